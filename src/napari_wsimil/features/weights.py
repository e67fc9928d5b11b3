"""Encoder weights: reading a local weights file, loading it with strict checks, seeded random nets.

Every encoder has a ``version`` written into each feature bag, so that a bag made with other weights
is recognised as stale: the weights file's content hash (:func:`file_digest`) is part of it. Weights
come from a local file the user names (nothing can be downloaded). Shared by the concrete torch
encoders (ResNet, timm, SSL) and the registry, below all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .encoder_base import EncoderError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def file_digest(path: str | Path, length: int = 12) -> str:
    """Short SHA-256 of a file: different weights give a different encoder version."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file or of a ``torch.save``'d state dict (loaded with
    ``weights_only=True``, so a file cannot run code). Checkpoints that wrap the weights in
    ``{"state_dict": ...}`` or ``{"model": ...}`` and DataParallel's ``module.`` prefix are unwrapped."""
    import torch

    path = Path(path).expanduser()
    if path.is_dir():
        raise EncoderError(f"{path} is a folder: name the weights file in it (a folder with timm's "
                           "config.json is read by the timm encoders: --encoder timm --weights FOLDER)")
    if not path.is_file():
        raise EncoderError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "not a weights file"
        raise EncoderError(f"{path.name} ({path}) is not a readable weights file "
                           f"(.safetensors, or a torch state dict saved with torch.save): {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"{path.name} ({path}) does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_weights(module: torch.nn.Module, path: str | Path, ignorable: tuple[str, ...] = (), *,
                 state: Mapping[str, Any] | None = None, assign: bool = False) -> None:
    """Load ``path`` into ``module`` with strict key and shape checking and a one-line readable error.

    Keys starting with one of ``ignorable`` may be present in the file and absent from the module
    (a full ResNet-50 file loaded into the truncated trunk, a classifier head). ``state`` is the
    file's content when the caller has read it already (``path`` then only names it in messages).
    ``assign`` hands the file's tensors to the module instead of copying them, for a module built on
    the ``meta`` device (no memory or time spent on a random initialisation the file overwrites);
    they are cast to the module's dtypes first.
    """
    path = Path(path).expanduser()
    state = dict(read_state_dict(path) if state is None else state)
    state = {k: v for k, v in state.items() if not (ignorable and k.startswith(ignorable))}
    own = module.state_dict()
    for k in set(own) - set(state):
        if k.endswith("num_batches_tracked"):  # files from torch < 0.4.1 lack this counter (not a weight)
            state[k] = own[k] if own[k].device.type != "meta" else _zeros_cpu(own[k])
    order = {k: i for i, k in enumerate(own)}
    for i, k in enumerate(state):
        order.setdefault(k, len(own) + i)

    def telling_first(keys: set[str]) -> list[str]:
        """Shallow keys first (``pos_embed``, ``fc.weight``, ``conv1.weight`` name the width or the
        architecture at a glance), then the module's own order."""
        return sorted(keys, key=lambda k: (k.count("."), order[k]))

    missing = telling_first(set(own) - set(state))
    unexpected = telling_first(set(state) - set(own))
    wrong = telling_first({k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)})
    if missing or unexpected or wrong:
        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        parts = []
        if wrong:
            parts.append(f"{len(wrong)} of another shape (file vs model): " + listing(
                [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]))
        if missing:
            parts.append(f"{len(missing)} missing: {listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
        text = (f"{path.name} ({path}) does not fit {type(module).__name__}: " + "; ".join(parts)
                + ". Is it weights for another architecture?")
        raise EncoderError(" ".join(text.split()))  # one line, whatever the key names hold
    if assign:
        state = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
    else:
        module.load_state_dict(state, strict=True)


def _zeros_cpu(t: torch.Tensor) -> torch.Tensor:
    """A zero tensor of ``t``'s shape and dtype on the CPU (``t`` may live on the meta device)."""
    import torch

    return torch.zeros(t.shape, dtype=t.dtype)


def seeded_init(factory: Callable[[], Any], seed: int = 0) -> Any:
    """Build a module with a fixed seed, leaving the global RNG as it was.

    Random-weight encoders must be the *same* network in every process: a cohort run that stops and
    resumes would otherwise mix features of two different random nets under one version string.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


__all__ = ["file_digest", "load_weights", "read_state_dict", "seeded_init"]

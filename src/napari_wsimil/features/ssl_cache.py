"""The cache of self-supervised encoders trained on a cohort's own patches (``ssl-ae``, ``ssl-simclr``).

Why a cache keyed by data *and* settings: training takes minutes to a quarter of an hour on a CPU,
so a second request for the same encoder must load, not retrain; but an encoder trained on other
patches or with other settings is another encoder, and must never be taken for this one. The key is
a hash of the encoder name, its training settings and the SHA-256 of the patch set (shape, dtype and
bytes), so equal inputs find the file and anything else trains anew beside it.

Layout, in the cache folder (``<project>/features/ssl`` for a project)::

    <name>-<key>.safetensors        the trunk's weights (what ``build_encoder(name, weights=...)`` loads)
    <name>-<key>.json               settings, data digest, losses, the encoder version
    <name>-<key>.ckpt.safetensors   while training: the last finished epoch (resumes after a kill)

Atomicity: files are only ever written whole (:mod:`napari_wsimil.io.atomic`: temporary file, fsync,
rename); the weights only at the end of training, after a first JSON (which the builder reads) and
before the JSON that adds the version. A run killed or failing at any point leaves no weights file,
at most a checkpoint that the next run with the same key resumes from. An entry is a cache hit only
when both files exist.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .encoder_base import TorchEncoder

#: ``progress(epoch, epochs, loss)``, called after each epoch: the convention every SSL trainer follows.
Progress = Callable[[int, int, float], None]


def patch_set_digest(patches: np.ndarray) -> str:
    """SHA-256 (hex, 16 chars) of a patch array: its shape, dtype and bytes, in order."""
    h = hashlib.sha256()
    arr = np.ascontiguousarray(patches)
    h.update(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()[:16]


def cache_key(name: str, settings: Mapping[str, Any], data_digest: str) -> str:
    """12 hex chars naming one (encoder, settings, data) combination."""
    blob = json.dumps({"name": name, "settings": dict(settings), "data": data_digest}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CacheEntry:
    """The files of one cached encoder."""

    weights: Path

    @property
    def meta(self) -> Path:
        return self.weights.with_suffix(".json")

    @property
    def checkpoint(self) -> Path:
        return self.weights.with_name(self.weights.stem + ".ckpt.safetensors")

    def exists(self) -> bool:
        return self.weights.is_file() and self.meta.is_file()

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text()) if self.meta.is_file() else {}


def cache_entry(folder: str | Path, name: str, key: str) -> CacheEntry:
    return CacheEntry(Path(folder) / f"{name}-{key}.safetensors")


def save_trunk(module: torch.nn.Module, entry: CacheEntry, build: Callable[[Path], TorchEncoder],
               meta: Mapping[str, Any]) -> TorchEncoder:
    """Write ``module``'s weights (safetensors, atomically), then its JSON with the final version;
    return the encoder reloaded from the file, so that what is returned is what later runs load."""
    from safetensors.torch import save

    from ..io.atomic import write_bytes, write_text

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    write_text(entry.meta, json.dumps(dict(meta), indent=1, default=str))  # the builder reads it (width)
    write_bytes(entry.weights, save(state))
    loaded = build(entry.weights)
    write_text(entry.meta, json.dumps({**meta, "version": loaded.version}, indent=1, default=str))
    return loaded


def cached_encoder(
    folder: str | Path,
    name: str,
    patches: np.ndarray,
    settings: Mapping[str, Any],
    train: Callable[[np.ndarray, CacheEntry], tuple[torch.nn.Module, list[float]]],
    build: Callable[[Path], TorchEncoder],
    retrain: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> TorchEncoder:
    """The encoder ``name`` trained with ``settings`` on ``patches``: loaded from ``folder`` when it was
    trained before, else trained by ``train(patches, entry)`` (which returns the trunk and the loss per
    epoch, and may keep a checkpoint at ``entry.checkpoint``) and saved there."""
    digest = patch_set_digest(patches)
    entry = cache_entry(folder, name, cache_key(name, settings, digest))
    if entry.exists() and not retrain:
        return build(entry.weights)
    if retrain:
        entry.checkpoint.unlink(missing_ok=True)
    module, losses = train(patches, entry)
    info = {"name": name, **dict(settings), "data_digest": digest, "n_patches": int(len(patches)),
            "patch_shape": list(patches.shape[1:]), "losses": [round(float(v), 6) for v in losses],
            **dict(meta or {})}
    encoder = save_trunk(module, entry, build, info)
    entry.checkpoint.unlink(missing_ok=True)
    return encoder


# --- epoch checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    """One safetensors file (written atomically) holding the tensors and ``info`` as JSON metadata."""
    from safetensors.torch import save

    from ..io.atomic import write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(path, save(state, metadata={"info": json.dumps(dict(info), default=str)}))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and info of a checkpoint, or None when there is none or it cannot be read (a
    checkpoint is an optimisation: a bad one means starting over, not failing)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            info = json.loads((fh.metadata() or {}).get("info", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception:  # noqa: BLE001
        return None
    return tensors, info


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimiser's per-parameter state as flat named tensors (safetensors holds tensors only)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for idx, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{idx}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def restore_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors` (the parameter groups come from ``opt`` as built)."""
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


__all__ = ["CacheEntry", "Progress", "cache_entry", "cache_key", "cached_encoder", "load_checkpoint",
           "optimizer_tensors", "patch_set_digest", "restore_optimizer", "save_checkpoint", "save_trunk"]

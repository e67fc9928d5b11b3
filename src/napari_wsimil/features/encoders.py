"""Patch encoders: a registry of named builders, and the ``Encoder`` interface extraction relies on.

Every encoder has a ``name`` and a ``version``; both are written into each feature bag so that a bag
made with other weights, or by an older feature definition, is recognised as stale and recomputed
instead of silently mixed with new ones. Weights come from a local file the user names (nothing can
be downloaded); the file's content hash is part of the version.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import WsimilError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ImageNet channel statistics, which every ImageNet-pretrained trunk expects its input scaled by.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(WsimilError):
    """An encoder cannot be built: unknown name, missing or mismatched weights file."""


class Encoder(ABC):
    """Maps a batch of RGB patches ``(B, P, P, 3) uint8`` to features ``(B, dim) float32``.

    Subclasses set ``name``, ``version`` and ``dim`` and implement :meth:`encode`. ``to`` moves the
    encoder to a device where that means anything (torch encoders); the others ignore it.
    """

    name: str = "encoder"
    version: str = "0"
    dim: int = 0
    device: str = "cpu"

    @abstractmethod
    def encode(self, patches: np.ndarray) -> np.ndarray:
        """Features of a batch of patches, one row per patch."""

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        return self.encode(patches)

    def to(self, device: str) -> Encoder:
        self.device = resolve_device(device)
        return self

    @property
    def identity(self) -> dict[str, Any]:
        """What a bag records about the encoder that made it."""
        return {"encoder": self.name, "encoder_version": self.version, "dim": int(self.dim)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} v{self.version} dim={self.dim} on {self.device}>"


def resolve_device(device: str | None) -> str:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else is passed through to torch."""
    if device in (None, "auto"):
        try:
            import torch
        except ImportError:
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    return str(device)


class TorchEncoder(Encoder):
    """A torch module over normalised patches, run in inference mode.

    ``mean``/``std`` are the channel statistics (0-1 scale) the network was trained with: ImageNet's
    by default, but a foundation model's ``config.json`` may name others, and a network fed the
    wrong statistics encodes shifted colours. ``input_size`` resizes patches first (CLAM feeds 224 px;
    a ViT needs the size its position embedding was trained for) with ``interpolation`` ("bilinear"
    or "bicubic", antialiased); None keeps the patch size, which a global-pooled CNN accepts as is.
    On CUDA the forward pass runs in float16 autocast when ``half`` is set: the features are pooled
    averages, which half precision keeps to ~1e-3.
    """

    def __init__(self, module: torch.nn.Module, name: str, version: str, dim: int, *,
                 input_size: int | None = None, device: str = "cpu", half: bool = False,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD, interpolation: str = "bilinear"):
        import torch

        if interpolation not in ("bilinear", "bicubic"):
            raise EncoderError(f"interpolation must be bilinear or bicubic, got {interpolation!r}")
        self.module = module.eval()
        self.name, self.version, self.dim = name, version, int(dim)
        self.input_size = input_size
        self.half = half
        self.interpolation = interpolation
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._mean = torch.tensor(self.mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.std).view(1, 3, 1, 1) * 255.0
        self.to(device)

    def to(self, device: str) -> TorchEncoder:
        self.device = resolve_device(device)
        self.module.to(self.device)
        self._mean = self._mean.to(self.device)
        self._std = self._std.to(self.device)
        return self

    def preprocess(self, patches: np.ndarray) -> torch.Tensor:
        """uint8 (B, P, P, 3) → normalised float (B, 3, S, S) on the encoder's device."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(patches))
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                              antialias=True, align_corners=False)
        return (x - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module on a preprocessed batch (what the benchmark times as "forward alone")."""
        import torch

        with torch.inference_mode():
            if self.half and self.device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.float16):
                    return self.module(x).float()
            return self.module(x)

    def encode(self, patches: np.ndarray) -> np.ndarray:
        if len(patches) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.forward(self.preprocess(patches)).float().cpu().numpy()


# --- weights --------------------------------------------------------------------------------------

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


# --- registry -------------------------------------------------------------------------------------

Builder = Callable[..., Encoder]


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: how to build it and what it says about itself before being built.

    ``source`` says where it comes from: "builtin", or the distribution (package) whose
    ``napari_wsimil.encoders`` entry point registered it.
    """

    name: str
    builder: Builder
    description: str
    takes_weights: bool = False
    source: str = "builtin"


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(name: str, builder: Builder, description: str = "", takes_weights: bool = False) -> None:
    """Add (or replace) an encoder; ``builder(weights=None, device="auto", **options) -> Encoder``."""
    _REGISTRY[name] = EncoderSpec(name, builder, description, takes_weights)


def available_encoders() -> dict[str, EncoderSpec]:
    """Every encoder by name: the built-in ones, ``timm:ARCH`` for the architectures built without
    timm, and those other packages register under the ``napari_wsimil.encoders`` entry-point group
    (loaded on the first call; :func:`refresh_encoders` looks again)."""
    _ensure_registry()
    return dict(_REGISTRY)


def refresh_encoders() -> dict[str, EncoderSpec]:
    """Forget the entry-point encoders found so far and look for them again.

    For a package installed (or a folder put on ``sys.path``) after the first look: the entry points
    themselves are read afresh each time, only this registry remembers.
    """
    global _PLUGINS_DONE
    for name in [n for n, spec in _REGISTRY.items() if spec.source != "builtin"]:
        del _REGISTRY[name]
    _BROKEN_PLUGINS.clear()
    _PLUGINS_DONE = False
    return available_encoders()


def build_encoder(name: str, weights: str | Path | None = None, device: str = "auto",
                  **options: Any) -> Encoder:
    """The encoder registered as ``name``, with weights from a local file where it takes any.

    ``timm:ARCH`` builds any architecture of timm's registry when timm imports, and those of
    :mod:`.timm_encoders` without it; ``timm`` alone takes the architecture from ``weights``, a
    folder holding timm's ``config.json``.
    """
    if isinstance(name, Encoder):
        return name
    _register_builtins()
    _register_timm()
    spec = _REGISTRY.get(name)
    if spec is None:  # plugins are imported only when a name is not a built-in one
        _register_plugins()
        spec = _REGISTRY.get(name)
    if spec is None and name.startswith(TIMM_PREFIX + ":"):
        from .timm_encoders import build_timm_encoder

        return build_timm_encoder(name[len(TIMM_PREFIX) + 1:], weights=weights, device=device, **options)
    if spec is None:
        if name in _BROKEN_PLUGINS:
            raise EncoderError(f"encoder {name!r} could not be loaded: {_BROKEN_PLUGINS[name]}")
        raise EncoderError(f"no encoder named {name!r}; choose one of {', '.join(sorted(_REGISTRY))}, "
                           f"or {TIMM_PREFIX}:ARCH (see `wsimil encoders`)")
    return spec.builder(weights=weights, device=device, **options)


def _resnet_builder(arch: str) -> Builder:
    def build(weights: str | Path | None = None, device: str = "auto", input_size: int | None = None,
              half: bool = False) -> Encoder:
        from . import resnet

        factory = {"resnet18": resnet.resnet18, "resnet50": resnet.resnet50,
                   "resnet50-trunc": resnet.resnet50_trunc}[arch]
        if weights is not None:
            module = factory()
            load_weights(module, weights, ignorable=module.ignorable_keys())
            version = f"1+{file_digest(weights)}"
        else:
            module = seeded_init(factory)  # a fixed random net: a baseline, the same in every run
            version = "1+random0"
        return TorchEncoder(module, arch, version, module.out_dim, input_size=input_size, device=device,
                            half=half)

    return build


def _handcrafted_builder(weights: str | Path | None = None, device: str = "auto", **options: Any) -> Encoder:
    from .handcrafted import HandcraftedEncoder

    if weights is not None:
        raise EncoderError("the handcrafted encoder takes no weights file")
    return HandcraftedEncoder(**options)


def _ssl_builder(weights: str | Path | None = None, device: str = "auto", **options: Any) -> Encoder:
    from .ssl import build_ssl_encoder

    return build_ssl_encoder(weights, device=device, **options)


_BUILTINS_DONE = False


def _register_builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    for name, text in (
        ("resnet18", "ResNet-18 trunk, 512-d (torchvision weights file)"),
        ("resnet50", "ResNet-50 trunk, 2048-d (torchvision weights file)"),
        ("resnet50-trunc",
         "ResNet-50 up to layer3, 1024-d: CLAM's default (torchvision ResNet-50 weights file)"),
    ):
        _REGISTRY.setdefault(name, EncoderSpec(name, _resnet_builder(name), text, takes_weights=True))
    _REGISTRY.setdefault("ssl-ae", EncoderSpec(
        "ssl-ae", _ssl_builder, "compact CNN auto-encoder trained on the project's own patches, 128-d "
        "(features.ssl.project_ssl_encoder makes its weights file)", takes_weights=True))
    _REGISTRY.setdefault("handcrafted", EncoderSpec(
        "handcrafted", _handcrafted_builder, "stain histograms (HED, HSV) + gradient and LBP texture, 76-d"))
    from .handcrafted_v2 import DIM, build_handcrafted_v2
    from .simclr import build_simclr_encoder

    _REGISTRY.setdefault("handcrafted-v2", EncoderSpec(
        "handcrafted-v2", build_handcrafted_v2, f"stain, nuclear size/shape/density (haematoxylin) and "
        f"multi-scale texture (LBP, GLCM), {DIM}-d; option mpp: the patches' µm/px (default 0.5)"))
    _REGISTRY.setdefault("ssl-simclr", EncoderSpec(
        "ssl-simclr", build_simclr_encoder, "small ResNet trained contrastively (SimCLR) on the cohort's own "
        "patches, 256-d (features.simclr.project_simclr_encoder makes its weights file)", takes_weights=True))


# --- timm architectures and entry-point plugins ---------------------------------------------------
# Kept apart from _register_builtins: these are found (timm) or loaded (plugins) rather than listed.

#: ``timm:ARCH`` names a timm architecture; ``timm`` alone reads it from a weights folder's config.json.
TIMM_PREFIX = "timm"
_PLUGINS_DONE = False
_TIMM_DONE = False
#: Entry-point encoders that failed to load: name → why (build_encoder repeats it).
_BROKEN_PLUGINS: dict[str, str] = {}


def _ensure_registry() -> None:
    _register_builtins()
    _register_timm()
    _register_plugins()


def _register_timm() -> None:
    global _TIMM_DONE
    if _TIMM_DONE:
        return
    _TIMM_DONE = True
    from .timm_encoders import LISTED, timm_builder

    _REGISTRY.setdefault(TIMM_PREFIX, EncoderSpec(
        TIMM_PREFIX, timm_builder(None), "a timm model from a folder holding config.json and "
        "model.safetensors or pytorch_model.bin (as saved from the Hugging Face hub): --weights FOLDER",
        takes_weights=True))
    for arch, text in LISTED.items():
        name = f"{TIMM_PREFIX}:{arch}"
        _REGISTRY.setdefault(name, EncoderSpec(name, timm_builder(arch), text, takes_weights=True))


def _register_plugins() -> None:
    global _PLUGINS_DONE
    if _PLUGINS_DONE:
        return
    _PLUGINS_DONE = True
    from .plugins import discover_encoders

    specs, broken = discover_encoders(reserved=set(_REGISTRY))
    for spec in specs:
        _REGISTRY[spec.name] = spec
    _BROKEN_PLUGINS.update(broken)


__all__ = [
    "Encoder", "TorchEncoder", "EncoderError", "EncoderSpec", "IMAGENET_MEAN", "IMAGENET_STD",
    "available_encoders", "build_encoder", "register_encoder", "load_weights", "read_state_dict",
    "resolve_device", "file_digest", "seeded_init", "refresh_encoders", "TIMM_PREFIX",
]

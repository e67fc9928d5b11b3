"""What every patch encoder is built on: the ``Encoder`` interface, the torch wrapper and the spec type.

Why a module of its own: the concrete encoders (handcrafted, SSL, timm, plugins) subclass these and
the registry (:mod:`.encoders`) imports the concrete encoders to build them; with the base types here,
below both, the imports within ``features`` run one way. :mod:`.encoders` re-exports every name, so
``napari_wsimil.features.encoders.Encoder`` stays what a plugin subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
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


__all__ = ["Builder", "Encoder", "EncoderError", "EncoderSpec", "IMAGENET_MEAN", "IMAGENET_STD", "TorchEncoder",
           "resolve_device"]

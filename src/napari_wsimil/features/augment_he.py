"""Batched H&E augmentations in torch, for self-supervised training (:mod:`.simclr`).

Why these: a contrastive encoder learns what the augmentations leave unchanged. H&E patches of one
tissue vary in stain amount (lab, scanner, section thickness), orientation (a section has no "up"),
focus and exposure, so those are randomised: stain jitter in HED space (colour deconvolution with
the fixed Ruifrok-Johnston matrix that :func:`skimage.color.rgb2hed` uses), 90° rotations and flips,
Gaussian blur, a random crop with a mild magnification jitter, brightness and contrast. What is left
for the encoder to tell patches apart by is tissue architecture and nuclear morphology.

Why batched torch: on 2 CPU cores a per-image PIL/skimage pipeline costs more than the network; here
one ``grid_sample`` does crop + rotation + flip + resize for the whole batch, and the stain jitter is
two 3x3 channel mixes. Every random number comes from the ``torch.Generator`` passed in (drawn on the
CPU), so a run is reproducible from its seed and resumes exactly from a saved generator state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

_LOG_FLOOR = math.log(1e-6)  # rgb2hed's floor: optical density = log(max(rgb, 1e-6)) / log(1e-6)


def _hed_matrices(device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(HED from OD, OD from HED) as float32 tensors: rows of the second are the stain vectors."""
    import torch

    from .handcrafted_v2 import HED_FROM_RGB, RGB_FROM_HED

    return (torch.as_tensor(HED_FROM_RGB, dtype=torch.float32, device=device),
            torch.as_tensor(RGB_FROM_HED, dtype=torch.float32, device=device))


def rgb_to_hed_t(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (B, 3, H, W) → stain densities H, E, D (B, 3, H, W), not clipped (so that the
    round trip through :func:`hed_to_rgb_t` is exact)."""
    import torch

    to_hed, _ = _hed_matrices(x.device)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_FLOOR
    return torch.einsum("bchw,ck->bkhw", od, to_hed)


def hed_to_rgb_t(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed_t`; values above 1 (negative density) are clipped to 1."""
    import torch

    _, to_od = _hed_matrices(hed.device)
    od = torch.einsum("bkhw,kc->bchw", hed, to_od)
    return torch.exp(od * _LOG_FLOOR).clamp(0.0, 1.0)


@dataclass(frozen=True)
class HEAugment:
    """One random view per input patch. Strengths of 0 switch a step off; the defaults are what
    :mod:`.simclr` trains with (on PCam, a third of or twice the stain jitter probed the same).

    * ``size``: output side in px; the source square is ``size * m`` px with the magnification jitter
      ``m`` log-uniform in ``scale`` (clamped to the patch), at a uniform random position;
    * ``rotate``/``flip``: a random multiple of 90° and a random mirror (exact: pixel centres map to
      pixel centres when ``m`` is 1);
    * ``hed_scale``/``hed_shift``: each of H, E, D is multiplied by U(1-s, 1+s) and shifted by U(-t, t)
      (densities; haematoxylin in nuclei is about 0.05-0.15);
    * ``brightness``/``contrast``: add U(-b, b); scale deviations from the patch mean by U(1-c, 1+c);
    * ``blur_p``/``blur_sigma``: with probability p a Gaussian blur of sigma U(lo, hi) px;
    * ``grey_p``: with probability p the view is made grey (a push away from colour-only cues).
    """

    size: int = 64
    scale: tuple[float, float] = (0.8, 1.25)
    rotate: bool = True
    flip: bool = True
    hed_scale: float = 0.15
    hed_shift: float = 0.015
    brightness: float = 0.1
    contrast: float = 0.15
    blur_p: float = 0.4
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    grey_p: float = 0.1

    def settings(self) -> dict[str, Any]:
        """Plain values for a cache key or a JSON file."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    # --- the steps, each batched ------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x``: float (B, 3, H, W) in [0, 1] on any device → float32 (B, 3, size, size) in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
        x = x.float()
        x = self.geometry(x, generator)
        x = self.stain(x, generator, self.hed_scale, self.hed_shift)
        x = self.light(x, generator)
        x = self.blur(x, generator)
        x = self.grey(x, generator)
        return x.clamp(0.0, 1.0)

    def geometry(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Crop (with magnification jitter), rotate by k·90°, mirror, resample to ``size``: one affine
        ``grid_sample`` for the batch."""
        import torch
        import torch.nn.functional as F

        b, _, h, w = x.shape
        lo, hi = self.scale
        u = torch.rand(b, 3, generator=g)
        m = torch.exp(math.log(lo) + u[:, 0] * (math.log(hi) - math.log(lo)))  # log-uniform in [lo, hi]
        side = torch.clamp(self.size * m, max=float(min(h, w)))  # source square, px
        # centre in normalised coordinates, keeping the square inside the patch
        cx = (u[:, 1] * 2 - 1) * (1 - side / w)
        cy = (u[:, 2] * 2 - 1) * (1 - side / h)
        k = torch.randint(0, 4, (b,), generator=g) if self.rotate else torch.zeros(b, dtype=torch.long)
        mirror = torch.rand(b, generator=g) < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[k]
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[k]
        sx = torch.where(mirror, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = cos * sx * side / w
        theta[:, 0, 1] = -sin * side / w
        theta[:, 1, 0] = sin * sx * side / h
        theta[:, 1, 1] = cos * side / h
        theta[:, 0, 2] = cx
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta.to(x.device), [b, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def stain(x: torch.Tensor, g: torch.Generator, scale: float, shift: float) -> torch.Tensor:
        """HED jitter: densities × U(1-scale, 1+scale) + U(-shift, shift), per image and stain.
        At zero strength it returns ``x`` itself (not a round trip through logarithms)."""
        import torch

        if scale <= 0 and shift <= 0:
            return x
        b = x.shape[0]
        alpha = 1 + (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * scale
        beta = (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * shift
        hed = rgb_to_hed_t(x)
        return hed_to_rgb_t(hed * alpha.to(x.device) + beta.to(x.device))

    def light(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        import torch

        if self.brightness <= 0 and self.contrast <= 0:
            return x
        b = x.shape[0]
        bright = (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * self.brightness
        con = 1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * self.contrast
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * con.to(x.device) + mean + bright.to(x.device)

    def blur(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Per-image Gaussian blur as one grouped convolution (images left sharp get a delta kernel)."""
        import torch
        import torch.nn.functional as F

        b, c, h, w = x.shape
        on = torch.rand(b, generator=g) < self.blur_p
        lo, hi = self.blur_sigma
        sigma = lo + torch.rand(b, generator=g) * (hi - lo)
        if self.blur_p <= 0 or not bool(on.any()):
            return x
        radius = max(1, math.ceil(2.5 * hi))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kern = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
        kern = kern / kern.sum(1, keepdim=True)
        delta = (t == 0).float().expand(b, -1)
        kern = torch.where(on[:, None], kern, delta).repeat_interleave(c, 0).to(x.device)  # (B*C, K)
        y = x.reshape(1, b * c, h, w)
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kern[:, None, None, :], groups=b * c)
        y = F.conv2d(y, kern[:, None, :, None], groups=b * c)
        return y.reshape(b, c, h, w)

    def grey(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        import torch

        on = torch.rand(x.shape[0], generator=g) < self.grey_p
        if self.grey_p <= 0 or not bool(on.any()):
            return x
        lum = torch.tensor([0.2125, 0.7154, 0.0721], device=x.device).view(1, 3, 1, 1)
        grey = (x * lum).sum(1, keepdim=True).expand_as(x)
        return torch.where(on.to(x.device).view(-1, 1, 1, 1), grey, x)


def to_float_batch(patches: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) → float32 (B, 3, H, W) in [0, 1] on ``device``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(patches)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


__all__ = ["HEAugment", "hed_to_rgb_t", "rgb_to_hed_t", "to_float_batch"]

"""Pinchaud's augmentation: rotation, mirroring, elastic deformation and colour jitter, on the device.

Geometric transforms move images, labels, tissue and soft targets together (labels by nearest neighbour,
so classes stay classes); colour jitter touches the image only. Everything is drawn from the generator
passed in, so an epoch's augmentation is reproducible from the engine's per-epoch seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotate: bool = True  # any angle (reflection padding), plus the 8 flips/quarter turns
    elastic_alpha: float = 6.0  # displacement in px; 0 turns elastic deformation off
    elastic_sigma: float = 8.0  # smoothness of the displacement field in px
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.03


def _smooth(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=noise.dtype, device=noise.device)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    c = noise.shape[1]
    noise = F.conv2d(F.pad(noise, (r, r, 0, 0), mode="reflect"), k.expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(noise, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def augment(x: torch.Tensor, targets: list[torch.Tensor], gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``x`` (B, 3, H, W) float in [0, 1]; ``targets`` (B, H, W) tensors of any dtype (labels with -1,
    tissue, soft targets with NaN). Returns the augmented image and targets."""
    b, _, h, w = x.shape
    dev = x.device
    # flips and quarter turns (exact, no interpolation) ---------------------------------------------------
    k = int(torch.randint(4, (1,), generator=gen))
    flip = bool(torch.randint(2, (1,), generator=gen))
    def geo(t: torch.Tensor) -> torch.Tensor:
        t = torch.rot90(t, k, dims=(-2, -1))
        return torch.flip(t, dims=(-1,)) if flip else t
    x = geo(x)
    targets = [geo(t) for t in targets]
    h, w = x.shape[-2:]
    # small rotation + elastic field, one resampling ----------------------------------------------------
    theta = torch.zeros(b, device=dev)
    if cfg.rotate:
        theta = (torch.rand(b, generator=gen) * 2 - 1).to(dev) * (torch.pi / 4)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev),
                            indexing="ij")
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    gx = cos * xs - sin * ys
    gy = sin * xs + cos * ys
    if cfg.elastic_alpha > 0:
        noise = (torch.rand(b, 2, h, w, generator=gen) * 2 - 1).to(dev)
        d = _smooth(noise, cfg.elastic_sigma)
        d = d / (d.abs().amax(dim=(2, 3), keepdim=True) + 1e-8) * cfg.elastic_alpha
        gx = gx + d[:, 0] * 2 / w
        gy = gy + d[:, 1] * 2 / h
    grid = torch.stack([gx, gy], -1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    out_t = []
    for t in targets:
        ft = t.float()[:, None]
        warped = F.grid_sample(ft, grid, mode="nearest", padding_mode="reflection", align_corners=True)[:, 0]
        out_t.append(warped.to(t.dtype) if t.dtype != torch.float32 else warped)
    # colour jitter -------------------------------------------------------------------------------------
    def u(scale: float) -> torch.Tensor:
        return ((torch.rand(b, generator=gen) * 2 - 1) * scale).to(dev).view(b, 1, 1, 1)
    x = x * (1 + u(cfg.brightness))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + u(cfg.contrast)) + mean
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * (1 + u(cfg.saturation)) + grey
    if cfg.hue > 0:  # a small rotation of the chroma plane around the grey axis
        a = u(cfg.hue).view(b) * 2 * torch.pi
        c, s = torch.cos(a), torch.sin(a)
        k3 = 1 / 3 ** 0.5
        # Rodrigues' rotation about (1,1,1)/sqrt(3)
        kx = torch.tensor([[0, -k3, k3], [k3, 0, -k3], [-k3, k3, 0]], device=dev)
        eye = torch.eye(3, device=dev)
        kk = torch.full((3, 3), 1 / 3, device=dev)
        rot = c.view(b, 1, 1) * eye + s.view(b, 1, 1) * kx + (1 - c).view(b, 1, 1) * kk
        x = torch.einsum("bij,bjhw->bihw", rot, x)
    return x.clamp_(0, 1), out_t


__all__ = ["AugmentConfig", "augment"]

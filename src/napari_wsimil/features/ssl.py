"""A self-supervised default encoder: a compact CNN trained as an auto-encoder on the project's own patches.

Why: no pretrained weights can be downloaded here, and random-weight ResNets encode little. A small
CNN that learned to reconstruct *this* cohort's patches (stain, scanner, tissue types) gives features
that follow its real variation, in minutes on a CPU (Pinchaud et al. pre-train their network the same
way). The trained weights are cached per project, keyed by the sampled patches and the settings
(``features/ssl/ssl-ae-<key>.safetensors`` with a JSON beside it; :mod:`.ssl_cache`, shared with
``ssl-simclr``) and load as any encoder would: ``build_encoder("ssl-ae", weights=that_file)``. The
version is the file's hash, so retraining makes every bag of the old encoder stale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .encoder_base import EncoderError, TorchEncoder
from .weights import file_digest, load_weights, seeded_init

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..slide import Slide

NAME = "ssl-ae"


def _cnn(width: int = 32) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Encoder (4 strided conv blocks, /16, ``4*width`` channels) and its mirror decoder."""
    from torch import nn

    def down(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def up(cin: int, cout: int, last: bool = False) -> nn.Module:
        layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(cin, cout, 3, padding=1)]
        if not last:
            layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)

    w = width
    encoder = nn.Sequential(down(3, w), down(w, 2 * w), down(2 * w, 4 * w), down(4 * w, 4 * w))
    decoder = nn.Sequential(up(4 * w, 4 * w), up(4 * w, 2 * w), up(2 * w, w), up(w, 3, last=True))
    return encoder, decoder


class CompactCNN:
    """Builds the trunk module: the encoder convolutions then a global average pool → ``4*width``-d."""

    @staticmethod
    def trunk(width: int = 32) -> torch.nn.Module:
        from torch import nn

        encoder, _ = _cnn(width)
        return nn.Sequential(encoder, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def build_ssl_encoder(weights: str | Path | None = None, device: str = "auto", width: int | None = None,
                      **_: Any) -> TorchEncoder:
    """The registered builder: loads a trained trunk (its JSON gives the width), else a random one."""
    if weights is not None:
        meta_path = Path(weights).with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        width = int(width or meta.get("width", 32))
        module = CompactCNN.trunk(width)
        load_weights(module, weights)
        version = f"1+{file_digest(weights)}"
    else:
        w = int(width or 32)
        module = seeded_init(lambda: CompactCNN.trunk(w))
        width, version = w, "1+random0"
    return TorchEncoder(module, NAME, version, 4 * width, device=device)


def sample_patches(slides: Sequence[Slide], n: int, patch_size: int, mpp: float, seed: int = 0,
                   min_tissue: float = 0.5) -> np.ndarray:
    """``n`` tissue patches drawn evenly across ``slides`` (fewer if the slides have fewer)."""
    from ..slide import PatchReader, patch_grid

    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    per_slide = -(-n // max(len(slides), 1))
    for slide in slides:
        grid = patch_grid(slide, patch_size, mpp, min_tissue=min_tissue)
        if len(grid) == 0:
            continue
        pick = np.sort(rng.choice(len(grid), size=min(per_slide, len(grid)), replace=False))
        with PatchReader(slide, grid.subset(pick), batch_size=64) as reader:
            out += [p for _, p in reader]
    if not out:
        raise EncoderError("no tissue patches to train the self-supervised encoder on")
    return np.concatenate(out)[:n]


def train_ssl_encoder(
    patches: np.ndarray,
    epochs: int = 10,
    batch_size: int = 64,
    width: int = 32,
    lr: float = 1e-3,
    device: str = "auto",
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[TorchEncoder, list[float]]:
    """Train the auto-encoder (L2 reconstruction, random flips and 90° rotations) on uint8 patches
    ``(N, P, P, 3)`` with P a multiple of 16; returns the trunk as an encoder and the loss per epoch.
    ``progress(epoch, epochs, loss)`` after each epoch."""
    import torch
    from torch import nn

    if patches.ndim != 4 or patches.shape[1] % 16 or patches.shape[2] % 16:
        raise ValueError(f"patches must be (N, P, P, 3) with P a multiple of 16, got {patches.shape}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    encoder, decoder = _cnn(width)
    enc = TorchEncoder(nn.Sequential(encoder, nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), NAME, "training",
                       4 * width, device=device)
    decoder.to(enc.device)
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    for epoch in range(epochs):
        encoder.train()
        decoder.train()
        order = rng.permutation(len(patches))
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            x = enc.preprocess(patches[idx])
            x = torch.rot90(x, int(rng.integers(4)), dims=(2, 3))
            if rng.random() < 0.5:
                x = torch.flip(x, dims=(3,))
            loss = nn.functional.mse_loss(decoder(encoder(x)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
        if progress is not None:
            progress(epoch + 1, epochs, losses[-1])
    enc.module.eval()
    return enc, losses


def save_ssl_encoder(encoder: TorchEncoder, path: str | os.PathLike[str], **meta: Any) -> TorchEncoder:
    """Write the trunk (safetensors, atomically) and its JSON; return it reloaded with its final version."""
    from .ssl_cache import CacheEntry, save_trunk

    return save_trunk(encoder.module, CacheEntry(Path(path)),
                      lambda p: build_ssl_encoder(p, device=encoder.device),
                      {"name": NAME, "width": encoder.dim // 4, **meta})


def project_ssl_encoder(project: Any, patch_size: int = 64, mpp: float = 1.0, n_patches: int = 2000,
                        epochs: int = 10, device: str = "auto", seed: int = 0, retrain: bool = False,
                        progress: Callable[[int, int, float], None] | None = None, width: int = 32,
                        batch_size: int = 64, lr: float = 1e-3) -> TorchEncoder:
    """The project's self-supervised encoder for these settings, trained on its slides the first time
    (or on ``retrain``) and loaded afterwards. It is cached in ``<project>/features/ssl`` keyed by the
    sampled patches and the settings (:mod:`.ssl_cache`): other slides or settings train another."""
    from .ssl_cache import cached_encoder

    slides = [project.open_slide(sid) for sid in project.slide_ids]
    patches = sample_patches(slides, n_patches, patch_size, mpp, seed=seed)
    settings = {"epochs": epochs, "batch_size": batch_size, "width": width, "lr": lr, "seed": seed}

    def train(p: np.ndarray, _entry: Any) -> tuple[torch.nn.Module, list[float]]:
        enc, losses = train_ssl_encoder(p, device=device, progress=progress, **settings)
        return enc.module, losses

    return cached_encoder(Path(project.features_dir) / "ssl", NAME, patches, settings, train,
                          lambda path: build_ssl_encoder(path, device=device), retrain=retrain,
                          meta={"patch_size": patch_size, "mpp": mpp, "slides": list(project.slide_ids)})


__all__ = ["NAME", "CompactCNN", "build_ssl_encoder", "project_ssl_encoder", "sample_patches",
           "save_ssl_encoder", "train_ssl_encoder"]

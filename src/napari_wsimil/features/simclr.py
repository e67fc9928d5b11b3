"""``ssl-simclr``: a contrastive (SimCLR, NT-Xent) encoder trained on the cohort's own patches.

Why: no pretrained weights can be downloaded here, and the auto-encoder (``ssl-ae``) learns to
reproduce colour and brightness, which is not what separates tumour from normal tissue. A SimCLR
encoder learns to recognise two differently augmented views of one patch among the other patches
of the batch; the augmentations (:mod:`.augment_he`: stain jitter in HED space, rotations, flips,
blur, crops with a mild magnification jitter, brightness/contrast) take away stain and orientation,
so what it keeps is architecture and nuclear morphology.

Model: a small ResNet (stem /2, four basic blocks of ``w, 2w, 4w, 8w`` channels, /16 overall, global
average pool; ``w = 32``: 1.2 M parameters, 256-d features) trained on 64 px views with a 2-layer
projection head (discarded after training). The trunk takes patches of any size at inference; give it
patches at the µm/px it was trained at (recorded in its JSON).

Budget: a step costs the same whatever the patch set, so time is views: with the defaults (64 px
views, width 32, batches of 256) 2 CPU cores ran ~320 views/s when the machine was otherwise idle
and 50-140 views/s when shared (the augmentations are ~5 % of it). The defaults of
:func:`project_simclr_encoder`, 8 000 patches x 8 epochs = 128 000 views, take ~7 min on 2 idle
cores; 20 000 patches fit in 15 min at ~7 epochs. The GPU is used when present (``device="auto"``,
bfloat16 autocast). On the CPU a run is deterministic from its seed (every random number comes from
one ``torch.Generator``), checkpointed after every epoch and resumed exactly after a kill; the
weights file appears only when training has finished (see :mod:`.ssl_cache`).

Measured (``benchmarks/bench_ssl_probe.py``, linear probe): trained on PCam's 3 964 train patches
(labels unused) for 15 epochs (as many views as the defaults), PCam valid patch AUC 0.87, the same
as ``handcrafted`` and below ``handcrafted-v2`` (0.88). Variations tried at that budget (temperature
0.2 or 0.1, weaker or stronger stain jitter, pooled stage-3 features) all gave 0.86-0.87; the loss
was still falling, so the budget, not the recipe, looks like the limit (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .augment_he import HEAugment, to_float_batch
from .encoder_base import IMAGENET_MEAN, IMAGENET_STD, EncoderError, TorchEncoder, resolve_device
from .ssl_cache import CacheEntry, Progress, cached_encoder, load_checkpoint, optimizer_tensors, \
    restore_optimizer, save_checkpoint
from .weights import file_digest, load_weights, seeded_init

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "ssl-simclr"
#: the architecture and training recipe; part of every version string
RECIPE = "1"


@dataclass(frozen=True)
class SimCLRSettings:
    """What a SimCLR training run depends on (all of it goes into the cache key)."""

    epochs: int = 8
    batch_size: int = 256
    width: int = 32
    proj_dim: int = 128
    temperature: float = 0.1
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    augment: HEAugment = field(default_factory=HEAugment)

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.settings()
        d["recipe"] = RECIPE
        return d


# --- model ---------------------------------------------------------------------------------------

def _block(cin: int, cout: int, stride: int) -> torch.nn.Module:
    from torch import nn

    class BasicBlock(nn.Module):
        """Two 3x3 convolutions with a shortcut (ResNet's basic block)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import torch

            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.down(x))

    return BasicBlock()


def backbone(width: int = 32) -> torch.nn.Module:
    """The trunk: (B, 3, P, P) ImageNet-normalised → (B, 8·width)."""
    from torch import nn

    w = width
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)),
        _block(w, w, 1), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def projection_head(dim: int, out: int) -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, out))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy: each of the 2B views must pick its partner out of
    the other 2B - 1 (cosine similarity / temperature)."""
    import torch
    import torch.nn.functional as F

    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


# --- encoder -------------------------------------------------------------------------------------

def build_simclr_encoder(weights: str | Path | None = None, device: str = "auto", width: int | None = None,
                         **_: Any) -> TorchEncoder:
    """The registered builder: a trained trunk (its JSON gives the width), else a fixed random one."""
    if weights is not None:
        meta_path = Path(weights).with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        w = int(width or meta.get("width", 32))
        module = backbone(w)
        load_weights(module, weights)
        version = f"{RECIPE}+{file_digest(weights)}"
    else:
        w = int(width or 32)
        module = seeded_init(lambda: backbone(w))
        version = f"{RECIPE}+random0"
    return TorchEncoder(module, NAME, version, 8 * w, device=device)


# --- training ------------------------------------------------------------------------------------

def train_simclr(
    patches: np.ndarray,
    settings: SimCLRSettings | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    checkpoint: Path | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Train on uint8 patches ``(N, P, P, 3)`` (P >= the view size); returns the trunk (in eval mode,
    on the CPU) and the mean loss per epoch. ``progress(epoch, epochs, loss)`` after each epoch. With
    ``checkpoint`` the state after each epoch is saved there and a run finding one (same settings and
    data: the caller keys the path) continues from it."""
    import torch

    s = settings or SimCLRSettings()
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError(f"patches must be uint8 (N, P, P, 3), got {patches.dtype} {patches.shape}")
    if len(patches) < 2:
        raise EncoderError(f"SimCLR needs at least 2 patches to contrast, got {len(patches)}")
    dev = resolve_device(device)
    cuda = dev.startswith("cuda")
    gen = torch.Generator().manual_seed(s.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        trunk = backbone(s.width)
        head = projection_head(8 * s.width, s.proj_dim)
    trunk.to(dev, memory_format=torch.channels_last)
    head.to(dev)
    params = list(trunk.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    batch = min(s.batch_size, len(patches))
    steps_per_epoch = max(1, len(patches) // batch)  # full batches only: equal-sized contrast sets
    total = steps_per_epoch * s.epochs
    warmup = max(1, int(s.warmup_epochs * steps_per_epoch))
    losses: list[float] = []
    start = 0
    if checkpoint is not None and (ck := load_checkpoint(checkpoint)) is not None:
        tensors, info = ck
        if info.get("epochs_done", 0) <= s.epochs and info.get("n", -1) == len(patches):
            trunk.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("trunk.")})
            head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
            restore_optimizer(opt, {k[4:]: v if k.endswith(".step") else v.to(dev)
                                    for k, v in tensors.items() if k.startswith("opt.")})
            gen.set_state(tensors["generator"])
            start, losses = int(info["epochs_done"]), list(info["losses"])

    def lr_at(step: int) -> float:
        if step < warmup:
            return s.lr * (step + 1) / warmup
        return s.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    for epoch in range(start, s.epochs):
        trunk.train()
        head.train()
        order = torch.randperm(len(patches), generator=gen).numpy()
        run = 0.0
        for i in range(steps_per_epoch):
            idx = np.sort(order[i * batch:(i + 1) * batch])
            x = to_float_batch(patches[idx], dev)
            views = torch.cat([s.augment(x, gen), s.augment(x, gen)])
            views = ((views - mean) / std).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                z = head(trunk(views))
            loss = nt_xent(z[:len(idx)], z[len(idx):], s.temperature)
            if not torch.isfinite(loss):
                raise EncoderError(f"SimCLR training diverged (loss {float(loss)}) at epoch {epoch + 1}; "
                                   "try a lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += float(loss.detach())
        losses.append(run / steps_per_epoch)
        if checkpoint is not None and epoch + 1 < s.epochs:
            tensors = {**{f"trunk.{k}": v for k, v in trunk.state_dict().items()},
                       **{f"head.{k}": v for k, v in head.state_dict().items()},
                       **{f"opt.{k}": v for k, v in optimizer_tensors(opt).items()},
                       "generator": gen.get_state()}
            info = {"epochs_done": epoch + 1, "losses": losses, "n": len(patches)}
            save_checkpoint(checkpoint, tensors, info)
        if progress is not None:
            progress(epoch + 1, s.epochs, losses[-1])
    trunk.to("cpu", memory_format=torch.contiguous_format)
    return trunk.eval(), losses


def simclr_encoder(
    patches: np.ndarray,
    folder: str | Path,
    settings: SimCLRSettings | None = None,
    device: str = "auto",
    retrain: bool = False,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
) -> TorchEncoder:
    """The SimCLR encoder of ``patches`` with ``settings``, cached in ``folder`` (see :mod:`.ssl_cache`):
    loaded when this data and these settings were trained on before, else trained (resuming a
    checkpoint left by a killed run) and saved."""
    s = settings or SimCLRSettings()

    def train(p: np.ndarray, entry: CacheEntry) -> tuple[torch.nn.Module, list[float]]:
        return train_simclr(p, s, device=device, progress=progress, checkpoint=entry.checkpoint)

    return cached_encoder(folder, NAME, patches, s.key(), train,
                          lambda path: build_simclr_encoder(path, device=device), retrain=retrain,
                          meta=meta)


def project_simclr_encoder(project: Any, patch_size: int = 96, mpp: float = 1.0, n_patches: int = 8000,
                           settings: SimCLRSettings | None = None, device: str = "auto", seed: int = 0,
                           retrain: bool = False, progress: Progress | None = None,
                           epochs: int | None = None) -> TorchEncoder:
    """The project's SimCLR encoder for ``n_patches`` tissue patches of ``patch_size`` px at ``mpp``
    µm/px drawn from its slides (with ``seed``), cached in ``<project>/features/ssl``; ``epochs``
    overrides the settings'. Extract features at the same µm/px as it was trained at."""
    from .ssl import sample_patches

    s = settings or SimCLRSettings()
    if epochs is not None:
        s = replace(s, epochs=int(epochs))
    if patch_size < s.augment.size:
        s = replace(s, augment=replace(s.augment, size=int(patch_size)))
    slides = [project.open_slide(sid) for sid in project.slide_ids]
    patches = sample_patches(slides, n_patches, patch_size, mpp, seed=seed)
    return simclr_encoder(patches, Path(project.features_dir) / "ssl", s, device=device, retrain=retrain,
                          progress=progress, meta={"patch_size": patch_size, "mpp": mpp, "sample_seed": seed,
                                                   "slides": list(project.slide_ids)})


__all__ = ["NAME", "RECIPE", "SimCLRSettings", "backbone", "build_simclr_encoder", "nt_xent",
           "project_simclr_encoder", "projection_head", "simclr_encoder", "train_simclr"]

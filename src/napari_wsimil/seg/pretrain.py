"""Auto-encoder pre-training of the segmentation U-Net (Pinchaud, section 4: "same network architecture but
without the lateral skip connections, trained to reconstruct the input using the L2 loss").

Without skips the only path from input to output goes through the bottleneck, so the encoder must learn a
compact description of the tissue; its weights then start a segmentation run (``--set
init_weights=RUN/autoencoder.safetensors``). It runs on the training engine like any method (events,
checkpoints, resume), on patches drawn uniformly over the tissue of every slide, labelled or not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..train.engine import StepOutput, TrainConfig, TrainingError, doc_field
from .data import SegSlide
from .loader import Patch, PatchBatches, read_patch
from .maps import default_grid
from .sampling import PatchRequest, draw_centres

KIND = "wsimil autoencoder"


@dataclass
class AutoencoderConfig(TrainConfig):
    """Pre-training settings; width and depth must match the segmentation runs that will use it."""

    epochs: int = doc_field("Passes of `patches_per_epoch` patches.", default=20)
    lr: float = doc_field("Adam learning rate.", default=1e-3)
    early_stopping: bool = doc_field("Stop when the validation loss stalls (no validation here: off).", default=False)
    width: int = doc_field("Filters in the first level.", default=32)
    depth: int = doc_field("U-Net levels.", default=4)
    batch_size: int = doc_field("Patches per step.", default=16)
    patches_per_epoch: int = doc_field("Patches per epoch, spread evenly over the slides.", default=512)
    read_workers: int = doc_field("Threads reading patches.", default=4)


class AutoencoderMethod:
    name = "autoencoder"

    def __init__(self, config: AutoencoderConfig, slides: Sequence[SegSlide], mpp: float, patch: int):
        self.config, self.slides, self.mpp, self.patch = config, list(slides), float(mpp), int(patch)
        self.grids = [default_grid(s, self.mpp, max(8, self.patch // 2), alpha=0.0) for s in self.slides]

    def check(self) -> None:
        if not self.slides:
            raise TrainingError("no slides to pre-train on")
        if self.patch % 2 ** (self.config.depth - 1):
            raise TrainingError(f"the patch size ({self.patch}) must be a multiple of {2 ** (self.config.depth - 1)}")

    def build_model(self) -> nn.Module:
        from .nets import autoencoder_pretrain_net

        return autoencoder_pretrain_net(self.config.width, self.config.depth).to(memory_format=torch.channels_last)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "segmentation-pretraining", "width": self.config.width,
                "depth": self.config.depth, "mpp": self.mpp, "patch": self.patch}

    def batches(self, epoch: int, rng: np.random.Generator) -> PatchBatches:
        jobs: list[Callable[[], Patch]] = []
        per = -(-self.config.patches_per_epoch // len(self.slides))
        for i, (s, g) in enumerate(zip(self.slides, self.grids)):
            d = s.downsample(self.mpp)
            for cx, cy in draw_centres(g, per, rng):
                req = PatchRequest(i, (cx - self.patch / 2) * d, (cy - self.patch / 2) * d)
                jobs.append(lambda s=s, req=req: read_patch(s, req, self.patch, self.mpp, benign_fill=False))
        order = rng.permutation(len(jobs))
        return PatchBatches([jobs[j] for j in order], self.config.batch_size, rng, workers=self.config.read_workers)

    def step(self, model: nn.Module, batch: Any, device: torch.device) -> StepOutput:
        from .nets import reconstruction_loss

        x = torch.from_numpy(batch.rgb).to(device).permute(0, 3, 1, 2).float().div_(255)
        x = x.contiguous(memory_format=torch.channels_last)
        loss = reconstruction_loss(model(x), x)
        return StepOutput({"l2": loss, "total": loss})

    def evaluate(self, model: nn.Module, device: torch.device) -> None:
        return None

    def close(self) -> None:
        for s in self.slides:
            s.close()


def export_autoencoder(run_dir: Path, config: AutoencoderConfig) -> Path:
    """``RUN/autoencoder.safetensors``: the weights with the metadata segmentation runs check."""
    from safetensors.torch import load_file, save

    from ..io.atomic import write_bytes

    tensors = load_file(str(run_dir / "best.safetensors"))
    out = run_dir / "autoencoder.safetensors"
    write_bytes(out, save(tensors, metadata={"kind": KIND, "width": str(config.width), "depth": str(config.depth)}))
    return out


__all__ = ["KIND", "AutoencoderConfig", "AutoencoderMethod", "export_autoencoder"]

"""Augmentation moves images and their labels together and keeps labels as labels."""

from __future__ import annotations

import torch

from napari_wsimil.seg.augment import AugmentConfig, augment


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.zeros(4, 3, 32, 32)
    labels = torch.full((4, 32, 32), -1, dtype=torch.long)
    x[:, :, 8:20, 4:14] = 1.0  # a bright block ...
    labels[:, 8:20, 4:14] = 1  # ... labelled tumour
    labels[:, 24:, 24:] = 0
    tissue = torch.ones(4, 32, 32, dtype=torch.bool)
    return x, labels, tissue


def test_labels_follow_the_image_and_stay_classes() -> None:
    x, labels, tissue = _batch()
    out, (lab, tis) = augment(x, [labels, tissue], torch.Generator().manual_seed(3),
                              AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0))
    assert out.shape == x.shape and lab.shape == labels.shape and lab.dtype == torch.long
    assert set(lab.unique().tolist()) <= {-1, 0, 1} and tis.dtype == torch.bool
    assert not torch.equal(out, x)  # something moved
    bright = out.mean(1) > 0.5
    # where the image is the bright block, the label says tumour (nearest-neighbour warp of the same grid)
    assert (lab[bright] == 1).float().mean() > 0.9
    assert (bright[lab == 1]).float().mean() > 0.9


def test_same_generator_same_augmentation_and_colour_stays_in_range() -> None:
    x, labels, tissue = _batch()
    a, _ = augment(x, [labels], torch.Generator().manual_seed(7))
    b, _ = augment(x, [labels], torch.Generator().manual_seed(7))
    c, _ = augment(x, [labels], torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0

"""FedMix's parts on their own: the adaptive weights, the averaging, the selection of pseudo-labels and the
Dice loss (numbers worked out by hand from the paper's formulas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wsimil.federated.fedmix_selection import dice, masked_dice_loss, select
from napari_wsimil.federated.fedmix_weights import adaptive_weights, weighted_average


def test_adaptive_weights_follow_the_formula() -> None:
    n, loss, lam, beta = [30, 10, 0], [0.2, 0.4, 0.8], 2.0, 1.5
    w = adaptive_weights(n, loss, lam, beta)
    lb = np.array(loss) ** beta
    expected = np.array(n) / 40 + lam * lb / lb.sum()
    np.testing.assert_allclose(w, expected / expected.sum())
    assert w.sum() == pytest.approx(1.0)
    assert w[2] > 0  # a site that selected nothing still counts through its loss (it fits worst)
    np.testing.assert_allclose(adaptive_weights([5, 5], [0, 0], 10, 3), [0.5, 0.5])  # no loss term
    np.testing.assert_allclose(adaptive_weights([0, 0], [0, 0], 10, 3), [0.5, 0.5])
    np.testing.assert_allclose(adaptive_weights([1, 3], [1, 1], 0, 3), [0.25, 0.75])  # λ = 0: FedAvg
    with pytest.raises(ValueError):
        adaptive_weights([1, 2], [0.1], 2, 1.5)
    with pytest.raises(ValueError):
        adaptive_weights([1, 2], [0.1, float("nan")], 2, 1.5)


def test_weighted_average_keeps_dtypes() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(10, np.int64)}
    b = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(20, np.int64)}
    out = weighted_average([a, b], [0.25, 0.75])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and int(out["n"]) == 18


def _square(h: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, h, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_dice_of_masks() -> None:
    a = torch.stack([_square(8, 0, 4, 0, 4), torch.zeros(8, 8, dtype=torch.bool), _square(8, 0, 4, 0, 4)])
    b = torch.stack([_square(8, 0, 4, 0, 2), torch.zeros(8, 8, dtype=torch.bool),
                     torch.zeros(8, 8, dtype=torch.bool)])
    np.testing.assert_allclose(dice(a, b).numpy(), [2 * 8 / 24, 1.0, 0.0])


def test_selection_keeps_agreement_inside_boxes_and_cross_supervises() -> None:
    h = 16
    tumour = _square(h, 4, 12, 4, 12).float()
    nearly = _square(h, 4, 12, 4, 11).float()  # Dice with tumour 0.97
    other = _square(h, 0, 4, 0, 16).float()  # disagrees
    box = torch.where(_square(h, 2, 14, 2, 14), 1, -1)
    labels = torch.stack([torch.zeros(h, h, dtype=torch.long),  # benign
                          torch.where(tumour > 0, 1, torch.where(_square(h, 0, 2, 0, 16), 0, -1)),  # painted
                          box, box,  # box patches: agreeing, then disagreeing
                          torch.full((h, h), -1), torch.full((h, h), -1), torch.full((h, h), -1)])  # weak
    pa = torch.stack([tumour, tumour, tumour, tumour, tumour, tumour, torch.zeros(h, h)])
    pb = torch.stack([other, other, nearly, other, nearly, other, torch.zeros(h, h)])
    kinds = ["benign", "pixel", "box", "box", "weak", "weak", "weak"]
    sel = select(kinds, labels, pa, pb, agree=0.9, box_min=0.5)
    # benign and painted always; box and weak only where the global nets agree; weak also needs tumour
    assert sel.kept.tolist() == [True, True, True, False, True, False, False]
    assert not sel.known[3].any() and not sel.known[5].any()
    assert sel.known[0].all() and float(sel.target_a[0].sum()) == 0  # a benign slide: all normal
    assert torch.equal(sel.known[1], labels[1] >= 0)  # paint: only where painted
    assert torch.equal(sel.target_a[1], tumour) and torch.equal(sel.target_b[1], tumour)
    # cross-supervision: A learns B's mask, B learns A's (inside the box)
    assert torch.equal(sel.target_a[2], nearly) and torch.equal(sel.target_b[2], tumour)
    assert torch.equal(sel.target_a[4], nearly) and torch.equal(sel.target_b[4], tumour)
    # a box far larger than what both nets see fails the box check even where they agree
    big_box = torch.ones(1, h, h, dtype=torch.long)
    small = _square(h, 7, 9, 7, 9).float()[None]
    assert not select(["box"], big_box, small, small).kept.item()
    # outside a box is normal, even where both nets call tumour
    half_box = torch.where(_square(h, 0, 16, 0, 8), 1, -1)[None]
    full = torch.ones(1, h, h)
    s = select(["box"], half_box, full, full, box_min=0.5)
    assert s.kept.item() and float(s.target_a.sum()) == h * 8 and s.known.all()
    with pytest.raises(ValueError):
        select(["nonsense"], labels[:1], pa[:1], pb[:1])


def test_masked_dice_loss() -> None:
    target = _square(8, 0, 4, 0, 8).float()[None]
    perfect = torch.stack([1 - target, target], 1) * 40 - 20  # logits: certain and right
    wrong = -perfect
    known = torch.ones_like(target, dtype=torch.bool)
    assert float(masked_dice_loss(perfect, target, known)) < 1e-3
    assert float(masked_dice_loss(wrong, target, known)) > 0.95
    nothing = masked_dice_loss(wrong.requires_grad_(), target, torch.zeros_like(known))
    assert float(nothing.detach()) == 0.0
    nothing.backward()  # still a graph: a batch with nothing kept does not break the step
    only_left = known.clone()
    only_left[..., 4:] = False  # the wrong half is not known: the loss only sees the rest
    half = torch.where(_square(8, 0, 8, 0, 4)[None, None], perfect, wrong)
    assert float(masked_dice_loss(half.detach(), target, only_left)) < 1e-3


def test_the_class_under_many_points_is_the_class_under_each(fed_cohort, tmp_path) -> None:
    """``SegSlide.centre_labels`` (a few mask reads for all points, what a FedMix site and the painted
    validation set use) gives exactly ``pixel_labels_at`` of each point: painted, boxed and benign slides,
    with and without benign filling, points inside and outside the slide."""
    from napari_wsimil.federated.fedmix_config import FedMixConfig
    from napari_wsimil.federated.fedmix_site import FedMixSite
    from napari_wsimil.federated.fedmix_sites import make_sites

    cfg = FedMixConfig(mpp=4.0, patch=32, width=8, depth=2, batch_size=8, patches_per_round=16, val_patches=4,
                       read_workers=1, device="cpu", seed=3)
    seen = set()
    for k, source in enumerate(make_sites(fed_cohort, tmp_path / "sites")):
        site = FedMixSite(source, cfg, tmp_path / f"w{k}")
        for i, s in enumerate(site.seg.train_slides + site.seg.val_slides):
            rng = np.random.default_rng(i)
            pts = np.concatenate([s.labelled_points(cfg.mpp, rng=rng)[:1000],
                                  np.column_stack([rng.uniform(-50, 1100, 200), rng.uniform(-50, 1100, 200)])])
            for fill in (True, False):
                each = np.array([s.pixel_labels_at(x, y, 1, cfg.mpp, fill)[0, 0] for x, y in pts], np.int8)
                np.testing.assert_array_equal(s.centre_labels(pts, cfg.mpp, fill), each)
                seen.update(each.tolist())
    assert seen == {-1, 0, 1}


def test_masked_dice_loss_of_a_batch_without_tumour_measures_the_normal_class() -> None:
    """A batch whose known target holds no tumour (benign patches only, as on a box or slide-label site
    before the global nets agree on any tumour): a net that calls it normal at p(tumour) = 0.02 everywhere
    fits it well, and the loss, which FedMix's aggregation weights sites by, must say so. Without leaving
    the absent class out, the tumour term 1 − 1 / (Σp + 1) made this loss ≈ 0.5 (Σp ≈ 160 here), the same
    as for a net that calls every pixel tumour at p = 0.5."""
    target = torch.zeros(2, 64, 64)
    known = torch.ones_like(target, dtype=torch.bool)
    p = torch.full_like(target, 0.02)
    good = torch.stack([torch.log(1 - p), torch.log(p)], 1)  # logits with softmax p(tumour) = 0.02
    assert float(masked_dice_loss(good, target, known)) < 0.02
    bad = torch.stack([torch.zeros_like(target), torch.zeros_like(target)], 1)  # p = 0.5 everywhere
    assert float(masked_dice_loss(bad, target, known)) > 0.3  # calling tumour still costs, through normal
    worse = torch.stack([torch.zeros_like(target), torch.full_like(target, 5.0)], 1)  # p ≈ 0.99
    assert float(masked_dice_loss(worse, target, known)) > 0.95
    lead = good.clone().requires_grad_()
    masked_dice_loss(lead, target, known).backward()
    assert lead.grad is not None and float(lead.grad[:, 1].sum()) > 0  # it still pushes tumour down

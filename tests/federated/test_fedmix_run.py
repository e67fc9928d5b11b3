"""FedMix end to end on real (synthetic) slides in one process: three sites (painted pixels, tumour boxes,
slide labels only) → rounds of local training and adaptive aggregation → a run folder that ``wsimil
predict`` / ``evaluate`` read like any segmentation run; resume; ``wsimil train --method fedmix`` refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main

from napari_wsimil.federated.fedmix_sites import make_sites, rows, write

TINY = dict(mpp=4.0, patch=32, width=8, depth=2, batch_size=8, patches_per_round=32, val_patches=4,
            read_workers=2, device="cpu", seed=3)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("fedmixcohort"), 6, seed=5, size=2048, workers=2)


@pytest.fixture(scope="module")
def sites(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_sites(cohort, tmp_path_factory.mktemp("sites"))


@pytest.fixture(scope="module")
def run(sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from napari_wsimil.federated.fedmix import run_local
    from napari_wsimil.federated.fedmix_config import FedMixConfig

    out = tmp_path_factory.mktemp("fed") / "run"
    res = run_local(sites, FedMixConfig(**TINY), 2, out)
    return out, res


def test_the_pixel_site_paints_tissue_and_leaves_glass_unlabelled(sites: list[Path]) -> None:
    """As a pathologist paints: tumour 1 exactly where the ground truth is, the rest of the tissue 2, glass 0."""
    import tifffile

    from napari_wsimil.slide import open_slide
    from napari_wsimil.slide.tissue import tissue_mask

    painted = [r for r in rows(sites[0]) if r["pixel_labels"]]
    assert painted
    for r in painted:
        paint, gt = tifffile.imread(r["pixel_labels"]), tifffile.imread(r["gt_mask"])
        with open_slide(r["path"]) as sl:
            tissue = tissue_mask(sl).on_grid(gt.shape, float(r["gt_downsample"]))
        np.testing.assert_array_equal(paint == 1, gt > 0)
        np.testing.assert_array_equal(paint == 2, (gt == 0) & tissue)
        assert (paint == 0).any() and (paint == 2).any()  # glass is left out, normal tissue is painted


def test_sites_are_told_apart_by_their_drawings(run: tuple[Path, dict]) -> None:
    out, res = run
    assert res["site_supervision"] == ["pixel", "box", "slide"]
    info = json.loads((out / "run.json").read_text())
    assert (info["kind"], info["method"], info["family"], info["federated"]) == ("segmentation", "fedmix",
                                                                                 "segmentation", True)
    hist = json.loads((out / "last.json").read_text())["history"]
    assert [h["round"] for h in hist] == [1, 2]
    for h in hist:
        ws = [s["weight"] for s in h["sites"]]
        assert sum(ws) == pytest.approx(1.0) and all(w > 0 for w in ws)
        for s in h["sites"]:
            assert 0 <= s["num_examples"] <= s["offered"] == TINY["patches_per_round"]
            assert s["selected_benign"] == TINY["patches_per_round"] // 2  # benign patches are always kept
            assert np.isfinite(s["loss"])
        pixel = h["sites"][0]
        assert pixel["num_examples"] == pixel["offered"]  # painted patches need no selection


def test_only_weights_and_numbers_leave_a_site(sites: list[Path], tmp_path: Path) -> None:
    from napari_wsimil.federated.fedmix import FedMix
    from napari_wsimil.federated.fedmix_config import FedMixConfig

    cfg = FedMixConfig(**TINY)
    method = FedMix()
    g = method.initial_arrays(cfg)
    a = {k: v for k, v in g.items() if k.startswith("a.")}
    assert any(not np.array_equal(v, g["b." + k[2:]]) for k, v in a.items())  # two different nets
    site = method.site_trainer(sites[1], cfg, tmp_path / "work")  # (it keeps its slides' tissue masks there)
    try:
        up = site.fit(g, 1)
    finally:
        site.close()
    assert set(up.arrays) == set(g)
    assert all(up.arrays[k].shape == g[k].shape for k in g)
    assert all(isinstance(v, float) for v in up.metrics.values())
    # the aggregation is the adaptive weighted mean of both nets
    other = {k: v * 0 if v.dtype.kind == "f" else v for k, v in up.arrays.items()}
    from napari_wsimil.federated.protocol import SiteUpdate

    ups = [up, SiteUpdate(other, 0, {"loss": up.metrics["loss"]})]
    w = FedMix.weights(ups, cfg)
    agg = method.aggregate(g, ups, cfg, np.random.default_rng(0))
    k = next(k for k in g if k.endswith("weight"))
    np.testing.assert_allclose(agg[k], w[0] * up.arrays[k], rtol=1e-5, atol=1e-7)


def test_predict_and_evaluate_a_fedmix_run(run: tuple[Path, dict], cohort: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    out, _ = run
    pred = tmp_path / "pred"
    assert main(["predict", str(out), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu"]) == 0
    n = len(rows(cohort))
    assert len(list((pred / "maps").glob("*.tif"))) == n
    assert json.loads((pred / "prediction.json").read_text())["method"] == "fedmix"
    assert main(["evaluate", str(pred), "--cohort", str(cohort)]) == 0
    assert "segmentation on" in capsys.readouterr().out


def test_resume_continues_from_the_last_round(sites: list[Path], run: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from napari_wsimil.errors import WsimilError
    from napari_wsimil.federated.fedmix import FedMix, run_local
    from napari_wsimil.federated.fedmix_config import FedMixConfig

    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    before, r0, _ = FedMix.read_round(out)
    with pytest.raises(WsimilError, match="already holds"):
        run_local(sites, FedMixConfig(**TINY), 3, out)
    res = run_local(sites[:1] + sites[2:], FedMixConfig(**TINY), 3, out, resume=True, evaluate=False)
    after, r1, hist = FedMix.read_round(out)
    assert (r0, r1, [h["round"] for h in hist]) == (2, 3, [1, 2, 3]) and len(res["history"]) == 3
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_train_refuses_fedmix_and_points_at_federate(cohort: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from napari_wsimil.workflow.session import method_names

    code = main(["train", str(cohort), "--method", "fedmix", "--out", str(tmp_path / "r"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "wsimil federate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "last.json").exists()
    assert "fedmix" not in method_names() and "hybrid" in method_names()


def test_a_site_without_benign_slides_is_refused(cohort: Path, tmp_path: Path) -> None:
    from napari_wsimil.errors import WsimilError
    from napari_wsimil.federated.fedmix_config import FedMixConfig
    from napari_wsimil.federated.fedmix_site import FedMixSite

    only_malignant = write([r for r in rows(cohort) if r["label"] == "1"], tmp_path / "m.csv")
    with pytest.raises(WsimilError, match="benign"):
        FedMixSite(only_malignant, FedMixConfig(**TINY), tmp_path)
    with pytest.raises(WsimilError, match="box"):
        FedMixSite(cohort, FedMixConfig(**{**TINY, "supervision": "box"}), tmp_path)

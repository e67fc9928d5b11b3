"""The federated benchmark's deal of slides to sites (``--sites K``): the claim "HistoFL above every site alone"
only means something if the sites' subsets are disjoint, the same for a given seed (site alone, HistoFL and
centralised see the same slides), and centralised training gets exactly their union."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def _rows(n_pos: int, n_neg: int, n_test: int = 6) -> list[dict]:
    rows = [{"slide_id": f"p{i:02d}", "label": "1", "split": "train"} for i in range(n_pos)]
    rows += [{"slide_id": f"n{i:02d}", "label": "0", "split": "val" if i % 4 == 0 else "train"} for i in range(n_neg)]
    rows += [{"slide_id": f"t{i:02d}", "label": str(i % 2), "split": "test"} for i in range(n_test)]
    return rows


@pytest.mark.parametrize("k", [3, 6])
@pytest.mark.parametrize("how", ["even", "skewed"])
def test_sites_are_disjoint_cover_the_pool_and_are_the_same_per_seed(k: int, how: str) -> None:
    from bench_federated import deal, site_names

    rows = _rows(29, 27)  # the CRC cohorts' 56 train/val slides
    sites = deal(rows, how, seed=3, k=k)
    assert tuple(sites) == site_names(k)
    ids = [r["slide_id"] for v in sites.values() for r in v]
    assert len(ids) == len(set(ids)), "a slide dealt to two sites"
    assert set(ids) == {r["slide_id"] for r in rows if r["split"] != "test"}, "test slides dealt or pool slides lost"
    assert all(len({r["label"] for r in v}) == 2 for v in sites.values()), "a site without both classes"
    again = deal(rows, how, seed=3, k=k)
    assert {s: [r["slide_id"] for r in v] for s, v in again.items()} == \
           {s: [r["slide_id"] for r in v] for s, v in sites.items()}
    other = deal(rows, how, seed=4, k=k)
    assert {s: [r["slide_id"] for r in v] for s, v in other.items()} != \
           {s: [r["slide_id"] for r in v] for s, v in sites.items()}
    sizes = [len(v) for v in sites.values()]
    if how == "even":
        assert max(sizes) - min(sizes) <= 2  # one slide per class at most
    else:  # one site with most slides, the last with a single malignant slide
        assert sizes[0] > sorted(sizes)[-2]
        assert sum(r["label"] == "1" for r in sites[site_names(k)[-1]]) == 1
        assert sizes[0] == round(1.8 / k * 56)


def test_more_sites_means_fewer_slides_each_and_centralised_trains_on_their_union(tmp_path: Path) -> None:
    from bench_federated import split_csvs

    from napari_wsimil.project.cohort_csv import read_rows

    rows = _rows(29, 27)
    three, _ = split_csvs(rows, "even", 1, 3, tmp_path / "k3")
    site_csvs, pooled = split_csvs(rows, "even", 1, 6, tmp_path / "k6")
    assert max(len(read_rows(p)) for p in site_csvs.values()) <= 10 < min(len(read_rows(p)) for p in three.values())
    union = sorted(r["slide_id"] for p in site_csvs.values() for r in read_rows(p))
    pooled_rows = read_rows(pooled)
    assert sorted(r["slide_id"] for r in pooled_rows) == union and len(union) == 56
    # every model carves its own validation slides: the cohort's val split is cleared everywhere
    assert {r["split"] for r in pooled_rows} == {""}
    assert {r["split"] for p in site_csvs.values() for r in read_rows(p)} == {""}


def test_a_site_count_the_skewed_split_cannot_hold_is_refused() -> None:
    from bench_federated import site_names

    with pytest.raises(ValueError, match="--sites must be 3 to 26"):
        site_names(2)


@pytest.mark.parametrize("how", ["even", "skewed"])
def test_cohort_val_keeps_validation_on_the_cohorts_val_slides(tmp_path: Path, how: str) -> None:
    """``--cohort-val``: with textures v3 a cohort's val slides show tiles no training slide shows; every model
    must choose its checkpoint on those and only those, so no training slide may become a validation slide."""
    from bench_federated import split_csvs

    from napari_wsimil.project.cohort_csv import read_rows

    rows = [{"slide_id": f"r{i:02d}", "label": str(i % 2), "split": "val" if i % 4 < 2 else "train"}
            for i in range(56)]
    rows += [{"slide_id": f"t{i:02d}", "label": str(i % 2), "split": "test"} for i in range(6)]
    split_of = {r["slide_id"]: r["split"] for r in rows}
    site_csvs, pooled = split_csvs(rows, how, 2, 6, tmp_path, cohort_val=True)
    sites = {s: read_rows(p) for s, p in site_csvs.items()}
    for s, got in sites.items():
        assert all(r["split"] == split_of[r["slide_id"]] for r in got), f"site {s}: a slide changed its split"
        val = [r for r in got if r["split"] == "val"]
        assert {r["label"] for r in val} == {"0", "1"}, f"site {s}: validation without both classes"
    ids = [r["slide_id"] for v in sites.values() for r in v]
    assert len(ids) == len(set(ids)) and set(ids) == {r["slide_id"] for r in rows if r["split"] != "test"}
    pooled_rows = read_rows(pooled)
    assert sorted(r["slide_id"] for r in pooled_rows if r["split"] == "val") == \
           sorted(r["slide_id"] for r in rows if r["split"] == "val")
    if how == "skewed":  # only the training slides are skewed
        train = {s: sum(r["split"] == "train" for r in v) for s, v in sites.items()}
        assert train["A"] > sorted(train.values())[-2]


def test_cohort_val_refuses_a_site_without_validation_slides(tmp_path: Path) -> None:
    """Too few val slides for the sites: a site without one would silently carve validation from its training
    slides, the very leak ``--cohort-val`` is for."""
    from bench_federated import split_csvs

    rows = [{"slide_id": f"r{i:02d}", "label": str(i % 2), "split": "val" if i < 2 else "train"} for i in range(20)]
    with pytest.raises(ValueError, match="2 val slides for 3 sites"):
        split_csvs(rows, "even", 1, 3, tmp_path, cohort_val=True)

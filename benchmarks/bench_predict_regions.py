"""One huge new slide predicted on a 2-worker local cluster: one task for the slide (``--region-patches 0``) against
region tasks (the slide's bag encoded as regions on both workers, merged, then predicted), measured in one run
against the single-process ``wsimil predict``. The bag is removed before every repeat (a new slide); both workers
have imported torch and built the encoder before the first repeat (paid once per run, not per slide).

    python benchmarks/bench_predict_regions.py --repeats 2

Prints wall times (min - max) and ratios against ``single`` and ``local:2 whole``. On a machine shared with other
jobs, two one-thread workers cannot be twice one: read the ratio against the load it was measured under.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _fresh(out: Path, bag: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    bag.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096, help="side of the huge slide in px at 0.5 µm/px")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--region-patches", type=int, default=64)
    args = ap.parse_args()

    from napari_wsimil.cli import main as cli
    from napari_wsimil.cluster.cohorts import predict_on_cluster, warm_up
    from napari_wsimil.cluster.spec import connect
    from napari_wsimil.features import read_bag
    from napari_wsimil.slide.synthetic.cohort import synthesize_cohort, synthesize_slide

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        synthesize_cohort(tmp / "train", 4, seed=3, size=(2048, 2048))
        new = tmp / "new"
        new.mkdir()
        synthesize_slide(new / "huge.tiff", (args.size, args.size), seed=11, malignant=True, gt_path=tmp / "gt.tiff")
        run = tmp / "work" / "run"
        assert cli(["train", str(tmp / "train" / "cohort.csv"), "--method", "abmil", "--out", str(run), "--epochs",
                    "1", "--encoder", args.encoder, "--patch", str(args.patch), "--mpp", "0.5",
                    "--device", "cpu"]) == 0
        bag = tmp / "work" / "features" / args.encoder / "huge.npz"
        times: dict[str, list[float]] = {"single": [], "local:2 whole": [], "local:2 regions": []}
        regions = 0
        with connect("local:2") as handle:
            warm_up(handle, args.encoder, None, "cpu", 0.5)  # torch and the encoder in both workers, once per run
            for _ in range(args.repeats):
                _fresh(tmp / "p0", bag)
                t0 = time.perf_counter()
                assert cli(["predict", str(run), "--cohort", str(new), "--out", str(tmp / "p0"), "--device", "cpu"]) == 0
                times["single"].append(time.perf_counter() - t0)
                for key, n in (("local:2 whole", 0), ("local:2 regions", args.region_patches)):
                    _fresh(tmp / "p1", bag)
                    t0 = time.perf_counter()
                    res = predict_on_cluster(handle, run, new, tmp / "p1", device="cpu", region_patches=n)
                    times[key].append(time.perf_counter() - t0)
                    assert [r["status"] for r in res] == ["done"], res
                    regions = max(regions, int(res[0].get("regions") or 0))
        patches = len(read_bag(bag)) if bag.exists() else -1
    print(f"one {args.size}² slide, {patches} patches of {args.patch} px, {args.encoder}; regions: {regions}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for key, xs in times.items():
        print(f"{key:16s} wall {min(xs):6.2f} - {max(xs):6.2f} s   single/this {min(times['single']) / min(xs):.2f}x"
              f"   whole/this {min(times['local:2 whole']) / min(xs):.2f}x")


if __name__ == "__main__":
    main()

"""Probability-map throughput of the segmentation U-Nets on CPU; how long Pinchaud training waits for maps.

1. Mapping, for the default U-Net (width 32, depth 4) and a small one (16, 3), on a synthetic slide at --mpp:
   (a) ``compute_map`` end to end: tissue tiles of --tile px read with the net's context margin, forward pass
   (batch norm folded into the convolutions), softmax, tissue masking, uint8 zarr write, sampling-grid sums;
   (b) the same tiles, read beforehand into memory, through the forward pass and softmax alone, with the net
   as trained and with batch norm folded. Throughput is megapixels of map per second (map pixels, not the
   larger reads with margins); folded/plain is what folding gains; e2e/folded = (a) / (b, folded) says how
   much of the net's speed survives reading and writing (1.0: all of it).
2. Cutting a map into what ``wsimil predict --masks`` writes: the tumour mask (pyramidal OME-TIFF) and QuPath
   outlines, at three thresholds, each timed against writing the map's probability TIFF from the same zarr (what
   every prediction writes). The map is smoothed noise, cut into many small regions: a worst case for outlines.
3. A short Pinchaud training run (``wsimil train`` through its Python API, the mapping worker on; by default
   the paper's U-Net at 1 µm/px on 4 training slides of 4096²): the share of wall time the trainer spent
   blocked waiting for maps (``wait_fraction()``, also the ``map_wait_fraction`` validation metric). Target
   < 10 %. The trainer waits only within its budget (``max_map_wait``, --max-map-wait; 1 = uncapped), so
   the run also prints the price of not waiting: ``map_age``, how many epochs older than the trainer's the
   weights of the maps it sampled from were. Baseline: the same run with the mapping worker off (uniform sampling); the ratio of seconds per
   epoch is what mapping on the same cores costs the trainer.

python benchmarks/bench_seg_mapping.py [--quick] [--size 4096] [--mpp 1] [--tile 512] [--nets 32x4 16x3]
    [--repeats 1] [--epochs 6] [--no-train] [--no-baseline] [--threads N] [--workdir DIR]

On a CPU that other processes are also using, torch's default OpenMP threads spin-wait for each other and can
run several times slower than one thread: use --threads 1 there (docs/benchmarks.md says which was used).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synthetic_slide, table  # noqa: E402


def seg_slide(path: Path, label: int = 1):
    """A :class:`SegSlide` for one slide file (tissue mask computed as training does)."""
    from napari_wsimil.seg.data import SegSlide
    from napari_wsimil.slide import open_slide
    from napari_wsimil.slide.tissue import tissue_mask

    with open_slide(path) as sl:
        tissue = tissue_mask(sl)
        mpp, shape0 = float(sl.mpp), tuple(sl.level_shapes[0])
    return SegSlide(path.stem, path, label, mpp, shape0, tissue)


def bench_net(slide, width: int, depth: int, mpp: float, tile: int, repeats: int, work: Path) -> list[object]:
    import torch

    from napari_wsimil.seg.configs import PinchaudConfig
    from napari_wsimil.seg.maps import _grid, iter_tiles, timed_map
    from napari_wsimil.seg.methods import build_net
    from napari_wsimil.seg.nets import fold_batch_norm, receptive_margin

    torch.manual_seed(0)
    net = build_net(PinchaudConfig(width=width, depth=depth)).eval()
    margin, mult = receptive_margin(net), _grid(net)
    tiles = list(iter_tiles(slide, mpp, tile))
    d = slide.downsample(mpp)

    # the reads predict_tile makes, done beforehand
    reads = []
    for y0, x0, h, w in tiles:
        H = -(-(h + 2 * margin) // mult) * mult
        W = -(-(w + 2 * margin) // mult) * mult
        reads.append((np.array(slide.read((x0 - margin) * d, (y0 - margin) * d, (W, H), mpp)), h, w))
    map_mpx = sum(h * w for _, h, w in reads) / 1e6
    read_mpx = sum(r.shape[0] * r.shape[1] for r, _, _ in reads) / 1e6

    def forward_only(net) -> None:
        with torch.no_grad():
            for rgb, h, w in reads:
                x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div_(255)
                x = x.contiguous(memory_format=torch.channels_last)
                p = torch.softmax(net(x).float(), 1)[0, 1, margin:margin + h, margin:margin + w]
                p.numpy()

    with torch.no_grad():  # warm-up: oneDNN primitives for these shapes
        x = torch.from_numpy(reads[0][0]).permute(2, 0, 1)[None].float()
        net(x.contiguous(memory_format=torch.channels_last))
    folded = fold_batch_norm(net)
    best_fwd = best_fold = best_e2e = float("inf")
    for r in range(repeats):
        t = time.perf_counter()
        forward_only(net)
        best_fwd = min(best_fwd, time.perf_counter() - t)
        t = time.perf_counter()
        forward_only(folded)
        best_fold = min(best_fold, time.perf_counter() - t)
        slide.close()  # a fresh slide, so its tile cache is cold: end to end includes decoding
        out = work / f"map_{width}x{depth}_{r}.zarr"
        _, timing = timed_map(net, slide, mpp, tile=tile, margin=margin, device="cpu", out=out, block=64)
        assert abs(timing.megapixels - map_mpx) < 1e-6, (timing.megapixels, map_mpx)
        best_e2e = min(best_e2e, timing.seconds)
    fwd, fold, e2e = map_mpx / best_fwd, map_mpx / best_fold, map_mpx / best_e2e
    return [f"{width}x{depth}", margin, len(tiles), map_mpx, read_mpx / map_mpx, fwd, fold, fold / fwd, e2e,
            e2e / fold, f"{best_e2e:.1f} s"]


def bench_cut(slide, mpp: float, thresholds: list[float], work: Path, seed: int = 0) -> list[list[object]]:
    """Masks and outlines (``wsimil predict --masks``) from one stored map, against writing the map's own
    probability TIFF (``wsimil predict``'s artefact) from the same zarr: what --masks adds to a prediction.

    The map is made to be hard to outline: smoothed noise ranked into [0, 1], so that a threshold t cuts
    1 − t of the map into many separate regions (blobs ~20 map px across)."""
    from scipy import ndimage as ndi

    from napari_wsimil.io.raster_store import LabelStore
    from napari_wsimil.seg.maps import open_map
    from napari_wsimil.seg.masks import write_tumour_mask, write_tumour_outlines
    from napari_wsimil.seg.operating_point import threshold_level
    from napari_wsimil.seg.predict import write_map_tiff

    h, w = slide.map_shape(mpp)
    field = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal((h, w)), 6)
    ranks = np.argsort(np.argsort(field, axis=None)).reshape(h, w) / (h * w - 1)
    zarr_path = work / "cut.zarr"
    open_map(zarr_path, slide, mpp).array[...] = np.round(ranks * 255).astype(np.uint8)
    t = time.perf_counter()
    write_map_tiff(zarr_path, work / "p.tif", slide, mpp)
    t_map = time.perf_counter() - t
    levels = LabelStore.open(zarr_path, readonly=True).read()  # small here; only to report the share cut
    rows = []
    for thr in thresholds:
        t = time.perf_counter()
        write_tumour_mask(zarr_path, work / "m.ome.tif", slide, mpp, thr)
        t_mask = time.perf_counter() - t
        t = time.perf_counter()
        _, n = write_tumour_outlines(zarr_path, work / "m.geojson", slide, mpp, thr)
        t_out = time.perf_counter() - t
        share = float((levels >= threshold_level(thr)).mean())
        rows.append([thr, f"{share:.1%}", n, levels.size / 1e6, f"{t_map:.2f} s", f"{t_mask:.2f} s",
                     t_mask / t_map, f"{t_out:.2f} s", t_out / t_map])
    return rows


def make_cohort(work: Path, n: int, size: int, seed: int) -> Path:
    from napari_wsimil.slide.synthetic import SAMPLE_VERSION, synthesize_cohort

    folder = work / f"cohort_v{SAMPLE_VERSION}_{n}x{size}_s{seed}"
    csv_path = folder / "cohort.csv"
    if not csv_path.is_file():
        t = time.perf_counter()
        synthesize_cohort(folder, n, seed=seed, size=size)
        print(f"(synthesised {n} slides of {size}² in {time.perf_counter() - t:.0f} s)", flush=True)
    return csv_path


def train_run(cohort_csv: Path, out: Path, args: argparse.Namespace, dynamic: bool) -> dict:
    """One short Pinchaud run; seconds per epoch, the trainer's waits, maps made."""
    from napari_wsimil.train.engine import train
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.live import prepare_run

    spec = RunSpec(source=cohort_csv, method="pinchaud", out=out, epochs=args.epochs, mpp=args.train_mpp,
                      patch=args.train_patch, seed=args.seed, device="cpu",
                      config={"width": args.train_width, "depth": args.train_depth, "batch_size": 16,
                              "patches_per_epoch": args.patches_per_epoch, "dynamic_sampling": dynamic,
                              "read_workers": 2, "map_tile": args.tile, "map_threads": args.map_threads,
                              "max_map_wait": args.max_map_wait})
    method = prepare_run(spec).method
    waits, ages = [], []
    t = time.perf_counter()
    for ev in train(method, out):
        if ev.kind == "validation" and "map_wait_fraction" in ev.metrics:
            waits.append(float(ev.metrics["map_wait_fraction"]))
            ages.append(float(ev.metrics.get("map_age", float("nan"))))
    wall = time.perf_counter() - t
    mapper = method.mapper
    return {"wall": wall, "s_per_epoch": wall / args.epochs, "wait_fraction": method.wait_fraction(),
            "wait_s": mapper.wait_seconds if mapper is not None else 0.0,
            "maps": mapper.maps_done if mapper is not None else 0, "per_epoch": waits, "ages": ages,
            "n_train": len(method.train_slides)}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2048² slide, 5 epochs (a minute or two)")
    ap.add_argument("--size", type=int, default=4096, help="mapped slide's side, level-0 px at 0.5 µm/px")
    ap.add_argument("--mpp", type=float, default=1.0, help="map resolution (Pinchaud: 1 µm/px)")
    ap.add_argument("--tile", type=int, default=512, help="map tile side (also the training run's map_tile)")
    ap.add_argument("--max-map-wait", type=float, default=0.05, help="the trainer's waiting budget (1: no cap)")
    ap.add_argument("--map-threads", type=int, default=0, help="the mapping worker's threads (0: its default)")
    ap.add_argument("--nets", nargs="+", default=["32x4", "16x3"], help="U-Nets as WIDTHxDEPTH")
    ap.add_argument("--repeats", type=int, default=1, help="best of N passes")
    ap.add_argument("--no-train", dest="train", action="store_false", help="skip the training-wait part")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the training run with the mapping worker off")
    ap.add_argument("--epochs", type=int, default=6, help="training epochs (waits can start at epoch 4)")
    ap.add_argument("--train-slides", type=int, default=6)
    ap.add_argument("--train-size", type=int, default=4096)
    ap.add_argument("--train-mpp", type=float, default=1.0)
    ap.add_argument("--train-patch", type=int, default=64)
    ap.add_argument("--train-width", type=int, default=32, help="training U-Net (default: the paper's)")
    ap.add_argument("--train-depth", type=int, default=4)
    ap.add_argument("--patches-per-epoch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; 1 is stabler on a shared CPU)")
    ap.add_argument("--workdir", type=Path, default=None, help="keeps the synthetic slides between runs")
    args = ap.parse_args(argv)
    if args.quick:  # small slides and net: mapping keeps far ahead of training, so waits are ~0
        args.size, args.epochs, args.repeats = 2048, 5, 1
        args.train_size, args.train_mpp, args.train_width, args.train_depth = 2048, 2.0, 16, 3
    base = args.workdir or Path(tempfile.gettempdir()) / "wsimil-bench" / "seg"
    base.mkdir(parents=True, exist_ok=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    slide = seg_slide(synthetic_slide(args.size, base))
    rows = []
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        for spec in args.nets:
            width, depth = (int(v) for v in spec.lower().split("x"))
            rows.append(bench_net(slide, width, depth, args.mpp, args.tile, args.repeats, Path(tmp)))
            print(f"  mapped with {spec}: {rows[-1][-1]}", flush=True)
        cut_rows = bench_cut(slide, args.mpp, [0.5, 0.9, 0.99], Path(tmp), args.seed)
    slide.close()
    h, w = slide.map_shape(args.mpp)
    print(f"\nmapping a {args.size}² slide at {args.mpp:g} µm/px ({w}x{h} map px), {args.tile} px tiles, "
          f"best of {args.repeats}; Mpx of map per second (ratios within the same run)")
    print(table(rows, ["U-Net", "margin", "tiles", "map Mpx", "read/map px", "forward Mpx/s", "BN folded",
                       "folded/plain", "end-to-end Mpx/s", "e2e/folded", "end-to-end time"]))

    print(f"\nmasks and outlines (predict --masks) of a {w}x{h} map of smoothed noise (many regions: a worst "
          "case for outlines), against writing its probability TIFF; ratios within the same run")
    print(table(cut_rows, ["threshold", "map cut", "regions", "map Mpx", "probability TIFF", "mask OME-TIFF",
                           "mask/TIFF", "outlines", "outlines/TIFF"]))

    if args.train:
        cohort = make_cohort(base, args.train_slides, args.train_size, args.seed)
        results = {}
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            for dyn in (True, False) if args.baseline else (True,):
                results[dyn] = train_run(cohort, Path(tmp) / f"run_{int(dyn)}", args, dyn)
        on = results[True]
        trows = [["mapping worker on", on["s_per_epoch"], on["maps"], on["wait_s"],
                  f"{on['wait_fraction']:.1%}", f"{on['wait_s'] / on['wall']:.1%}"]]
        if False in results:
            off = results[False]
            trows.append(["off (uniform sampling)", off["s_per_epoch"], 0, 0.0, "-", "-"])
        print(f"\nPinchaud, {args.epochs} epochs of {args.patches_per_epoch} patches of {args.train_patch} "
              f"px at {args.train_mpp:g} µm/px, U-Net {args.train_width}x{args.train_depth}, {on['n_train']} "
              f"training slides of {args.train_size}²; the mapper and the trainer share the CPU")
        print(table(trows, ["run", "s/epoch", "maps made", "waited s", "wait_fraction()", "waited / wall"]))
        if on["per_epoch"]:
            print("map_wait_fraction per epoch: " + " ".join(f"{v:.1%}" for v in on["per_epoch"]))
            print("map_age per epoch (epochs of training between the weights a sampled map came from and the "
                  "trainer's): " + " ".join(f"{v:.1f}" for v in on["ages"]))
        print(f"target: wait fraction < 10 %: {'met' if on['wait_fraction'] < 0.10 else 'NOT met'}")
        if False in results:
            slow = on["s_per_epoch"] / results[False]["s_per_epoch"]
            print(f"s/epoch with / without the mapping worker: {slow:.2f}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())

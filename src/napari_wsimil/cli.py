"""The ``wsimil`` command line.

One function per subcommand (``_cmd_<name>(args) -> int``), registered in ``_build_parser``; heavy
modules are imported inside them so that ``wsimil --help`` is instant. Failures the package raises on
purpose (``WsimilError``) print as one line on stderr with exit status 2, without a traceback: they
describe a problem with the user's input, not a bug.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from napari_wsimil.errors import Stopped, WsimilError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status instead of exiting."""
    from napari_wsimil.settings import SettingsError

    try:
        parser = _build_parser()  # reads the default device setting (NAPARI_WSIMIL_DEVICE)
    except SettingsError as exc:
        print(f"wsimil: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the reason (or the help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except WsimilError as exc:
        print(f"wsimil {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Stopped: SIGTERM (e.g. a site when its federation has ended), not Ctrl-C
        print(f"wsimil {args.command}: {'stopped' if isinstance(exc, Stopped) else 'interrupted'}", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    from napari_wsimil import __version__

    parser = argparse.ArgumentParser(
        prog="wsimil", description="Weakly supervised deep learning on whole-slide images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "synth", help="write a synthetic cohort of H&E-like slides with tumour ground truth",
        description="Write N synthetic slides (pyramidal JPEG TIFF), their ground-truth tumour masks "
                    "(<slide>_gt.tiff) and OUT/cohort.csv (slide_id,path,label,gt_mask,gt_downsample; "
                    "paths relative to the CSV). The same seed always gives the same cohort.")
    p.add_argument("out", metavar="OUT", help="folder to write into (created if missing)")
    p.add_argument("--slides", type=int, default=10, metavar="N", help="number of slides (default 10)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--size", type=_size, default=(4096, 4096), metavar="PX",
                   help="level-0 size in pixels: PX for a square or HxW, e.g. 20000x30000 (default 4096)")
    p.add_argument("--mpp", type=float, default=0.5, metavar="M", help="µm per pixel at level 0 (default 0.5, 20x)")
    p.add_argument("--malignant-fraction", type=float, default=0.5, metavar="F",
                   help="share of slides that carry tumour (default 0.5)")
    p.add_argument("--tumour-contrast", type=float, default=1.0, metavar="C",
                   help="how different tumour looks from normal tissue, 0-1 (default 1; lower is harder for a "
                        "model, 0 makes it invisible); the ground truth does not change")
    p.add_argument("--mucinous-share", type=float, default=0.0, metavar="F",
                   help="share of each tumour drawn as pale mucin with a few floating tumour cells instead of "
                        "solid tumour, 0-1 (default 0); the ground truth does not change")
    p.add_argument("--aggregate-share", type=float, default=0.0, metavar="F",
                   help="share of every slide's tissue covered by lymphoid aggregates, 0-0.5 (default 0): "
                        "dense, dark normal tissue that mimics tumour; ground truth: normal")
    p.add_argument("--tumour-share", type=_share_range, default=None, metavar="LO,HI",
                   help="range of each malignant slide's tumour share of its tissue, drawn log-uniformly "
                        "(default 0.005,0.08; at most 0.5)")
    t = p.add_argument_group(
        "real tissue",
        "fill the tissue with real labelled H&E tiles instead of drawing it; same layout and ground truth. Adds "
        "split, textures and texture_tiles columns to cohort.csv and writes OUT/textures.json")
    t.add_argument("--textures", metavar="DIR",
                   help="folder with one folder per class (images directly, or train/ and valid|val|test/ split "
                        "folders, as PCam); tumour is the class whose name contains 'tum'; classes named like "
                        "'empty' or 'background' are left out")
    t.add_argument("--tumour-class", metavar="NAME",
                   help="which class folder is tumour (default: the one named *tum*)")
    t.add_argument("--tile-mpp", type=float, metavar="M",
                   help="µm/px of the texture tiles (default: their resolution tags, when believable)")
    t.add_argument("--split", choices=("all", "train", "test"), default=None,
                   help="all (default): 55/15/30 %% train/val/test slides, stratified by label; train: "
                        "train and val slides only; test: test slides only. Train slides use training tiles; "
                        "val slides a quarter of the held-out tiles, test slides the rest (under 8 held-out "
                        "tiles per class: val slides share the training tiles)")
    p.add_argument("--workers", type=int, default=None, metavar="K", help="render threads (default: CPU count)")
    p.set_defaults(func=_cmd_synth)

    from napari_wsimil.project.cli import register as register_project
    register_project(sub)
    from napari_wsimil.features.cli import register as register_features
    register_features(sub)
    from napari_wsimil.workflow.cli import register as register_train
    register_train(sub)
    from napari_wsimil.seg.cli import register as register_seg
    register_seg(sub)
    from napari_wsimil.federated.cli import register as register_federate
    register_federate(sub)
    from napari_wsimil.cluster.cli import extend as extend_cluster
    extend_cluster(sub)  # --cluster on features and predict
    return parser


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PX or HxW in pixels, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected PX or HxW in pixels, got {text!r}")


def _share_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI shares of the tissue, e.g. 0.05,0.3; "
                                         f"got {text!r}") from None
    return low, high


def _cmd_synth(args: argparse.Namespace) -> int:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    if args.slides < 1:
        raise WsimilError(f"--slides must be at least 1, got {args.slides}")
    if args.workers is not None and args.workers < 1:
        raise WsimilError(f"--workers must be at least 1, got {args.workers}")
    h, w = args.size
    what = "synthetic" if args.textures is None else f"textured ({args.textures})"
    print(f"writing {args.slides} {what} slides of {h} x {w} px at {args.mpp:g} µm/px into {args.out}",
          flush=True)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        print(f"  slide {done}/{total} written ({elapsed:.1f} s)", flush=True)

    csv_path = synthesize_cohort(args.out, args.slides, seed=args.seed, size=(h, w), mpp=args.mpp,
                                 malignant_fraction=args.malignant_fraction, progress=progress,
                                 workers=args.workers, tumour_contrast=args.tumour_contrast,
                                 mucinous_share=args.mucinous_share, aggregate_share=args.aggregate_share,
                                 textures=args.textures, tumour_class=args.tumour_class, tile_mpp=args.tile_mpp,
                                 split=args.split, tumour_share=args.tumour_share)
    print(f"cohort: {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

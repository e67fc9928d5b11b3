"""``wsimil features-eval`` (a linear probe of an encoder on labelled tiles) and ``wsimil encoders``.

Registered by :func:`napari_wsimil.features.cli.register`; imports stay inside the commands so that
``wsimil --help`` loads neither torch nor any encoder plugin.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..settings import add_device_argument


def register(subparsers: Any) -> None:
    """Add ``features-eval`` and ``encoders`` to ``subparsers`` (an argparse sub-parser action)."""
    p = subparsers.add_parser(
        "features-eval", help="does an encoder see tumour? a linear probe on labelled tiles",
        description="Encode the tiles of TILES_DIR (one subfolder per class, tiles directly inside or in "
                    "split subfolders such as train/ and valid/) and fit an L2 logistic regression on the "
                    "standardised features: tumour vs each other class, and tumour vs all. With train and "
                    "valid (or val/test) splits in every class the probe is fitted on train and scored on "
                    "the held-out split; otherwise stratified k-fold cross-validation. Prints balanced "
                    "accuracy and ROC AUC per task.")
    p.add_argument("tiles_dir", metavar="TILES_DIR", help="folder with one subfolder of tiles per class")
    p.add_argument("--encoder", default="handcrafted", metavar="NAME",
                   help="a name `wsimil encoders` lists, or timm:ARCH (default handcrafted)")
    p.add_argument("--weights", default=None, metavar="FILE_OR_DIR",
                   help="the encoder's weights: a file, or for timm encoders a folder with config.json")
    p.add_argument("--folds", type=int, default=5, metavar="K",
                   help="cross-validation folds, at most the smallest class's size (default 5)")
    p.add_argument("--tile-mpp", type=float, default=None, metavar="M", help="µm/px of the tiles as stored")
    p.add_argument("--mpp", type=float, default=None, metavar="M",
                   help="resample the tiles to this µm/px before encoding (needs --tile-mpp)")
    p.add_argument("--tumour-class", default=None, metavar="NAME",
                   help="the tumour class folder (default: the one class named like TUM/tumor/tumour)")
    p.add_argument("--max-per-class", type=int, default=None, metavar="N",
                   help="a random N tiles per class (per split and class with splits); default all")
    p.add_argument("--batch", type=int, default=64, metavar="B", help="tiles per batch (default 64)")
    add_device_argument(p)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of subsets and folds (default 0)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_features_eval)

    q = subparsers.add_parser(
        "encoders", help="list the feature encoders (built in, timm, and from installed plugins)",
        description="Every encoder --encoder accepts: the built-in ones, timm:ARCH, and those other "
                    "packages register under the napari_wsimil.encoders entry-point group.")
    q.set_defaults(func=_cmd_encoders)


def _cmd_features_eval(args: argparse.Namespace) -> int:
    from .evaluate import TileSetError, evaluate_encoder

    if args.max_per_class is not None and args.max_per_class < 2:
        raise TileSetError(f"--max-per-class must be at least 2, got {args.max_per_class}")
    if args.batch < 1:
        raise TileSetError(f"--batch must be at least 1, got {args.batch}")

    def progress(stage: str, done: int, total: int) -> None:
        end = "" if done < total else "\n"
        print(f"\r{stage}: {done}/{total} tiles", end=end, file=sys.stderr, flush=True)

    report = evaluate_encoder(args.tiles_dir, args.encoder, weights=args.weights, folds=args.folds,
                              tile_mpp=args.tile_mpp, mpp=args.mpp, tumour_class=args.tumour_class,
                              max_per_class=args.max_per_class, batch_size=args.batch, device=args.device,
                              seed=args.seed, progress=progress)
    counts = ", ".join(f"{k} {v}" for k, v in report.classes.items())
    print(f"{report.tiles_dir}: {sum(report.classes.values())} tiles ({counts})")
    scale = f", resampled {report.tile_mpp:g} -> {report.mpp:g} µm/px" if report.mpp is not None else ""
    print(f"encoder {report.encoder} v{report.encoder_version} ({report.dim}-d){scale}; "
          f"probe: L2 logistic regression, {report.protocol}")
    print(report.table())
    s = report.seconds
    print(f"encoding {s['encode']:.1f} s ({s['tiles_per_second']:g} tiles/s), probe {s['probe']:.1f} s")
    if args.json:
        from pathlib import Path

        from ..io.atomic import write_text

        write_text(Path(args.json), json.dumps(report.as_dict(), indent=1))
    return 0


def _cmd_encoders(args: argparse.Namespace) -> int:
    import warnings

    from .encoders import available_encoders

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = available_encoders()
    width = max(len(n) for n in specs)
    for name, spec in specs.items():
        weights = "weights" if spec.takes_weights else "       "
        source = "" if spec.source == "builtin" else f"  [{spec.source}]"
        print(f"{name:<{width}}  {weights}  {spec.description}{source}")
    print(f"{'timm:ARCH':<{width}}  weights  any timm architecture when timm imports; without it: "
          + ", ".join(_native()))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def _native() -> list[str]:
    from .timm_encoders import native_architectures

    return native_architectures()


__all__ = ["register"]

"""``wsimil features``: one feature bag per slide of a project or a list of slide files.

Registered by the main command line with :func:`register`; imports stay inside the command so that
``wsimil --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..settings import add_device_argument


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``features`` subcommand to ``subparsers`` (an argparse sub-parser action)."""
    p = subparsers.add_parser(
        "features", help="extract patch features, one bag per slide",
        description="Tile each slide's tissue into patches of --patch px at --mpp µm/px, encode them and "
                    "write OUT/<slide id>.npz (coords + features). Bags that are complete and made by the same "
                    "encoder, weights, patch size and µm/px from an unchanged slide are skipped, so a "
                    "stopped run resumes where it left off.")
    p.add_argument("source", nargs="+", metavar="COHORT_OR_PROJECT",
                   help="a project folder, or one or more slide files")
    p.add_argument("--encoder", default="handcrafted", metavar="NAME",
                   help="handcrafted or handcrafted-v2 (no weights), resnet18, resnet50, resnet50-trunc "
                        "(CLAM's), ssl-ae or ssl-simclr (self-supervised: without --weights, trained on "
                        "the project's own slides at --mpp the first time, then loaded from "
                        "PROJECT/features/ssl), timm:ARCH (e.g. timm:vit_large_patch16_224, UNI's), timm (a "
                        "folder's config.json names the architecture), or a plugin's encoder; `wsimil encoders` "
                        "lists them all. Default handcrafted")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="weights for the encoder: .safetensors or a torch state dict (.pth/.pt/.bin, read "
                        "without unpickling code); for timm encoders also a folder with config.json and "
                        "model.safetensors or pytorch_model.bin")
    p.add_argument("--mpp", type=float, default=0.5, metavar="M",
                   help="µm per pixel of the patches (default 0.5)")
    p.add_argument("--patch", type=int, default=256, metavar="PX", help="patch size in pixels (default 256)")
    p.add_argument("--batch", type=int, default=64, metavar="B", help="patches per batch (default 64)")
    add_device_argument(p)
    p.add_argument("--min-tissue", type=float, default=0.5, metavar="F",
                   help="keep patches with at least this tissue fraction (default 0.5)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where bags go (default: PROJECT/features/ENCODER; required for slide files)")
    p.add_argument("--overwrite", action="store_true", help="recompute every bag, even current ones")
    p.add_argument("--ssl-patches", type=int, default=None, metavar="N",
                   help="ssl-ae / ssl-simclr without --weights: tissue patches to train on (default 2000 for "
                        "ssl-ae, 8000 for ssl-simclr)")
    p.add_argument("--ssl-epochs", type=int, default=None, metavar="E",
                   help="ssl-ae / ssl-simclr without --weights: training epochs (default 10 and 8)")
    p.set_defaults(func=_cmd_features)
    from .eval_cli import register as register_eval

    register_eval(subparsers)  # features-eval and encoders
    _register_interop(subparsers)  # features-import and features-export
    return p


def _register_interop(subparsers: Any) -> None:
    """``features-import`` / ``features-export``: CLAM / TIAToolbox feature files in and out (:mod:`.interop`)."""
    p = subparsers.add_parser(
        "features-import", help="import CLAM/TIAToolbox feature files (.h5, .pt) into a project",
        description="Read .h5 files (datasets 'features' N x D and 'coords' N x 2, level-0 pixel x, y, as CLAM "
                    "writes them) or bare .pt feature files (their coords from the .h5 of the same name, beside "
                    "them, in ../h5_files or in --coords DIR) and store them as the project's feature bags of "
                    "encoder imported:NAME. Each file is matched to the slide whose id or file name it bears. "
                    "Every file is checked before anything is written. Train on them with "
                    "'wsimil train PROJECT --encoder imported:NAME --patch PX --mpp M'.")
    p.add_argument("project", metavar="PROJECT", help="the project folder")
    p.add_argument("files", nargs="+", metavar="FILE_OR_DIR",
                   help=".h5 / .pt files, or folders of them (a CLAM output folder: its h5_files are read)")
    p.add_argument("--name", required=True, metavar="NAME",
                   help="what computed them, e.g. clam-resnet50 or uni; the bags' encoder is imported:NAME")
    p.add_argument("--patch", type=int, required=True, metavar="PX", help="patch size in pixels the features "
                   "were computed on")
    p.add_argument("--mpp", type=float, required=True, metavar="M",
                   help="µm per pixel of those patches (0.5 for 20x, 0.25 for 40x)")
    p.add_argument("--coords", default=None, metavar="DIR", help="folder of the .h5 files that hold the coords "
                   "of .pt files")
    p.add_argument("--slide", default=None, metavar="ID", help="the slide of a single file whose name is not "
                   "its slide's")
    p.set_defaults(func=_cmd_features_import)

    q = subparsers.add_parser(
        "features-export", help="export feature bags as CLAM .h5 / .pt files",
        description="Write each bag as OUT/h5_files/<slide>.h5 ('features' float32 N x D, 'coords' int64 N x 2 "
                    "level-0 x, y, with CLAM's patch_size/patch_level on coords and the encoder, patch size and "
                    "µm/px as file attributes) and OUT/pt_files/<slide>.pt (the features as one tensor).")
    q.add_argument("source", metavar="PROJECT_OR_BAGS", help="a project folder (with --encoder) or a folder of bags")
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write h5_files/ and pt_files/ into")
    q.add_argument("--encoder", default=None, metavar="NAME",
                   help="for a project: whose bags (PROJECT/features/NAME), e.g. handcrafted or resnet50-trunc")
    q.add_argument("--format", choices=("h5", "pt", "both"), default="both", help="default both")
    q.add_argument("--slide", action="append", default=None, metavar="ID", help="only this slide (repeatable)")
    q.set_defaults(func=_cmd_features_export)


def _cmd_features_import(args: argparse.Namespace) -> int:
    from .interop import import_features, imported_encoder

    written = import_features(args.project, args.files, args.name, args.patch, args.mpp, slide_id=args.slide,
                              coords_dir=args.coords, report=lambda m: print(m, file=sys.stderr))
    enc = imported_encoder(args.name)
    print(f"{len(written)} bags imported as {enc}; train with: wsimil train {args.project} --encoder {enc} "
          f"--patch {args.patch} --mpp {args.mpp:g}", file=sys.stderr)
    return 0


def _cmd_features_export(args: argparse.Namespace) -> int:
    from ..project.project import PROJECT_FILE
    from .extract import safe_dirname
    from .interop import EXPORT_FORMATS, InteropError, export_features

    src = Path(args.source)
    if (src / PROJECT_FILE).is_file():
        if args.encoder is None:
            have = sorted(d.name for d in (src / "features").glob("*") if any(d.glob("*.npz"))) \
                if (src / "features").is_dir() else []
            raise InteropError("give --encoder NAME: whose bags to export"
                               + (f" (the project has {', '.join(have)})" if have else " (the project has none)"))
        folder = src / "features" / safe_dirname(args.encoder)
    else:
        folder = src
    formats = EXPORT_FORMATS if args.format == "both" else (args.format,)
    written = export_features(folder, args.out, formats, slide_ids=args.slide,
                              report=lambda m: print(m, file=sys.stderr))
    print(f"{len(written)} files written to {args.out}", file=sys.stderr)
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from .extract import CohortEvent, extract_cohort

    source: Any = args.source[0] if len(args.source) == 1 and Path(args.source[0]).is_dir() else args.source
    if args.out is None and not isinstance(source, str):
        print("wsimil features: error: give --out DIR for slide files (bags go inside a project by default)",
              file=sys.stderr)
        return 2

    def report(ev: CohortEvent) -> None:
        head = f"[{ev.index + 1}/{ev.count}] {ev.slide_id}"
        if ev.stage == "patches":
            print(f"\r{head}: {ev.done}/{ev.total} patches", end="", file=sys.stderr, flush=True)
        elif ev.stage == "done":
            print(f"\r{head}: {ev.total} patches, done", file=sys.stderr)
        elif ev.stage == "skipped":
            print(f"{head}: up to date, skipped", file=sys.stderr)
        elif ev.stage == "busy":
            print(f"{head}: {ev.message}; waiting for it", file=sys.stderr)
        elif ev.stage == "failed":
            print(f"\r{head}: FAILED: {ev.message}", file=sys.stderr)

    encoder: Any = args.encoder
    if args.weights is None and args.encoder in _SELF_SUPERVISED:
        encoder = _project_ssl_encoder(args, source)
        if encoder is None:
            return 2
    results = extract_cohort(source, args.out, encoder, patch_size=args.patch, mpp=args.mpp,
                             batch_size=args.batch, device=args.device, progress=report, weights=args.weights,
                             overwrite=args.overwrite, min_tissue=args.min_tissue)
    failed = [r for r in results if r.status == "failed"]
    done = sum(r.status == "done" for r in results)
    skipped = len(results) - done - len(failed)
    print(f"{done} computed, {skipped} up to date, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


#: self-supervised encoders a project trains for itself: name → (module, function)
_SELF_SUPERVISED = {"ssl-ae": ("ssl", "project_ssl_encoder"),
                    "ssl-simclr": ("simclr", "project_simclr_encoder")}


def _project_ssl_encoder(args: argparse.Namespace, source: Any) -> Any:
    """The project's own self-supervised encoder at ``--mpp`` (trained the first time, cached after:
    :mod:`.ssl_cache`), or None after saying why there is none. Without this, the name alone would
    build an untrained random network."""
    import time
    from importlib import import_module

    from ..project.project import PROJECT_FILE, Project

    if not isinstance(source, str) or not (Path(source) / PROJECT_FILE).is_file():
        print(f"wsimil features: error: --encoder {args.encoder} without --weights trains on a project's "
              "slides; give a project folder, or --weights FILE", file=sys.stderr)
        return None
    module, func = _SELF_SUPERVISED[args.encoder]
    train = getattr(import_module(f".{module}", __package__), func)
    start = time.perf_counter()

    def say(epoch: int, epochs: int, loss: float) -> None:
        print(f"\r{args.encoder}: training on the project's patches, epoch {epoch}/{epochs}, loss {loss:.4f} "
              f"({time.perf_counter() - start:.0f} s)", end="\n" if epoch == epochs else "", file=sys.stderr,
              flush=True)

    project = Project.open(source, readonly=True)  # reads slides; the encoder goes to features/ssl
    try:
        options = {k: v for k, v in (("n_patches", args.ssl_patches), ("epochs", args.ssl_epochs))
                   if v is not None}
        enc = train(project, mpp=args.mpp, device=args.device, progress=say, **options)
    finally:
        project.close()
    print(f"{args.encoder}: version {enc.version}", file=sys.stderr)
    return enc


__all__ = ["register"]

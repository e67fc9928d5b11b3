"""``--cluster SPEC`` on ``wsimil features`` and ``wsimil predict`` (segmentation maps and masks included: they are
``wsimil predict`` of a segmentation run, with ``--masks``).

The commands themselves live in the layers below (``features/cli.py``, ``workflow/cli.py``), which must not import
this package; so the top-level ``cli.py`` calls :func:`extend` after registering them, which adds the option and
wraps each command: without ``--cluster`` the command runs exactly as before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .progress import SlideBar

SPEC_HELP = ("run one task per slide on dask.distributed: local (one worker process per core, or per GPU), "
             "local:N, tcp://HOST:PORT (a running scheduler) or a dask-jobqueue YAML file (jobqueue: slurm, jobs: N, "
             "cores, memory, gpus ..., the cluster class's own options). The dashboard address is printed")


#: default ``--region-patches``: a 40x resection has 5,000-20,000 patches of 224 px at 0.5 µm/px; above 20,000 a
#: slide alone would keep one worker busy for minutes while others idle at the end of a run
REGION_PATCHES = 20000


def extend(subparsers: Any) -> None:
    """Add ``--cluster`` to the ``features`` and ``predict`` subcommands already in ``subparsers``."""
    for name, runner in (("features", _features), ("predict", _predict)):
        parser = subparsers.choices.get(name)
        if parser is None:
            continue
        parser.add_argument("--cluster", default=None, metavar="SPEC", help=SPEC_HELP)
        if name == "features":
            parser.add_argument("--reader-threads", type=int, default=2, metavar="T",
                                help="with --cluster: tile-decoding threads per slide in each worker (default 2)")
        parser.add_argument("--region-patches", type=int, default=REGION_PATCHES, metavar="N",
                            help="with --cluster: a slide with more than N tissue patches is encoded as "
                                 f"region tasks of about N patches on several workers at once, merged into "
                                 f"the same bag{' (then predicted from it)' if name == 'predict' else ''} "
                                 f"(default {REGION_PATCHES}; 0: one task per slide)")
        plain = parser.get_default("func")
        # predict always runs here: without --cluster too, a bad slide must not stop the others
        parser.set_defaults(func=_either(plain, runner) if name == "features" else runner)


def _either(plain: Any, clustered: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        return clustered(args) if getattr(args, "cluster", None) else plain(args)

    run.__doc__ = plain.__doc__
    return run


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _out(msg: str) -> None:
    """The family's own lines (slides and their probabilities) go to stdout, as ``wsimil predict`` always printed
    them, so scripts that read them keep working; failures and the cluster's progress go to stderr."""
    print(msg, flush=True)


def _open(spec: str) -> Any:
    from .spec import connect

    handle = connect(spec)
    workers = len(handle.client.scheduler_info().get("workers", {}))
    _say(f"cluster {handle.spec}: {workers} workers{', GPU tasks' if handle.uses_gpus else ''}; "
         f"dashboard {handle.dashboard}")
    return handle


class _Bar:
    """The runner's ``progress(done, total, result)`` drawn as a :class:`SlideBar` (made at the first call, which
    brings the total)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int, result: dict[str, Any] | None) -> None:
    
        self.bar = self.bar or SlideBar(total)
        if result is not None:
            self.bar.update(result)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _features(args: argparse.Namespace) -> int:
    from .cohorts import extract_on_cluster

    source: Any = args.source[0] if len(args.source) == 1 and Path(args.source[0]).is_dir() else args.source
    if args.out is None and not isinstance(source, str):
        _say("wsimil features: error: give --out DIR for slide files (bags go inside a project by default)")
        return 2
    if args.weights is None and args.encoder in ("ssl-ae", "ssl-simclr"):
        _say(f"wsimil features: error: --cluster needs the weights of --encoder {args.encoder}: run it once without "
             "--cluster (it trains and caches them under PROJECT/features/ssl) and pass that file with --weights")
        return 2
    with _open(args.cluster) as handle:
        bar = _Bar()
        results = extract_on_cluster(handle, source, args.out, args.encoder, weights=args.weights, patch=args.patch,
                                     mpp=args.mpp, batch=args.batch, device=args.device, min_tissue=args.min_tissue,
                                     overwrite=args.overwrite, reader_threads=args.reader_threads,
                                     region_patches=args.region_patches, progress=bar)
        bar.close()
    failed = [r for r in results if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in results)
    _say(f"{done} computed, {len(results) - done - len(failed)} up to date, {len(failed)} failed")
    return 1 if failed else 0


#: the ``wsimil predict`` options a family reads from ``PredictRequest.options``
PREDICT_OPTIONS = ("heatmaps", "heatmap_overlap", "slide_score", "top_k", "masks", "ome_zarr")


def _predict(args: argparse.Namespace) -> int:
    """``wsimil predict``, with or without ``--cluster``: either way a slide that cannot be read is listed in
    ``PRED/failures.csv`` with its reason (one line each here), the others are predicted, and the exit status is 1."""
    from .cohorts import FAILURES_FILE, predict_here, predict_on_cluster

    options = {k: getattr(args, k) for k in PREDICT_OPTIONS if hasattr(args, k)}
    if args.cluster:
        with _open(args.cluster) as handle:
            bar = _Bar()
            results = predict_on_cluster(handle, args.run, args.cohort, args.out, weights=args.weights,
                                         device=args.device, options=options, progress=bar,
                                         region_patches=args.region_patches)
            bar.close()
    else:
        results = predict_here(args.run, args.cohort, args.out, weights=args.weights, device=args.device,
                               options=options, report=_out)
    failed = [r for r in results if r["status"] == "failed"]
    if args.cluster:  # the family says it itself in one process
        _say(f"predictions: {Path(args.out) / 'predictions.csv'} ({len(results) - len(failed)} slides)")
    if failed:
        if not args.cluster:  # the cluster's bar already named each one
            for r in failed:
                _say(f"{r['slide_id']}: FAILED: {r.get('message', '')}")
        _say(f"{len(failed)} slides could not be predicted: see {Path(args.out) / FAILURES_FILE}")
        return 1
    return 0


__all__ = ["extend"]

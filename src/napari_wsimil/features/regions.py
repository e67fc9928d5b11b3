"""One huge slide's bag as several region tasks, merged into exactly the bag one task would write.

A slide with more tissue patches than a threshold is cut into contiguous ranges of its patch grid (grid order is
row-major, so a range is a band of grid rows). Each range is encoded on its own — by another worker, in parallel —
into a *part*, ``OUT/.regions/<slide>/<start>-<stop>.npz`` (a bag of that range's coords and features, written
atomically under its own claim); once every part is there, a merge writes ``OUT/<slide>.npz`` atomically under the
bag's claim and removes the parts.

Why the result is the same bag, array for array: the grid is computed the same way in every task (tissue detection
is deterministic), parts are concatenated in grid order, and every range starts at a multiple of the batch size, so
the encoder sees exactly the batches the single-process loop feeds it (a network's output can depend on the other
images in its batch through the BLAS blocking of a different batch shape; the same batches rule that out).

Resumption: a part already there, made by the same encoder from the same slide for the same patches, is not
encoded again; a worker killed while encoding a range leaves at most a temporary file, removed by the next task
that claims that range; a merge killed before its rename leaves the parts and no bag, so the next run merges again.
A half-merged bag never exists under its final name.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from .bags import BAG_SUFFIX, Bag, read_bag, stale_reasons
from .encoders import Encoder
from .extract import CohortResult, SlideEntry, bag_is_current, extract_features

REGIONS_DIR = ".regions"


def region_ranges(n_patches: int, batch_size: int, region_patches: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of about ``region_patches`` patches covering ``n_patches``, each starting at a
    multiple of ``batch_size`` (see the module docstring); one range when the slide is not above the threshold."""
    size = max(batch_size, region_patches // batch_size * batch_size)
    return [(a, min(a + size, n_patches)) for a in range(0, n_patches, size)] or [(0, 0)]


def region_dir(out: Path, slide_id: str) -> Path:
    return Path(out) / REGIONS_DIR / slide_id


def part_path(out: Path, slide_id: str, start: int, stop: int) -> Path:
    return region_dir(out, slide_id) / f"{start}-{stop}{BAG_SUFFIX}"


def slide_grid(entry: SlideEntry, patch_size: int, mpp: float, min_tissue: float) -> Any:
    """The slide's patch grid, as :func:`extract_features` computes it (the slide opened and closed again)."""
    from ..slide import patch_grid

    slide = entry[2]()
    try:
        return patch_grid(slide, patch_size, mpp, min_tissue=min_tissue)
    finally:
        close = getattr(slide, "close", None)
        if close is not None:
            close()


def _part_current(path: Path, enc: Encoder, entry: SlideEntry, patch_size: int, mpp: float,
                  coords: np.ndarray) -> bool:
    if not path.exists() or stale_reasons(path, enc, entry[1], patch_size, mpp, entry[3]):
        return False
    try:
        return np.array_equal(read_bag(path).coords, coords)
    except WsimilError:
        return False


def extract_region(entry: SlideEntry, out: Path, enc: Encoder, patch_size: int, mpp: float, batch_size: int,
                   start: int, stop: int, *, min_tissue: float = 0.5, num_workers: int = 2) -> CohortResult:
    """Encode patches ``start:stop`` of the slide's grid into their part (status "done", "skipped" when the part
    or the whole bag is already current, "busy" when another process holds this range, or "failed")."""
    from ..io.atomic import TMP_SUFFIX
    from ..io.claims import Claim, try_claim

    sid, path, opener, _slide_mpp = entry
    bag_path = out / f"{sid}{BAG_SUFFIX}"
    part = part_path(out, sid, start, stop)
    claim = try_claim(out, f"{sid}{BAG_SUFFIX}.{start}-{stop}")
    if not isinstance(claim, Claim):
        return CohortResult(sid, path, part, "busy", message=f"claimed by {claim.describe()}")
    t0 = time.perf_counter()
    with claim:
        if bag_is_current(entry, out, enc, patch_size, mpp):
            return CohortResult(sid, path, bag_path, "skipped", message="the whole bag is up to date")
        for tmp in part.parent.glob(f".{part.name}.*{TMP_SUFFIX}"):  # a killed writer's leftovers
            tmp.unlink(missing_ok=True)
        try:
            grid = slide_grid(entry, patch_size, mpp, min_tissue)
            if stop > len(grid):
                raise WsimilError(f"{sid}: patches {start}:{stop} asked for, the grid has {len(grid)}")
            sub = grid.subset(slice(start, stop))
            if _part_current(part, enc, entry, patch_size, mpp, sub.coords):
                return CohortResult(sid, path, part, "skipped", stop - start)
            slide = opener()
            try:
                bag = extract_features(slide, enc, patch_size, mpp, batch_size, device=enc.device, grid=sub,
                                       min_tissue=min_tissue, num_workers=num_workers)
            finally:
                close = getattr(slide, "close", None)
                if close is not None:
                    close()
            bag.attrs["slide_id"] = sid
            for attempt in range(2):
                try:
                    part.parent.mkdir(parents=True, exist_ok=True)
                    bag.save(part)
                    break
                except FileNotFoundError:  # another slide's merge removed the empty .regions meanwhile
                    if attempt:
                        raise
        except (WsimilError, OSError) as exc:
            return CohortResult(sid, path, part, "failed", message=str(exc))
    return CohortResult(sid, path, part, "done", stop - start, time.perf_counter() - t0)


def merge_regions(entry: SlideEntry, out: Path, enc: Encoder, patch_size: int, mpp: float,
                  ranges: list[tuple[int, int]]) -> CohortResult:
    """The slide's bag from its parts, in grid order, written atomically under the bag's claim; then the parts
    are removed. "skipped" when the bag is already current (another client merged it), "busy", or "failed" when a
    part is missing or was made differently (nothing is written then)."""
    from ..io.claims import Claim, try_claim

    sid, path, _opener, _slide_mpp = entry
    bag_path = out / f"{sid}{BAG_SUFFIX}"
    claim = try_claim(out, f"{sid}{BAG_SUFFIX}")
    if not isinstance(claim, Claim):
        return CohortResult(sid, path, bag_path, "busy", message=f"claimed by {claim.describe()}")
    t0 = time.perf_counter()
    with claim:
        if bag_is_current(entry, out, enc, patch_size, mpp):
            return CohortResult(sid, path, bag_path, "skipped", message="done by another process")
        parts: list[Bag] = []
        try:
            for start, stop in ranges:
                p = part_path(out, sid, start, stop)
                if not p.exists() or stale_reasons(p, enc, path, patch_size, mpp, entry[3]):
                    raise WsimilError(f"{sid}: region {start}:{stop} is missing or was made with other settings")
                parts.append(read_bag(p))
                if len(parts[-1]) != stop - start:
                    raise WsimilError(f"{sid}: region {start}:{stop} holds {len(parts[-1])} patches")
            bag = Bag(np.concatenate([b.coords for b in parts]), np.concatenate([b.features for b in parts]),
                      dict(parts[0].attrs))
            bag.attrs.pop("format", None)  # save() writes the current format itself
            bag.save(bag_path)
        except (WsimilError, OSError) as exc:
            return CohortResult(sid, path, bag_path, "failed", message=str(exc))
        shutil.rmtree(region_dir(out, sid), ignore_errors=True)
        remove_empty_regions(out)
    return CohortResult(sid, path, bag_path, "done", len(bag), time.perf_counter() - t0)


def remove_empty_regions(out: Path) -> None:
    """``OUT/.regions`` once no slide has parts left in it (left alone while another process still uses it)."""
    try:
        (Path(out) / REGIONS_DIR).rmdir()
    except OSError:
        pass


__all__ = ["REGIONS_DIR", "extract_region", "merge_regions", "part_path", "region_dir", "region_ranges",
           "remove_empty_regions", "slide_grid"]

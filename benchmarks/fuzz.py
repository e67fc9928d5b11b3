"""Fuzzing every input (issue #21, part 1): malformed slides and structured files, each in a child process with a
time limit (10 s) and a memory limit (RLIMIT_AS 1 GB).

    python benchmarks/fuzz.py --out out/fuzz                  # the full run (>= 100 variants per slide file)
    python benchmarks/fuzz.py --out out/fuzz --ci             # the CI subset (~100 cases; tests/reliability runs it)
    python benchmarks/fuzz.py --out out/fuzz --resume         # go on where an interrupted run stopped

Slides: every real file in ../shared/data/slides/ and a synthetic pyramid, mutated by byte flips concentrated in
headers and IFDs, truncations, and TIFF tags rewritten (zero or huge dimensions, tile offsets and byte counts out
of range, unknown compression, IFD loops, odd tile sizes and samples, a missing or contradictory µm/px). Each
variant is opened, read at three levels, its tissue found, tiled and patched. Structured inputs (GeoJSON, cohort
CSV, feature bags, checkpoints and run.json, project.json, label zarr chunks) are mutated (byte flips,
truncations, JSON values and CSV cells replaced by values of other types, hostile paths) and read through the
Python API and, for some, the CLI.

Outcomes: ``ok`` (read; ``pixels`` says whether they equal the unmutated file's), ``error`` (a SlideError or other
WsimilError whose message is one clear line naming the file), ``unclear`` (one of ours, but not such a line),
``crash`` (any other exception, or the child died), ``hang`` (over the time limit), ``memory`` (MemoryError under
the limit), ``half-written`` (a failed write left something behind). Goal: 0 of the last five.

Seeded: case ``i`` of source ``s`` always gets the same mutation. Resumable: results are appended to
``OUT/results.jsonl`` and cases already there are skipped. ``OUT/summary.json`` holds the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import random
import re
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TIME_LIMIT = 10.0  # CPU seconds per case (what a case costs on an idle machine)
WALL_LIMIT = 30.0  # wall seconds per case: on a busy shared machine a case waits for the cores too
MEMORY_LIMIT = 1 << 30
RECYCLE = 100  # cases per worker before a fresh one: one case's leftovers (fragmentation) never count against another
BAD_OUTCOMES = ("unclear", "crash", "hang", "memory", "half-written")

# ============================================================================================ TIFF structure


def tiff_ifds(data: bytes, limit: int = 64) -> tuple[str, bool, list[dict[str, Any]]]:
    """(byte order, bigtiff, IFDs) of a TIFF: each IFD's offset, entry table and next-pointer position, followed
    until a loop, the end, or ``limit``. Only what the mutations need; any inconsistency stops the walk."""
    if len(data) < 16 or data[:2] not in (b"II", b"MM"):
        return "<", False, []
    bo = "<" if data[:2] == b"II" else ">"
    magic = struct.unpack(bo + "H", data[2:4])[0]
    big = magic == 43
    if magic not in (42, 43):
        return bo, False, []
    off = struct.unpack(bo + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    ifds, seen = [], set()
    while off and off not in seen and len(ifds) < limit and off + 8 < len(data):
        seen.add(off)
        if big:
            n = struct.unpack(bo + "Q", data[off:off + 8])[0]
            first, size, next_fmt = off + 8, 20, "Q"
        else:
            n = struct.unpack(bo + "H", data[off:off + 2])[0]
            first, size, next_fmt = off + 2, 12, "I"
        if n > 4096 or first + n * size + 8 > len(data):
            break
        entries = []
        for i in range(n):
            e = first + i * size
            if big:
                tag, typ, count = struct.unpack(bo + "HHQ", data[e:e + 12])
                vpos = e + 12
            else:
                tag, typ, count = struct.unpack(bo + "HHI", data[e:e + 8])
                vpos = e + 8
            entries.append({"pos": e, "tag": tag, "type": typ, "count": count, "vpos": vpos})
        next_pos = first + n * size
        ifds.append({"offset": off, "entries": entries, "next_pos": next_pos, "end": next_pos + (8 if big else 4)})
        off = struct.unpack(bo + next_fmt, data[next_pos:next_pos + (8 if big else 4)])[0]
    return bo, big, ifds


TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
TYPE_FMT = {3: "H", 4: "I", 16: "Q", 8: "h", 9: "i", 17: "q"}


def _value_positions(data: bytes, bo: str, big: bool, entry: dict[str, Any]) -> list[tuple[int, str]]:
    """(file position, struct format) of each integer value of an entry, inline or at its offset."""
    fmt = TYPE_FMT.get(entry["type"])
    if fmt is None:
        return []
    size = TYPE_SIZE[entry["type"]]
    count = min(entry["count"], 1 << 16)
    room = 8 if big else 4
    if count * size <= room:
        base = entry["vpos"]
    else:
        base = struct.unpack(bo + ("Q" if big else "I"), data[entry["vpos"]:entry["vpos"] + room])[0]
    if base + count * size > len(data):
        return []
    return [(base + i * size, fmt) for i in range(count)]


def _put(buf: bytearray, pos: int, fmt: str, bo: str, value: int) -> None:
    bits = struct.calcsize(fmt) * 8
    if fmt.islower():
        value = max(-(1 << (bits - 1)), min((1 << (bits - 1)) - 1, value))
    else:
        value = max(0, min((1 << bits) - 1, value))
    struct.pack_into(bo + fmt, buf, pos, value)


def _rewrite_tag(buf: bytearray, rng: random.Random, tags: tuple[int, ...], values: list[int],
                 every: bool = False) -> str:
    bo, big, ifds = tiff_ifds(bytes(buf))
    cands = [(i, e) for i, ifd in enumerate(ifds) for e in ifd["entries"] if e["tag"] in tags]
    if not cands:
        return "no such tag"
    i, e = rng.choice(cands)
    pos = _value_positions(bytes(buf), bo, big, e)
    if not pos:
        return "value not rewritable"
    value = rng.choice(values)
    chosen = pos if every else [rng.choice(pos)]
    for p, fmt in chosen:
        _put(buf, p, fmt, bo, value)
    return f"ifd {i} tag {e['tag']} -> {value}{' (all)' if every else ''}"


def _structure_ranges(data: bytes) -> list[tuple[int, int]]:
    bo, big, ifds = tiff_ifds(data)
    ranges = [(0, 16)]
    for ifd in ifds:
        ranges.append((ifd["offset"], ifd["end"]))
        for e in ifd["entries"]:  # out-of-line values: tile offsets, descriptions, resolutions
            size = TYPE_SIZE.get(e["type"], 1) * min(e["count"], 1 << 20)
            if size > (8 if big else 4):
                off = struct.unpack(bo + ("Q" if big else "I"), data[e["vpos"]:e["vpos"] + (8 if big else 4)])[0]
                if off < len(data):
                    ranges.append((off, min(len(data), off + min(size, 4096))))
    return ranges


# ================================================================================================ mutations
SLIDE_MUTATIONS = ["flip-structure", "flip-structure", "flip-any", "truncate", "truncate-structure", "dimension",
                   "tile-offsets", "tile-counts", "compression", "ifd-loop", "entry-type", "tile-size", "samples",
                   "mpp"]


def mutate_slide(data: bytes, rng: random.Random, kind: str) -> tuple[bytes, str]:
    """One seeded mutation of a slide file; returns (bytes, what was done)."""
    if kind == "none":
        return data, "unmutated"
    buf = bytearray(data)
    is_tiff = data[:2] in (b"II", b"MM")
    if not is_tiff and kind not in ("flip-any", "truncate"):
        kind = rng.choice(["flip-head", "flip-any", "truncate"])
    if kind == "flip-head":
        n = rng.randint(1, 24)
        for _ in range(n):
            buf[rng.randrange(min(len(buf), 4096))] ^= 1 << rng.randrange(8)
        return bytes(buf), f"{n} bit flips in the first 4 KB"
    if kind == "flip-structure":
        ranges = _structure_ranges(data)
        n = rng.randint(1, 16)
        for _ in range(n):
            a, b = rng.choice(ranges)
            buf[rng.randrange(a, max(a + 1, b))] = rng.randrange(256)
        return bytes(buf), f"{n} random bytes in header/IFDs"
    if kind == "flip-any":
        n = rng.randint(1, 64)
        for _ in range(n):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf), f"{n} bit flips anywhere"
    if kind == "truncate":
        cut = rng.randrange(1, len(buf))
        return bytes(buf[:cut]), f"truncated to {cut} of {len(buf)} bytes"
    if kind == "truncate-structure":
        a, b = rng.choice(_structure_ranges(data))
        cut = max(1, rng.randrange(a, max(a + 1, b)))
        return bytes(buf[:cut]), f"truncated inside a header/IFD at {cut}"
    if kind == "dimension":
        return bytes(buf), "dimension " + _rewrite_tag(buf, rng, (256, 257), [0, 1, 3, 65535, 2**31 - 1, 2**32 - 1])
    if kind == "tile-offsets":
        big = len(data) + rng.randint(1, 1 << 20)
        return bytes(buf), "offsets " + _rewrite_tag(buf, rng, (324, 273), [big, 2**32 - 1, 0, 7],
                                                    every=rng.random() < 0.5)
    if kind == "tile-counts":
        return bytes(buf), "counts " + _rewrite_tag(buf, rng, (325, 279), [0, 1, 2**31 - 1, 2**32 - 1, len(data)],
                                                   every=rng.random() < 0.5)
    if kind == "compression":
        return bytes(buf), "compression " + _rewrite_tag(buf, rng, (259,), [0, 2, 9, 12345, 34661, 65535])
    if kind == "tile-size":
        return bytes(buf), "tile size " + _rewrite_tag(buf, rng, (322, 323), [0, 1, 15, 16, 65535])
    if kind == "samples":
        return bytes(buf), "samples " + _rewrite_tag(buf, rng, (277, 258, 262, 284), [0, 2, 5, 12, 64, 255, 65535])
    if kind == "ifd-loop":
        bo, bigtiff, ifds = tiff_ifds(data)
        if not ifds:
            return bytes(buf), "no IFD"
        k = rng.randrange(len(ifds))
        j = rng.randrange(k + 1)
        fmt = "Q" if bigtiff else "I"
        struct.pack_into(bo + fmt, buf, ifds[k]["next_pos"], ifds[j]["offset"])
        return bytes(buf), f"IFD {k} points back to IFD {j} (a loop)"
    if kind == "entry-type":
        bo, bigtiff, ifds = tiff_ifds(data)
        entries = [e for ifd in ifds for e in ifd["entries"]]
        if not entries:
            return bytes(buf), "no entry"
        e = rng.choice(entries)
        if rng.random() < 0.5:
            struct.pack_into(bo + "H", buf, e["pos"] + 2, rng.choice([0, 2, 7, 13, 19, 255, 65535]))
            return bytes(buf), f"tag {e['tag']} type rewritten"
        struct.pack_into(bo + ("Q" if bigtiff else "I"), buf, e["pos"] + 4, rng.choice([0, 2**31 - 1, 2**32 - 1]))
        return bytes(buf), f"tag {e['tag']} count rewritten"
    if kind == "mpp":
        return mutate_mpp(buf, rng)
    raise ValueError(kind)


def mutate_mpp(buf: bytearray, rng: random.Random) -> tuple[bytes, str]:
    """Make the µm/px missing, absurd or contradictory: the Aperio description's MPP, the resolution tags, OME's
    PhysicalSizeX (same length, so no offset moves)."""
    text = bytes(buf)
    options = []
    for m in re.finditer(rb"MPP = ([0-9.]+)", text):
        options.append(("svs", m.start(1), m.end(1)))
    for m in re.finditer(rb'PhysicalSizeX="([0-9.eE+-]+)"', text):
        options.append(("ome", m.start(1), m.end(1)))
    bo, big, ifds = tiff_ifds(text)
    res = [e for ifd in ifds for e in ifd["entries"] if e["tag"] in (282, 296)]
    if res:
        options.append(("res", 0, 0))
    if not options:
        return bytes(buf), "no µm/px recorded to mutate"
    kind, a, b = rng.choice(options)
    if kind == "res":
        e = rng.choice(res)
        if e["tag"] == 296:
            struct.pack_into(bo + "H", buf, e["vpos"], rng.choice([0, 1, 3, 7]))
            return bytes(buf), "ResolutionUnit rewritten"
        off = struct.unpack(bo + ("Q" if big else "I"), text[e["vpos"]:e["vpos"] + (8 if big else 4)])[0]
        if off + 8 <= len(buf):
            num, den = rng.choice([(0, 1), (1, 0), (1, 10**9), (10**9, 1), (4294967295, 1)])
            struct.pack_into(bo + "II", buf, off, num, den)
            return bytes(buf), f"XResolution = {num}/{den}"
        return bytes(buf), "XResolution not rewritable"
    width = b - a
    value = rng.choice(["0", "-1", "nan", "inf", "1e9", "0.00001", "abc", "", "0.25"]).encode()
    buf[a:b] = value[:width].ljust(width, b" ")
    return bytes(buf), f"{kind} µm/px -> {value.decode()!r}" + (" (contradicting the resolution tags)"
                                                                 if value == b"0.25" else "")


# ---- structured inputs ---------------------------------------------------------------------------------
HOSTILE = [None, -1, 0, 1e308, float("nan"), "", "../../../etc/passwd", "/", "x" * 5000, [], {}, True, "ü\u0000",
           [1, [2, [3]]], {"a": None}, -2**63, 2**70]


def _random_value(rng: random.Random) -> Any:
    return rng.choice(HOSTILE)


def mutate_json(text: str, rng: random.Random) -> tuple[str, str]:
    """Replace a random value (or key's value) in a JSON document by one of another type, or drop a key."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text, "not JSON"
    nodes: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                nodes.append((node, k))
                walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                nodes.append((node, i))
                walk(v)

    walk(doc)
    if not nodes:
        return json.dumps(_random_value(rng)), "document replaced"
    parent, key = rng.choice(nodes)
    if isinstance(parent, dict) and rng.random() < 0.25:
        del parent[key]
        what = f"key {key!r} removed"
    else:
        value = _random_value(rng)
        parent[key] = value
        what = f"{key!r} -> {str(value)[:20]!r}"
    return json.dumps(doc, allow_nan=True), what


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    if rng.random() < 0.35 and len(buf) > 1:
        cut = rng.randrange(0, len(buf))
        return bytes(buf[:cut]), f"truncated to {cut} of {len(buf)} bytes"
    n = rng.randint(1, 12)
    head = rng.random() < 0.6
    for _ in range(n):
        buf[rng.randrange(min(len(buf), 512) if head else len(buf))] = rng.randrange(256)
    return bytes(buf), f"{n} random bytes{' in the first 512' if head else ''}"


def mutate_csv(text: str, rng: random.Random) -> tuple[str, str]:
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2:
        return text, "empty"
    choice = rng.randrange(6)
    if choice == 0:
        r, c = rng.randrange(len(rows)), rng.randrange(len(rows[0]))
        value = str(_random_value(rng))
        if c < len(rows[r]):
            rows[r][c] = value
        what = f"cell {r},{c} -> {value[:20]!r}"
    elif choice == 1:
        rows.append(list(rows[rng.randrange(1, len(rows))]))
        what = "a row duplicated"
    elif choice == 2:
        rows = rows[1:]
        what = "header removed"
    elif choice == 3:
        r = rng.randrange(1, len(rows))
        rows[r] = rows[r][: rng.randrange(len(rows[r]))]
        what = f"row {r} cut short"
    elif choice == 4:
        rows[0] = [h.upper() if rng.random() < 0.5 else h + " " for h in rows[0]]
        what = "header names changed"
    else:
        data, what = mutate_bytes(text.encode(), rng)
        return data.decode("utf-8", "replace"), what
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue(), what


# ================================================================================================== sources


def build_sources(work: Path, with_real: bool = True) -> dict[str, Any]:
    """The unmutated inputs: slide files (real ones and a synthetic pyramid) and a small project with labels,
    annotations, a bag, a run folder and a cohort CSV. Built once per output folder."""
    from _common import SHARED_SLIDES
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    done = work / "sources.json"
    if done.exists():
        return json.loads(done.read_text())
    from napari_wsimil.slide.synthetic import synthesize_slide

    slides = {}
    if with_real and SHARED_SLIDES.is_dir():
        for p in sorted(SHARED_SLIDES.iterdir()):
            if p.is_file():
                slides[p.name] = str(p)
    synth = work / "synthetic.tiff"
    synthesize_slide(synth, 2048, seed=11, malignant=True, mpp=0.5)
    slides["synthetic.tiff"] = str(synth)

    from napari_wsimil.features.bags import Bag
    from napari_wsimil.project import Project
    from napari_wsimil.project.annotations import Annotation

    cohort = work / "cohort"
    cohort.mkdir(exist_ok=True)
    shutil.copy(synth, cohort / "a.tiff")
    shutil.copy(synth, cohort / "b.tiff")
    (cohort / "cohort.csv").write_text("slide_id,path,label,split,mpp\nsa,a.tiff,malignant,train,0.5\n"
                                       "sb,b.tiff,benign,val,\n")
    proj = work / "project"
    with Project.create_from_csv(proj, cohort / "cohort.csv", slide_classes=["benign", "malignant"]) as p:
        labels = np.zeros(p.label_geometry("sa").shape, np.uint8)
        labels[10:80, 10:90] = 1
        labels[100:150, 20:60] = 2
        p.save_pixel_labels("sa", labels)
        p.save_annotations("sa", [Annotation.box(100, 100, 400, 300, "tumour"),
                                  Annotation.polygon([(500, 500), (900, 520), (700, 900)], "normal")])
    bag = work / "bag.npz"
    rng = np.random.default_rng(0)
    Bag(rng.integers(0, 2000, (50, 2)), rng.normal(size=(50, 16)).astype(np.float32), {"encoder": "x"}).save(bag)
    run = work / "run"
    _make_run(run)
    info = {"slides": slides, "project": str(proj), "cohort_csv": str(cohort / "cohort.csv"),
            "geojson": str(proj / "annotations" / "sa.geojson"), "bag": str(bag), "run": str(run)}
    done.write_text(json.dumps(info, indent=1))
    return info


def _tiny_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _make_run(run: Path) -> None:
    """A run folder as the engine writes it (best.safetensors, last.json, a checkpoint, run.json)."""
    from safetensors.torch import save_file

    run.mkdir(parents=True, exist_ok=True)
    model = _tiny_model()
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(run / "best.safetensors"))
    save_file(tensors, str(run / "ckpt-0001.safetensors"))
    (run / "last.json").write_text(json.dumps({"format": 1, "epoch": 1, "tensors": "ckpt-0001.safetensors",
                                               "method": {"name": "abmil"}, "stopped": "finished"}))
    (run / "run.json").write_text(json.dumps({"method": "abmil", "family": "mil", "classes": ["benign", "malignant"],
                                              "mpp": 0.5, "patch": 256}))


# ==================================================================================================== cases
STRUCTURED = ["geojson", "cohort_csv", "bag", "checkpoint", "last_json", "run_json", "project_json", "label_chunk",
              "cli_project_json", "cli_cohort_csv"]


def plan(sources: dict[str, Any], per_slide: int, per_structured: int, seed: int) -> list[dict[str, Any]]:
    cases = []
    for name in sorted(sources["slides"]):
        for i in range(per_slide):
            cases.append({"id": f"slide/{name}/{i}", "domain": "slide", "source": name,
                          "kind": SLIDE_MUTATIONS[i % len(SLIDE_MUTATIONS)], "seed": [seed, name, i]})
    for kind in STRUCTURED:
        n = per_structured if not kind.startswith("cli_") else max(2, per_structured // 5)
        for i in range(n):
            cases.append({"id": f"input/{kind}/{i}", "domain": "input", "kind": kind, "seed": [seed, kind, i]})
    return cases


def case_rng(case: dict[str, Any]) -> random.Random:
    return random.Random(hashlib.sha256(json.dumps(case["seed"]).encode()).hexdigest())


# =================================================================================================== worker


def clear_message(msg: str, names: list[str]) -> str | None:
    """None if ``msg`` is a clear one-line message naming one of ``names``; else why it is not."""
    if not msg.strip():
        return "empty"
    lines = msg.strip().splitlines()
    if len(lines) > 1 and not (re.search(r"\(\d+ problems\):$", lines[0]) and all(ln.startswith("  ")
                                                                                  for ln in lines[1:])):
        return "more than one line (and not a list of problems under a one-line summary)"
    if any(ord(c) < 32 and c != "\n" for c in msg):
        return "control characters"
    msg = lines[0]
    if "Traceback" in msg or " object at 0x" in msg:
        return "a traceback or object repr"
    if len(msg) > 600:
        return f"{len(msg)} characters long"
    if names and not any(n in msg for n in names):
        return "does not name the file"
    return None


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".lock":
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def run_slide_case(case: dict[str, Any], sources: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import numpy as np

    from napari_wsimil.errors import SlideError, WsimilError
    from napari_wsimil.slide import open_slide
    from napari_wsimil.slide.tiling import PatchReader, patch_grid
    from napari_wsimil.slide.tissue import tissue_mask

    src = Path(sources["slides"][case["source"]])
    data, what = mutate_slide(src.read_bytes(), case_rng(case), case["kind"])
    path = tmp / f"fuzz{src.suffix}"
    path.write_bytes(data)
    result: dict[str, Any] = {"what": what}
    try:
        with open_slide(path) as slide:
            digest = hashlib.sha256()
            n = slide.level_count
            for level in sorted({0, n // 2, n - 1}):
                w, h = slide.dimensions_of(level)
                x, y = max(0, w // 2 - 128), max(0, h // 2 - 128)
                digest.update(slide.read_level(level, y, y + min(256, h), x, x + min(256, w)).tobytes())
            tissue = tissue_mask(slide)
            grid = patch_grid(slide, patch_size=128, mpp=None, level=n - 1, min_tissue=0.25, tissue=tissue)
            with PatchReader(slide, grid, batch_size=8, num_workers=2) as reader:
                for _coords, patches in reader:
                    digest.update(np.ascontiguousarray(patches).tobytes())
                    break
        result.update(outcome="ok", digest=digest.hexdigest()[:16])
    except SlideError as exc:
        why = clear_message(str(exc), [path.name])
        result.update(outcome="error" if why is None else "unclear", message=str(exc)[:400],
                      **({"why": why} if why else {}))
    except WsimilError as exc:
        why = clear_message(str(exc), [path.name])
        result.update(outcome="error" if why is None else "unclear", message=str(exc)[:400],
                      **({"why": why} if why else {}))
    except MemoryError:
        result.update(outcome="memory")
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
        result.update(outcome="crash", message=f"{type(exc).__name__}: {str(exc)[:300]}")
    return result


def run_input_case(case: dict[str, Any], sources: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from napari_wsimil.errors import WsimilError

    rng = case_rng(case)
    kind = case["kind"]
    result: dict[str, Any] = {}
    names: list[str] = []
    watch: Path | None = None  # a folder that must be unchanged (or not created) when the case fails
    created: Path | None = None

    def act() -> None:
        nonlocal names, watch, created
        if kind == "geojson":
            from napari_wsimil.project.annotations import read_geojson

            path = tmp / "a.geojson"
            text = Path(sources["geojson"]).read_text()
            data = mutate_json(text, rng)[0].encode() if rng.random() < 0.5 else mutate_bytes(text.encode(), rng)[0]
            path.write_bytes(data)
            names = [path.name]
            read_geojson(path)
        elif kind in ("cohort_csv", "cli_cohort_csv"):
            from napari_wsimil.project import Project
            from napari_wsimil.train.cohort import load_cohort

            cohort_dir = tmp / "cohort"
            shutil.copytree(Path(sources["cohort_csv"]).parent, cohort_dir)
            path = cohort_dir / "cohort.csv"
            path.write_text(mutate_csv(path.read_text(), rng)[0])
            names = [path.name]
            created = tmp / "newproj"
            if kind == "cli_cohort_csv":
                _cli(["project", "create", str(created), "--from-csv", str(path)], names)
                return
            load_cohort(path)
            with Project.create_from_csv(created, path):
                pass
        elif kind == "bag":
            from napari_wsimil.features.bags import read_bag

            path = tmp / "bag.npz"
            path.write_bytes(mutate_bytes(Path(sources["bag"]).read_bytes(), rng)[0])
            names = [path.name]
            read_bag(path)
        elif kind in ("checkpoint", "last_json", "run_json"):
            from napari_wsimil.train.checkpoints import load_checkpoint_weights
            from napari_wsimil.train.run import read_run_info

            run = tmp / "run"
            shutil.copytree(sources["run"], run)
            target = {"checkpoint": rng.choice(["best.safetensors", "ckpt-0001.safetensors"]),
                      "last_json": "last.json", "run_json": "run.json"}[kind]
            path = run / target
            if target.endswith(".json") and rng.random() < 0.7:
                path.write_text(mutate_json(path.read_text(), rng)[0])
            else:
                path.write_bytes(mutate_bytes(path.read_bytes(), rng)[0])
            names = [path.name, "run"]
            if kind == "run_json":
                read_run_info(run)
            else:
                weights = "best" if target == "best.safetensors" else "last"
                if weights == "last":
                    (run / "best.safetensors").unlink()
                load_checkpoint_weights(run, _tiny_model(), weights, "cpu")
        elif kind in ("project_json", "cli_project_json", "label_chunk"):
            from napari_wsimil.project import Project
            from napari_wsimil.project.check import check_project

            root = tmp / "project"
            shutil.copytree(sources["project"], root)
            for prev in root.rglob("*.wsimil-prev"):  # without the previous copies: the harder case
                if rng.random() < 0.5:
                    prev.unlink()
            if kind == "label_chunk":
                chunks = [p for p in root.rglob("c/*/*") if not p.name.startswith(".")]
                path = rng.choice(chunks)
                path.write_bytes(mutate_bytes(path.read_bytes(), rng)[0])
                names = ["labels", "sa", "project"]
            else:
                path = root / "project.json"
                if rng.random() < 0.7:
                    path.write_text(mutate_json(path.read_text(), rng)[0])
                else:
                    path.write_bytes(mutate_bytes(path.read_bytes(), rng)[0])
                names = ["project.json", "project", "slide"]
            watch = root
            before = _snapshot(root)
            result["before"] = before
            if kind == "cli_project_json":
                _cli(["project", "info", str(root)], names)
                return
            with Project.open(root) as p:
                for sid in p.slide_ids:
                    p.pixel_labels(sid)
                    p.annotations(sid)
                p.info()
            check_project(root)

    try:
        act()
        result["outcome"] = "ok"
    except _CliFailure as exc:
        result.update(outcome=exc.outcome, message=exc.message)
    except WsimilError as exc:
        why = clear_message(str(exc), names)
        result.update(outcome="error" if why is None else "unclear", message=str(exc)[:400],
                      **({"why": why} if why else {}))
    except MemoryError:
        result["outcome"] = "memory"
    except Exception as exc:  # noqa: BLE001
        result.update(outcome="crash", message=f"{type(exc).__name__}: {str(exc)[:300]}")
    before = result.pop("before", None)
    if result["outcome"] not in ("ok",) and created is not None and (created / "project.json").exists():
        result.update(outcome="half-written", message=f"a failed create left {created / 'project.json'}")
    if watch is not None and before is not None and result["outcome"] != "ok":
        after = _snapshot(watch)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                         and not k.endswith(".wsimil-tmp"))
        if changed:
            result.update(outcome="half-written", message=f"a failed open changed {changed[:5]}")
    return result


class _CliFailure(Exception):
    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome, self.message = outcome, message


def _cli(args: list[str], names: list[str]) -> None:
    """``wsimil ARGS`` in a process of its own: exit 0, or exit 2 with one clear line on stderr."""
    out = subprocess.run([sys.executable, "-m", "napari_wsimil.cli", *args], capture_output=True, text=True,
                         timeout=TIME_LIMIT - 1)
    if out.returncode == 0:
        return
    err = out.stderr.strip()
    if out.returncode != 2:
        raise _CliFailure("crash", f"exit {out.returncode}: {err[-300:]}")
    why = clear_message(err, names)
    raise _CliFailure("error" if why is None else "unclear", err[:400] + (f" [{why}]" if why else ""))


def _cpu() -> float:
    """CPU seconds of this process and its threads: the hang criterion on a shared machine, where wall time
    also counts the other jobs' turns on the two cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_main(sources_file: str, domain: str) -> None:
    """Read cases (JSON lines) from stdin, answer results (JSON lines) on stdout. Runs under the limits. The
    worker of structured inputs loads torch first (checkpoints need it), so that a case never pays for it."""
    sources = json.loads(Path(sources_file).read_text())
    if domain == "input":
        import torch  # noqa: F401
        import zarr  # noqa: F401
    else:
        import dask.array  # noqa: F401
        import tifffile  # noqa: F401
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    for line in sys.stdin:
        case = json.loads(line)
        t0 = time.perf_counter()
        c0 = _cpu()
        with tempfile.TemporaryDirectory(prefix="wsimil-fuzz-") as d:
            if case["domain"] == "slide":
                res = run_slide_case(case, sources, Path(d))
            else:
                res = run_input_case(case, sources, Path(d))
        res["id"] = case["id"]
        res["seconds"] = round(time.perf_counter() - t0, 3)
        res["cpu_s"] = round(_cpu() - c0, 3)
        res["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out.write(json.dumps(res) + "\n")
        out.flush()


# =================================================================================================== parent


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    os.setpgrp()


class Worker:
    """A child process that runs cases one at a time; restarted after a crash or a hang."""

    def __init__(self, sources_file: Path, domain: str = "slide"):
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        self.domain, self.cases = domain, 0
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(sources_file), "--domain", domain],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=_limits, env=env)
        os.set_blocking(self.proc.stderr.fileno(), False)

    def run(self, case: dict[str, Any], limit: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.cases += 1
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"id": case["id"], "outcome": "crash", "message": "the worker had died"}
        deadline = t0 + WALL_LIMIT + 20.0  # the first case of a fresh worker also pays for its imports
        while True:
            left = deadline - time.perf_counter()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    res = json.loads(line)
                    if res.get("cpu_s", res["seconds"]) > limit or res["seconds"] > WALL_LIMIT:
                        res.update(outcome="hang", message=f"took {res['seconds']:.1f} s, {res.get('cpu_s', 0):.1f} "
                                                           f"s of CPU (limit {limit:g} s)")
                    return res
                code = self.proc.wait(5)
                tail = self._stderr()
                kind = "memory" if "MemoryError" in tail or "std::bad_alloc" in tail else "crash"
                return {"id": case["id"], "outcome": kind, "message": f"the process died (exit {code}): {tail[-300:]}"}
            if left <= 0:
                self.kill()
                return {"id": case["id"], "outcome": "hang", "message": f"no answer after {limit:g} s"}

    def _stderr(self) -> str:
        with contextlib.suppress(Exception):
            return self.proc.stderr.read() or ""
        return ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_domain: dict[str, Counter] = {}
    by_source: dict[str, Counter] = {}
    for r in results:
        domain, source = r["id"].split("/")[:2]
        by_domain.setdefault(domain, Counter())[r["outcome"]] += 1
        by_source.setdefault(f"{domain}/{source}", Counter())[r["outcome"]] += 1
    bad = [r for r in results if r["outcome"] in BAD_OUTCOMES]
    oks = [r for r in results if r["id"].startswith("slide/") and r["outcome"] == "ok"]
    return {
        "cases": len(results),
        "outcomes": dict(Counter(r["outcome"] for r in results)),
        "by_domain": {k: dict(v) for k, v in by_domain.items()},
        "by_source": {k: dict(v) for k, v in sorted(by_source.items())},
        "bad": bad,
        "slowest_s": max((r.get("seconds", 0) for r in results), default=0),
        "slowest_cpu_s": max((r.get("cpu_s", 0) for r in results), default=0),
        "max_rss_mb": max((r.get("max_rss_mb", 0) for r in results), default=0),
        "slide_ok_pixels_changed": sum(1 for r in oks if r.get("changed")),
        "slide_ok": len(oks),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/fuzz"))
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--ci", action="store_true", help="the CI subset: ~100 cases")
    ap.add_argument("--per-slide", type=int, default=None, help="variants per slide file (default 120; CI 11)")
    ap.add_argument("--per-input", type=int, default=None, help="variants per structured kind (default 60; CI 5)")
    ap.add_argument("--resume", action="store_true", help="keep OUT/results.jsonl and skip the cases in it")
    ap.add_argument("--retry-bad", action="store_true",
                    help="with --resume: run again the cases whose outcome was bad (e.g. a hang under load)")
    ap.add_argument("--rerun", default=None, metavar="TEXT",
                    help="with --resume: run again the cases whose id contains TEXT (e.g. after a fix to one reader)")
    ap.add_argument("--no-real", action="store_true", help="only the synthetic slide (no ../shared/data)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--domain", default="slide", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.domain)
        return 0
    per_slide = args.per_slide or (11 if args.ci else 120)
    per_input = args.per_input or (5 if args.ci else 60)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sources = build_sources(out / "sources", with_real=not args.no_real)
    sources_file = out / "sources" / "sources.json"
    # the unmutated slides' digests, so that an "ok" variant can say whether its pixels changed
    cases = plan(sources, per_slide, per_input, args.seed)
    results_path = out / "results.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if args.resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                done[r["id"]] = r
    elif results_path.exists():
        results_path.unlink()
    retried = []
    if args.retry_bad or args.rerun:
        retried = [k for k, r in done.items() if (args.retry_bad and r["outcome"] in BAD_OUTCOMES)
                   or (args.rerun and args.rerun in k)]
        for k in retried:
            done.pop(k)
    reference = _reference_digests(sources, out)
    todo = [c for c in cases if c["id"] not in done]
    print(f"{len(cases)} cases ({len(done)} already done), {len(sources['slides'])} slide files, "
          f"limits {TIME_LIMIT:g} s and {MEMORY_LIMIT >> 20} MB per case", flush=True)
    workers: dict[str, Worker] = {}
    t0 = time.perf_counter()
    try:
        with results_path.open("a") as fh:
            for i, case in enumerate(todo):
                domain = case["domain"]
                worker = workers.get(domain)
                if worker is None or worker.cases >= RECYCLE:
                    if worker is not None:
                        worker.close()
                    worker = workers[domain] = Worker(sources_file, domain)
                res = worker.run(case, TIME_LIMIT)
                res["kind"] = case["kind"]
                if res.get("digest") and case["domain"] == "slide":
                    res["changed"] = res["digest"] != reference.get(case["source"])
                if res["outcome"] in ("crash", "hang", "memory") or worker.proc.poll() is not None:
                    worker.kill()
                    workers.pop(domain)
                done[case["id"]] = res
                fh.write(json.dumps(res) + "\n")
                fh.flush()
                if res["outcome"] in BAD_OUTCOMES:
                    print(f"  {res['outcome'].upper():12s} {case['id']} ({res.get('what', case['kind'])}): "
                          f"{res.get('message', '')[:200]}", flush=True)
                if (i + 1) % 50 == 0:
                    print(f"  {i + 1}/{len(todo)} in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        for w in workers.values():
            w.close()
    summary = summarise([done[c["id"]] for c in cases if c["id"] in done])
    summary.update(retried=retried if len(retried) <= 20 else f"{len(retried)} cases", seed=args.seed, per_slide=per_slide, per_input=per_input, ci=args.ci,
                   time_limit_s=TIME_LIMIT, memory_limit_mb=MEMORY_LIMIT >> 20,
                   wall_s=round(time.perf_counter() - t0, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("bad", "by_source")}, indent=1))
    for src, counts in summary["by_source"].items():
        print(f"  {src:48s} {dict(counts)}")
    return 0 if not summary["bad"] else 1


def _reference_digests(sources: dict[str, Any], out: Path) -> dict[str, str]:
    """Digests of the unmutated slides read the same way, computed once by a worker."""
    ref_file = out / "sources" / "reference.json"
    if ref_file.exists():
        return json.loads(ref_file.read_text())
    worker = Worker(out / "sources" / "sources.json")
    ref = {}
    try:
        for name in sources["slides"]:
            res = worker.run({"id": f"ref/{name}", "domain": "slide", "source": name, "kind": "none",
                              "seed": [0, name, -1]}, 60.0)
            ref[name] = res.get("digest")
    finally:
        worker.close()
    ref_file.write_text(json.dumps(ref))
    return ref


if __name__ == "__main__":
    sys.exit(main())

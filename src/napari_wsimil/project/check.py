"""Finding and repairing damage in a project folder: ``wsimil project check DIR [--repair]`` and the Check button.

Why this exists: every write is atomic, so a crash alone leaves nothing half-written, but a project
folder lives for months on laptops, USB drives and synced shares. A disk error, a sync tool or a hand
edit can still garble project.json, a label chunk or a GeoJSON file, a slide can move, an interrupted
save or export leaves temporaries, and a lock file can name a process that is long gone. The check
names each such problem in words a pathologist can act on; the repair undoes what can be undone
without losing more work:

==================  =============================================  ==========================================
damage              what the check looks at                        what --repair does
==================  =============================================  ==========================================
project-file        project.json parses and has a valid schema     restore its previous good copy
label-store         labels/<id>.zarr/zarr.json parses as an array  restore its previous good copy
label-chunk         every stored chunk decodes                     restore the chunk's previous good copy, or
                                                                   (none, or damaged too) set the chunk aside
                                                                   so it reads as unlabelled (named: work lost)
annotations         annotations/<id>.geojson parses                restore its previous good copy
missing-slide       each slide file exists                         nothing: relink it (it names the command)
half-written        temporaries of an interrupted save or export   remove them
stale-lock          a lock file naming a process that is not       clear it
                    running on this machine
==================  =============================================  ==========================================

Previous good copies are the hard links that :mod:`napari_wsimil.io.atomic` keeps at every save of these
files. Damaged files are never deleted: they are moved to ``removed/damaged-<time>/`` first. A repair
takes the project's write lock, so it is refused while the project is open for writing elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.atomic import PREV_SUFFIX, TMP_SUFFIX, fsync_dir, previous_name
from .errors import ProjectError
from .lock import LOCK_NAME, ProjectLock
from .schema import PROJECT_FILE, SCHEMA_VERSION, ProjectData, read_project_file, resolve_stored


@dataclass(frozen=True)
class Damage:
    """One problem: its ``kind`` (see the module table), the file, plain words, and what repair would do
    (``fix`` None: no automatic repair; ``what`` then says what to do)."""

    kind: str
    path: Path
    what: str
    fix: str | None = None
    slide_id: str | None = None

    def __str__(self) -> str:
        what = self.what.rstrip(".")
        tail = f" Repair: {self.fix}." if self.fix else ""
        return f"[{self.kind}] {what}{'' if what.endswith('?') else '.'}{tail}"


@dataclass
class CheckReport:
    """What a check found (``damage``) and, after a repair, what was done (``repaired``) and what is left."""

    root: Path
    damage: list[Damage] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def repairable(self) -> list[Damage]:
        return [d for d in self.damage if d.fix]

    def text(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.checked.items())
        lines = [f"project {self.root}: checked {counts}"]
        lines += [f"repaired: {r}" for r in self.repaired]
        if self.ok:
            lines.append("no damage found" if not self.repaired else "no damage left")
        else:
            lines.append(f"{len(self.damage)} problem{'s' if len(self.damage) != 1 else ''}:")
            lines += [f"  {d}" for d in self.damage]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- checks
def project_file_damage(root: Path) -> tuple[dict | None, Damage | None]:
    """(usable project.json content, damage): from the file itself, else from its previous good copy (then
    also the damage naming the file), else (None, damage) with no repair."""
    try:
        data = read_project_file(root)
        ProjectData.from_json(data, root)
        return data, None
    except ProjectError as exc:
        if not (root / PROJECT_FILE).exists() and not previous_name(root / PROJECT_FILE).exists():
            raise  # not a project at all
        if _newer_schema(root / PROJECT_FILE):
            raise  # not damage: a newer napari-wsimil wrote it
        reason = str(exc)
    prev = previous_name(root / PROJECT_FILE)
    try:
        data = json.loads(prev.read_text(encoding="utf-8"))
        ProjectData.from_json(data, root)
        if int(data["schema"]) < 1:
            raise ValueError("schema")
    except (OSError, ValueError, TypeError, KeyError, ProjectError):
        return None, Damage("project-file", root / PROJECT_FILE,
                            f"project.json is damaged: {reason}; it has no usable previous copy, restore it "
                            "from a backup", None)
    saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(prev.stat().st_mtime))
    return data, Damage("project-file", root / PROJECT_FILE, f"project.json is damaged: {reason}",
                        f"restore its previous good copy (saved {saved})")


def _newer_schema(path: Path) -> bool:
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["schema"]) > SCHEMA_VERSION
    except Exception:  # noqa: BLE001 - unreadable means damaged, not newer
        return False


def _chunk_files(store: Path) -> Iterator[tuple[Path, tuple[int, ...]]]:
    base = store / "c"
    if not base.is_dir():
        return
    for path in base.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            yield path, tuple(int(p) for p in path.relative_to(base).parts)
        except ValueError:
            continue


def label_store_damage(store: Path, slide_id: str, deep: bool = True) -> list[Damage]:
    """Damage of one label store: its metadata, then (``deep``) every stored chunk, decoded one by one."""
    import zarr

    meta = store / "zarr.json"
    try:
        json.loads(meta.read_text(encoding="utf-8"))
        arr = zarr.open_array(store=str(store), mode="r")
        if arr.ndim != 2:
            raise ValueError(f"{arr.ndim}-D")
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for damaged metadata
        fix = "restore its previous good copy" if previous_name(meta).exists() else None
        what = f"the pixel labels of slide '{slide_id}' cannot be opened: {meta} is damaged ({_short(exc)})"
        if fix is None:
            what += "; set the folder aside to start this slide's labels afresh"
        return [Damage("label-store", meta, what, fix, slide_id)]
    if not deep:
        return []
    out = []
    cy_, cx_ = arr.chunks
    h, w = arr.shape
    for path, idx in _chunk_files(store):
        if len(idx) != 2 or idx[0] * cy_ >= h or idx[1] * cx_ >= w:
            continue
        cy, cx = idx
        try:
            arr[cy * cy_:(cy + 1) * cy_, cx * cx_:(cx + 1) * cx_]
        except Exception as exc:  # noqa: BLE001 - codec errors (zstd checksum, short read) of one chunk
            px0, py0 = cx * cx_, cy * cy_
            prev = previous_name(path)
            fix = (f"restore the chunk's previous good copy (the last save of this chunk, made "
                   f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(prev.stat().st_mtime))}, is lost), or if that is "
                   f"damaged too set the chunk aside" if prev.exists()
                   else "set the chunk aside: that area reads as unlabelled (its painting is lost)")
            out.append(Damage("label-chunk", path,
                              f"slide '{slide_id}': the pixel labels of label pixels x {px0}-{px0 + cx_}, "
                              f"y {py0}-{py0 + cy_} (chunk {cy}/{cx}) cannot be decoded ({_short(exc)})", fix,
                              slide_id))
    return out


def annotation_damage(path: Path, slide_id: str) -> Damage | None:
    from .annotations import read_geojson

    try:
        read_geojson(path)
        return None
    except Exception as exc:  # noqa: BLE001 - ProjectError for bad GeoJSON, OSError, UnicodeError
        fix = "restore its previous good copy" if previous_name(path).exists() else None
        what = f"the boxes and polygons of slide '{slide_id}' in {path.name} cannot be read ({_short(exc)})"
        if fix is None:
            what += "; fix or remove the file by hand"
        return Damage("annotations", path, what, fix, slide_id)


def lock_damage(root: Path) -> Damage | None:
    """A lock file naming a process of this machine that no longer runs (the kernel has dropped the lock, so
    it blocks nothing, but the stale name would mislead whoever reads it)."""
    lock = ProjectLock(root)
    if not lock.path.exists():
        return None
    owner = lock.owner()
    if not owner.pid or (owner.host and owner.host != socket.gethostname()) or _alive(owner.pid):
        return None
    if lock.held_elsewhere():
        return None
    return Damage("stale-lock", lock.path, f"the lock file names pid {owner.pid}, which is no longer running "
                  "(left by a crash; it does not block opening)", "clear it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(f".*{TMP_SUFFIX}") if p.is_file()]


def check_project(dir: str | os.PathLike[str], deep: bool = True) -> CheckReport:
    """Every kind of damage the module docstring lists; ``deep`` also decodes every label chunk (seconds
    for a large project, which is why opening a project does the cheap part only)."""
    root = Path(dir).expanduser().resolve()
    report = CheckReport(root)
    data, dmg = project_file_damage(root)
    if dmg is not None:
        report.damage.append(dmg)
    records = ProjectData.from_json(data, root).records if data is not None else {}
    report.checked["slides"] = len(records)
    for rec in records.values():
        path = resolve_stored(root, rec.path)
        if not path.exists():
            report.damage.append(Damage("missing-slide", path, f"slide '{rec.slide_id}': its file {path} is missing "
                                        f"(moved, renamed or on a drive that is not mounted); relink it with the "
                                        "Relink button or project.relink()", None, rec.slide_id))
    stores = sorted((root / "labels").glob("*.zarr")) if (root / "labels").is_dir() else []
    report.checked["label stores"] = len(stores)
    n_chunks = 0
    for store in stores:
        report.damage += label_store_damage(store, store.name[:-len(".zarr")], deep)
        n_chunks += sum(1 for _ in _chunk_files(store))
    if deep:
        report.checked["label chunks"] = n_chunks
    anns = sorted((root / "annotations").glob("*.geojson")) if (root / "annotations").is_dir() else []
    report.checked["annotation files"] = len(anns)
    for path in anns:
        d = annotation_damage(path, path.name[:-len(".geojson")])
        if d is not None:
            report.damage.append(d)
    for tmp in temporaries(root):
        report.damage.append(Damage("half-written", tmp, f"{tmp.relative_to(root)} is a half-written file left by "
                                    "an interrupted save or export (the finished file beside it is intact)",
                                    "remove it"))
    lock = lock_damage(root)
    if lock is not None:
        report.damage.append(lock)
    return report


# --------------------------------------------------------------------------------------------- repair
def repair_project(dir: str | os.PathLike[str]) -> CheckReport:
    """Check, repair what can be repaired (see the module table), and check again. Takes the write lock:
    a ProjectError says who holds it when the project is open for writing elsewhere."""
    root = Path(dir).expanduser().resolve()
    before = check_project(root)
    if not before.repairable:
        return before
    lock = ProjectLock(root)
    if not lock.acquire():
        raise ProjectError(f"cannot repair {root}: it is open for writing in another window ({lock.owner()}); "
                           "close it there first")
    done: list[str] = []
    try:
        aside = root / "removed" / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        for d in before.repairable:
            action = _REPAIRS[d.kind]
            done.append(action(root, d, aside))
    finally:
        lock.release()
    after = check_project(root)
    after.repaired = done
    return after


def _set_aside(root: Path, path: Path, aside: Path) -> Path:
    target = aside / path.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))
    fsync_dir(path.parent)
    return target


def _restore(root: Path, d: Damage, aside: Path) -> str:
    prev = previous_name(d.path)
    if d.path.exists():
        _set_aside(root, d.path, aside)
    os.link(prev, d.path)
    fsync_dir(d.path.parent)
    return (f"{d.path.relative_to(root)} restored from its previous good copy"
            + (f" (the damaged one is in {aside.relative_to(root)})" if aside.exists() else ""))


def _repair_chunk(root: Path, d: Damage, aside: Path) -> str:
    prev = previous_name(d.path)
    _set_aside(root, d.path, aside)
    where = d.what.split(": ", 1)[-1].split(" cannot be decoded")[0]
    if prev.exists():
        os.link(prev, d.path)
        fsync_dir(d.path.parent)
        store = d.path
        while store.suffix != ".zarr":
            store = store.parent
        if not any(x.path == d.path for x in label_store_damage(store, d.slide_id or "", True)):
            return f"slide '{d.slide_id}': {where} restored from the chunk's previous good copy"
        _set_aside(root, d.path, aside / "previous")
    return (f"slide '{d.slide_id}': {where} set aside (no usable previous copy): that area now reads as unlabelled; "
            f"the damaged chunk is in {aside.relative_to(root)}")


def _remove_temporary(root: Path, d: Damage, aside: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        d.path.unlink()
    return f"removed the half-written {d.path.relative_to(root)}"


def _clear_lock(root: Path, d: Damage, aside: Path) -> str:
    (root / LOCK_NAME).write_text("", encoding="utf-8")  # we hold the lock here; the file only names the holder
    return "cleared the stale lock file"


_REPAIRS: dict[str, Callable[[Path, Damage, Path], str]] = {
    "project-file": _restore, "label-store": _restore, "annotations": _restore,
    "label-chunk": _repair_chunk, "half-written": _remove_temporary, "stale-lock": _clear_lock,
}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "…"


def open_damage(root: Path) -> list[Damage]:
    """The cheap part of the check, run when a project opens: label store metadata only (no chunk decoding)."""
    out: list[Damage] = []
    if (root / "labels").is_dir():
        for store in sorted((root / "labels").glob("*.zarr")):
            out += label_store_damage(store, store.name[:-len(".zarr")], deep=False)
    return out


__all__ = ["CheckReport", "Damage", "PREV_SUFFIX", "check_project", "open_damage", "project_file_damage",
           "repair_project"]

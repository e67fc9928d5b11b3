"""Label classes: the table that gives pixel values and annotation classes their meaning.

Pixel labels store class *ids* (uint8), annotations store class *names* (as QuPath does). Ids are
never reused or renumbered, so a rename or recolour never touches a label file; id 0 is reserved
for "unlabelled", which training ignores, so erasing paint means writing 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ProjectError

UNLABELLED = "unlabelled"
MAX_CLASS_ID = 255  # labels are uint8

#: Distinct colours for new classes (Sasha Trubetskoy's 20-colour list, the first two used by default).
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
    "#808000", "#ffd8b1", "#000075", "#808080",
)
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class ClassDef:
    """One label class. ``color`` is ``#rrggbb``."""

    id: int
    name: str
    color: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return hex_to_rgb(self.color)

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "color": self.color}

    @classmethod
    def from_json(cls, d: dict) -> ClassDef:
        return cls(int(d["id"]), str(d["name"]), normalize_color(d["color"]))


def default_classes() -> list[ClassDef]:
    return [ClassDef(0, UNLABELLED, "#000000"), ClassDef(1, "tumour", "#e6194b"), ClassDef(2, "normal", "#3cb44b")]


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    c = normalize_color(color)
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def rgb_to_hex(rgb: Sequence[int]) -> str:
    r, g, b = (int(v) for v in rgb)
    for v in (r, g, b):
        if not 0 <= v <= 255:
            raise ProjectError(f"colour components must be 0-255, got {tuple(rgb)}")
    return f"#{r:02x}{g:02x}{b:02x}"


def normalize_color(color: object) -> str:
    """``#rrggbb`` from ``#rrggbb``, ``#rgb`` or an (r, g, b) triple of 0-255 ints."""
    if isinstance(color, str):
        c = color.strip()
        if re.fullmatch(r"#[0-9a-fA-F]{3}", c):
            c = "#" + "".join(ch * 2 for ch in c[1:])
        if _HEX.match(c):
            return c.lower()
        raise ProjectError(f"colour {color!r} is not of the form #rrggbb (e.g. #e6194b)")
    if isinstance(color, Sequence) and len(color) == 3:
        return rgb_to_hex(color)  # type: ignore[arg-type]
    raise ProjectError(f"colour {color!r} is not of the form #rrggbb (e.g. #e6194b)")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ProjectError(f"a class name must be non-empty text, got {name!r}")
    if name != name.strip():
        raise ProjectError(f"class name {name!r} starts or ends with spaces")
    return name


def next_color(used: Iterable[str]) -> str:
    used_set = {u.lower() for u in used}
    for c in PALETTE:
        if c not in used_set:
            return c
    return PALETTE[len(used_set) % len(PALETTE)]


def new_class(table: Sequence[ClassDef], name: str, color: str | None = None) -> ClassDef:
    """The class ``name`` as added to ``table``: the next id, and ``color`` or else an unused palette colour."""
    check_name(name)
    if any(c.name == name for c in table):
        raise ProjectError(f"class {name!r} already exists")
    new_id = max(c.id for c in table) + 1
    if new_id > MAX_CLASS_ID:
        raise ProjectError(f"a project holds at most {MAX_CLASS_ID} classes (labels are 8-bit)")
    return ClassDef(new_id, name, normalize_color(color) if color else next_color(c.color for c in table))


def build_classes(spec: Iterable[object] | None) -> list[ClassDef]:
    """The class table for a new project from names, ``(name, colour)`` pairs or ClassDefs.

    "unlabelled" (id 0) is always first; other ids follow in the order given unless ClassDefs say.
    """
    if spec is None:
        return default_classes()
    out = [ClassDef(0, UNLABELLED, "#000000")]
    for item in spec:
        if isinstance(item, ClassDef):
            if item.id == 0:
                continue
            cd = ClassDef(int(item.id), check_name(item.name), normalize_color(item.color))
        elif isinstance(item, str):
            if item == UNLABELLED:
                continue
            cd = ClassDef(max(c.id for c in out) + 1, check_name(item), next_color(c.color for c in out))
        else:
            try:
                name, color = item  # type: ignore[misc]
            except (TypeError, ValueError):
                raise ProjectError(f"a class is a name, (name, colour) or ClassDef, got {item!r}") from None
            if name == UNLABELLED:
                continue
            cd = ClassDef(max(c.id for c in out) + 1, check_name(name), normalize_color(color))
        out.append(cd)
    check_table(out)
    return out


def check_table(classes: Sequence[ClassDef]) -> None:
    problems = []
    ids = [c.id for c in classes]
    names = [c.name for c in classes]
    if 0 not in ids:
        problems.append("id 0 (unlabelled) is missing")
    for i in sorted(set(ids)):
        if ids.count(i) > 1:
            problems.append(f"id {i} is used {ids.count(i)} times")
        if not 0 <= i <= MAX_CLASS_ID:
            problems.append(f"id {i} is outside 0-{MAX_CLASS_ID}")
    for n in sorted(set(names)):
        if names.count(n) > 1:
            problems.append(f"name {n!r} is used {names.count(n)} times")
    if problems:
        raise ProjectError("invalid class table: " + "; ".join(problems))

"""The global model at a site: kept as a run folder, and its map of one of the site's own slides.

Every message a site answers carries the current global model. The site keeps the last one it received as
``WORKDIR/global`` (``PROJECT/federated/global`` for a site started from a project): a run folder of the
method's family (``run.json`` + ``last.json`` + checkpoint, as the server's own run folder), written from the
weights and settings the server sent and nothing else. The Federation panel maps the slide open in the viewer
with it (:func:`global_map`), locally: the map never leaves the site. The map is the family's live layer as
the Training widget shows it (HistoFL: attention; FedMix: tumour probability), through the same
``slide_map`` of the run's family, so it is what ``wsimil predict`` with that model would give.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .protocol import Arrays

GLOBAL_DIR = "global"


def save_global_model(method: Any, config: Any, arrays: Arrays, server_round: int, workdir: Path,
                      classes: Sequence[str] | None = None) -> Path:
    """Write the global model received for ``server_round`` to ``WORKDIR/global`` (checkpoint first, then
    ``last.json``, atomically: a reader never sees half of it); returns the folder."""
    from ..io.atomic import write_text

    out = Path(workdir) / GLOBAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    info = method.run_info(config, [], list(classes or getattr(config, "classes", None) or []))
    info.update(received_round=int(server_round), why="the global model as this site last received it")
    write_text(out / "run.json", json.dumps(info, indent=1))
    method.write_round(out, arrays, int(server_round), config, [])
    return out


def global_round(run_dir: Path) -> int | None:
    """The round of the model in a run folder (None while there is none)."""
    try:
        return int(json.loads((Path(run_dir) / "last.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def global_map(run_dir: str | Path, slide_id: str, source: str | Path, weights: str = "last") -> Any:
    """The map (:class:`~napari_wsimil.train.events.MapEvent`) of ``slide_id`` of the project or cohort
    ``source`` from the model in ``run_dir`` (a site's ``global`` folder or a federated run folder): the run's
    family's own map of a slide, computed here."""
    from ..errors import WsimilError
    from ..train.registry import run_family

    run_dir = Path(run_dir)
    if global_round(run_dir) is None:
        raise WsimilError(f"{run_dir} holds no global model yet: it appears after the site's first round")
    family, _ = run_family(run_dir)
    return family.slide_map(run_dir, slide_id, Path(source), weights=weights)


__all__ = ["GLOBAL_DIR", "global_map", "global_round", "save_global_model"]

"""Reading the house's ``.npz`` files (feature bags, zoom bags): arrays plus a JSON ``attrs`` member, never
pickle, and one clear error naming the file for anything that is not such a file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError, short


@contextmanager
def open_npz(path: str | os.PathLike[str], error: type[WsimilError], name: str, kind: str
             ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(file, attrs)`` of an ``.npz`` opened without pickle. A missing file is ``error("<name> PATH does not
    exist")``; a zip, key or JSON error — or any error while the caller reads it inside the ``with`` — is
    ``error("FILE (PATH) is not a readable <kind>: reason")``, so a truncated file never escapes as a low-level
    exception."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            yield z, json.loads(str(z["attrs"][()]))
    except FileNotFoundError:
        raise error(f"{name} {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - zip, key or JSON errors all mean "not such a file"
        raise error(f"{path.name} ({path}) is not a readable {kind}: {short(exc)}") from exc


__all__ = ["open_npz"]

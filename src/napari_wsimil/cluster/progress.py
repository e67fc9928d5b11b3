"""A command-line progress bar over slides, with an ETA from the slides actually computed.

Skipped slides (already done, by an earlier run or another client) finish instantly; counting them in the rate
would promise an ETA the remaining slides cannot keep, so the rate is the wall time per *computed* slide.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class SlideBar:
    """``update(result)`` after each slide: one line naming it, then the bar with counts, rate and ETA."""

    def __init__(self, total: int, what: str = "slides", stream: IO[str] | None = None, width: int = 24) -> None:
        self.total, self.what, self.width = total, what, width
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.finished = 0
        self.computed = 0
        self.counts: dict[str, int] = {}

    def eta(self) -> float | None:
        if not self.computed:
            return None
        per = (time.perf_counter() - self.start) / self.computed
        return per * (self.total - self.finished)

    def line(self) -> str:
        filled = int(self.width * self.finished / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        eta = self.eta()
        rate = f"  {elapsed / self.computed:.1f} s/slide" if self.computed else ""
        return (f"[{bar}] {self.finished}/{self.total} {self.what}{rate}  elapsed {_clock(elapsed)}"
                f"  ETA {'?' if eta is None else _clock(eta)}")

    def update(self, result: dict[str, Any]) -> None:
        status = str(result.get("status"))
        self.finished += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "done":
            self.computed += 1
        regions = f" as {result['regions']} region tasks" if result.get("regions") else ""
        what = {"done": f"done in {float(result.get('seconds') or 0):.1f} s{regions}",
                "skipped": "up to date, skipped",
                "failed": f"FAILED: {result.get('message', '')}"}.get(status, status)
        print(f"\r{result.get('slide_id')}: {what}".ljust(len(self.line()) + 1), file=self.stream)
        print(self.line(), end="", file=self.stream, flush=True)

    def close(self) -> None:
        print(file=self.stream, flush=True)

    def summary(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))


__all__ = ["SlideBar"]

"""A small live plot of training and validation loss per epoch, painted with QPainter.

No matplotlib: a dock widget that repaints every epoch must stay light, and two polylines on a
dark background are all the user needs to see whether training converges or overfits.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

SERIES = {"train": QColor("#f0a030"), "val": QColor("#40a0f0")}
BACKGROUND = QColor("#262930")  # napari's dark theme
AXIS = QColor("#8a8d93")


class LossPlot(QWidget):
    """Loss against epoch for the series ``train`` and ``val``; one value per epoch (a later one replaces)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._data: dict[str, dict[int, float]] = {k: {} for k in SERIES}
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("Loss per epoch: orange training, blue validation.")

    def sizeHint(self) -> QSize:
        return QSize(260, 130)

    # --- data ------------------------------------------------------------------------------------
    def add(self, series: str, epoch: int, value: float) -> None:
        """Record ``value`` for ``epoch`` (non-finite values are skipped: NaN has no place on an axis)."""
        if series not in self._data:
            raise KeyError(f"unknown series {series!r}; use one of {', '.join(SERIES)}")
        value = float(value)
        if math.isfinite(value):
            self._data[series][int(epoch)] = value
            self.update()

    def clear(self) -> None:
        for points in self._data.values():
            points.clear()
        self.update()

    def set_values(self, values: dict[str, list[tuple[int, float]]]) -> None:
        """Replace what is plotted with ``{series: [(epoch, loss), ...]}`` (a saved run's history)."""
        for points in self._data.values():
            points.clear()
        for series, points in values.items():
            for epoch, value in points:
                if series in self._data and math.isfinite(float(value)):
                    self._data[series][int(epoch)] = float(value)
        self.update()

    def values(self) -> dict[str, list[tuple[int, float]]]:
        """What is plotted: ``{series: [(epoch, loss), ...]}`` sorted by epoch (tests read this)."""
        return {k: sorted(v.items()) for k, v in self._data.items()}

    # --- painting --------------------------------------------------------------------------------
    def paintEvent(self, event: Any) -> None:
        p = QPainter(self)
        try:
            p.setRenderHint(QPainter.RenderHint.Antialiasing)
            p.fillRect(self.rect(), BACKGROUND)
            self._paint(p)
        finally:
            p.end()

    def _paint(self, p: QPainter) -> None:
        fm = p.fontMetrics()
        left, bottom, top, right = fm.horizontalAdvance("0.000") + 8, fm.height() + 4, fm.height() + 2, 8
        area = QRectF(left, top, max(10, self.width() - left - right), max(10, self.height() - top - bottom))
        p.setPen(QPen(AXIS, 1))
        p.drawLine(area.bottomLeft(), area.bottomRight())
        p.drawLine(area.bottomLeft(), area.topLeft())
        points = [pt for v in self._data.values() for pt in v.items()]
        if not points:
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, "loss per epoch")
            return
        e0, e1 = min(e for e, _ in points), max(e for e, _ in points)
        y0, y1 = min(v for _, v in points), max(v for _, v in points)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

        def xy(e: int, v: float) -> QPointF:
            fx = 0.5 if e1 == e0 else (e - e0) / (e1 - e0)
            fy = (v - y0) / (y1 - y0)
            return QPointF(area.left() + fx * area.width(), area.bottom() - fy * area.height())

        p.drawText(QRectF(0, area.top() - fm.height() / 2, left - 4, fm.height()),
                   Qt.AlignmentFlag.AlignRight, f"{y1:.3g}")
        p.drawText(QRectF(0, area.bottom() - fm.height() / 2, left - 4, fm.height()),
                   Qt.AlignmentFlag.AlignRight, f"{y0:.3g}")
        p.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), fm.height()),
                   Qt.AlignmentFlag.AlignLeft, str(e0))
        p.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), fm.height()),
                   Qt.AlignmentFlag.AlignRight, f"epoch {e1}")
        x = area.left() + 4
        for name, color in SERIES.items():
            series = sorted(self._data[name].items())
            if not series:
                continue
            p.setPen(QPen(color, 2))
            path = QPainterPath(xy(*series[0]))
            for e, v in series[1:]:
                path.lineTo(xy(e, v))
            p.drawPath(path)
            for e, v in series:
                p.drawEllipse(xy(e, v), 2.0, 2.0)
            label = f"{name} {series[-1][1]:.3f}"
            p.drawText(QPointF(x, fm.ascent()), label)
            x += fm.horizontalAdvance(label) + 12

"""A small live plot of training and validation loss per epoch, painted with QPainter.

No matplotlib: a dock widget that repaints every epoch must stay light, and two polylines are all the
user needs to see whether training converges or overfits.

Colours follow napari's theme (:meth:`LossPlot.follow`): the panel, axes and text take the theme's
``foreground``, ``highlight`` and ``text``, and the two series a darker orange and blue on a light theme,
where the dark theme's pale ones would wash out. A theme change repaints the plot at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

log = logging.getLogger(__name__)

SERIES = ("train", "val")


@dataclass(frozen=True)
class PlotColors:
    """What the plot paints with: the panel, the axes, the labels, and one colour per series."""

    background: QColor
    axis: QColor
    text: QColor
    series: dict[str, QColor]


#: napari's dark theme (the default, and what is used without napari)
DARK = PlotColors(QColor("#2e333e"), QColor("#61696e"), QColor("#f0f1f2"),
                  {"train": QColor("#f0a030"), "val": QColor("#40a0f0")})
SERIES_ON_LIGHT = {"train": QColor("#c05a00"), "val": QColor("#1060b0")}


def colors_for_theme(theme_id: str) -> PlotColors:
    """The plot's colours under napari theme ``theme_id`` ("dark", "light", "system" or a plugin theme)."""
    from napari.utils.theme import get_theme

    theme = get_theme(theme_id)
    background = QColor(str(theme.foreground))
    light = background.lightnessF() > 0.5
    return PlotColors(background, QColor(str(theme.highlight)), QColor(str(theme.text)),
                      dict(SERIES_ON_LIGHT if light else DARK.series))


class LossPlot(QWidget):
    """Loss against epoch for the series ``train`` and ``val``; one value per epoch (a later one replaces)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._data: dict[str, dict[int, float]] = {k: {} for k in SERIES}
        self.colors = DARK
        self.theme: str | None = None
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("Loss per epoch: orange training, blue validation.")

    def sizeHint(self) -> QSize:
        return QSize(260, 130)

    # --- theme -----------------------------------------------------------------------------------
    def set_theme(self, theme_id: str) -> None:
        """Paint with napari theme ``theme_id``'s colours from now on."""
        self.colors = colors_for_theme(theme_id)
        self.theme = theme_id
        self.update()

    def follow(self, viewer: Any) -> None:
        """Take ``viewer``'s theme now and whenever it changes (Preferences > Appearance)."""
        if viewer is None:
            return
        self.set_theme(viewer.theme)
        viewer.events.theme.connect(self._on_theme)

    def _on_theme(self, event: Any) -> None:
        try:
            self.set_theme(str(event.value))
        except RuntimeError:  # the widget was closed before the viewer: nothing left to paint
            log.debug("loss plot gone before its viewer's theme changed")

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
            p.fillRect(self.rect(), self.colors.background)
            self._paint(p)
        finally:
            p.end()

    def _paint(self, p: QPainter) -> None:
        fm = p.fontMetrics()
        left, bottom, top, right = fm.horizontalAdvance("0.000") + 8, fm.height() + 4, fm.height() + 2, 8
        area = QRectF(left, top, max(10, self.width() - left - right), max(10, self.height() - top - bottom))
        p.setPen(QPen(self.colors.axis, 1))
        p.drawLine(area.bottomLeft(), area.bottomRight())
        p.drawLine(area.bottomLeft(), area.topLeft())
        p.setPen(QPen(self.colors.text, 1))
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
        for name, color in self.colors.series.items():
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

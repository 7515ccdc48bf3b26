"""The score histogram of the widget: kept and rejected in two colours, a cut that can be dragged, the counts on
each side, the automatic cut, and below it the log-likelihood trace with the prunings marked.

Drawn with QPainter in ``paintEvent`` (a few rectangles, lines and labels: a millisecond or two), not with
matplotlib: a full matplotlib draw of the same figure took 40-80 ms of main-thread time on the 2-core
machine, more than the widget's budget for one pause of the event loop (see
``benchmarks/bench_ui_latency.py``). Tick positions still come from matplotlib's locators (computation only).
Scores are binned as in the report (``core.report.score_bin_edges``): on a logarithmic axis when they are
positive and span decades (the paper's sorting factors), linearly otherwise, over the 0.5th to 99.5th
percentile and the cuts (the rest are counted in the end bins). The x axis is the model's ``score_label``
with what larger means ("more junk-like"); when the result has a junk probability per particle, a second
axis on top reads the score as that probability. Colours follow the viewer's theme.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import LogLocator, MaxNLocator
from napari.utils.theme import get_theme
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from .core.report import score_bin_edges

__all__ = ["ScoreHistogram", "KEPT_COLOUR", "REJECTED_COLOUR", "axis_label"]

N_BINS = 60
#: The bins span the 0.5th to the 99.5th percentile of the scores (and the cuts); the rest go to the end bins.
TAIL = 0.005
#: Kept and rejected particles everywhere in the widget (a colour-blind-safe pair: blue and orange).
KEPT_COLOUR = "#4c9be8"
REJECTED_COLOUR = "#f08c3a"
#: Room left around the first histogram of a sort, so that later rounds usually fit the same axis.
X_MARGIN = 0.05
#: Junk probabilities labelled on the top axis, when the model gives them.
PROBABILITY_TICKS = (0.01, 0.1, 0.5, 0.9, 0.99)
#: Layout, in pixels: margins around the histogram plot and the trace's height.
LEFT, RIGHT, LINE, TRACE_HEIGHT = 46, 12, 15, 46


def axis_label(score_label: str) -> str:
    """The x axis of a score: the model's name for it, and which way is junk (every score: larger = more junk-like)."""
    return f"\u2190 particle-like    {score_label}    junk-like \u2192"


class ScoreHistogram(QWidget):
    """Histogram of junk scores with the cut, and the log-likelihood trace of the EM.

    Signals:
        cut_dragged(float): the user drags the cut on the plot to this score (while the mouse moves).
        cut_dropped(float): the user released the cut at this score.

    Attributes:
        scores: (n,) float64, the scores shown; kept: (n,) bool, which of them are on the kept side.
        counts: (N_BINS,) int, the histogram of all of them; kept_counts: of the kept ones.
        edges: (N_BINS + 1,) float64, the bin edges; logarithmic: whether they (and the axis) are logarithmic.
        cut: the score of the cut line, or None; automatic_cut: the sort's own cut (dotted), or None.
        title, x_label: the texts above and below the plot; counts_text: the counts on each side.
        probability_ticks: [(score, probability)] of the top axis (empty without junk probabilities).
        log_likelihood: (n_iterations,) float64, the trace shown; prunings: the EM iterations at which a round pruned.
        n_paints: how many times the widget was painted.
    """

    cut_dragged = Signal(float)
    cut_dropped = Signal(float)

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._viewer = viewer
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumHeight(250)
        self.setMouseTracking(False)
        self.setToolTip("drag on the histogram to move the cut: the particles left of it are kept (blue), the others "
                        "rejected (orange); the dotted line is the sort's own cut; the scores beyond the 0.5th and "
                        "99.5th percentiles are counted in the end bins")
        self.scores = np.empty(0)
        self.kept = np.zeros(0, dtype=bool)
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.kept_counts = np.zeros(N_BINS, dtype=np.int64)
        self.edges = np.linspace(0.0, 1.0, N_BINS + 1)
        self.logarithmic = False
        self.cut: float | None = None
        self.automatic_cut: float | None = None
        self.title = "no sort yet"
        self.x_label = axis_label("junk score")
        self.counts_text = ""
        self.probability_ticks: list[tuple[float, float]] = []
        self.log_likelihood = np.empty(0)
        self.prunings = np.empty(0)
        self.n_paints = 0
        self._x_range: tuple[float, float] | None = None
        self._trace_span = 1
        self._dragging = False
        self._apply_theme()
        viewer.events.theme.connect(self._apply_theme)

    # -- what is shown -----------------------------------------------------------------------------------------

    def set_score_label(self, score_label: str) -> None:
        """Name the x axis after the model's score (``ModelSpec.score_label``)."""
        self.x_label = axis_label(score_label)
        self.update()

    def clear(self, title: str, score_label: str | None = None, n_iterations: int | None = None) -> None:
        """Empty the histogram and the trace (a new sort starts); the next scores choose a new axis.

        ``score_label`` is the model's name of its score (None keeps the current one); ``n_iterations`` the EM
        iterations the trace will span (the whole sort, when known).
        """
        if score_label is not None:
            self.x_label = axis_label(score_label)
        self.scores = np.empty(0)
        self.kept = np.zeros(0, dtype=bool)
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.kept_counts = np.zeros(N_BINS, dtype=np.int64)
        self.cut = self.automatic_cut = None
        self.counts_text = ""
        self.probability_ticks = []
        self.title = title
        self.log_likelihood = np.empty(0)
        self.prunings = np.empty(0)
        self._trace_span = max(n_iterations or 1, 1)
        self._x_range = None
        self.update()

    def show_scores(self, scores: np.ndarray, kept: np.ndarray, cut: float | None, title: str, *,
                    automatic_cut: float | None = None, probability: np.ndarray | None = None,
                    limits: tuple[float, float] | None = None) -> None:
        """Show ``scores`` (n,) with the (n,) bool ``kept`` side in its colour and the cut line at ``cut``.

        automatic_cut : the sort's own cut, drawn dotted. probability : (n,) junk probabilities of the same
        particles (a model that gives them), read on a second axis on top. limits : the widest range drawn
        (``ModelSpec.score_limits``); scores beyond it are counted in the end bins.
        """
        self.scores = np.asarray(scores, dtype=np.float64)
        self.automatic_cut = None if automatic_cut is None else float(automatic_cut)
        self.edges, logarithmic = score_bin_edges(self.scores, N_BINS, tail=TAIL, include=(cut, automatic_cut),
                                                  limits=limits)
        if logarithmic != self.logarithmic:
            self._x_range = None
        self.logarithmic = logarithmic
        self.title = title
        self.probability_ticks = _probability_ticks(self.scores, probability)
        low, high = self._to_axis(self.edges[0]), self._to_axis(self.edges[-1])
        if self._x_range is None or low < self._x_range[0] or high > self._x_range[1]:
            margin = (high - low) * X_MARGIN
            self._x_range = (low - margin, high + margin)  # grows only, so that rounds share an axis
        self._set_kept(kept, cut)
        self.update()

    def set_selection(self, kept: np.ndarray, cut: float | None) -> None:
        """The same scores with another kept side (a moved cut, overrides) and the cut line at ``cut``."""
        self._set_kept(kept, cut)
        self.update()

    def show_trace(self, log_likelihood: np.ndarray, prunings, n_iterations: int | None = None) -> None:
        """The mean log-likelihood per image before each EM iteration, with dashed marks at the ``prunings``
        (EM iteration counts); the x range spans ``n_iterations`` (default: as set by :meth:`clear`, or the
        trace's length when it is longer)."""
        self.log_likelihood = np.asarray(log_likelihood, dtype=np.float64)
        self.prunings = np.asarray(prunings, dtype=np.float64)
        if n_iterations is not None:
            self._trace_span = max(int(n_iterations), 1)
        self._trace_span = max(self._trace_span, self.log_likelihood.size)
        self.update()

    # -- the axis --------------------------------------------------------------------------------------------

    def _to_axis(self, score: float) -> float:
        return float(np.log10(score)) if self.logarithmic else float(score)

    def _from_axis(self, value: float) -> float:
        return float(10.0**value) if self.logarithmic else float(value)

    def plot_rect(self) -> QRectF:
        """Where the histogram's bars are, in widget coordinates."""
        top = 2 * LINE + (LINE if self.probability_ticks else 0) + 4
        bottom = self.height() - (2 * LINE + TRACE_HEIGHT + 2 * LINE + 8)
        return QRectF(LEFT, top, max(self.width() - LEFT - RIGHT, 10), max(bottom - top, 20))

    def trace_rect(self) -> QRectF:
        plot = self.plot_rect()
        top = plot.bottom() + 2 * LINE + 6
        return QRectF(LEFT, top, plot.width(), TRACE_HEIGHT)

    def pixel_of(self, score: float) -> float:
        """The x of ``score`` on the plot, in widget coordinates."""
        plot = self.plot_rect()
        low, high = self._x_range or (0.0, 1.0)
        return plot.left() + (self._to_axis(score) - low) / (high - low) * plot.width()

    def score_at(self, x: float) -> float:
        """The score at widget x ``x`` on the plot."""
        plot = self.plot_rect()
        low, high = self._x_range or (0.0, 1.0)
        return self._from_axis(low + (x - plot.left()) / plot.width() * (high - low))

    # -- dragging the cut --------------------------------------------------------------------------------------

    def mousePressEvent(self, event) -> None:
        position = event.position() if hasattr(event, "position") else QPointF(event.pos())
        if event.button() != Qt.MouseButton.LeftButton or self.scores.size == 0 \
                or not self.plot_rect().contains(position):
            return super().mousePressEvent(event)
        self._dragging = True
        self.cut_dragged.emit(self.score_at(position.x()))

    def mouseMoveEvent(self, event) -> None:
        if self._dragging:
            position = event.position() if hasattr(event, "position") else QPointF(event.pos())
            plot = self.plot_rect()
            x = min(max(position.x(), plot.left()), plot.right())
            self.cut_dragged.emit(self.score_at(x))

    def mouseReleaseEvent(self, event) -> None:
        if not self._dragging:
            return super().mouseReleaseEvent(event)
        self._dragging = False
        position = event.position() if hasattr(event, "position") else QPointF(event.pos())
        plot = self.plot_rect()
        self.cut_dropped.emit(self.score_at(min(max(position.x(), plot.left()), plot.right())))

    # -- drawing -------------------------------------------------------------------------------------------------

    def _set_kept(self, kept: np.ndarray, cut: float | None) -> None:
        self.kept = np.asarray(kept, dtype=bool)
        self.cut = None if cut is None or not np.isfinite(cut) else float(cut)
        clipped = np.clip(self.scores, self.edges[0], self.edges[-1])
        self.counts, _ = np.histogram(clipped, bins=self.edges)
        self.kept_counts, _ = np.histogram(clipped[self.kept], bins=self.edges)
        n_kept = int(self.kept.sum())
        self.counts_text = f"{n_kept} kept | {self.kept.size - n_kept} rejected" if self.kept.size else ""

    def paintEvent(self, event) -> None:
        self.n_paints += 1
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        painter.fillRect(self.rect(), self._background)
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        painter.setFont(font)
        self._paint_histogram(painter)
        self._paint_trace(painter)
        painter.end()

    def _paint_histogram(self, painter: QPainter) -> None:
        plot = self.plot_rect()
        painter.fillRect(plot, self._plot_background)
        painter.setPen(self._text)
        painter.drawText(QRectF(0, 2, self.width(), LINE + 2), int(Qt.AlignmentFlag.AlignHCenter), self.title)
        low, high = self._x_range or (0.0, 1.0)
        top = max(1, int(self.counts.max()) if self.counts.size else 1) * 1.15

        def x_of(value):  # value on the axis (log10 for a logarithmic one)
            return plot.left() + (value - low) / (high - low) * plot.width()

        def y_of(count):
            return plot.bottom() - count / top * plot.height()

        if self.scores.size:
            axis_edges = np.log10(self.edges) if self.logarithmic else self.edges
            for i in range(self.counts.size):
                left, right = x_of(axis_edges[i]), x_of(axis_edges[i + 1])
                kept, total = int(self.kept_counts[i]), int(self.counts[i])
                if kept:
                    painter.fillRect(QRectF(left, y_of(kept), right - left, plot.bottom() - y_of(kept)), self._kept)
                if total > kept:
                    painter.fillRect(QRectF(left, y_of(total), right - left, y_of(kept) - y_of(total)),
                                     self._rejected)
        # axes: x ticks below, count ticks on the left, probability ticks on top
        painter.setPen(self._text)
        painter.drawRect(plot)
        for value in _ticks(low, high, self.logarithmic):
            x = x_of(np.log10(value) if self.logarithmic else value)
            painter.drawLine(QPointF(x, plot.bottom()), QPointF(x, plot.bottom() + 3))
            painter.drawText(QRectF(x - 40, plot.bottom() + 3, 80, LINE), int(Qt.AlignmentFlag.AlignHCenter),
                             f"{value:g}")
        for count in MaxNLocator(nbins=4, integer=True).tick_values(0, top):
            if 0 <= count <= top:
                y = y_of(count)
                painter.drawLine(QPointF(plot.left() - 3, y), QPointF(plot.left(), y))
                painter.drawText(QRectF(0, y - LINE / 2, plot.left() - 5, LINE),
                                 int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"{count:g}")
        painter.drawText(QRectF(0, plot.bottom() + LINE + 2, self.width(), LINE), int(Qt.AlignmentFlag.AlignHCenter),
                         self.x_label)
        if self.probability_ticks:
            painter.drawText(QRectF(0, LINE + 2, self.width(), LINE), int(Qt.AlignmentFlag.AlignHCenter),
                             "junk probability")
            metrics = painter.fontMetrics()
            labelled = []  # x of the labels drawn; from p = 1/2 outwards, a label that would overlap one is left out
            for score, p in sorted(self.probability_ticks, key=lambda tick: abs(tick[1] - 0.5)):
                x = self.pixel_of(score)
                if not plot.left() <= x <= plot.right():
                    continue
                painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.top() - 3))
                text = f"{p:g}"
                width = metrics.horizontalAdvance(text) + 6
                if any(abs(x - other) < width for other in labelled):
                    continue
                labelled.append(x)
                painter.drawText(QRectF(x - 30, plot.top() - LINE - 2, 60, LINE),
                                 int(Qt.AlignmentFlag.AlignHCenter), text)
        painter.setClipRect(plot)
        if self.automatic_cut is not None:
            pen = QPen(self._text, 1, Qt.PenStyle.DotLine)
            painter.setPen(pen)
            x = self.pixel_of(self.automatic_cut)
            painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
        if self.cut is not None:
            painter.setPen(QPen(self._text, 2))
            x = self.pixel_of(self.cut)
            painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
        painter.setClipping(False)
        if self.kept.size:
            n_kept = int(self.kept.sum())
            bold = QFont(painter.font())
            bold.setBold(True)
            painter.setFont(bold)
            inner = plot.adjusted(5, 2, -5, 0)
            painter.setPen(self._kept)
            painter.drawText(inner, int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop), f"{n_kept} kept")
            painter.setPen(self._rejected)
            painter.drawText(inner, int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop),
                             f"{self.kept.size - n_kept} rejected")
            bold.setBold(False)
            painter.setFont(bold)

    def _paint_trace(self, painter: QPainter) -> None:
        trace = self.trace_rect()
        painter.fillRect(trace, self._plot_background)
        painter.setPen(self._text)
        painter.drawRect(trace)
        span = self._trace_span

        def x_of(iteration):
            return trace.left() + (iteration - 0.5) / span * trace.width()

        for value in MaxNLocator(nbins=6, integer=True).tick_values(1, span):
            if 1 <= value <= span:
                x = x_of(value)
                painter.drawLine(QPointF(x, trace.bottom()), QPointF(x, trace.bottom() + 3))
                painter.drawText(QRectF(x - 30, trace.bottom() + 3, 60, LINE), int(Qt.AlignmentFlag.AlignHCenter),
                                 f"{value:g}")
        painter.drawText(QRectF(0, trace.bottom() + LINE + 2, self.width(), LINE), int(Qt.AlignmentFlag.AlignHCenter),
                         "EM iteration (dashed: a pruning round)")
        painter.save()
        painter.translate(10, trace.center().y())
        painter.rotate(-90)
        painter.drawText(QRectF(-TRACE_HEIGHT, -8, 2 * TRACE_HEIGHT, LINE), int(Qt.AlignmentFlag.AlignHCenter),
                         "log-lik.")
        painter.restore()
        finite = self.log_likelihood[np.isfinite(self.log_likelihood)]
        if finite.size == 0:
            return
        painter.setPen(QPen(self._warning, 1, Qt.PenStyle.DashLine))
        for pruning in self.prunings:
            x = x_of(pruning + 0.5)
            if trace.left() <= x <= trace.right():
                painter.drawLine(QPointF(x, trace.top()), QPointF(x, trace.bottom()))
        low, high = float(finite.min()), float(finite.max())
        pad = max(high - low, abs(high) * 1e-3, 1e-9) * 0.15
        low, high = low - pad, high + pad
        path = QPainterPath()
        for i, value in enumerate(self.log_likelihood):
            if not np.isfinite(value):
                continue
            point = QPointF(x_of(i + 1), trace.bottom() - (value - low) / (high - low) * trace.height())
            if path.elementCount():
                path.lineTo(point)
            else:
                path.moveTo(point)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        painter.setPen(QPen(self._text, 1.2))
        painter.drawPath(path)
        painter.drawText(trace.adjusted(4, 1, -4, 0), int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop),
                         f"{finite[0]:.6g} \u2192 {finite[-1]:.6g} per image")

    def _apply_theme(self, event=None) -> None:
        theme = get_theme(self._viewer.theme)
        self._background = QColor(theme.background.as_hex())
        self._plot_background = QColor(theme.foreground.as_hex())
        self._text = QColor(theme.text.as_hex())
        self._warning = QColor(theme.warning.as_hex())
        self._kept = QColor(KEPT_COLOUR)
        self._rejected = QColor(REJECTED_COLOUR)
        self.update()


def _ticks(low: float, high: float, logarithmic: bool) -> list[float]:
    """Tick values (scores) for an axis spanning [low, high] (log10 of the scores when ``logarithmic``)."""
    if logarithmic:
        values = LogLocator(base=10.0).tick_values(10.0**low, 10.0**high)
        if np.count_nonzero((values >= 10.0**low) & (values <= 10.0**high)) < 2:
            values = LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)).tick_values(10.0**low, 10.0**high)
        return [float(v) for v in values if 10.0**low <= v <= 10.0**high]
    return [float(v) for v in MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
            if low <= v <= high]


def _probability_ticks(scores: np.ndarray, probability) -> list[tuple[float, float]]:
    """[(score, p)] for the top axis: the score at which the junk probability reaches each of PROBABILITY_TICKS."""
    if probability is None or scores.size < 2:
        return []
    probability = np.asarray(probability, dtype=np.float64)
    finite = np.isfinite(scores) & np.isfinite(probability)
    order = np.argsort(scores[finite], kind="stable")
    x, p = scores[finite][order], np.maximum.accumulate(probability[finite][order])
    return [(float(np.interp(tick, p, x)), tick) for tick in PROBABILITY_TICKS if p[0] <= tick <= p[-1]]

"""The score histogram of the widget: kept and rejected in two colours, a cut that can be dragged, the counts on
each side, the automatic cut, and below it the log-likelihood trace with the prunings marked.

The figure lives in a FigureCanvas inside a QWidget (as napari-matplotlib does) and takes its colours from the
viewer's theme. Scores are binned as in the report (``core.report.score_bin_edges``): on a logarithmic axis
when they are positive and span decades (the paper's sorting factors), on a linear one otherwise. The x axis
is the model's ``score_label`` with what larger means ("more junk-like"); when the result has a junk
probability per particle a second axis on top reads the score as that probability.

Redrawing a whole figure takes tens of milliseconds of main-thread time, so everything that changes while a
sort runs or while the cut is dragged (bars, cut lines, counts, title, trace) is an "animated" artist blitted
over a cached background; the whole figure is redrawn only when an axis must change (limits, scale, labels),
on resize and on a theme change.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import blended_transform_factory
from napari.utils.theme import get_theme
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from .core.report import score_bin_edges

__all__ = ["ScoreHistogram", "KEPT_COLOUR", "REJECTED_COLOUR", "axis_label"]

N_BINS = 60
#: The bins span the 0.5th to the 99.5th percentile of the scores (and the cuts); the rest go to the end bins.
TAIL = 0.005
#: Room left around the first histogram of a sort, so that later rounds usually fit the same axes.
X_MARGIN = 1.5
Y_MARGIN = 1.3
#: Kept and rejected particles everywhere in the widget (a colour-blind-safe pair: blue and orange).
KEPT_COLOUR = "#4c9be8"
REJECTED_COLOUR = "#f08c3a"


def axis_label(score_label: str) -> str:
    """The x axis of a score: the model's name for it, and which way is junk (every score: larger = more junk-like)."""
    return f"\u2190 particle-like    {score_label}    junk-like \u2192"


class ScoreHistogram(QWidget):
    """Histogram of junk scores with the cut, and the log-likelihood trace of the EM.

    Signals:
        cut_dragged(float): the user drags the cut on the plot to this score (while the mouse moves).
        cut_dropped(float): the user released the cut at this score.

    Attributes:
        scores: (n,) float64, the scores last shown.
        kept: (n,) bool, which of them are on the kept side.
        counts: (N_BINS,) int, the histogram of all of them; kept_counts: of the kept ones.
        edges: (N_BINS + 1,) float64, the bin edges.
        logarithmic: whether the score axis (and the bins) are logarithmic.
        cut: the score of the cut line, or None; automatic_cut: the sort's own cut (dotted), or None.
        counts_text: the counts on each side as drawn on the plot.
        log_likelihood: (n_iterations,) float64, the trace shown; prunings: the EM iterations at which a round pruned.
        n_full_draws: how many times the whole figure was drawn (the rest are blits).
    """

    cut_dragged = Signal(float)
    cut_dropped = Signal(float)

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._viewer = viewer
        # fixed margins: a constrained layout would double the cost of every full draw
        self.figure = Figure(figsize=(4, 3.4))
        self.figure.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.86, hspace=0.6)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(260)
        self.axes, self.trace_axes = self.figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]})
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

        self.scores = np.empty(0)
        self.kept = np.zeros(0, dtype=bool)
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.kept_counts = np.zeros(N_BINS, dtype=np.int64)
        self.edges = np.linspace(0.0, 1.0, N_BINS + 1)
        self.cut: float | None = None
        self.automatic_cut: float | None = None
        self.counts_text = ""
        self.log_likelihood = np.empty(0)
        self.prunings = np.empty(0)
        self.n_full_draws = 0
        self.logarithmic = False
        self._limits_set = False
        self._dragging = False
        self._full_draw_pending = False
        self._probability_axis = None
        self._trace_span = (0.0, 1.0)

        self._kept_bars = self.axes.stairs(self.kept_counts, self.edges, fill=True, animated=True, color=KEPT_COLOUR,
                                           label="kept")
        self._rejected_bars = self.axes.stairs(self.kept_counts, self.edges, baseline=self.kept_counts, fill=True,
                                               animated=True, color=REJECTED_COLOUR, label="rejected")
        self._cut_line = self.axes.axvline(1.0, linewidth=2, visible=False, animated=True)
        self._automatic_line = self.axes.axvline(1.0, linewidth=1, linestyle=":", visible=False, animated=True)
        self._kept_text = self.axes.text(0.01, 0.97, "", transform=self.axes.transAxes, va="top", ha="left",
                                         fontsize="small", animated=True, color=KEPT_COLOUR, fontweight="bold")
        self._rejected_text = self.axes.text(0.99, 0.97, "", transform=self.axes.transAxes, va="top", ha="right",
                                             fontsize="small", animated=True, color=REJECTED_COLOUR,
                                             fontweight="bold")
        self.axes.set_xlim(0.0, 1.0)
        self.axes.set_xlabel(axis_label("junk score"), fontsize="small")
        self.axes.set_ylabel("images")
        self.axes.set_title("no sort yet", fontsize="medium")
        self.axes.title.set_animated(True)
        self._trace_line, = self.trace_axes.plot([], [], linewidth=1.2, animated=True)
        self._pruning_marks, = self.trace_axes.plot(
            [], [], linewidth=0.8, linestyle="--", animated=True,
            transform=blended_transform_factory(self.trace_axes.transData, self.trace_axes.transAxes))
        self._trace_text = self.trace_axes.text(0.01, 0.95, "", transform=self.trace_axes.transAxes, va="top",
                                                ha="left", fontsize="x-small", animated=True)
        self.trace_axes.set_xlabel("EM iteration (dashed: a pruning round)", fontsize="small")
        self.trace_axes.set_ylabel("log-lik.", fontsize="small")
        # no y ticks: the trace rescales every round by a blit (its range is written on it), not a full draw
        self.trace_axes.set_yticks([])
        self.trace_axes.tick_params(labelsize="x-small")
        self._animated = (self._kept_bars, self._rejected_bars, self._automatic_line, self._cut_line,
                          self._kept_text, self._rejected_text, self.axes.title, self._trace_line, self._pruning_marks,
                          self._trace_text)
        self._background = None
        self.canvas.mpl_connect("draw_event", self._on_full_draw)
        self.canvas.mpl_connect("button_press_event", self._on_press)
        self.canvas.mpl_connect("motion_notify_event", self._on_motion)
        self.canvas.mpl_connect("button_release_event", self._on_release)
        self.canvas.setToolTip("drag on the histogram to move the cut: the particles left of it are kept (blue), "
                               "the others rejected (orange); the dotted line is the sort's own cut; the scores "
                               "beyond the 0.5th and 99.5th percentiles are counted in the end bins")
        self._apply_theme()
        viewer.events.theme.connect(self._apply_theme)

    # -- what is shown ---------------------------------------------------------------------------------

    def set_score_label(self, score_label: str) -> None:
        """Name the x axis after the model's score (``ModelSpec.score_label``); drawn with the next full draw."""
        if axis_label(score_label) != self.axes.get_xlabel():
            self.axes.set_xlabel(axis_label(score_label), fontsize="small")
            self._background = None  # the axis label is part of the cached background
            self._limits_set = False

    def clear(self, title: str, score_label: str | None = None, n_iterations: int | None = None) -> None:
        """Empty the histogram and the trace (a new sort starts); the next scores choose new axis limits.

        ``score_label`` is the model's name of its score (None keeps the current one); ``n_iterations`` the EM
        iterations the trace will span (the whole sort, when known).
        """
        if score_label is not None:
            self.set_score_label(score_label)
        if n_iterations is not None:
            self.trace_axes.set_xlim(0.5, max(n_iterations, 1) + 0.5)
            self._background = None
        self._set_probability_axis(None, None)
        self.scores = np.empty(0)
        self.kept = np.zeros(0, dtype=bool)
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.kept_counts = np.zeros(N_BINS, dtype=np.int64)
        self._draw_bars()
        self._move_line(self._automatic_line, None)
        self.automatic_cut = None
        self._move_cut(None)
        self.counts_text = ""
        self._kept_text.set_text("")
        self._rejected_text.set_text("")
        self.axes.title.set_text(title)
        self.log_likelihood = np.empty(0)
        self.prunings = np.empty(0)
        self._trace_line.set_data([], [])
        self._pruning_marks.set_data([], [])
        self._trace_text.set_text("")
        self._limits_set = False
        self._blit()

    def show_scores(self, scores: np.ndarray, kept: np.ndarray, cut: float | None, title: str, *,
                    automatic_cut: float | None = None, probability: np.ndarray | None = None) -> None:
        """Show ``scores`` (n,) with the (n,) bool ``kept`` side in its colour and the cut line at ``cut``.

        automatic_cut : the sort's own cut, drawn dotted. probability : (n,) junk probabilities of the same
        particles (a model that gives them), read on a second axis on top.
        """
        self.scores = np.asarray(scores, dtype=np.float64)
        self.edges, logarithmic = score_bin_edges(self.scores, N_BINS, tail=TAIL, include=(cut, automatic_cut))
        self.axes.title.set_text(title)
        self.automatic_cut = None if automatic_cut is None else float(automatic_cut)
        self._move_line(self._automatic_line, self.automatic_cut)
        probability_changed = self._set_probability_axis(self.scores, probability)
        self._set_kept(kept, cut)
        low, high = self.edges[0], self.edges[-1]
        left, right = self.axes.get_xlim()
        if not self._limits_set or probability_changed or logarithmic != self.logarithmic or low < left \
                or high > right or self.counts.max() > self.axes.get_ylim()[1]:
            self._set_scale(logarithmic)
            if logarithmic:
                self.axes.set_xlim(low / X_MARGIN, high * X_MARGIN)
            else:
                margin = (high - low) * (X_MARGIN - 1) / 2
                self.axes.set_xlim(low - margin, high + margin)
            self.axes.set_ylim(0, max(1, self.counts.max()) * Y_MARGIN)
            self._limits_set = True
            self._full_draw()
        else:
            self._blit()

    def set_selection(self, kept: np.ndarray, cut: float | None) -> None:
        """The same scores with another kept side (a moved cut, overrides) and the cut line at ``cut``."""
        self._set_kept(kept, cut)
        self._blit()

    def show_trace(self, log_likelihood: np.ndarray, prunings, n_iterations: int | None = None, *,
                   refresh: bool = True) -> None:
        """The mean log-likelihood per image before each EM iteration, with dashed marks at the ``prunings``
        (EM iteration counts); the x range spans ``n_iterations`` (default: as set by :meth:`clear`, or the trace's
        length when it is longer). ``refresh=False`` leaves the drawing to the next show_scores."""
        self.log_likelihood = np.asarray(log_likelihood, dtype=np.float64)
        self.prunings = np.asarray(prunings, dtype=np.float64)
        iterations = np.arange(1, self.log_likelihood.size + 1)
        self._trace_line.set_data(iterations, self.log_likelihood)
        x = np.repeat(self.prunings + 0.5, 3)
        y = np.tile([0.0, 1.0, np.nan], self.prunings.size)
        self._pruning_marks.set_data(x, y)
        finite = self.log_likelihood[np.isfinite(self.log_likelihood)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        pad = max(high - low, abs(high) * 1e-3, 1e-9) * 0.15
        self.trace_axes.set_ylim(low - pad, high + pad)  # no y ticks: nothing in the background changes
        self._trace_text.set_text(f"{finite[0]:.6g} \u2192 {finite[-1]:.6g} per image" if finite.size else "")
        span = max(n_iterations or 0, self.log_likelihood.size)
        if span and (0.5, span + 0.5) != tuple(self.trace_axes.get_xlim()) and \
                (n_iterations is not None or span + 0.5 > self.trace_axes.get_xlim()[1]):
            self.trace_axes.set_xlim(0.5, span + 0.5)
            self._background = None  # the x ticks are part of the background
        if refresh:
            self._blit()

    # -- dragging the cut ------------------------------------------------------------------------------------

    def _on_press(self, event) -> None:
        if event.inaxes is not self.axes or event.button != 1 or self.scores.size == 0 or event.xdata is None:
            return
        self._dragging = True
        self.cut_dragged.emit(float(event.xdata))

    def _on_motion(self, event) -> None:
        if self._dragging and event.inaxes is self.axes and event.xdata is not None:
            self.cut_dragged.emit(float(event.xdata))

    def _on_release(self, event) -> None:
        if not self._dragging:
            return
        self._dragging = False
        x = event.xdata if event.inaxes is self.axes and event.xdata is not None else self.cut
        if x is not None:
            self.cut_dropped.emit(float(x))

    # -- drawing ---------------------------------------------------------------------------------------------

    def _set_kept(self, kept: np.ndarray, cut: float | None) -> None:
        self.kept = np.asarray(kept, dtype=bool)
        low, high = self.edges[0], self.edges[-1]
        clipped = np.clip(self.scores, low, high)
        self.counts, _ = np.histogram(clipped, bins=self.edges)
        self.kept_counts, _ = np.histogram(clipped[self.kept], bins=self.edges)
        self._draw_bars()
        self._move_cut(cut)
        n_kept = int(self.kept.sum())
        self.counts_text = f"{n_kept} kept | {self.kept.size - n_kept} rejected" if self.kept.size else ""
        self._kept_text.set_text(f"{n_kept} kept" if self.kept.size else "")
        self._rejected_text.set_text(f"{self.kept.size - n_kept} rejected" if self.kept.size else "")

    def _draw_bars(self) -> None:
        self._kept_bars.set_data(self.kept_counts, self.edges, baseline=0)
        self._rejected_bars.set_data(self.counts, self.edges, baseline=self.kept_counts)

    def _set_probability_axis(self, scores, probability) -> bool:
        """A second x axis on top reading the score as the junk probability (or none); True if it changed."""
        had = self._probability_axis is not None
        if had:
            self._probability_axis.remove()
            self._probability_axis = None
        if probability is None or scores is None or scores.size < 2:
            return had
        finite = np.isfinite(scores) & np.isfinite(probability)
        order = np.argsort(scores[finite], kind="stable")
        x, p = scores[finite][order], np.asarray(probability, dtype=np.float64)[finite][order]
        p = np.maximum.accumulate(p)  # monotone for the axis (the probability grows with the score)

        def to_probability(values):
            return np.interp(values, x, p)

        def to_score(values):
            return np.interp(values, p, x)

        self._probability_axis = self.axes.secondary_xaxis("top", functions=(to_probability, to_score))
        self._probability_axis.set_xlabel("junk probability", fontsize="x-small")
        self._probability_axis.tick_params(labelsize="x-small")
        self._apply_theme_to(self._probability_axis)
        return True

    def _set_scale(self, logarithmic: bool) -> None:
        if logarithmic == self.logarithmic:
            return
        self.logarithmic = logarithmic
        self.axes.set_xscale("log" if logarithmic else "linear")
        if logarithmic:
            self.axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges

    def _move_cut(self, cut: float | None) -> None:
        self.cut = None if cut is None else float(cut)
        self._move_line(self._cut_line, self.cut)

    @staticmethod
    def _move_line(line, x: float | None) -> None:
        if x is not None and np.isfinite(x):
            line.set_xdata([x, x])
        line.set_visible(x is not None and bool(np.isfinite(x)))

    def _full_draw(self) -> None:
        """Redraw the whole figure at the next turn of the event loop (``draw_idle``): the caller's other updates
        and this draw are then two short pauses of the event loop instead of one long one."""
        self._full_draw_pending = True
        self.canvas.draw_idle()

    def _on_full_draw(self, event) -> None:
        """After a full draw (which leaves out the animated artists): keep the background, add them."""
        self.n_full_draws += 1
        self._full_draw_pending = False
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        for artist in self._animated:
            artist.axes.draw_artist(artist)

    def _blit(self) -> None:
        if self._full_draw_pending:  # the coming full draw draws the animated artists as they are then
            return
        if self._background is None:  # nothing drawn yet, or the axes changed: a full draw makes the background
            self._full_draw()
            return
        self.canvas.restore_region(self._background)
        for artist in self._animated:
            artist.axes.draw_artist(artist)
        # Qt paints the updated buffer with the rest of the window (canvas.blit would repaint at once)
        self.canvas.update()

    def _apply_theme_to(self, axes) -> None:
        theme = get_theme(self._viewer.theme)
        text = theme.text.as_hex()
        for spine in axes.spines.values():
            spine.set_color(text)
        axes.tick_params(colors=text, which="both")
        axes.xaxis.label.set_color(text)
        axes.yaxis.label.set_color(text)

    def _apply_theme(self, event=None) -> None:
        theme = get_theme(self._viewer.theme)
        text = theme.text.as_hex()
        self.figure.set_facecolor(theme.background.as_hex())
        for axes in (self.axes, self.trace_axes):
            axes.set_facecolor(theme.foreground.as_hex())
            self._apply_theme_to(axes)
        if self._probability_axis is not None:
            self._apply_theme_to(self._probability_axis)
        self.axes.title.set_color(text)
        self._cut_line.set_color(text)
        self._automatic_line.set_color(text)
        self._trace_line.set_color(theme.text.as_hex())
        self._trace_text.set_color(text)
        self._pruning_marks.set_color(theme.warning.as_hex())
        self.canvas.draw_idle()

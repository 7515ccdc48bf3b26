"""A docked matplotlib histogram of junk scores with the cut drawn on it, themed like napari.

The figure lives in a FigureCanvas inside a QWidget (as napari-matplotlib does) and takes its colours
from the viewer's current theme, following theme changes. Scores are binned as in the report
(``core.report.score_bin_edges``): on a logarithmic axis when they are positive and span decades (the
paper's sorting factors), on a linear one otherwise (the steerable model's signed evidence).

Redrawing a whole figure (axes, ticks, labels) takes tens of milliseconds of main-thread time, so the
parts that change every pruning round (the bars, the cut line, the title) are "animated" artists
blitted over a cached background; the whole figure is redrawn only when the axis limits must grow,
on resize and on a theme change.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import NullFormatter
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.utils.theme import get_theme
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from .core.report import score_bin_edges

__all__ = ["ScoreHistogram"]

N_BINS = 60
#: Room left around the first histogram of a sort, so that later rounds usually fit the same axes.
X_MARGIN = 1.5
Y_MARGIN = 1.3


class ScoreHistogram(QWidget):
    """Histogram of the scores of one pruning round (or of the final scores), with a vertical cut line.

    Attributes:
        scores: (n,) float64, the scores last shown.
        counts: (N_BINS,) int, their histogram.
        edges: (N_BINS + 1,) float64, the bin edges over the scores' range.
        logarithmic: whether the score axis (and the bins) are logarithmic.
        cut: the score of the cut line (images scoring above it are removed), or None.
        n_full_draws: how many times the whole figure was drawn (the rest are blits).
    """

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._viewer = viewer
        # fixed margins: a constrained layout would double the cost of every full draw
        self.figure = Figure(figsize=(4, 2.4))
        self.figure.subplots_adjust(left=0.16, right=0.97, bottom=0.2, top=0.88)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(180)
        self.axes = self.figure.add_subplot()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

        self.scores = np.empty(0)
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.edges = np.linspace(0.0, 1.0, N_BINS + 1)
        self.cut: float | None = None
        self.n_full_draws = 0
        self._limits_set = False
        self.logarithmic = False
        self._bars = self.axes.stairs(self.counts, self.edges, fill=True, animated=True)
        self._cut_line = self.axes.axvline(1.0, linewidth=1.5, linestyle="--", visible=False, animated=True)
        self.axes.set_xlim(self.edges[0], self.edges[-1])
        self.axes.set_xlabel("junk score")
        self.axes.set_ylabel("images")
        self.axes.set_title("no sort yet", fontsize="medium")
        self.axes.title.set_animated(True)
        self._animated = (self._bars, self._cut_line, self.axes.title)
        self._background = None
        self.canvas.mpl_connect("draw_event", self._on_full_draw)
        self._apply_theme()
        viewer.events.theme.connect(self._apply_theme)

    def clear(self, title: str, label: str | None = None) -> None:
        """Empty the histogram (a new sort starts); the next scores choose new axis limits.

        ``label`` names the score on the x axis (``core.pipeline.score_label``); None keeps the current one.
        """
        if label is not None and label != self.axes.get_xlabel():
            self.axes.set_xlabel(label)
            self._background = None  # the axis label is part of the cached background
        self.scores = np.empty(0)
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self._bars.set_data(self.counts, self.edges)
        self._move_cut(None)
        self.axes.title.set_text(title)
        self._limits_set = False
        self._blit()

    def show_scores(self, scores: np.ndarray, cut: float | None, title: str) -> None:
        """Replace the histogram by that of ``scores`` (n,) and draw the cut at ``cut``."""
        self.scores = np.asarray(scores, dtype=np.float64)
        self.edges, logarithmic = score_bin_edges(self.scores, N_BINS)
        low, high = self.edges[0], self.edges[-1]
        self.counts, _ = np.histogram(np.clip(self.scores, low, high), bins=self.edges)
        self._bars.set_data(self.counts, self.edges)
        self.axes.title.set_text(title)
        self._move_cut(cut)
        left, right = self.axes.get_xlim()
        if not self._limits_set or logarithmic != self.logarithmic or low < left or high > right \
                or self.counts.max() > self.axes.get_ylim()[1]:
            self._set_scale(logarithmic)
            if logarithmic:
                self.axes.set_xlim(low / X_MARGIN, high * X_MARGIN)
            else:
                margin = (high - low) * (X_MARGIN - 1) / 2
                self.axes.set_xlim(low - margin, high + margin)
            self.axes.set_ylim(0, max(1, self.counts.max()) * Y_MARGIN)
            self._limits_set = True
            self.canvas.draw()
        else:
            self._blit()

    def set_cut(self, cut: float | None) -> None:
        """Move the cut line to ``cut`` (None hides it)."""
        self._move_cut(cut)
        self._blit()

    def _set_scale(self, logarithmic: bool) -> None:
        if logarithmic == self.logarithmic:
            return
        self.logarithmic = logarithmic
        self.axes.set_xscale("log" if logarithmic else "linear")
        if logarithmic:
            self.axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges

    def _move_cut(self, cut: float | None) -> None:
        self.cut = None if cut is None else float(cut)
        if self.cut is not None:
            self._cut_line.set_xdata([self.cut, self.cut])
        self._cut_line.set_visible(self.cut is not None)

    def _on_full_draw(self, event) -> None:
        """After a full draw (which leaves out the animated artists): keep the background, add them."""
        self.n_full_draws += 1
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        for artist in self._animated:
            self.axes.draw_artist(artist)

    def _blit(self) -> None:
        if self._background is None:  # nothing drawn yet: the first draw makes the background
            self.canvas.draw()
            return
        self.canvas.restore_region(self._background)
        for artist in self._animated:
            self.axes.draw_artist(artist)
        # Qt paints the updated buffer with the rest of the window (canvas.blit would repaint at once)
        self.canvas.update()

    def _apply_theme(self, event=None) -> None:
        theme = get_theme(self._viewer.theme)
        background = theme.background.as_hex()
        text = theme.text.as_hex()
        self.figure.set_facecolor(background)
        self.axes.set_facecolor(theme.foreground.as_hex())
        for spine in self.axes.spines.values():
            spine.set_color(text)
        self.axes.tick_params(colors=text, which="both")
        self.axes.xaxis.label.set_color(text)
        self.axes.yaxis.label.set_color(text)
        self.axes.title.set_color(text)
        self._bars.set_facecolor(theme.current.as_hex())
        self._bars.set_edgecolor(theme.current.as_hex())
        self._cut_line.set_color(theme.warning.as_hex())
        self.canvas.draw_idle()

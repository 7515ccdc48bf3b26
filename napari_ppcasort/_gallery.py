"""The particle gallery: every particle as a tile, ordered by score, framed by the side of the cut it is on.

A QListView in icon mode over a model with one row per particle (100,000 rows cost nothing: only the tiles
on screen are painted). A tile is the particle's image (normalised on its own 1st-99th percentiles, shown
at the particle's full box scaled to the tile), framed blue when kept and orange when rejected (a thick
dashed frame when a manual override put it there), labelled with its score and, for simulated data, its
true class. Its tooltip gives the particle index, the score, the junk probability when the model gives one,
the round that removed it and its class.

Thumbnails are read and made off the main thread (:class:`ThumbnailLoader`: the particle set's ``read``,
then a QImage, never a QPixmap) in the order the view asks for them, latest first, and kept in a bounded
cache; the view repaints the tiles that became ready. Clicking a tile emits :attr:`ParticleGallery.particle_clicked`
(the widget moves the particle across the cut).
"""

from __future__ import annotations

import collections
import threading

import numpy as np
from qtpy.QtCore import QAbstractListModel, QModelIndex, QObject, QRect, QSize, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QImage, QPainter, QPen
from qtpy.QtWidgets import (QComboBox, QHBoxLayout, QLabel, QListView, QStyle, QStyledItemDelegate, QVBoxLayout,
                            QWidget)

from ._histogram import KEPT_COLOUR, REJECTED_COLOUR

__all__ = ["ParticleGallery", "GalleryModel", "ThumbnailLoader", "BEST_FIRST", "WORST_FIRST", "NEAR_CUT",
           "thumbnail_pixels"]

BEST_FIRST, WORST_FIRST, NEAR_CUT = "best first", "worst first", "near the cut"
#: Tiles on each side of the cut in the "near the cut" view.
NEAR_CUT_TILES = 120
THUMBNAIL = 72  # px of the image in a tile
TEXT_HEIGHT = 30
MARGIN = 4
#: Thumbnails kept in memory (72 x 72 bytes each).
CACHE_SIZE = 6000
#: Images read at once by the loader.
BATCH = 48


def thumbnail_pixels(image: np.ndarray) -> np.ndarray:
    """(box, box) image -> (box, box) uint8, its 1st to 99th percentile mapped to 0-255 (a constant image: 128)."""
    image = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(image, [1.0, 99.0])
    if not high > low:
        return np.full(image.shape, 128, dtype=np.uint8)
    return np.clip((image - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)


class ThumbnailLoader(QObject):
    """Reads particle images and makes their thumbnails in a thread of its own.

    Signals:
        ready(list): particle indices whose thumbnails were just made (emitted from the loader thread; Qt
            delivers it on the main thread).
    """

    ready = Signal(object)

    def __init__(self, size: int = THUMBNAIL):
        super().__init__()
        self.size = size
        self._particles = None
        self._generation = 0
        self._cache: collections.OrderedDict[int, QImage] = collections.OrderedDict()
        self._queue: collections.deque[int] = collections.deque()
        self._pending: set[int] = set()
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ppcasort-thumbnails", daemon=True)
        self._thread.start()

    def set_particles(self, particles) -> None:
        """Show thumbnails of ``particles`` (a ParticleSet) from now on; forgets those of the previous set."""
        with self._condition:
            self._particles = particles
            self._generation += 1
            self._cache.clear()
            self._queue.clear()
            self._pending.clear()

    def thumbnail(self, index: int) -> QImage | None:
        """The thumbnail of particle ``index`` if it is made; otherwise asks for it (latest asked, first made)."""
        with self._condition:
            image = self._cache.get(index)
            if image is not None:
                self._cache.move_to_end(index)
                return image
            if index not in self._pending and self._particles is not None:
                self._pending.add(index)
                self._queue.append(index)
                self._condition.notify()
        return None

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._stopped:
                    self._condition.wait()
                if self._stopped:
                    return
                batch = [self._queue.pop() for _ in range(min(BATCH, len(self._queue)))]
                particles, generation = self._particles, self._generation
            try:
                images = particles.read(np.asarray(batch, dtype=np.int64))
            except Exception:  # an unreadable image: its tile stays blank (the sort reports such files)
                images = None
            made = {}
            if images is not None:
                for index, image in zip(batch, images):
                    pixels = np.ascontiguousarray(thumbnail_pixels(image))
                    height, width = pixels.shape
                    qimage = QImage(pixels.data, width, height, width, QImage.Format.Format_Grayscale8).copy()
                    made[index] = qimage.scaled(self.size, self.size, Qt.AspectRatioMode.KeepAspectRatio,
                                                Qt.TransformationMode.SmoothTransformation)
            with self._condition:
                if generation != self._generation:
                    continue
                self._pending.difference_update(batch)
                self._cache.update(made)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            if made:
                self.ready.emit(list(made))


class GalleryModel(QAbstractListModel):
    """One row per particle shown, in :attr:`order`.

    Attributes:
        order: (n,) int, the particle index of each row.
        scores: (N,) float, kept: (N,) bool, manual: (N,) bool (moved across the cut by hand), for all particles.
        labels: (N,) int or None, the true classes of simulated data, named by label_names.
        probability: (N,) float or None, the junk probability when the model gives one.
        removal_round: (N,) int or None; assignment: (N,) int or None, the class of each particle.
    """

    def __init__(self, loader: ThumbnailLoader):
        super().__init__()
        self.loader = loader
        self.order = np.empty(0, dtype=np.int64)
        self.scores = np.empty(0)
        self.kept = np.zeros(0, dtype=bool)
        self.manual = np.zeros(0, dtype=bool)
        self.labels = None
        self.label_names: dict = {}
        self.probability = None
        self.removal_round = None
        self.assignment = None

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else int(self.order.size)

    def particle(self, row: int) -> int:
        return int(self.order[row])

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or index.row() >= self.order.size:
            return None
        particle = self.particle(index.row())
        if role == Qt.ItemDataRole.DisplayRole:
            return self.caption(particle)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.tooltip(particle)
        return None

    def caption(self, particle: int) -> str:
        text = f"{self.scores[particle]:.3g}"
        if self.labels is not None:
            text += "\n" + str(self.label_names.get(int(self.labels[particle]), self.labels[particle]))
        return text

    def tooltip(self, particle: int) -> str:
        side = "kept" if self.kept[particle] else "rejected"
        lines = [f"particle {particle}", f"score {self.scores[particle]:.5g}"]
        if self.probability is not None:
            lines.append(f"junk probability {self.probability[particle]:.3f}")
        lines.append(side + (" (moved by hand)" if self.manual[particle] else ""))
        if self.removal_round is not None and self.removal_round[particle]:
            lines.append(f"removed in round {int(self.removal_round[particle])}")
        if self.assignment is not None:
            lines.append(f"class {int(self.assignment[particle]) + 1}")
        if self.labels is not None:
            lines.append(f"true class: {self.label_names.get(int(self.labels[particle]), self.labels[particle])}")
        lines.append("click: move it across the cut")
        return "\n".join(lines)

    def set_order(self, order: np.ndarray) -> None:
        self.beginResetModel()
        self.order = np.asarray(order, dtype=np.int64)
        self.endResetModel()


class TileDelegate(QStyledItemDelegate):
    """Paints a tile: the thumbnail, its frame (kept / rejected / moved by hand) and its caption."""

    def __init__(self, model: GalleryModel, parent=None):
        super().__init__(parent)
        self.model = model
        self.kept_pen = QPen(QColor(KEPT_COLOUR), 3)
        self.rejected_pen = QPen(QColor(REJECTED_COLOUR), 3)

    def sizeHint(self, option, index) -> QSize:
        return QSize(THUMBNAIL + 2 * MARGIN, THUMBNAIL + TEXT_HEIGHT + 2 * MARGIN)

    def paint(self, painter: QPainter, option, index: QModelIndex) -> None:
        particle = self.model.particle(index.row())
        rect = option.rect
        image_rect = QRect(rect.x() + MARGIN, rect.y() + MARGIN, THUMBNAIL, THUMBNAIL)
        painter.save()
        if option.state & QStyle.StateFlag.State_MouseOver:
            painter.fillRect(rect, option.palette.highlight())
        image = self.model.loader.thumbnail(particle)
        if image is None:
            painter.fillRect(image_rect, QColor(40, 40, 40))
        else:
            target = QRect(0, 0, image.width(), image.height())
            target.moveCenter(image_rect.center())
            painter.drawImage(target, image)
        pen = QPen(self.kept_pen if self.model.kept[particle] else self.rejected_pen)
        if self.model.manual[particle]:
            pen.setWidth(5)
            pen.setStyle(Qt.PenStyle.DashLine)
        painter.setPen(pen)
        painter.drawRect(image_rect.adjusted(-1, -1, 1, 1))
        painter.setPen(option.palette.text().color())
        font = painter.font()
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
        painter.setFont(font)
        text_rect = QRect(rect.x(), image_rect.bottom() + 2, rect.width(), TEXT_HEIGHT)
        painter.drawText(text_rect, int(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop),
                         self.model.caption(particle))
        painter.restore()


class ParticleGallery(QWidget):
    """The gallery: a view choice (best first, worst first, near the cut), a line saying what is shown, the tiles.

    Signals:
        particle_clicked(int): a tile was clicked; the particle index.
    """

    particle_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.loader = ThumbnailLoader()
        self.model = GalleryModel(self.loader)
        self.mode = QComboBox()
        self.mode.addItems([NEAR_CUT, BEST_FIRST, WORST_FIRST])
        self.mode.setToolTip("which particles the gallery shows, in score order (lowest score, the most "
                             "particle-like, first): all of them best first or worst first, or the "
                             f"{NEAR_CUT_TILES} on each side of the cut")
        self.summary = QLabel("no sort yet")
        self.summary.setToolTip("blue frame: kept; orange frame: rejected; thick dashed frame: moved across the "
                                "cut by hand. Click a tile to move it across the cut.")
        self.view = QListView()
        self.view.setViewMode(QListView.ViewMode.IconMode)
        self.view.setResizeMode(QListView.ResizeMode.Adjust)
        self.view.setMovement(QListView.Movement.Static)
        self.view.setUniformItemSizes(True)
        self.view.setLayoutMode(QListView.LayoutMode.Batched)
        self.view.setBatchSize(500)
        self.view.setSpacing(2)
        self.view.setMouseTracking(True)
        self.view.setSelectionMode(QListView.SelectionMode.NoSelection)
        self.view.setModel(self.model)
        self.view.setItemDelegate(TileDelegate(self.model, self.view))
        self.view.setMinimumHeight(220)
        self.view.clicked.connect(self._on_clicked)
        self.loader.ready.connect(self._on_thumbnails_ready)
        self.mode.currentTextChanged.connect(self._on_mode_changed)
        top = QHBoxLayout()
        top.addWidget(QLabel("show"))
        top.addWidget(self.mode)
        top.addWidget(self.summary, stretch=1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.view, stretch=1)
        self._by_score = np.empty(0, dtype=np.int64)
        self._cut_rank = 0

    @property
    def order(self) -> np.ndarray:
        """(n,) int, the particles shown, in their order on screen."""
        return self.model.order

    def frames(self) -> np.ndarray:
        """(n,) bool, for each tile shown: True when framed as kept."""
        return self.model.kept[self.model.order]

    def show_particles(self, particles, scores: np.ndarray, kept: np.ndarray, manual: np.ndarray, *,
                       labels=None, label_names: dict | None = None, probability=None, removal_round=None,
                       assignment=None) -> None:
        """Show the N particles of ``particles`` with their scores (N,), kept (N,) and manual (N,) masks.

        labels : (N,) int true classes (simulated data) named by ``label_names``; probability : (N,) junk
        probabilities; removal_round, assignment : (N,) int, for the tooltips.
        """
        self.loader.set_particles(particles)
        model = self.model
        model.scores = np.asarray(scores, dtype=np.float64)
        model.labels = None if labels is None else np.asarray(labels)
        model.label_names = dict(label_names or {})
        model.probability = None if probability is None else np.asarray(probability, dtype=np.float64)
        model.removal_round = None if removal_round is None else np.asarray(removal_round)
        model.assignment = None if assignment is None else np.asarray(assignment)
        self._by_score = np.argsort(np.nan_to_num(model.scores, nan=np.inf), kind="stable")
        model.kept = np.asarray(kept, dtype=bool).copy()
        model.manual = np.asarray(manual, dtype=bool).copy()
        self._cut_rank = -1
        self.set_selection(kept, manual, force_order=True)

    def set_selection(self, kept: np.ndarray, manual: np.ndarray, *, force_order: bool = False) -> None:
        """New frames (kept (N,), manual (N,) masks); the "near the cut" view follows the cut."""
        model = self.model
        model.kept = np.asarray(kept, dtype=bool).copy()
        model.manual = np.asarray(manual, dtype=bool).copy()
        # the cut's place in the score order: how many particles the cut alone keeps
        cut_rank = int(np.count_nonzero(model.kept ^ model.manual))
        if force_order or (self.mode.currentText() == NEAR_CUT and cut_rank != self._cut_rank):
            self._cut_rank = cut_rank
            self._apply_order()
        else:
            self._cut_rank = cut_rank
            self.view.viewport().update()
        self._update_summary()

    def clear(self) -> None:
        self.loader.set_particles(None)
        self.model.scores = np.empty(0)
        self.model.kept = self.model.manual = np.zeros(0, dtype=bool)
        self._by_score = np.empty(0, dtype=np.int64)
        self.model.set_order(self._by_score)
        self.summary.setText("no sort yet")

    def close_loader(self) -> None:
        self.loader.stop()

    def _on_mode_changed(self, text: str) -> None:
        self._apply_order()

    def _apply_order(self) -> None:
        mode = self.mode.currentText()
        if mode == BEST_FIRST:
            order = self._by_score
        elif mode == WORST_FIRST:
            order = self._by_score[::-1]
        else:
            start = max(0, self._cut_rank - NEAR_CUT_TILES)
            order = self._by_score[start:self._cut_rank + NEAR_CUT_TILES]
        self.model.set_order(order)
        self._update_summary()
        self.scroll_to_cut()

    def scroll_to_cut(self) -> None:
        """In the "near the cut" view, bring the first tile past the cut to the middle of the view."""
        if self.mode.currentText() != NEAR_CUT or self.model.order.size == 0:
            return
        row = min(self._cut_rank - max(0, self._cut_rank - NEAR_CUT_TILES), self.model.order.size - 1)
        self.view.scrollTo(self.model.index(row), QListView.ScrollHint.PositionAtCenter)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        # a view laid out while hidden (another tab) scrolled with the wrong size: scroll again once shown
        QTimer.singleShot(0, self.scroll_to_cut)

    def _update_summary(self) -> None:
        model = self.model
        if model.scores.size == 0:
            self.summary.setText("no sort yet")
            return
        n_kept = int(model.kept.sum())
        what = {BEST_FIRST: "all, best first", WORST_FIRST: "all, worst first",
                NEAR_CUT: f"{model.order.size} nearest the cut"}[self.mode.currentText()]
        manual = int(model.manual.sum())
        self.summary.setText(f"{what}: {n_kept} kept, {model.kept.size - n_kept} rejected"
                             + (f", {manual} by hand" if manual else ""))

    def _on_clicked(self, index: QModelIndex) -> None:
        if index.isValid():
            self.particle_clicked.emit(self.model.particle(index.row()))

    def _on_thumbnails_ready(self, indices) -> None:
        self.view.viewport().update()


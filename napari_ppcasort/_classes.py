"""The class view: one row per mixture component, as 2-D classes are shown, updated after every pruning round.

A row shows the component's in-plane aligned average of its members (``core.classes``), its top components
beside it (principal directions, by decreasing variance, signed: grey is 0), its kind (a particle class, or a
junk component of a model that has them), its particle count, weight, mean score and how many of its members
are kept; and two buttons that decide the whole class with one click, as Select 2D in cryoSPARC or a subset
selection in RELION: "keep all" or "reject all" its members (a second click gives the class back to the cut:
"by score").

Images are drawn at a fixed tile size whatever the box, and the header says what box they come from (the
sorted, Fourier-cropped one), so that nothing looks bigger or sharper than it is.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QPushButton, QScrollArea, QVBoxLayout, QWidget

from ._gallery import thumbnail_pixels

__all__ = ["ClassView", "ClassDecision", "BY_SCORE", "KEEP_ALL", "REJECT_ALL", "DECISIONS"]

BY_SCORE, KEEP_ALL, REJECT_ALL = "by score", "keep all", "reject all"
DECISIONS = (BY_SCORE, KEEP_ALL, REJECT_ALL)
AVERAGE_PIXELS = 96
COMPONENT_PIXELS = 48


def _subspace_of(kinds, component: int, n_subspaces: int) -> int | None:
    """The subspace (row of the components) of ``component``: its own for a particle class, its particle class's
    for an outlier twin (the same subspace with more variance; twins follow the classes in order), else None."""
    if component < n_subspaces:
        return component
    if kinds[component] == "outlier":
        return component - kinds.index("outlier")
    return None


def _pixmap(image: np.ndarray, size: int, symmetric: bool = False) -> QPixmap:
    """A (box, box) image as a size x size pixmap; ``symmetric``: 0 is mid-grey (signed components)."""
    image = np.asarray(image, dtype=np.float32)
    if symmetric:
        scale = float(np.abs(image).max())
        pixels = np.full(image.shape, 128, np.uint8) if scale == 0 else \
            np.clip(127.5 + 127.5 * image / scale, 0, 255).astype(np.uint8)
    else:
        pixels = thumbnail_pixels(image)
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape
    qimage = QImage(pixels.data, width, height, width, QImage.Format.Format_Grayscale8).copy()
    return QPixmap.fromImage(qimage.scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                           Qt.TransformationMode.SmoothTransformation))


class ClassDecision(QWidget):
    """Two checkable buttons, "keep all" and "reject all"; neither checked is "by score".

    Signals:
        changed(str): the user made the decision (one of DECISIONS).
    """

    changed = Signal(str)

    def __init__(self, component: int, parent: QWidget | None = None):
        super().__init__(parent)
        self.keep_button = QPushButton(KEEP_ALL)
        self.reject_button = QPushButton(REJECT_ALL)
        self.keep_button.setToolTip(f"keep every particle of class {component + 1}, whatever its score (click again: "
                                    "the cut decides)")
        self.reject_button.setToolTip(f"reject every particle of class {component + 1}, whatever its score (click "
                                      "again: the cut decides)")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for button in (self.keep_button, self.reject_button):
            button.setCheckable(True)
            layout.addWidget(button)
        self.keep_button.clicked.connect(lambda checked: self._on_clicked(KEEP_ALL, checked))
        self.reject_button.clicked.connect(lambda checked: self._on_clicked(REJECT_ALL, checked))

    @property
    def decision(self) -> str:
        if self.keep_button.isChecked():
            return KEEP_ALL
        return REJECT_ALL if self.reject_button.isChecked() else BY_SCORE

    def set_decision(self, decision: str) -> None:
        """Show ``decision`` without announcing it."""
        self.keep_button.setChecked(decision == KEEP_ALL)
        self.reject_button.setChecked(decision == REJECT_ALL)

    def _on_clicked(self, decision: str, checked: bool) -> None:
        self.set_decision(decision if checked else BY_SCORE)
        self.changed.emit(self.decision)


class ClassView(QWidget):
    """Rows of classes with their averages, components, numbers and a whole-class decision.

    Signals:
        decision_changed(int, str): the user chose ``decision`` (one of DECISIONS) for component ``int``.

    Attributes:
        decisions: one ClassDecision per component shown.
        info: one QLabel per component (kind, counts, weight, mean score).
    """

    decision_changed = Signal(int, str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.header = QLabel("The classes appear after the first pruning round.")
        self.header.setWordWrap(True)
        self._rows = QWidget()
        self._grid = QGridLayout(self._rows)
        self._grid.setAlignment(Qt.AlignmentFlag.AlignTop)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self._rows)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.header)
        layout.addWidget(scroll, stretch=1)
        self.decisions: list[ClassDecision] = []
        self.info: list[QLabel] = []
        self._averages: list[QLabel] = []
        self._components: list[list[QLabel]] = []
        self._classes = None
        self._kept_counts = None

    @property
    def classes(self):
        """The ClassViews shown (None before the first round)."""
        return self._classes

    def show_classes(self, classes, components: np.ndarray, *, box: int, pixel_size: float | None,
                     decisions_enabled: bool) -> None:
        """Show ``classes`` (core.classes.ClassViews) with ``components`` (M, n, box, box) of its first M classes (the
        particle classes; the junk components after them have none), the sorted ``box`` (px)
        and its ``pixel_size`` (A/px, or None); the decision choices are active when ``decisions_enabled``."""
        self._classes = classes
        n = classes.n_components
        self._ensure_rows(n, components.shape[1])
        size = f"{box} px" + (f" ({box * pixel_size:.0f} \u00c5)" if pixel_size else "")
        alignment = "aligned in-plane" if classes.aligned else "not aligned (the basis is not steerable)"
        self.header.setText(f"{n} classes: the average of each class's members, {alignment}, and its top "
                            f"components; sorted box {size}.")
        total = max(int(classes.counts.sum()), 1)
        for m in range(n):
            self._averages[m].setPixmap(_pixmap(classes.averages[m], AVERAGE_PIXELS))
            subspace = _subspace_of(classes.kinds, m, components.shape[0])
            for j, label in enumerate(self._components[m]):
                if subspace is None:  # a noise or background component has no subspace
                    label.clear()
                else:
                    label.setPixmap(_pixmap(components[subspace, j], COMPONENT_PIXELS, symmetric=True))
            self._averages[m].setToolTip(
                f"class {m + 1}: the average of its {classes.counts[m]} members ({alignment})" if classes.counts[m]
                else f"class {m + 1}: no member; its model mean")
            self.decisions[m].setEnabled(decisions_enabled)
        self._total = total
        self._kept_counts = None
        self._update_info()

    def set_kept_counts(self, kept_counts: np.ndarray | None) -> None:
        """How many members of each class are kept now (None: not known, during a run)."""
        self._kept_counts = None if kept_counts is None else np.asarray(kept_counts)
        self._update_info()

    def reset_decisions(self) -> None:
        for decision in self.decisions:
            decision.set_decision(BY_SCORE)

    def set_decision(self, component: int, decision: str) -> None:
        """Show ``decision`` for ``component`` without announcing it (restoring a curation)."""
        self.decisions[component].set_decision(decision)

    def clear(self) -> None:
        self._classes = None
        self._ensure_rows(0, 0)
        self.header.setText("The classes appear after the first pruning round.")

    def _update_info(self) -> None:
        classes = self._classes
        if classes is None:
            return
        for m in range(classes.n_components):
            count = int(classes.counts[m])
            lines = [f"class {m + 1}: {classes.kinds[m]}",
                     f"{count} particles ({count / self._total:.1%}), weight {classes.weights[m]:.2f}",
                     f"mean score {classes.mean_scores[m]:.3g}" if np.isfinite(classes.mean_scores[m])
                     else "no member"]
            if self._kept_counts is not None:
                lines[-1] += f", {int(self._kept_counts[m])} kept"
            self.info[m].setText("\n".join(lines))

    def _ensure_rows(self, n: int, n_components: int) -> None:
        """Exactly ``n`` rows of ``n_components`` component tiles (rows are reused between rounds)."""
        if len(self.decisions) == n and (n == 0 or len(self._components[0]) == n_components):
            return
        while self._grid.count():
            item = self._grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.decisions, self.info, self._averages, self._components = [], [], [], []
        for m in range(n):
            average = QLabel()
            average.setFixedSize(AVERAGE_PIXELS, AVERAGE_PIXELS)
            self._grid.addWidget(average, m, 0)
            tiles = []
            for j in range(n_components):
                tile = QLabel()
                tile.setFixedSize(COMPONENT_PIXELS, COMPONENT_PIXELS)
                tile.setToolTip(f"component {j + 1} of class {m + 1} (by decreasing variance; grey is 0)")
                self._grid.addWidget(tile, m, 1 + j, Qt.AlignmentFlag.AlignTop)
                tiles.append(tile)
            info = QLabel()
            info.setToolTip("kind (a particle class; a junk class: a particle class whose mean carries no particle; or a "
                            "junk component: outlier, noise, background), members (the "
                            "particles it explains best), mixing weight, mean junk score and members kept")
            self._grid.addWidget(info, m, 1 + n_components)
            decision = ClassDecision(m)
            decision.setEnabled(False)
            decision.changed.connect(lambda text, component=m: self.decision_changed.emit(component, text))
            self._grid.addWidget(decision, m, 2 + n_components)
            self.decisions.append(decision)
            self.info.append(info)
            self._averages.append(average)
            self._components.append(tiles)

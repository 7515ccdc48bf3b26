"""Reviewing a finished sort: the user's curation (a cut, whole classes, single particles), the review controls,
and the controller that keeps every view on one kept set and exports it.

:class:`Curation` is the state, with no Qt: the cut is a score threshold (the particles scoring at most it are
kept); a class decided as a whole ("keep all", "reject all") overrides the cut for its members; a particle
clicked in the gallery overrides both. What differs from the cut is exported as the manual overrides of
parameters.json (``SortResult.with_selection``), so the command line reproduces the kept set.

:class:`ReviewPanel` holds the controls: "keep the best" (the cut as a count, linked to the cut dragged on the
histogram), the counts, "undo hand edits" and Export. :class:`ReviewController` shows a result in the
histogram, the class view and the gallery, applies every change of the curation to all of them, and exports.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
from magicgui.widgets import Container, Label, PushButton, Slider
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QFileDialog, QMessageBox

from ._classes import BY_SCORE, KEEP_ALL, REJECT_ALL
from ._reader import ParticleStack
from ._worker import widget_name
from .core.errors import PPCASortError
from .core.models import MODELS, score_label
from .core.results import existing_results, particle_columns
from .core.simulate import LABEL_NAMES

__all__ = ["Curation", "ReviewPanel", "ReviewController", "TRUE_LABEL_COLUMN", "JUNK_PROBABILITY_COLUMN"]

#: The column of a particle table with the true class of simulated data (core.simulate.LABEL_NAMES codes).
TRUE_LABEL_COLUMN = "ppcasortTrueLabel"
#: The per-particle output (core.results.COLUMNS) of a model that gives each image a junk probability.
JUNK_PROBABILITY_COLUMN = "junk_probability"


class Curation:
    """What the user keeps of a finished sort.

    Args:
        result: the SortResult.
        assignment: (N,) int, the class of each particle (``ClassViews.assignment``), or None.

    Attributes:
        scores: (N,) float, the final scores; sorted_scores: (N,) ascending.
        automatic_cut: the sort's own cut (the largest score it kept in its last round).
        threshold: the cut now (starts at the automatic cut).
        class_decisions: {component: True (keep all) or False (reject all)}.
        hand: {particle: True (kept) or False (rejected)}, the tiles clicked.
    """

    def __init__(self, result, assignment: np.ndarray | None = None):
        self.result = result
        self.scores = np.asarray(result.scores, dtype=np.float64)
        self.sorted_scores = np.sort(self.scores)
        self.assignment = None if assignment is None else np.asarray(assignment)
        self.automatic_cut = float(result.final.cut)
        self.threshold = self.automatic_cut
        self.class_decisions: dict[int, bool] = {}
        self.hand: dict[int, bool] = {}

    @property
    def n_particles(self) -> int:
        return self.scores.size

    @property
    def n_best(self) -> int:
        """How many particles the cut keeps (by score alone)."""
        return int(np.searchsorted(self.sorted_scores, self.threshold, side="right"))

    def keep_best(self, count: int) -> None:
        """Move the cut to keep the ``count`` best-scoring particles (1 <= count <= N)."""
        count = int(np.clip(count, 1, self.n_particles))
        self.threshold = float(self.sorted_scores[count - 1])

    def move_cut(self, score: float) -> None:
        """Move the cut to ``score``, snapped to the largest particle score at most it (at least one is kept)."""
        at = int(np.searchsorted(self.sorted_scores, score, side="right"))
        self.keep_best(max(at, 1))

    def base_mask(self) -> np.ndarray:
        """(N,) bool, the particles the cut keeps."""
        return self.scores <= self.threshold

    def kept_mask(self) -> np.ndarray:
        """(N,) bool, the kept set: the cut, then the class decisions, then the particles clicked."""
        kept = self.base_mask()
        if self.assignment is not None:
            for component, keep in self.class_decisions.items():
                kept[self.assignment == component] = keep
        if self.hand:
            indices = np.fromiter(self.hand, dtype=np.int64, count=len(self.hand))
            kept[indices] = np.fromiter(self.hand.values(), dtype=bool, count=len(self.hand))
        return kept

    def moved_mask(self) -> np.ndarray:
        """(N,) bool, the particles on the other side than the cut puts them (by class or by hand)."""
        return self.kept_mask() != self.base_mask()

    def toggle(self, particle: int) -> bool:
        """Move ``particle`` across the cut (or back); returns whether it is kept now."""
        kept = not bool(self.kept_mask()[particle])
        self.hand[int(particle)] = kept
        return kept

    def decide_class(self, component: int, decision: str) -> None:
        """Keep all, reject all or let the cut decide (BY_SCORE) the members of ``component``; the particles of
        the class clicked by hand earlier follow the class decision."""
        if self.assignment is None:
            raise ValueError("no class assignment: the classes are not known")
        if decision == BY_SCORE:
            self.class_decisions.pop(component, None)
        elif decision in (KEEP_ALL, REJECT_ALL):
            self.class_decisions[component] = decision == KEEP_ALL
        else:
            raise ValueError(f"unknown class decision {decision!r}")
        members = set(np.flatnonzero(self.assignment == component).tolist())
        self.hand = {particle: kept for particle, kept in self.hand.items() if particle not in members}

    def undo_hand_edits(self) -> None:
        self.hand.clear()
        self.class_decisions.clear()

    def kept_per_class(self, n_components: int) -> np.ndarray | None:
        """(M,) int, the kept members of each class (None without classes)."""
        if self.assignment is None:
            return None
        return np.bincount(self.assignment[self.kept_mask()], minlength=n_components)

    def curated_result(self):
        """The SortResult with this cut and the overrides that make this kept set (what Export writes)."""
        return self.result.with_selection(self.threshold, self.kept_mask())


class ReviewPanel(Container):
    """The review controls (a magicgui Container): keep the best N, the counts, undo the hand edits, Export."""

    def __init__(self):
        self.threshold = Slider(label="keep the best", min=0, max=1, value=1, enabled=False,
                                tooltip="the cut, as the number of particles kept by score (lowest scores first); "
                                        "dragging the cut on the histogram moves it too")
        self.counts = Label(label="kept / rejected", value="-",
                            tooltip="particles kept and rejected now: the cut, whole classes and particles moved "
                                    "by hand")
        self.undo = PushButton(text="Undo hand edits", enabled=False,
                               tooltip="forget the particles moved by hand and the class decisions: the cut alone "
                                       "decides")
        self.export_button = PushButton(text="Export...", enabled=False,
                                        tooltip="write the kept and rejected sets (in the input's format), "
                                                "scores.csv, report.png and parameters.json (with the cut and the "
                                                "hand edits) into a folder, as the command line does")
        super().__init__(widgets=[self.threshold, self.counts, self.undo, self.export_button])

    def set_enabled(self, enabled: bool) -> None:
        for control in (self.threshold, self.undo, self.export_button):
            control.enabled = enabled


class ReviewController(QObject):
    """Shows a finished sort in the histogram, the class view and the gallery, and keeps them on one kept set.

    Signals:
        status(str): a line for the widget's status.
        exported(dict): an export finished; the paths written.

    Attributes:
        panel: the ReviewPanel. result, classes, curation: the result shown, its ClassViews and the user's curation
        (None before a result).
    """

    status = Signal(str)
    exported = Signal(object)

    def __init__(self, viewer, histogram, class_view, gallery, parent_widget):
        super().__init__()
        self.viewer, self.histogram, self.class_view, self.gallery = viewer, histogram, class_view, gallery
        self._parent_widget = weakref.ref(parent_widget)
        self.panel = ReviewPanel()
        self.result = None
        self.classes = None
        self.curation: Curation | None = None
        self._components = None
        self._layer = None
        self._updating = False
        self.panel.threshold.changed.connect(self._on_keep_best_changed)
        self.panel.undo.changed.connect(self._on_undo)
        self.panel.export_button.changed.connect(self._on_export_clicked)
        histogram.cut_dragged.connect(self._on_cut_dragged)
        histogram.cut_dropped.connect(self._on_cut_dragged)
        class_view.decision_changed.connect(self._on_class_decision)
        gallery.particle_clicked.connect(self._on_particle_clicked)

    def set_result(self, result, classes, components, layer) -> None:
        """A new result (SortResult), its ClassViews (or None) and class components (M, n, box, box), sorted from
        ``layer`` (the napari layer, or None): a fresh curation at the sort's own cut, shown."""
        self.result, self.classes, self._components, self._layer = result, classes, components, layer
        self.curation = Curation(result, None if classes is None else classes.assignment)
        self.show()

    def forget_layer(self, layer) -> None:
        if layer is self._layer:
            self._layer = None

    def set_enabled(self, enabled: bool) -> None:
        self.panel.set_enabled(enabled)
        if not enabled:
            self.panel.counts.value = "-"

    def show(self) -> None:
        """Show the result in every view (histogram and trace, classes, gallery, controls), or nothing."""
        result, curation = self.result, self.curation
        if result is None:
            self.histogram.clear("no sort yet")
            self.class_view.clear()
            self.gallery.clear()
            self.set_enabled(False)
            return
        kept = curation.kept_mask()
        probability = particle_columns(result, kept).get(JUNK_PROBABILITY_COLUMN)
        self.histogram.set_score_label(score_label(result.settings))
        iterations = result.settings.iterations_per_round * np.arange(1, result.final.round + 1)
        self.histogram.show_trace(result.final.log_likelihood, iterations, result.final.log_likelihood.size)
        self.histogram.show_scores(result.scores, kept, curation.threshold,
                                   f"final scores of all {result.final.n_total} images (dotted: the sort's cut)",
                                   automatic_cut=curation.automatic_cut, probability=probability,
                                   limits=MODELS[result.settings.model].score_limits)
        if self.classes is not None:
            box = self.classes.averages.shape[-1]
            particles = result.particles
            pixel_size = particles.pixel_size * particles.box_size / box if particles.pixel_size else None
            self.class_view.show_classes(self.classes, self._components, box=box, pixel_size=pixel_size,
                                         decisions_enabled=True)
            self.class_view.reset_decisions()
            for component, keep in curation.class_decisions.items():
                self.class_view.set_decision(component, KEEP_ALL if keep else REJECT_ALL)
        table = getattr(result.particles, "table", None)
        labels = table[TRUE_LABEL_COLUMN].to_numpy() if table is not None and TRUE_LABEL_COLUMN in table else None
        self.gallery.show_particles(result.particles, result.scores, kept, curation.moved_mask(), labels=labels,
                                    label_names=LABEL_NAMES, probability=probability,
                                    removal_round=result.removal_round,
                                    assignment=None if self.classes is None else self.classes.assignment)
        self._updating = True
        try:
            self.panel.threshold.min = 1
            self.panel.threshold.max = curation.n_particles
            self.panel.threshold.value = curation.n_best
        finally:
            self._updating = False
        self.panel.set_enabled(True)
        self._apply()

    def _apply(self) -> None:
        """After the cut, a class decision or a click: every view shows the new kept set."""
        curation = self.curation
        kept = curation.kept_mask()
        moved = kept != curation.base_mask()
        self.histogram.set_selection(kept, curation.threshold)
        self.gallery.set_selection(kept, moved)
        if self.classes is not None:
            self.class_view.set_kept_counts(curation.kept_per_class(self.classes.n_components))
        n_kept, by_hand = int(kept.sum()), int(moved.sum())
        self.panel.counts.value = (f"{n_kept} kept (score <= {curation.threshold:.4g}"
                                   + (f"; {by_hand} moved by hand or class)" if by_hand else ")")
                                   + f", {kept.size - n_kept} rejected")
        self.panel.undo.enabled = bool(curation.hand or curation.class_decisions)

    def _active(self) -> bool:
        return self.curation is not None and self.panel.threshold.enabled

    def _on_keep_best_changed(self, value=None) -> None:
        if self._active() and not self._updating:
            self.curation.keep_best(int(self.panel.threshold.value))
            self._apply()

    def _on_cut_dragged(self, score: float) -> None:
        if not self._active():
            return
        self.curation.move_cut(score)
        self._updating = True
        try:
            self.panel.threshold.value = self.curation.n_best
        finally:
            self._updating = False
        self._apply()

    def _on_class_decision(self, component: int, decision: str) -> None:
        if self._active() and self.curation.assignment is not None:
            self.curation.decide_class(component, decision)
            self._apply()

    def _on_particle_clicked(self, particle: int) -> None:
        if not self._active():
            return
        kept = self.curation.toggle(particle)
        self._apply()
        self.status.emit(f"particle {particle} (score {self.curation.scores[particle]:.4g}) "
                         f"{'kept' if kept else 'rejected'} by hand")
        layer = self._layer
        if layer is not None and layer in self.viewer.layers and isinstance(layer.data, ParticleStack) \
                and layer.data.is_whole_set:
            self.viewer.dims.set_current_step(0, particle * layer.scale[0] + layer.translate[0])

    def _on_undo(self, value=None) -> None:
        if self.curation is not None:
            self.curation.undo_hand_edits()
            self.class_view.reset_decisions()
            self._apply()

    # -- export --------------------------------------------------------------------------------------------------

    def export(self, out_dir=None, *, force: bool = False):
        """Write the curated result into ``out_dir`` as one output set, in a worker (see SortWidget.export)."""
        if self.result is None or self.curation is None:
            show_error("Nothing to export yet: run a sort first.")
            return None
        if out_dir is None:
            parent = self._parent_widget()
            out_dir = QFileDialog.getExistingDirectory(parent, "Export the sorted particles to a folder")
            if not out_dir:
                return None
            previous = existing_results(out_dir)
            if previous and not force:
                answer = QMessageBox.question(
                    parent, "Replace the results?", f"{out_dir} already holds results ({', '.join(previous)}). "
                    "Replace them?", QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No)
                if answer != QMessageBox.StandardButton.Yes:
                    return None
                force = True
        curated = self.curation.curated_result()
        kept = curated.kept_mask
        self.panel.export_button.enabled = False
        self.status.emit(f"Exporting to {out_dir}...")
        worker = thread_worker(_export, start_thread=False)(curated, Path(out_dir), force)
        worker.returned.connect(_weak_call(self, "_on_exported", Path(out_dir), int(kept.sum()), int((~kept).sum())))
        worker.finished.connect(_weak_call(self, "_on_export_finished"))
        worker.start()
        return worker

    def _on_export_clicked(self, value=None) -> None:
        self.export()

    def _on_export_finished(self) -> None:
        self.panel.export_button.enabled = self.result is not None and self.panel.threshold.enabled

    def _on_exported(self, out_dir: Path, n_kept: int, n_rejected: int, outcome) -> None:
        if isinstance(outcome, str):
            show_error(outcome)
            self.status.emit(f"Export failed: {outcome}")
            return
        message = (f"Wrote {n_kept} kept and {n_rejected} rejected particles, scores, report and parameters "
                   f"to {out_dir}")
        show_info(message)
        self.status.emit(message)
        self.exported.emit(outcome)


def _export(result, out_dir: Path, force: bool):
    """SortResult.export in a worker thread: the written paths, or the message of a refused or failed export."""
    try:
        return result.export(out_dir, force=force)
    except PPCASortError as error:
        return error.describe(widget_name)


def _weak_call(owner: QObject, name: str, *bound_args):
    """A slot calling ``owner.name(*bound_args, *args)`` that holds ``owner`` weakly (napari keeps its workers)."""
    reference = weakref.ref(owner)

    def slot(*args):
        target = reference()
        if target is not None:
            getattr(target, name)(*bound_args, *args)

    return slot

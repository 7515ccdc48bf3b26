"""The napari dock widget: sort a particle stack, watch the classes form round by round, curate, export.

It composes parts with one job each:

* :class:`~napari_ppcasort._settings_form.SettingsForm` (tab "Settings"): the source and the settings, with
  limits from the data and the engine's checks before Run;
* :class:`~napari_ppcasort._controller.RunController`: the sort in a worker thread, Cancel, shutdown;
* :class:`~napari_ppcasort._classes.ClassView` (tab "Classes"): each class's aligned average, components and
  numbers after every pruning round, and whole-class decisions after the run;
* :class:`~napari_ppcasort._gallery.ParticleGallery` (tab "Particles"): every particle by score, framed by its
  side of the cut; a click moves it across;
* :class:`~napari_ppcasort._histogram.ScoreHistogram`: kept and rejected scores, the cut dragged on it, the
  log-likelihood trace;
* :class:`~napari_ppcasort._review.ReviewPanel` and :class:`~napari_ppcasort._review.Curation`: the cut as a
  count, the counts, undo, Export.

What is on screen always belongs to one result: while a sort runs its rounds are shown; when it succeeds its
result replaces the previous one; when it is cancelled or fails the previous result (if any) comes back,
whole. The napari canvas keeps only the user's layers (the particle stack in angstrom when the pixel size
is known): no layers are added, and the viewer is not switched to grid mode.

For scripts and notebooks: :meth:`SortWidget.run` (returns the worker), :meth:`SortWidget.export` (returns the
worker), and after a run :attr:`SortWidget.result`, :attr:`SortWidget.kept_mask`, :attr:`SortWidget.scores`,
:attr:`SortWidget.score_threshold` and :attr:`SortWidget.curation`.
"""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QMessageBox, QProgressBar, QPushButton, QScrollArea,
                            QSizePolicy, QTabWidget, QVBoxLayout, QWidget)

from ._classes import ClassView
from ._controller import CANCELLED, DONE, FAILED, RunController
from ._gallery import ParticleGallery
from ._histogram import ScoreHistogram
from ._reader import ParticleStack
from ._review import Curation, ReviewPanel
from ._settings_form import SettingsForm, particle_layer
from ._worker import CoefficientsProgress, IterationDone, RoundDone, RunFailed, SortFinished, SortStarted, widget_name
from .core.errors import PPCASortError
from .core.models import score_label
from .core.results import existing_results, particle_columns
from .core.simulate import LABEL_NAMES

__all__ = ["SortWidget", "N_COMPONENTS_SHOWN", "TRUE_LABEL_COLUMN", "JUNK_PROBABILITY_COLUMN"]

#: Components of each class shown in the class view.
N_COMPONENTS_SHOWN = 4
#: The column of a particle table with the true class of simulated data (core.simulate.LABEL_NAMES codes).
TRUE_LABEL_COLUMN = "ppcasortTrueLabel"
#: The per-particle output (core.results.COLUMNS) of a model that gives each image a junk probability.
JUNK_PROBABILITY_COLUMN = "junk_probability"
SETTINGS_TAB, CLASSES_TAB, PARTICLES_TAB = "Settings", "Classes", "Particles"


class SortWidget(QWidget):
    """Dock widget that sorts a particle stack with the mixture of PPCA and online pruning, and curates the result.

    Signals (for scripts and tests):
        round_updated(RoundDone): after the classes and the histogram show a pruning round; once per round.
        run_finished(str): the sort ended: "done", "cancelled" or "failed" (after the views are updated).
        exported(dict): an export finished; the paths written (see core.run.SortResult.export).

    Attributes:
        result: the SortResult of the last successful run (None before one); it stays until the next run succeeds.
        curation: the user's selection on it (core of the review: cut, class decisions, particles clicked).
        classes_shown: the ClassViews of that result.
        n_round_updates: pruning rounds shown, over all runs.
    """

    round_updated = Signal(object)
    run_finished = Signal(str)
    exported = Signal(object)

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.n_round_updates = 0
        self.result = None
        self.curation: Curation | None = None
        self.classes_shown = None
        self._components = None  # (M, n, box, box) components of the shown result
        self._run_particles = None
        self._run_settings = None
        self._run_layer = None  # the layer the running sort reads (to show a clicked particle in it)
        self._result_layer = None
        self._pending = None  # (SortResult, ClassViews, components) of the running sort, once it finished
        self._last_round = None
        self._n_rounds = self._n_particles = 0
        self._automatic = False
        self._iterations_per_round = 1
        self._updating_review = False
        self._trace_span = None

        self.form = SettingsForm(viewer)
        self.controller = RunController(N_COMPONENTS_SHOWN)
        self.controller.event.connect(self._on_event)
        self.controller.finished.connect(self._on_finished)
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("sort the chosen source with these settings (cancels a running sort)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("stop the sort within one EM iteration; the previous result comes back")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self._on_run_clicked)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        self.progress.setValue(0)
        self.progress.setToolTip("coefficients, then pruning rounds")
        self.status = QLabel("Choose a stack and press Run.")
        # one line whose length never resizes the dock (a resize would redraw the whole histogram)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)

        self.class_view = ClassView()
        self.class_view.decision_changed.connect(self._on_class_decision)
        self.gallery = ParticleGallery()
        self.gallery.particle_clicked.connect(self._on_particle_clicked)
        self.histogram = ScoreHistogram(viewer, self)
        self.histogram.cut_dragged.connect(self._on_cut_dragged)
        self.histogram.cut_dropped.connect(self._on_cut_dragged)
        self.review = ReviewPanel()
        self.review.threshold.changed.connect(self._on_keep_best_changed)
        self.review.undo.changed.connect(self._on_undo)
        self.review.export_button.changed.connect(self._on_export_clicked)

        form_scroll = QScrollArea()
        form_scroll.setWidgetResizable(True)
        form_scroll.setWidget(self.form.native)
        self.tabs = QTabWidget()
        self.tabs.addTab(form_scroll, SETTINGS_TAB)
        self.tabs.addTab(self.class_view, CLASSES_TAB)
        self.tabs.addTab(self.gallery, PARTICLES_TAB)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.tabs, stretch=3)
        layout.addWidget(self.histogram, stretch=2)
        layout.addWidget(self.review.native)

        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self.destroyed.connect(_stopper(self.gallery.loader))

    # -- public state ------------------------------------------------------------------------------------------

    @property
    def scores(self) -> np.ndarray | None:
        """(N,) float, the final scores of the shown result (None before a run)."""
        return None if self.result is None else self.result.scores

    @property
    def score_threshold(self) -> float | None:
        """The cut: particles whose final score is at most this are kept, before the hand edits (None before a run)."""
        return None if self.curation is None else self.curation.threshold

    @property
    def kept_mask(self) -> np.ndarray | None:
        """(N,) bool, the particles kept now: the cut, the class decisions, the particles clicked (None before a run)."""
        return None if self.curation is None else self.curation.kept_mask()

    @property
    def running(self) -> bool:
        return self.controller.running

    # -- the source ----------------------------------------------------------------------------------------

    def _on_layer_inserted(self, event) -> None:
        layer = event.value
        if particle_layer(layer) and not self.running:
            self.form.choose_layer(layer)  # a stack opened (File > Open, drag and drop, sample data) is sorted next
        else:
            self.form.refresh_sources()

    def _on_layer_removed(self, event=None) -> None:
        self.form.refresh_sources()
        if event is not None and event.value is self._result_layer:
            self._result_layer = None

    # -- running ---------------------------------------------------------------------------------------------

    def _on_run_clicked(self, checked=False) -> None:
        self.run()

    def run(self):
        """Check the settings, then start a sort of the chosen source (cancelling a running one).

        Returns the worker, or None (with the reason shown) when the source or a setting cannot be used.
        """
        self.controller.shutdown()
        self._watch_window()  # docked by now: closing its window stops the sort
        try:
            particles, settings = self.form.checked()
        except (ValueError, PPCASortError) as error:
            message = str(error)
            show_error(message)
            self._set_status(f"Not started: {message}")
            self._show_result()  # the previous result, whole
            return None
        self._run_particles, self._run_settings = particles, settings
        layer = self.form.source.value
        self._run_layer = layer if layer is not None and not isinstance(layer, str) else None
        self._pending = None
        self._last_round = None
        self._iterations_per_round = settings.iterations_per_round
        self.form.set_locked(True)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.review.set_enabled(False)
        self.review.counts.value = "-"
        self.gallery.clear()
        self.class_view.clear()
        self.histogram.clear("waiting for the first pruning round", score_label(settings))
        self._trace_span = None
        self.progress.setRange(0, 0)
        self.progress.setFormat("starting")
        self._set_status(f"Sorting {particles.n_particles} images...")
        self.tabs.setCurrentIndex(1)  # the classes form round by round
        return self.controller.start(particles, settings)

    def cancel(self, checked=False) -> None:
        """Ask the running sort to stop; it does before its next EM iteration."""
        if self.running:
            self.controller.cancel()
            self._set_status("Cancelling...")

    def _on_event(self, event) -> None:
        if isinstance(event, CoefficientsProgress):
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
            self.progress.setFormat("coefficients %v / %m")
            self._set_status(f"Computing basis coefficients: {event.done} of {event.total} images")
        elif isinstance(event, SortStarted):
            self._n_rounds, self._n_particles = event.n_rounds, event.n_particles
            self._automatic = event.automatic
            self.progress.setRange(0, event.n_rounds)
            self.progress.setValue(0)
            self.progress.setFormat("round %v (until no outlier is left)" if event.automatic else "round %v of %m")
            rounds = "pruning until no outlier is left" if event.automatic else f"{event.n_rounds} pruning rounds"
            self._set_status(f"{event.n_particles} images, {event.n_coefficients} coefficients each: {rounds}")
            self._trace_span = event.n_rounds * self._iterations_per_round  # an upper bound in the automatic mode
        elif isinstance(event, IterationDone):
            self._show_progress(event.round, event.iteration, event.log_likelihood, event.n_kept)
        elif isinstance(event, RoundDone):
            # no immediate repaints while the round is shown: the widget is painted once, afterwards
            self.setUpdatesEnabled(False)
            try:
                self._show_round(event)
            finally:
                self.setUpdatesEnabled(True)
                # the sort resumes once Qt has also painted the round (a zero timer fires after pending paints)
                QTimer.singleShot(0, self.controller.round_shown.set)
        elif isinstance(event, SortFinished):
            last = self._last_round
            self._pending = (event.result, last.classes if last is not None else None,
                             last.components if last is not None else None)
        elif isinstance(event, RunFailed):
            self._set_status(f"Failed: {event.message}")

    def _show_round(self, event: RoundDone) -> None:
        result = event.result
        self._last_round = event
        self.progress.setValue(result.round)
        kept = result.scores <= result.cut
        self.histogram.show_trace(result.log_likelihood, self._prunings(result.round), self._trace_span)
        self.histogram.show_scores(result.scores, kept, result.cut,
                                   f"round {result.round}: scores of {result.scores.size} images")
        if event.classes is not None:
            self.class_view.show_classes(event.classes, event.components, box=event.means.shape[-1],
                                         pixel_size=self._sorted_pixel_size(event.means.shape[-1]),
                                         decisions_enabled=False)
        self._show_progress(result.round, result.n_iterations, result.log_likelihood[-1], result.kept.size)
        self.n_round_updates += 1
        self.round_updated.emit(event)

    def _on_finished(self, outcome: str) -> None:
        self.form.set_locked(False)
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        if outcome == DONE and self._pending is not None:
            result, classes, components = self._pending
            self.result, self.classes_shown, self._components = result, classes, components
            self.curation = Curation(result, None if classes is None else classes.assignment)
            self._result_layer = self._run_layer
            self.progress.setValue(1)
            self.progress.setFormat(f"done: {result.final.round} rounds")
            self._show_result()
            self._set_status(f"Done: kept {result.n_kept} of {result.final.n_total} images after "
                             f"{result.final.round} rounds; move the cut, decide classes, click particles, Export")
        else:
            outcome = CANCELLED if outcome == DONE else outcome  # ended without a result: stopped
            self.progress.setValue(0)
            self.progress.setFormat(outcome)
            self._show_result()
            previous = "" if self.result is None else " The previous result is shown."
            if outcome == FAILED:
                show_error(self.controller.message)
                self._set_status(f"Failed: {self.controller.message}{previous}")
            else:
                self._set_status(f"Cancelled.{previous}")
        self.run_finished.emit(outcome)

    def _prunings(self, n_rounds: int) -> np.ndarray:
        return self._iterations_per_round * np.arange(1, n_rounds + 1)

    def _sorted_pixel_size(self, sorted_box: int) -> float | None:
        """Angstrom per pixel of the sorted (Fourier-cropped) images of the running or shown sort."""
        particles = self._run_particles if self._run_particles is not None else getattr(self.result, "particles", None)
        if particles is None or not particles.pixel_size:
            return None
        return particles.pixel_size * particles.box_size / sorted_box

    def _show_progress(self, round_number: int, iteration: int, log_likelihood: float, n_kept: int) -> None:
        """The one-line status: round, EM iteration, mean log-likelihood per image, images kept."""
        of = "" if self._automatic else f"/{self._n_rounds}"
        self._set_status(f"round {round_number}{of} | EM it. {iteration} | logL {log_likelihood:.6g} | "
                         f"kept {n_kept}/{self._n_particles}")

    def _set_status(self, text: str) -> None:
        self.status.setText(text)
        self.status.setToolTip(text)  # the whole text when the line is cut

    # -- the result and its review -----------------------------------------------------------------------------

    def _show_result(self) -> None:
        """Show the current result in every view (histogram, trace, classes, gallery, review), or nothing."""
        result, curation = self.result, self.curation
        if result is None:
            self.histogram.clear("no sort yet")
            self.class_view.clear()
            self.gallery.clear()
            self.review.set_enabled(False)
            self.review.counts.value = "-"
            return
        kept = curation.kept_mask()
        columns = particle_columns(result, kept)
        probability = columns.get(JUNK_PROBABILITY_COLUMN)
        self.histogram.set_score_label(score_label(result.settings))
        self.histogram.show_trace(result.final.log_likelihood, self._prunings(result.final.round),
                                  result.final.log_likelihood.size)
        self.histogram.show_scores(result.scores, kept, curation.threshold,
                                   f"final scores of all {result.final.n_total} images (dotted: the sort's cut)",
                                   automatic_cut=curation.automatic_cut, probability=probability)
        if self.classes_shown is not None:
            box = self.classes_shown.averages.shape[-1]
            particles = result.particles
            pixel_size = particles.pixel_size * particles.box_size / box if particles.pixel_size else None
            self.class_view.show_classes(self.classes_shown, self._components, box=box, pixel_size=pixel_size,
                                         decisions_enabled=True)
            self.class_view.reset_decisions()
            for component, keep in curation.class_decisions.items():
                self.class_view.decisions[component].blockSignals(True)
                self.class_view.decisions[component].setCurrentText("keep all" if keep else "reject all")
                self.class_view.decisions[component].blockSignals(False)
        table = getattr(result.particles, "table", None)
        labels = table[TRUE_LABEL_COLUMN].to_numpy() if table is not None and TRUE_LABEL_COLUMN in table else None
        self.gallery.show_particles(result.particles, result.scores, kept, curation.moved_mask(), labels=labels,
                                    label_names=LABEL_NAMES, probability=probability,
                                    removal_round=result.removal_round,
                                    assignment=None if self.classes_shown is None else self.classes_shown.assignment)
        self._updating_review = True
        try:
            self.review.threshold.min = 1
            self.review.threshold.max = curation.n_particles
            self.review.threshold.value = curation.n_best
        finally:
            self._updating_review = False
        self.review.set_enabled(True)
        self._apply_selection()

    def _apply_selection(self) -> None:
        """After the cut, a class decision or a click: every view shows the new kept set."""
        curation = self.curation
        kept = curation.kept_mask()
        moved = kept != curation.base_mask()
        self.histogram.set_selection(kept, curation.threshold)
        self.gallery.set_selection(kept, moved)
        if self.classes_shown is not None:
            self.class_view.set_kept_counts(curation.kept_per_class(self.classes_shown.n_components))
        n_kept = int(kept.sum())
        by_hand = int(moved.sum())
        self.review.counts.value = (f"{n_kept} kept, {kept.size - n_kept} rejected (score <= "
                                    f"{curation.threshold:.4g}" + (f"; {by_hand} by hand or class)" if by_hand else ")"))
        self.review.undo.enabled = bool(curation.hand or curation.class_decisions)

    def _on_keep_best_changed(self, value=None) -> None:
        if self.curation is None or self._updating_review:
            return
        self.curation.keep_best(int(self.review.threshold.value))
        self._apply_selection()

    def _on_cut_dragged(self, score: float) -> None:
        if self.curation is None or not self.review.threshold.enabled:
            return
        self.curation.move_cut(score)
        self._updating_review = True
        try:
            self.review.threshold.value = self.curation.n_best
        finally:
            self._updating_review = False
        self._apply_selection()

    def _on_class_decision(self, component: int, decision: str) -> None:
        if self.curation is None or self.curation.assignment is None:
            return
        self.curation.decide_class(component, decision)
        self._apply_selection()

    def _on_particle_clicked(self, particle: int) -> None:
        if self.curation is None or not self.review.threshold.enabled:
            return
        kept = self.curation.toggle(particle)
        self._apply_selection()
        self._set_status(f"particle {particle} (score {self.curation.scores[particle]:.4g}) "
                         f"{'kept' if kept else 'rejected'} by hand")
        layer = self._result_layer
        if layer is not None and layer in self.viewer.layers and isinstance(layer.data, ParticleStack) \
                and layer.data.is_whole_set:
            self.viewer.dims.set_current_step(0, particle * layer.scale[0] + layer.translate[0])

    def _on_undo(self, value=None) -> None:
        if self.curation is not None:
            self.curation.undo_hand_edits()
            self.class_view.reset_decisions()
            self._apply_selection()

    # -- export --------------------------------------------------------------------------------------------------

    def export(self, out_dir=None, *, force: bool = False):
        """Write the curated result (kept and rejected sets, scores.csv, report.png, parameters.json with the cut
        and the hand edits) into ``out_dir`` as one output set (all or nothing), in a worker.

        Without ``out_dir`` a folder dialog asks for one, and a folder that holds results is replaced only if the
        user says so; ``force`` replaces them without asking. Returns the worker (None if nothing to do);
        :attr:`exported` is emitted with the written paths when it is done.
        """
        if self.result is None or self.curation is None:
            show_error("Nothing to export yet: run a sort first.")
            return None
        if out_dir is None:
            out_dir = QFileDialog.getExistingDirectory(self, "Export the sorted particles to a folder")
            if not out_dir:
                return None
            previous = existing_results(out_dir)
            if previous and not force:
                answer = QMessageBox.question(
                    self, "Replace the results?", f"{out_dir} already holds results ({', '.join(previous)}). "
                    "Replace them?", QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No)
                if answer != QMessageBox.StandardButton.Yes:
                    return None
                force = True
        curated = self.curation.curated_result()
        kept = curated.kept_mask
        self.review.export_button.enabled = False
        self._set_status(f"Exporting to {out_dir}...")
        worker = thread_worker(_export, start_thread=False)(curated, Path(out_dir), force)
        worker.returned.connect(_weak_call(self, "_on_exported", Path(out_dir), int(kept.sum()), int((~kept).sum())))
        worker.finished.connect(_weak_call(self, "_on_export_finished"))
        worker.start()
        return worker

    def _on_export_clicked(self, value=None) -> None:
        self.export()

    def _on_export_finished(self) -> None:
        self.review.export_button.enabled = self.result is not None and not self.running

    def _on_exported(self, out_dir: Path, n_kept: int, n_rejected: int, outcome) -> None:
        if isinstance(outcome, str):
            show_error(outcome)
            self._set_status(f"Export failed: {outcome}")
            return
        message = (f"Wrote {n_kept} kept and {n_rejected} rejected particles, scores, report and parameters "
                   f"to {out_dir}")
        show_info(message)
        self._set_status(message)
        self.exported.emit(outcome)

    # -- shutting down -------------------------------------------------------------------------------------------

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._watch_window()

    def _watch_window(self) -> None:
        """Watch the window the widget is docked in, to stop the sort when it closes (no reference to it kept)."""
        top = self
        while top.parentWidget() is not None:
            top = top.parentWidget()
        if top is not self:
            top.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Close:
            self.shutdown()
        return False

    def shutdown(self) -> None:
        """Cancel a running sort and wait (at most one EM iteration) until its thread has stopped."""
        self.controller.shutdown()


def _export(result, out_dir: Path, force: bool):
    """SortResult.export in a worker thread: the written paths, or the message of a refused or failed export."""
    try:
        return result.export(out_dir, force=force)
    except PPCASortError as error:
        return error.describe(widget_name)


def _weak_call(owner: QObject, name: str, *bound_args):
    """A slot calling ``owner.name(*bound_args, *args)`` that holds ``owner`` weakly (napari keeps its workers)."""
    import weakref

    reference = weakref.ref(owner)

    def slot(*args):
        widget = reference()
        if widget is not None:
            getattr(widget, name)(*bound_args, *args)

    return slot


def _stopper(loader):
    return lambda *args: loader.stop()


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
* :class:`~napari_ppcasort._review.ReviewController` (with its ReviewPanel and the Curation): the result in
  every view, the cut as a count, the counts, undo, Export.

What is on screen always belongs to one result: while a sort runs its rounds are shown; when it succeeds its
result replaces the previous one; when it is cancelled or fails the previous result (if any) comes back,
whole. The napari canvas keeps only the user's layers (the particle stack in angstrom when the pixel size
is known): no layers are added, and the viewer is not switched to grid mode.

For scripts and notebooks: :meth:`SortWidget.run` (returns the worker), :meth:`SortWidget.export` (returns the
worker), and after a run :attr:`SortWidget.result`, :attr:`SortWidget.kept_mask`, :attr:`SortWidget.scores`,
:attr:`SortWidget.score_threshold` and :attr:`SortWidget.curation`.
"""

from __future__ import annotations

import napari
import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import (QHBoxLayout, QLabel, QProgressBar, QPushButton, QScrollArea, QSizePolicy, QTabWidget,
                            QVBoxLayout, QWidget)

from ._classes import ClassView
from ._controller import CANCELLED, DONE, FAILED, RunController
from ._gallery import ParticleGallery
from ._histogram import ScoreHistogram
from ._review import ReviewController
from ._settings_form import SettingsForm, particle_layer
from ._worker import CoefficientsProgress, IterationDone, RoundDone, RunFailed, SortFinished, SortStarted
from .core.errors import PPCASortError
from .core.models import MODELS, score_label

__all__ = ["SortWidget", "N_COMPONENTS_SHOWN"]

#: Components of each class shown in the class view.
N_COMPONENTS_SHOWN = 4
SETTINGS_TAB, CLASSES_TAB, PARTICLES_TAB = "Settings", "Classes", "Particles"

#: Rounds the log-likelihood trace spans at first in the automatic mode (it grows with the run).
AUTOMATIC_TRACE_ROUNDS = 5


class SortWidget(QWidget):
    """Dock widget that sorts a particle stack with the mixture of PPCA and online pruning, and curates the result.

    Signals (for scripts and tests):
        round_updated(RoundDone): after the classes and the histogram show a pruning round; once per round.
        run_finished(str): the sort ended: "done", "cancelled" or "failed" (after the views are updated).
        exported(dict): an export finished; the paths written (see core.run.SortResult.export).

    Attributes:
        n_round_updates: pruning rounds shown, over all runs.
        form, controller, class_view, gallery, histogram, review: the parts (see the module docstring).
    """

    round_updated = Signal(object)
    run_finished = Signal(str)
    exported = Signal(object)

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.n_round_updates = 0
        self._run_particles = None
        self._run_layer = None  # the layer the running sort reads (to show a clicked particle in it)
        self._pending = None  # (SortResult, ClassViews, components) of the running sort, once it finished
        self._last_round = None
        self._n_rounds = self._n_particles = 0
        self._automatic = False
        self._iterations_per_round = 1
        self._score_limits = None  # the running model's ModelSpec.score_limits
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
        self.gallery = ParticleGallery()
        self.histogram = ScoreHistogram(viewer, self)
        self.review = ReviewController(viewer, self.histogram, self.class_view, self.gallery, self)
        self.review.status.connect(self._set_status)
        self.review.exported.connect(self.exported.emit)

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
        layout.addWidget(self.review.panel.native)

        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self.destroyed.connect(_stopper(self.gallery.loader))

    # -- public state ------------------------------------------------------------------------------------------

    @property
    def result(self):
        """The SortResult of the last successful run (None before one); it stays until the next run succeeds."""
        return self.review.result

    @property
    def curation(self):
        """The user's selection on the result (cut, class decisions, particles clicked): a _review.Curation."""
        return self.review.curation

    @property
    def classes_shown(self):
        """The ClassViews of the result (None before a run)."""
        return self.review.classes

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
        if event is not None:
            self.review.forget_layer(event.value)

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
            scheduler = self.form.scheduler()
        except (ValueError, PPCASortError) as error:
            message = str(error)
            show_error(message)
            self._set_status(f"Not started: {message}")
            self.review.show()  # the previous result, whole
            return None
        self._run_particles = particles
        layer = self.form.source.value
        self._run_layer = layer if layer is not None and not isinstance(layer, str) else None
        self._pending = None
        self._last_round = None
        self._iterations_per_round = settings.iterations_per_round
        self._score_limits = MODELS[settings.model].score_limits
        self.form.set_locked(True)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.review.set_enabled(False)
        self.gallery.clear()
        self.class_view.clear()
        self.histogram.clear("waiting for the first pruning round", score_label(settings))
        self._trace_span = None
        self.progress.setRange(0, 0)
        self.progress.setFormat("starting")
        self._set_status(f"Sorting {particles.n_particles} images...")
        self.tabs.setCurrentIndex(1)  # the classes form round by round
        return self.controller.start(particles, settings, dask_scheduler=scheduler)

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
            self.progress.setFormat("round %v (until no junk is found)" if event.automatic else "round %v of %m")
            rounds = "pruning until no junk is found" if event.automatic else f"{event.n_rounds} pruning rounds"
            self._set_status(f"{event.n_particles} images, {event.n_coefficients} coefficients each: {rounds}")
            # the automatic mode's n_rounds is a far upper bound: the trace's axis starts at a few rounds and grows
            shown_rounds = min(event.n_rounds, AUTOMATIC_TRACE_ROUNDS) if event.automatic else event.n_rounds
            self._trace_span = shown_rounds * self._iterations_per_round
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
                                   f"round {result.round}: scores of {result.scores.size} images",
                                   limits=self._score_limits)
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
            self.progress.setValue(1)
            self.progress.setFormat(f"done: {result.final.round} rounds")
            self.review.set_result(result, classes, components, self._run_layer)
            self._set_status(f"Done: kept {result.n_kept} of {result.final.n_total} images after "
                             f"{result.final.round} rounds; move the cut, decide classes, click particles, Export")
        else:
            outcome = CANCELLED if outcome == DONE else outcome  # ended without a result: stopped
            self.progress.setValue(0)
            self.progress.setFormat(outcome)
            self.review.show()  # the previous result, whole, or nothing
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
        """Angstrom per pixel of the sorted (Fourier-cropped) images of the running sort."""
        particles = self._run_particles
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

    # -- the result ---------------------------------------------------------------------------------------------

    def export(self, out_dir=None, *, force: bool = False):
        """Write the curated result (kept and rejected sets, scores.csv, report.png, parameters.json with the cut
        and the hand edits) into ``out_dir`` as one output set (all or nothing), in a worker.

        Without ``out_dir`` a folder dialog asks for one, and a folder that holds results is replaced only if the
        user says so; ``force`` replaces them without asking. Returns the worker (None if nothing to do);
        :attr:`exported` is emitted with the written paths when it is done.
        """
        return self.review.export(out_dir, force=force)

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


def _stopper(loader):
    return lambda *args: loader.stop()


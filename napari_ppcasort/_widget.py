"""The napari dock widget: sort a particle stack, watch every pruning round, move the cut, export.

Layout, top to bottom: the source (an image layer holding a stack, or a particle file opened lazily) and
the parameters (magicgui widgets whose limits follow from the data); Run and Cancel; a progress bar
(coefficients, then round i of n) and a one-line status; the score histogram; after a run, a slider that
moves the cut over the final scores, the kept/rejected counts and Export.

The sort runs in a napari ``thread_worker`` (``_worker.run_sort``) that yields after every EM iteration,
so Cancel, a new Run and closing the viewer stop it within one EM iteration. Each pruning round updates,
on the main thread, the layers "subspace means" and "subspace components" and the histogram, then emits
:attr:`SortWidget.round_updated` once.

The subspaces are shown as 2-D montages, not as stacks: a stack of M means would share the slider of
the particle stack (napari aligns layers on their last axes) and go blank whenever that slider is past
M. "subspace means" is (box, M * box), subspace m in columns [m * box, (m + 1) * box); "subspace
components" is (n * box, M * box), the j-th component of subspace m in the tile of row j, column m.
Each tile has its own contrast, mapped to [0, 1] (see :func:`display_tiles`), like class averages.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSlider, FloatSpinBox, Label, PushButton, Slider,
                              SpinBox)
from napari.layers import Image
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import QFileDialog, QLabel, QProgressBar, QSizePolicy, QVBoxLayout, QWidget

from ._histogram import ScoreHistogram
from ._reader import PARTICLE_SUFFIXES, ParticleStack, stack_layer_kwargs
from ._worker import (CoefficientsProgress, IterationDone, RoundDone, RunFailed, SortFinished, SortStarted, run_sort,
                      widget_name)
from .core.errors import PPCASortError
from .core.models import MODELS, score_label
from .core.bases import BASES
from .core.particles import ArrayParticleSet, ParticleFileError, open_particles
from .core.settings import SETTINGS, SortSettings
from .core.preprocess import default_radius, disk_mask

__all__ = ["SortWidget", "MEANS_LAYER", "COMPONENTS_LAYER", "KEPT_LAYER", "REJECTED_LAYER"]

MEANS_LAYER = "subspace means"
COMPONENTS_LAYER = "subspace components"
KEPT_LAYER = "kept particles"
REJECTED_LAYER = "rejected particles"
#: Components of each subspace shown in the components layer.
N_COMPONENTS_SHOWN = 4
MAX_SUBSPACES = 20
FILE_SOURCE = "file"
STOP_ROUNDS, STOP_FRACTION, STOP_AUTOMATIC = "number of rounds", "kept fraction", "no outlier left"
#: The automatic mode's threshold offered first (robust z-score; see SortSettings.outlier_threshold).
DEFAULT_OUTLIER_THRESHOLD = 2.5
#: Longest wait (seconds) for a cancelled sort to stop when the viewer closes.
SHUTDOWN_TIMEOUT = 60.0


class SortWidget(QWidget):
    """Dock widget that sorts a particle stack with the mixture of PPCA and online pruning.

    Signals (for scripts and tests):
        round_updated(RoundDone): after the layers and the histogram show a pruning round; once per round.
        run_finished(str): the sort ended: "done", "cancelled" or "failed".
        exported(dict): an export finished; the paths written (see core.run.SortResult.export).
    """

    round_updated = Signal(object)
    run_finished = Signal(str)
    exported = Signal(object)

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.n_round_updates = 0
        self._worker = None
        self._run_number = 0
        self._cancel: threading.Event | None = None
        self._round_shown = threading.Event()
        self._outcome = "done"
        self._file_particles = None
        self._run = None  # (particles, settings, stack) of the current or last run
        self._final = None  # the last SortRound of a finished run
        self._result = None  # its SortResult (what Export writes)
        self._sorted_scores = np.empty(0)
        self._grid_set = False
        self._n_rounds = self._n_particles = 0
        self._automatic = False
        self._review_layout_set = False

        self._build_parameters()
        self._build_controls()
        self.histogram = ScoreHistogram(viewer, self)
        self._build_review()

        layout = QVBoxLayout(self)
        for part in (self.parameters.native, self.controls.native, self.progress, self.status):
            layout.addWidget(part)
        layout.addWidget(self.histogram, stretch=1)
        layout.addWidget(self.review.native)

        viewer.layers.events.inserted.connect(self._refresh_sources)
        viewer.layers.events.removed.connect(self._refresh_sources)
        self._on_source_changed()

    # -- construction ---------------------------------------------------------------------------------

    def _build_parameters(self) -> None:
        defaults = SortSettings()
        self.source = ComboBox(label="source", choices=self._source_choices)
        self.file = FileEdit(label="particle file", mode="r",
                             filter="Particle sets (" + " ".join(f"*{s}" for s in PARTICLE_SUFFIXES) + ")")
        box = SETTINGS["box_size"]
        self.crop = SpinBox(label=box.label, min=box.minimum, max=box.minimum, value=box.minimum, tooltip=box.help)
        self.n_coefficients = SpinBox(**_described("n_coefficients"), min=0,
                                      max=max(defaults.n_coefficients or 0, 2), value=defaults.n_coefficients or 0)
        self.n_coefficients.native.setSpecialValueText("auto")  # 0: none, estimated from the noise (PCA)
        self.model = ComboBox(**_described("model"), choices=list(MODELS), value=defaults.model)
        self.basis = ComboBox(**_described("basis"), choices=list(BASES), value=defaults.basis)
        self.n_subspaces = SpinBox(**_described("n_subspaces"), min=SETTINGS["n_subspaces"].minimum, max=MAX_SUBSPACES,
                                   value=defaults.n_subspaces)
        self.total_dimension = SpinBox(**_described("total_dimension"), min=defaults.n_subspaces,
                                       max=max(defaults.total_dimension, (defaults.n_coefficients or 2) - 1),
                                       value=defaults.total_dimension)
        self.alpha = FloatSlider(**_described("alpha"), min=0.5, max=50.0, step=0.5,
                                 value=SETTINGS["alpha"].unit_scale * defaults.alpha)
        self.iterations = SpinBox(**_described("iterations_per_round"), min=SETTINGS["iterations_per_round"].minimum,
                                  max=200, value=defaults.iterations_per_round)
        self.stop = ComboBox(label="stop after", choices=[STOP_ROUNDS, STOP_FRACTION, STOP_AUTOMATIC], value=STOP_ROUNDS,
                             tooltip="a fixed number of rounds; a kept fraction; or the automatic mode: remove only "
                                     "outliers of each round's scores, until a round finds none")
        self.n_rounds = SpinBox(**_described("n_rounds"), min=SETTINGS["n_rounds"].minimum, max=500,
                                value=defaults.n_rounds)
        self.target = FloatSlider(**_described("target_kept_fraction"), min=1.0, max=99.0, step=0.5, value=80.0,
                                  visible=False)
        self.outlier_threshold = FloatSpinBox(**_described("outlier_threshold"), min=1.0, max=10.0, step=0.5,
                                              value=DEFAULT_OUTLIER_THRESHOLD, visible=False)
        self.seed = SpinBox(**_described("random_state"), min=SETTINGS["random_state"].minimum, max=2**31 - 1,
                            value=defaults.random_state)
        self.parameters = Container(widgets=[
            self.source, self.file, self.crop, self.model, self.basis, self.n_coefficients, self.n_subspaces,
            self.total_dimension, self.alpha, self.iterations, self.stop, self.n_rounds, self.target,
            self.outlier_threshold, self.seed])

        self.source.changed.connect(self._on_source_changed)
        self.file.changed.connect(self._on_source_changed)
        self.crop.changed.connect(self._update_limits)
        self.n_coefficients.changed.connect(self._update_limits)
        self.n_subspaces.changed.connect(self._update_limits)
        self.stop.changed.connect(self._on_stop_changed)
        self.model.changed.connect(self._on_model_changed)
        self._on_model_changed()

    def _build_controls(self) -> None:
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.controls = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        self.progress.setValue(0)
        self.status = QLabel("Choose a stack and press Run.")
        # one line whose length never resizes the dock (a resize would redraw the whole histogram)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)

    def _build_review(self) -> None:
        self.threshold = Slider(label="keep the best", min=0, max=1, value=1, enabled=False,
                                tooltip="move the cut: keep the images with the lowest final scores")
        self.counts = Label(label="kept / rejected", value="-")
        self.export_button = PushButton(text="Export...", enabled=False)
        self.threshold.changed.connect(self._on_threshold_changed)
        self.export_button.changed.connect(self._on_export_clicked)
        self.review = Container(widgets=[self.threshold, self.counts, self.export_button])

    # -- source and limits ----------------------------------------------------------------------------

    def _source_choices(self, widget=None) -> list[tuple[str, object]]:
        layers = [(layer.name, layer) for layer in self.viewer.layers
                  if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb
                  and "ppcasort_output" not in layer.metadata]
        return layers + [("particle file (below)", FILE_SOURCE)]

    def _refresh_sources(self, event=None) -> None:
        self.source.reset_choices()

    def _on_source_changed(self, value=None) -> None:
        self.file.visible = self.source.value == FILE_SOURCE
        shape = self._source_shape()
        if shape is None:
            return
        box = shape[1]
        self.crop.min = min(SETTINGS["box_size"].minimum, box)
        self.crop.max = box
        self.crop.value = min(box, SortSettings().box_size or box)
        self._update_limits()

    def _source_shape(self) -> tuple[int, int] | None:
        """(number of images, box) of the chosen source, or None when nothing usable is chosen."""
        if self.source.value == FILE_SOURCE:
            particles = self._open_file()
            return None if particles is None else (particles.n_particles, particles.box_size)
        if self.source.value is None:
            return None
        shape = self.source.value.data.shape
        return shape[0], shape[1]

    def _open_file(self):
        """The ParticleSet of the chosen file (opened once per path), or None (with a notification)."""
        path = self.file.value
        if path is None or not Path(path).is_file():
            return None
        if self._file_particles is None or self._file_particles.path != Path(path):
            try:
                particles = open_particles(path)
            except ParticleFileError as error:
                show_error(str(error))
                return None
            if particles.missing_stacks:
                show_error(f"{path}: {len(particles.missing_stacks)} of its image stacks are missing "
                           f"(first: {particles.missing_stacks[0]})")
                return None
            self._file_particles = particles
        return self._file_particles

    def _update_limits(self, value=None) -> None:
        """Keep every parameter within what the data allow.

        L < pixels in the particle disk of the cropped box; total dimension < L (with L automatic: at most
        half the disk pixels, PCA's own limit); M <= total dimension; and the smallest set the model can
        be fitted on, M (K + 1) + 1 images, below the number of images (so that a round can prune).
        """
        shape = self._source_shape()
        n_images = shape[0] if shape else 10**9
        box = self.crop.value
        disk_pixels = int(disk_mask(box, default_radius(box)).sum())
        self.n_coefficients.max = max(2, disk_pixels - 1)
        n_coefficients = self.n_coefficients.value or disk_pixels // 2
        largest_total = max(self.n_subspaces.value, min(n_coefficients - 1, n_images - self.n_subspaces.value - 2))
        self.total_dimension.min = self.n_subspaces.value
        self.total_dimension.max = largest_total
        self.n_subspaces.max = max(1, min(MAX_SUBSPACES, self.total_dimension.max))

    def _on_model_changed(self, value=None) -> None:
        """The steerable model needs the steerable (PSWF) basis: fix the basis while it is chosen."""
        steerable = self.model.value == "steerable"
        if steerable:
            self.basis.value = "pswf"
        self.basis.enabled = not steerable

    def _on_stop_changed(self, value=None) -> None:
        self.n_rounds.visible = self.stop.value == STOP_ROUNDS
        self.target.visible = self.stop.value == STOP_FRACTION
        self.outlier_threshold.visible = self.stop.value == STOP_AUTOMATIC

    def settings(self) -> SortSettings:
        """The SortSettings the widgets describe (ValueError naming the bad parameter)."""
        shape = self._source_shape()
        box = shape[1] if shape else None
        stop = self.stop.value
        return SortSettings(
            model=self.model.value,
            n_subspaces=int(self.n_subspaces.value),
            total_dimension=int(self.total_dimension.value),
            alpha=float(self.alpha.value) / 100,
            iterations_per_round=int(self.iterations.value),
            n_rounds=int(self.n_rounds.value) if stop == STOP_ROUNDS else None,
            target_kept_fraction=float(self.target.value) / 100 if stop == STOP_FRACTION else None,
            outlier_threshold=float(self.outlier_threshold.value) if stop == STOP_AUTOMATIC else None,
            basis=self.basis.value,
            n_coefficients=int(self.n_coefficients.value) or None,
            box_size=None if box is None or self.crop.value >= box else int(self.crop.value),
            random_state=int(self.seed.value),
        )

    def _source_particles(self):
        """(particle set, stack of all its images) of the chosen source; ValueError if there is none."""
        if self.source.value == FILE_SOURCE:
            particles = self._open_file()
            if particles is None:
                raise ValueError("choose a particle file (.mrcs, .mrc, .star or .cs) or an image layer to sort")
            return particles, ParticleStack(particles)
        layer = self.source.value
        if layer is None:
            raise ValueError("choose an image layer holding a particle stack, or a particle file")
        if isinstance(layer.data, ParticleStack) and layer.data.is_whole_set:
            return layer.data.particles, layer.data
        particles = ArrayParticleSet(layer.data, f"napari layer {layer.name}",
                                     pixel_size=layer.metadata.get("pixel_size"))
        return particles, ParticleStack(particles)

    # -- running ----------------------------------------------------------------------------------------

    def run(self, value=None):
        """Start a sort of the chosen source (cancelling any running one). Returns the worker, or None."""
        self.cancel()
        self._watch_window()
        try:
            settings = self.settings()
            particles, stack = self._source_particles()
        except PPCASortError as error:
            show_error(error.describe(widget_name))
            return None
        except ValueError as error:
            show_error(str(error))
            return None
        self._run = (particles, settings, stack)
        self._final = None
        self._result = None
        self._prepare_output_layers(settings, particles.box_size)
        self.histogram.clear("waiting for the first pruning round", score_label(settings))
        self._set_review_enabled(False)
        self._cancel = threading.Event()
        self._round_shown = threading.Event()
        self._outcome = "done"
        self._run_number += 1
        worker = thread_worker(run_sort, start_thread=False)(particles, settings, self._cancel, N_COMPONENTS_SHOWN,
                                                             self._round_shown)
        worker.yielded.connect(self._weak_slot("_on_event", run_number=self._run_number))
        worker.finished.connect(self._weak_slot("_on_finished", run_number=self._run_number))
        worker.errored.connect(self._weak_slot("_on_crash", run_number=self._run_number))
        self._worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.setRange(0, 0)
        self.progress.setFormat("starting")
        self._set_status(f"Sorting {particles.n_particles} images...")
        worker.start()
        return worker

    def cancel(self, value=None) -> None:
        """Ask the running sort to stop; it does before its next EM iteration."""
        if self._worker is None:
            return
        self._outcome = "cancelled"
        self._cancel.set()
        self._worker.quit()
        self._set_status("Cancelling...")

    def _weak_slot(self, name: str, *bound_args, run_number: int | None = None):
        """A slot calling ``self.name(*bound_args, *args)``, for a worker's signals.

        It holds the widget weakly (napari keeps every worker in the window's task list, so a strong
        reference would keep the widget and the viewer alive), and with ``run_number`` it ignores the
        signals of a run that is no longer the current one (cancelled, replaced by a new run).
        """
        widget = weakref.ref(self)

        def slot(*args):
            owner = widget()
            if owner is not None and (run_number is None or owner._run_number == run_number):
                getattr(owner, name)(*bound_args, *args)

        return slot

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
        elif isinstance(event, IterationDone):
            self._show_progress(event.round, event.iteration, event.log_likelihood, event.n_kept)
        elif isinstance(event, RoundDone):
            # no immediate repaints while the round is shown (QProgressBar.setValue repaints at once, and
            # that would also redraw the changed canvas): the widget is painted once, afterwards
            self.setUpdatesEnabled(False)
            try:
                self._show_round(event)
            finally:
                self.setUpdatesEnabled(True)
                # the sort resumes once Qt has also painted the round (a zero timer fires after the
                # pending paint events)
                QTimer.singleShot(0, self._round_shown.set)
        elif isinstance(event, SortFinished):
            self._result = event.result
        elif isinstance(event, RunFailed):
            self._outcome = "failed"
            show_error(event.message)
            self._set_status(f"Failed: {event.message}")

    def _show_round(self, event: RoundDone) -> None:
        result = event.result
        self.progress.setValue(result.round)
        self._set_output_layer(MEANS_LAYER, montage(display_tiles(event.means[np.newaxis])))
        self._set_output_layer(COMPONENTS_LAYER,
                               montage(display_tiles(event.components.transpose(1, 0, 2, 3), symmetric=True)))
        self.histogram.show_scores(result.scores, result.cut,
                                   f"round {result.round}: scores of {result.scores.size} images")
        self._show_progress(result.round, result.n_iterations, result.log_likelihood[-1], result.kept.size)
        self.n_round_updates += 1
        self.round_updated.emit(event)
        if result.done:
            self._enter_review(result)

    def _prepare_output_layers(self, settings: SortSettings, box: int) -> None:
        """Create (or blank) the subspace layers before the sort starts.

        Adding a layer to napari costs far more main-thread time than updating one, so the layers are
        made here, at Run, and every pruning round only replaces their data. The first time, the viewer
        switches to grid mode: one cell per layer keeps the subspaces in view next to the particles.
        """
        shown_box = settings.box_size or box
        n_shown = min(N_COMPONENTS_SHOWN, settings.subspace_dimension)
        self._set_output_layer(MEANS_LAYER, np.zeros((shown_box, settings.n_subspaces * shown_box), np.float32))
        self._set_output_layer(COMPONENTS_LAYER,
                               np.zeros((n_shown * shown_box, settings.n_subspaces * shown_box), np.float32))
        if not self._grid_set:
            # napari >= 0.9 keeps the grid on the canvas model; older versions on the viewer
            canvas = getattr(self.viewer, "canvas", None)
            (canvas.grid if hasattr(canvas, "grid") else self.viewer.grid).enabled = True
            self.viewer.reset_view()
            self._grid_set = True

    def _show_progress(self, round_number: int, iteration: int, log_likelihood: float, n_kept: int) -> None:
        """The one-line status: round, EM iteration, mean log-likelihood per image, images kept."""
        of = "" if self._automatic else f"/{self._n_rounds}"
        text = (f"round {round_number}{of} | EM it. {iteration} | logL {log_likelihood:.6g} | "
                f"kept {n_kept}/{self._n_particles}")
        self._set_status(text)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)
        self.status.setToolTip(text)  # the whole text when the line is cut

    def _set_output_layer(self, name: str, data: np.ndarray) -> None:
        """Show the 2-D image ``data`` (values in [0, 1]) in the layer ``name``, replacing its data if it exists."""
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
        else:
            self.viewer.add_image(data, name=name, contrast_limits=(0.0, 1.0), metadata={"ppcasort_output": name})

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if self._outcome == "cancelled":
            self._set_status("Cancelled.")
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("cancelled")
        self.run_finished.emit(self._outcome)

    def _on_crash(self, error: Exception) -> None:
        # napari already shows the error as a notification; only the state changes here
        self._outcome = "failed"
        self._set_status(f"Failed: {type(error).__name__}: {error}")

    # -- reviewing the result ---------------------------------------------------------------------------

    def _enter_review(self, result) -> None:
        self._final = result
        self._sorted_scores = np.sort(result.final_scores)
        n_at_cut = int(np.count_nonzero(result.final_scores <= result.cut))
        self.threshold.max = result.n_total
        self.threshold.min = 1
        self._set_review_enabled(True)
        self.histogram.show_scores(result.final_scores, result.cut, f"final scores of all {result.n_total} images")
        if self.threshold.value == n_at_cut:
            self._on_threshold_changed(n_at_cut)
        else:
            self.threshold.value = n_at_cut  # updates the counts and the layers
        if not self._review_layout_set:
            # the first image of every stack, each in its grid cell
            self.viewer.dims.set_current_step(0, 0)
            self.viewer.reset_view()
            self._review_layout_set = True

    def _set_review_enabled(self, enabled: bool) -> None:
        self.threshold.enabled = enabled
        self.export_button.enabled = enabled

    @property
    def score_threshold(self) -> float | None:
        """The score at the cut: images whose final score is at most this are kept (None before a run)."""
        if self._final is None:
            return None
        return float(self._sorted_scores[self.threshold.value - 1])

    @property
    def kept_mask(self) -> np.ndarray | None:
        """(N,) bool, the images kept at the current threshold (None before a run)."""
        if self._final is None:
            return None
        return self._final.final_scores <= self.score_threshold

    def _on_threshold_changed(self, value=None) -> None:
        if self._final is None:
            return
        kept = self.kept_mask
        n_kept = int(kept.sum())
        self.counts.value = f"{n_kept} kept, {kept.size - n_kept} rejected (score <= {self.score_threshold:.4g})"
        self.histogram.set_cut(self.score_threshold)
        _, _, stack = self._run
        self._set_subset_layer(KEPT_LAYER, stack, np.flatnonzero(kept))
        self._set_subset_layer(REJECTED_LAYER, stack, np.flatnonzero(~kept))

    def _set_subset_layer(self, name: str, stack: ParticleStack, positions: np.ndarray) -> None:
        """Show the images at ``positions`` of ``stack`` (read lazily) in the layer ``name``; none: no layer."""
        exists = name in self.viewer.layers
        if positions.size == 0:
            if exists:
                self.viewer.layers.remove(name)
            return
        subset = stack.subset(positions)
        if exists:
            self.viewer.layers[name].data = subset
        else:
            self.viewer.add_image(subset, **stack_layer_kwargs(subset, name))

    def export(self, out_dir=None):
        """Write the results (kept and rejected sets, scores.csv, report.png, parameters.json) to ``out_dir`` as one
        output set (all or nothing), in a worker.

        Without ``out_dir`` a folder dialog asks for one. Returns the worker (None if nothing to do);
        :attr:`exported` is emitted with the written paths when it is done.
        """
        if self._result is None:
            show_error("Nothing to export yet: run a sort first.")
            return None
        if out_dir is None:
            out_dir = QFileDialog.getExistingDirectory(self, "Export the sorted particles to a folder")
            if not out_dir:
                return None
        kept = self.kept_mask
        self.export_button.enabled = False
        self._set_status(f"Exporting to {out_dir}...")
        worker = thread_worker(_export, start_thread=False)(self._result, kept, Path(out_dir))
        worker.returned.connect(self._weak_slot("_on_exported", Path(out_dir), int(kept.sum()), int((~kept).sum())))
        worker.finished.connect(self._weak_slot("_on_export_finished"))
        worker.start()
        return worker

    def _on_export_clicked(self, value=None) -> None:
        self.export()

    def _on_export_finished(self) -> None:
        self.export_button.enabled = self._final is not None

    def _on_exported(self, out_dir: Path, n_kept: int, n_rejected: int, outcome) -> None:
        if isinstance(outcome, str):
            show_error(outcome)
            self._set_status(f"Export failed: {outcome}")
            return
        message = f"Wrote {n_kept} kept and {n_rejected} rejected particles, scores and parameters to {out_dir}"
        show_info(message)
        self._set_status(message)
        self.exported.emit(outcome)

    # -- shutting down ----------------------------------------------------------------------------------

    def _watch_window(self) -> None:
        """Watch the window the widget is docked in, to stop the sort when it closes.

        Installing the filter again only moves it to the front. No reference to the window is kept: it
        would keep the window, which owns this widget, alive.
        """
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
        worker = self._worker
        if worker is None:
            return
        self.cancel()
        self._worker = None
        self._run_number += 1  # its last signals are ignored
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        while worker.is_running and time.monotonic() < deadline:
            time.sleep(0.01)


def display_tiles(tiles: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """Map each (box, box) tile of a (rows, columns, box, box) array to [0, 1] for display (float32).

    Default: the tile's minimum to 0 and maximum to 1. ``symmetric`` (principal components, whose sign
    is arbitrary): 0 to 0.5 and the largest absolute value to 0 or 1. A constant tile becomes 0.5.
    """
    tiles = np.asarray(tiles, dtype=np.float64)
    if symmetric:
        scale = np.abs(tiles).max(axis=(2, 3), keepdims=True)
        shown = 0.5 + 0.5 * np.divide(tiles, scale, out=np.zeros_like(tiles), where=scale > 0)
    else:
        low = tiles.min(axis=(2, 3), keepdims=True)
        span = tiles.max(axis=(2, 3), keepdims=True) - low
        shown = np.divide(tiles - low, span, out=np.full_like(tiles, 0.5), where=span > 0)
    return shown.astype(np.float32)


def montage(tiles: np.ndarray) -> np.ndarray:
    """Tile an (rows, columns, box, box) array of images into one (rows * box, columns * box) image."""
    rows, columns, box, _ = tiles.shape
    return tiles.transpose(0, 2, 1, 3).reshape(rows * box, columns * box)


def _export(result, kept, out_dir: Path):
    """SortResult.export in a worker thread: the written paths, or the message of a refused or failed export."""
    try:
        return result.export(out_dir, kept_mask=kept)
    except PPCASortError as error:
        return error.describe(widget_name)


def _described(name: str) -> dict:
    """The label and tooltip of a setting's widget, from its declaration."""
    return {"label": SETTINGS[name].label, "tooltip": SETTINGS[name].help}

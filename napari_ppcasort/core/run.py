"""The one run loop of a sort, for the command line, the napari widget, the benchmarks and notebooks.

    from napari_ppcasort import open_particles, SortSettings, sort_particles, iter_sort

    result = sort_particles("particles.star", SortSettings(n_rounds=3))   # a SortResult
    result.export("sorted")                                                # the files, all or nothing

    for event in iter_sort(particles, settings, cancel=stop_event):       # progress, one event at a time
        ...

:func:`iter_sort` yields :class:`CoefficientsProgress` while the images are expanded in the basis,
:class:`SortStarted` once, :class:`IterationDone` after every EM iteration, :class:`RoundDone` after every
pruning round, and :class:`SortFinished` (with the :class:`SortResult`) at the end. It checks everything it
can before the expensive work (the particle files, the settings against the data) and raises an
:class:`~napari_ppcasort.core.errors.InputError` naming the file or the setting; a failure of the
computation is a :class:`~napari_ppcasort.core.errors.ComputeError`. It stops, before the next EM iteration
or the next chunk of images, once ``cancel`` is set.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .chunks import Chunks, LocalChunks, column_range
from .classes import ClassViews, class_views
from .errors import ComputeError, SettingsError, SortCancelled, literal
from .particles import ArrayParticleSet, ParticleFileError, ParticleSet, open_particles
from .pipeline import coefficient_steps, make_preprocessor, make_sorter, removal_schedule, subspace_images
from .preprocess import BadImageError, disk_mask
from .selection import Overrides, base_mask, kept_mask
from .settings import SortSettings
from .sorting import OnlineSorter, SortRound

__all__ = [
    "iter_sort",
    "sort_particles",
    "SortResult",
    "CoefficientsProgress",
    "SortStarted",
    "IterationDone",
    "RoundDone",
    "SortFinished",
    "check_sort",
]

#: Components of each subspace shown with every RoundDone.
N_COMPONENTS_SHOWN = 4
#: Seconds between checks for cancellation while waiting for ``shown``.
POLL_SECONDS = 0.05


# -- events ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoefficientsProgress:
    """``done`` of ``total`` images preprocessed and expanded in the basis."""

    done: int
    total: int


@dataclass(frozen=True)
class SortStarted:
    """The model is initialised: ``n_rounds`` pruning rounds on ``n_particles`` images of ``n_coefficients``.

    automatic : the automatic mode; the sort may stop before ``n_rounds`` (an upper bound), after a round
        that finds no outlier.
    """

    n_rounds: int
    n_particles: int
    n_coefficients: int
    automatic: bool = False


@dataclass(frozen=True)
class IterationDone:
    """One EM iteration finished.

    round : the 1-based pruning round it belongs to.
    iteration : EM iterations done in total.
    log_likelihood : mean log-likelihood per image before the iteration.
    n_kept : images the iteration ran on.
    started, finished : time.monotonic() at its start and end (seconds).
    """

    round: int
    iteration: int
    log_likelihood: float
    n_kept: int
    started: float
    finished: float


@dataclass(frozen=True)
class RoundDone:
    """A pruning round: the engine's SortRound and the subspaces as images.

    means : (M, box, box) float32, the subspace means through the basis.
    components : (M, n, box, box) float32, the top n components of each subspace.
    n_rounds : the number of rounds of the whole sort (an upper bound in the automatic mode).
    classes : the components as classes (members, aligned averages), when ``iter_sort`` was asked for them.
    """

    result: SortRound
    means: np.ndarray
    components: np.ndarray
    n_rounds: int
    classes: ClassViews | None = None


@dataclass(frozen=True)
class SortFinished:
    """The sort is over: its :class:`SortResult`."""

    result: "SortResult"


# -- the result --------------------------------------------------------------------------------------------


@dataclass
class SortResult:
    """What a sort produced, with what it needs to write its files.

    Attributes:
        particles: the particle set that was sorted.
        settings: the SortSettings of the sort.
        final: the SortRound of the last pruning round (scores, removal rounds, model parameters, trace).
        model: the fitted mixture (scikit-learn style: ``predict_proba``, ``score_samples``, ``converged_``).
        scorer: the junk score, ``scorer(model, coefficients) -> (N,)``.
        basis: the basis of the coefficients (``basis.evaluate`` turns coefficients into images).
        preprocessor: the preprocessing applied before the expansion.
        coefficients: (N, L) float32, the basis coefficients of every particle (for a sort on Dask, the
            DaskChunks that hold them on the workers, while the client is open).
        overrides: particles moved across the cut by hand (see :mod:`napari_ppcasort.core.selection`).

    The kept set (:attr:`kept_mask`) is the particles the sort kept, or those scoring at most
    ``settings.score_threshold`` when it is set, with the overrides applied.
    """

    particles: ParticleSet
    settings: SortSettings
    final: SortRound
    model: object
    scorer: Callable
    basis: object
    preprocessor: object
    coefficients: np.ndarray
    overrides: Overrides = field(default_factory=Overrides)

    @property
    def scores(self) -> np.ndarray:
        """(N,) float, each particle's final junk score (larger = more junk-like; removed particles keep the
        score they were removed with)."""
        return self.final.final_scores

    @property
    def removal_round(self) -> np.ndarray:
        """(N,) int, the round each particle was removed in, 0 if it was kept."""
        return self.final.removal_round

    @property
    def sort_kept_mask(self) -> np.ndarray:
        """(N,) bool, the particles the sort kept (never removed by a pruning round)."""
        return self.final.removal_round == 0

    @property
    def score_threshold(self) -> float | None:
        """The cut on the final scores (``settings.score_threshold``), or None: the sort's own selection."""
        return self.settings.score_threshold

    def base_mask(self, score_threshold: float | None = None) -> np.ndarray:
        """(N,) bool, the kept set before the overrides: the particles scoring at most ``score_threshold`` (default:
        the settings' threshold), or those the sort kept when there is none."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        return base_mask(self.scores, self.sort_kept_mask, threshold)

    @property
    def kept_mask(self) -> np.ndarray:
        """(N,) bool, the kept set: the cut (the score threshold, or the sort's own selection), then the overrides."""
        return kept_mask(self.scores, self.sort_kept_mask, self.score_threshold, self.overrides)

    def with_selection(self, score_threshold: float | None, kept_mask=None) -> "SortResult":
        """This result with another cut: ``score_threshold`` (None: the sort's own selection) and, if given, the
        (N,) bool ``kept_mask`` the user made from it (what differs from the cut becomes manual overrides)."""
        settings = self.settings.replace(score_threshold=score_threshold)
        moved = replace(self, settings=settings, overrides=Overrides())
        if kept_mask is None:
            return moved
        kept_mask = np.asarray(kept_mask, dtype=bool)
        if kept_mask.shape != self.scores.shape:
            raise ValueError(f"kept_mask must have one entry per particle ({self.scores.size}), got {kept_mask.shape}")
        return replace(moved, overrides=Overrides.between(kept_mask, moved.base_mask()))

    def class_views(self) -> ClassViews:
        """The components as classes: members, counts, weights, mean scores and in-plane aligned averages (for a
        sort on Dask, computed on the workers that hold the coefficients: while its client is open)."""
        return class_views(self.model, self.final.parameters, self.basis, self.coefficients, self.scores)

    @property
    def n_kept(self) -> int:
        return int(np.count_nonzero(self.kept_mask))

    @property
    def estimated(self) -> dict:
        """What the sort measured from the data, for parameters.json (a rerun with the same settings measures the
        same): the mask radius in pixels of the images it sorted (``sorted_box_px`` across, after any crop) and, when
        the particle file gives a pixel size, in angstrom."""
        preprocessor = self.preprocessor
        estimates = {"mask_radius_px": round(float(preprocessor.radius), 3),
                     "sorted_box_px": int(preprocessor.output_box)}
        pixel_size = getattr(self.particles, "pixel_size", None)
        if pixel_size:
            sorted_pixel_size = pixel_size * preprocessor.box_size / preprocessor.output_box
            estimates["mask_radius_angstrom"] = round(float(preprocessor.radius * sorted_pixel_size), 2)
        return estimates

    def kept_at(self, threshold: float) -> np.ndarray:
        """(N,) bool, the particles whose final score is at most ``threshold`` (a cut moved after the sort)."""
        return self.scores <= threshold

    def subspace_images(self, n_per_subspace: int = N_COMPONENTS_SHOWN) -> tuple[np.ndarray, np.ndarray]:
        """The subspaces as images: means (M, box, box) and top components (M, n, box, box)."""
        return subspace_images(self.basis, self.final.parameters, n_per_subspace)

    def report(self, path=None, *, kept_mask=None, title: str | None = None,
               n_components_shown: int = N_COMPONENTS_SHOWN):
        """The one-page report: a matplotlib Figure, or written to the PNG ``path`` (returned) if given."""
        from .report import report_figure, write_report  # matplotlib: only when a report is drawn

        kept_mask = self.kept_mask if kept_mask is None else np.asarray(kept_mask, dtype=bool)
        means, components = self.subspace_images(n_components_shown)
        title = str(self.particles.path) if title is None else title
        if path is None:
            return report_figure(self.final, kept_mask, means, components, title=title, settings=self.settings)
        return write_report(path, self.final, kept_mask, means, components, title=title, settings=self.settings)

    def export(self, folder, *, kept_mask=None, force: bool = False, report: bool = True,
               title: str | None = None) -> dict[str, list[Path]]:
        """Write the results into ``folder`` as one output set: kept and rejected sets (in the input's format),
        scores.csv, report.png and parameters.json, all or nothing (see :mod:`napari_ppcasort.core.outputs`).

        kept_mask : (N,) bool, the particles to keep (default: the sort's own selection).
        force : replace the results already in ``folder`` (as a whole); without it they are refused.
        Returns the paths written: {"kept": [...], "rejected": [...], "scores": [...], "report": [...],
        "parameters": [...]} (the .mrcs and .star, or the .cs, of each set). InputError (OutputExistsError, OutputBusyError, an input in the way) before
        anything is written; OutputWriteError if writing fails (nothing is left behind).
        """
        from .results import open_results_folder, write_results

        with open_results_folder(folder, self.particles, force=force) as output:
            written = write_results(output, self, kept_mask, report=report, title=title)
            output.commit()
        return written


# -- the run loop ------------------------------------------------------------------------------------------


def as_particle_set(particles) -> ParticleSet:
    """A ParticleSet from a ParticleSet, a path (opened; InputError if its stacks are missing) or an
    (n, box, box) array."""
    if isinstance(particles, ParticleSet):
        return particles
    if isinstance(particles, (str, Path)):
        return open_particles(particles)
    if hasattr(particles, "shape"):
        return ArrayParticleSet(particles)
    raise TypeError(f"expected a particle file, a ParticleSet or an (n, box, box) array, got "
                    f"{type(particles).__name__}")


def as_settings(settings=None, **changes) -> SortSettings:
    """SortSettings from SortSettings, a mapping of settings or None (the defaults), with ``changes`` applied."""
    if settings is None:
        settings = SortSettings()
    elif isinstance(settings, dict):
        settings = SortSettings.from_dict(settings)
    elif not isinstance(settings, SortSettings):
        raise TypeError(f"expected SortSettings or a dict of settings, got {type(settings).__name__}")
    return settings.replace(**changes) if changes else settings


def check_sort(particles: ParticleSet, settings: SortSettings) -> None:
    """Everything that can be checked before the expensive work: the stacks exist, the mask fits the box, the
    subspaces fit in the pixels of the mask, and there are enough images for a round to remove one.

    ParticleFileError / SettingsError naming the particle file and the setting.
    """
    where = literal(particles.path)
    if particles.missing_stacks:
        raise ParticleFileError(f"{particles.path}: {len(particles.missing_stacks)} of its image stacks are missing "
                                f"(first: {particles.missing_stacks[0]})")
    try:
        preprocessor = make_preprocessor(particles, settings)
    except SettingsError as error:
        raise SettingsError(f"{where}: {error.template}") from None
    n_pixels = int(disk_mask(preprocessor.output_box, preprocessor.radius).sum())
    if settings.total_dimension >= n_pixels:
        raise SettingsError(f"{where}: {{total_dimension}} {settings.total_dimension} does not fit the "
                            f"{n_pixels} pixels inside the mask circle of its {preprocessor.output_box} px images; "
                            "lower it (or raise {box_size})")
    if removal_schedule(settings, particles.n_particles):
        return
    n = particles.n_particles
    if settings.target_kept_fraction is not None and np.ceil(settings.target_kept_fraction * n) >= n:
        raise SettingsError(f"{where}: {{target_kept_fraction}} {settings.target_kept_fraction:g} keeps all {n} "
                            "images: there is nothing to remove; lower {target_kept_fraction}")
    needed = settings.n_subspaces * (settings.subspace_dimension + 1) + 2
    raise SettingsError(f"{where}: {n} images are too few to sort with {settings.n_subspaces} subspaces of dimension "
                        f"{settings.subspace_dimension} (at least {needed} are needed): lower {{n_subspaces}} or "
                        "{total_dimension}")


def iter_sort(particles, settings=None, *, cancel=None, n_components_shown: int = N_COMPONENTS_SHOWN,
              shown: threading.Event | None = None, with_classes: bool = False, client=None,
              chunk_size: int | None = None) -> Iterator:
    """Sort ``particles`` with ``settings``, yielding progress events (see the module docstring).

    Args:
        particles: a ParticleSet, a particle file (.mrcs, .mrc, .star, .cs) or an (n, box, box) array.
        settings: SortSettings, a dict of settings, or None for the defaults.
        cancel: a ``threading.Event`` or a callable returning True to stop; checked between EM iterations
            and between chunks of the expansion. The generator then ends without SortFinished.
        n_components_shown: components of each subspace in every RoundDone.
        shown: if given, the sort pauses after each RoundDone until ``shown`` is set (by a GUI, once it has
            drawn the round), so that drawing never competes with the sort for the CPU.
        with_classes: every RoundDone carries the components as classes (``RoundDone.classes``: members and
            aligned averages; costs about one E-step over all images per round, on the workers with ``client``).
        client: a ``distributed.Client``: the images are read, preprocessed and expanded by its workers, which
            keep the coefficients and run the E-steps and the scores; the client runs the M-steps and keeps the
            kept mask (see :mod:`napari_ppcasort.core.distributed`). The workers must see the particle files at
            the paths this process sees.
        chunk_size: particles per chunk of the EM (and per Dask task); default about 64 MB of float64
            coefficients (28,053 particles of 299). The local and the Dask sort with the same chunk size sum in
            the same order.

    Raises:
        InputError (ParticleFileError, SettingsError) naming the file and the setting, before the expensive
        work where possible; ComputeError when the computation fails (numerically, or out of memory).
    """
    particles = as_particle_set(particles)
    settings = as_settings(settings)
    cancelled = _cancel_check(cancel)
    check_sort(particles, settings)
    prepared = None
    completed = False
    try:
        steps = coefficient_steps(particles, settings, client=client, chunk_size=chunk_size)
        while True:
            if cancelled():
                return
            try:
                done, total = next(steps)
            except StopIteration as finished:
                prepared = finished.value
                break
            yield CoefficientsProgress(done, total)
        _check_spread(prepared.coefficients, particles, settings)
        sorter = make_sorter(settings, prepared.basis)
        sorter.start(prepared.coefficients, chunk_size=chunk_size)
        n_rounds = len(sorter.schedule)
        yield SortStarted(n_rounds, prepared.coefficients.shape[0], prepared.coefficients.shape[1],
                          automatic=sorter.automatic)
        result = yield from _rounds(sorter, prepared, n_components_shown, n_rounds, cancelled, shown, with_classes)
        if result is None:
            return
        completed = True
        yield SortFinished(SortResult(particles=particles, settings=settings, final=result, model=sorter.model,
                                      scorer=sorter.scorer, basis=prepared.basis, preprocessor=prepared.preprocessor,
                                      coefficients=prepared.coefficients))
    except SettingsError as error:  # a setting that does not fit these data (the basis they give)
        raise SettingsError(f"{literal(particles.path)}: {error.template}") from None
    except BadImageError as error:
        if error.constant_background and settings.normalize:
            raise SettingsError(f"{literal(particles.path)}: {literal(error)}; for noise-free images (a simulation) whose "
                                "background is constant, sort without background normalisation ({normalize:off})"
                                ) from None
        raise ParticleFileError(f"{particles.path}: {error}") from None
    except np.linalg.LinAlgError as error:
        raise ComputeError(f"the fit failed numerically ({literal(error)}); try another {{random_state}}, fewer "
                           "{n_subspaces} or a smaller {total_dimension}") from error
    except MemoryError as error:
        raise ComputeError(f"not enough memory to sort {particles.n_particles} images of {particles.box_size} px "
                           f"({literal(error) or 'MemoryError'}); lower {{box_size}} or {{n_coefficients}}, or sort "
                           "fewer particles at a time") from None
    finally:
        if not completed and prepared is not None and hasattr(prepared.coefficients, "release"):
            prepared.coefficients.release()  # a sort on Dask that stops half-way: cancel its tasks, free the workers


def _rounds(sorter: OnlineSorter, prepared, n_components_shown: int, n_rounds: int, cancelled, shown,
            with_classes: bool = False):
    """Run the sort's rounds one EM iteration at a time, yielding IterationDone and RoundDone; returns the
    last SortRound, or None if cancelled."""
    n_kept = prepared.coefficients.shape[0]
    round_number = 0
    result = None
    while not sorter.finished:
        round_number += 1
        for _ in range(sorter.iterations_per_round):
            if cancelled():
                return None
            started = time.monotonic()
            log_likelihood = sorter.em_step()
            yield IterationDone(round_number, sorter.model.n_iter_, float(log_likelihood), n_kept, started,
                                time.monotonic())
        result = sorter.prune()
        n_kept = result.kept.size
        means, components = subspace_images(prepared.basis, result.parameters, n_components_shown)
        classes = class_views(sorter.model, result.parameters, prepared.basis, prepared.coefficients,
                              result.final_scores) if with_classes else None
        if shown is not None:
            shown.clear()
        yield RoundDone(result, means, components, n_rounds, classes)
        if shown is not None and not _wait_unless_cancelled(shown, cancelled):
            return None
    return result


def sort_particles(particles, settings=None, *, cancel=None, progress: Callable | None = None, client=None,
                   chunk_size: int | None = None, **changes) -> SortResult:
    """Sort ``particles`` and return the :class:`SortResult` (nothing is written: see ``SortResult.export``).

    Args:
        particles: a ParticleSet, a particle file or an (n, box, box) array.
        settings: SortSettings, a dict of settings, or None for the defaults; ``changes`` override single
            settings (``sort_particles("p.star", n_rounds=3)``).
        cancel: see :func:`iter_sort`; a cancelled sort raises SortCancelled.
        progress: called with every event of :func:`iter_sort`.
        client, chunk_size: a ``distributed.Client`` to sort on, and the particles per chunk (see :func:`iter_sort`).
    """
    for event in iter_sort(particles, as_settings(settings, **changes), cancel=cancel, client=client,
                           chunk_size=chunk_size):
        if progress is not None:
            progress(event)
        if isinstance(event, SortFinished):
            return event.result
    raise SortCancelled("the sort was cancelled")


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError(f"cancel must be a threading.Event or a callable, got {type(cancel).__name__}")


def _wait_unless_cancelled(event: threading.Event, cancelled: Callable[[], bool]) -> bool:
    """Wait until ``event`` is set (True) or the sort is cancelled (False)."""
    while not event.wait(POLL_SECONDS):
        if cancelled():
            return False
    return True


def _check_spread(coefficients, particles, settings: SortSettings) -> None:
    """InputError if every image is the same inside the mask (all blank, say): there is nothing to sort, and
    the initialisation could not tell the subspaces apart. ``coefficients``: (N, L) array or Chunks."""
    chunks = coefficients if isinstance(coefficients, Chunks) else LocalChunks(coefficients)
    spread = chunks.reduce(column_range)
    if np.any(spread.high > spread.low):
        return
    what = "blank (0)" if not (spread.low.any() or spread.high.any()) else "the same"
    raise ParticleFileError(f"{particles.path}: all {chunks.n_total} images are {what} inside the mask "
                            "circle after preprocessing: there is nothing to sort")


"""The steps of a sort: particles -> preprocessed images -> basis coefficients -> online sorter.

:func:`napari_ppcasort.core.run.iter_sort` runs them in order (the one run loop of the command line, the
widget and the Python API); they are public for benchmarks and tests that need one step alone.

    settings = SortSettings(n_subspaces=3, total_dimension=60)
    prepared = prepare_coefficients(particles, settings)          # images -> basis coefficients
    sorter = make_sorter(settings, prepared.basis)                # model + score + pruning schedule
    for result in sorter.rounds(prepared.coefficients): ...       # one SortRound per pruning round
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Callable

import numpy as np

from .bases import BASES, expansion_steps
from .ctf import ctf_parameters
from .errors import SettingsError
from .mixture import MixtureParameters
from .models import MODELS
from .noise import estimate_noise_spectrum, estimate_particle_radius
from .preprocess import BadImageError, Preprocessor, default_radius
from .settings import SortSettings
from .sorting import OnlineSorter

__all__ = [
    "PreparedCoefficients",
    "make_preprocessor",
    "coefficient_steps",
    "prepare_coefficients",
    "make_sorter",
    "removal_schedule",
    "subspace_images",
]

Progress = Callable[[int, int], None]


@dataclass
class PreparedCoefficients:
    """Basis coefficients of a particle set, with the basis and preprocessing that made them.

    coefficients : (N, L) float32, row i for particle i of the set (or, for a sort on Dask, the DaskChunks that
        hold them on the workers).
    """

    coefficients: np.ndarray
    basis: object
    preprocessor: Preprocessor


#: Added to the estimated particle radius for the mask, as a fraction of the box: the CTF spreads a particle's edge
#: over a few pixels, and a ring of background inside the mask is what tells a centred particle from contamination
#: that fills the box. On the contamination benchmark's tuning seeds a smaller margin rejects more empty and
#: off-centre boxes and a larger one keeps more particles of a clean stack; 0.06 of the box balances the two.
RADIUS_MARGIN = 0.06
#: Images read to estimate the noise spectrum and the particle's radius (a random sample, in file order).
NOISE_SAMPLE_SIZE = 2000


def make_preprocessor(particles, settings: SortSettings) -> Preprocessor:
    """The preprocessing of ``particles`` that ``settings`` ask for, before anything is estimated from the images:
    crop (only boxes larger than box_size), normalisation, and the CTF of each particle when phase flipping is
    asked for and the particle file has it. See :func:`fit_preprocessor` for the rest.

    SettingsError if the mask radius does not fit the (cropped) box.
    """
    crop = settings.box_size is not None and settings.box_size < particles.box_size
    output_box = settings.box_size if crop else particles.box_size
    largest = (output_box - 1) / 2
    if settings.mask_radius is not None and settings.mask_radius > largest:
        raise SettingsError(f"{{mask_radius}} {settings.mask_radius:g} px does not fit the {output_box} px images "
                            f"being sorted: it must be at most {largest:g} px (the circle must leave background in "
                            "the corners)")
    ctf = ctf_parameters(particles) if settings.ctf_correction == "flip" else None
    return Preprocessor(box_size=particles.box_size, target_box=settings.box_size if crop else None,
                        mask_radius=settings.mask_radius, normalize=settings.normalize, ctf=ctf)


def fit_preprocessor(preprocessor: Preprocessor, particles, settings: SortSettings) -> Preprocessor:
    """The preprocessor with what is estimated from a random sample of the images (at most NOISE_SAMPLE_SIZE):
    the noise power spectrum to whiten with (``settings.whiten``), and the particle's radius as the mask radius
    when ``settings.mask_radius`` is None (see :mod:`napari_ppcasort.core.noise`)."""
    if not settings.whiten and settings.mask_radius is not None:
        return preprocessor
    rng = np.random.default_rng(settings.random_state)
    sample = np.sort(rng.choice(particles.n_particles, size=min(particles.n_particles, NOISE_SAMPLE_SIZE),
                                replace=False))
    indices, images = [], []
    for chunk_indices, chunk in particles.iter_chunks(sample):
        try:
            images.append(preprocessor.normalized(chunk))
        except BadImageError as error:
            raise error.of_particles(chunk_indices) from error
        indices.append(chunk_indices)
    indices, images = np.concatenate(indices), np.concatenate(images)
    if not _has_noise(images):
        return preprocessor
    spectrum = estimate_noise_spectrum(images)
    whitened = replace(preprocessor, normalize=False, target_box=None, box_size=preprocessor.output_box,
                       noise_spectrum=spectrum, noise_normalize=True, ctf=_cropped_ctf(preprocessor))(images, indices)
    if settings.mask_radius is None:
        radius = estimate_particle_radius(whitened, largest=default_radius(preprocessor.output_box))
        preprocessor = replace(preprocessor, mask_radius=min(radius + RADIUS_MARGIN * preprocessor.output_box,
                                                                   default_radius(preprocessor.output_box)))
    # the noise again, from the background outside the particle only
    spectrum = estimate_noise_spectrum(images, background_radius=preprocessor.radius)
    if settings.whiten:
        preprocessor = replace(preprocessor, noise_spectrum=spectrum, noise_normalize=True)
    return preprocessor


def _has_noise(images: np.ndarray) -> bool:
    """Whether most of the (n, box, box) images have noise in their corners (outside the inscribed circle): a
    noise-free simulation has none, and neither a noise spectrum nor a particle radius can be measured on it."""
    box = images.shape[1]
    offsets = np.arange(box) - (box - 1) / 2
    corners = np.hypot(offsets[:, None], offsets[None, :]) > box / 2
    spread = images[:, corners].std(axis=1)
    return bool(np.median(spread) > 1e-6 * max(float(images.std()), np.finfo(np.float32).tiny))


def _cropped_ctf(preprocessor: Preprocessor):
    """The preprocessor's CTF for images already cropped to its output box (the pixel size of the crop)."""
    if preprocessor.ctf is None:
        return None
    return replace(preprocessor.ctf, pixel_size=preprocessor.output_pixel_size)


def coefficient_steps(particles, settings: SortSettings, *, client=None, chunk_size: int | None = None):
    """:func:`prepare_coefficients` as a generator: estimates the noise and the particle's radius, builds the
    basis, then yields (done, total) images after each chunk of the expansion, and returns the
    PreparedCoefficients.

    With a Dask ``client`` the expansion runs on its workers, one task per chunk of ``chunk_size`` particles,
    and the coefficients stay there: ``PreparedCoefficients.coefficients`` is then a
    :class:`~napari_ppcasort.core.distributed.DaskChunks`.
    """
    preprocessor = fit_preprocessor(make_preprocessor(particles, settings), particles, settings)
    basis = BASES[settings.basis].build(particles, preprocessor, settings)
    if basis.n_coefficients <= settings.total_dimension:
        raise SettingsError(
            f"the {settings.basis.upper()} basis gives {basis.n_coefficients} coefficients, not more than the "
            f"total dimension {settings.total_dimension}: lower {{total_dimension}} or ask for more coefficients "
            "({n_coefficients})")
    if client is None:
        coefficients = yield from expansion_steps(particles, basis, preprocessor)
    else:
        from .distributed import expansion_steps as expansion_steps_on_workers

        coefficients = yield from expansion_steps_on_workers(client, particles, basis, preprocessor, chunk_size)
    return PreparedCoefficients(coefficients=coefficients, basis=basis, preprocessor=preprocessor)


def prepare_coefficients(particles, settings: SortSettings, progress: Progress | None = None) -> PreparedCoefficients:
    """Preprocess every image of ``particles`` and expand it in the chosen basis, chunk by chunk.

    ``particles`` is a ParticleSet (or anything with ``n_particles``, ``box_size`` and ``iter_chunks``).
    ``progress(done, total)`` is called after each chunk.
    """
    steps = coefficient_steps(particles, settings)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(done, total)


def make_sorter(settings: SortSettings, basis) -> OnlineSorter:
    """The online sorter (model, score and pruning schedule) that ``settings`` describe.

    ``basis`` is the basis the coefficients were expanded in (``PreparedCoefficients.basis``): the
    steerable model needs its angular frequencies, radial indices and cos/sin flags.
    """
    spec = MODELS[settings.model]
    if spec.steerable_basis and not hasattr(basis, "angular_frequencies"):
        raise ValueError(f"the {settings.model} model needs coefficients in the PSWF basis, got {type(basis).__name__}")
    model, scorer = spec.build(settings, basis)
    return _online_sorter(settings, model, scorer)


def _online_sorter(settings: SortSettings, model, scorer) -> OnlineSorter:
    """The sorter of ``settings``: with stop 'junk-left', the model's probability cut if its score has one, else
    the robust outlier rule; with 'schedule', no rule (alpha of the rest every round)."""
    spec = MODELS[settings.model]
    score_cut = spec.score_cut if settings.stop == "junk-left" else None
    outlier_threshold = settings.outlier_threshold if settings.stop == "junk-left" and score_cut is None else None
    return OnlineSorter(
        model,
        alpha=settings.alpha,
        iterations_per_round=settings.iterations_per_round,
        n_rounds=settings.n_rounds,
        target_kept_fraction=settings.target_kept_fraction,
        scorer=scorer,
        outlier_threshold=outlier_threshold,
        score_cut=score_cut,
        final_cut=spec.final_cut if score_cut is not None else None,
    )


def removal_schedule(settings: SortSettings, n_total: int) -> list[int]:
    """How many images each round of a sort of ``n_total`` images removes (upper bounds in the automatic mode),
    as the OnlineSorter will compute it; empty when no round can remove an image. Needs no data."""
    stand_in = SimpleNamespace(n_components=settings.n_subspaces, n_dims=settings.subspace_dimension)
    return _online_sorter(settings, stand_in, scorer=None).removal_schedule(n_total)


def subspace_images(basis, parameters: MixtureParameters, n_per_subspace: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The subspaces as images: means (M, box, box) and top components (M, n, box, box), through the basis.

    Components are the orthonormal axes of each subspace ordered by variance, at most ``n_per_subspace``.
    """
    axes, _ = parameters.orthonormal_components()
    n_shown = min(n_per_subspace, axes.shape[1])
    means = basis.evaluate(parameters.means)
    top = axes[:, :n_shown].reshape(-1, axes.shape[2])
    components = basis.evaluate(top).reshape(axes.shape[0], n_shown, *means.shape[1:])
    return means, components

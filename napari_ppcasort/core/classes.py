"""The mixture's components as a biologist reads 2-D classes: members, counts, and in-plane aligned averages.

A component's mean in the steerable model is a rotational average (a ring or a blob): nothing to judge a
class by. What a user needs is the average of the class's members after aligning them in-plane, as 2-D
classification shows. In a steerable basis (PSWF) rotating an image by theta multiplies the complex
coefficient z = a + i b of each (cos, sin) pair of angular frequency N by exp(-i N theta)
(``PSWFBasis.rotate``), so the correlation of an image with a reference at every angle is one FFT over the
angular frequencies:

    c(theta_k) = sum_{N=0} r y + Re sum_N C_N exp(-2 pi i N k / K),   C_N = sum_{pairs of frequency N} conj(r) z

and the best angle of every member costs O(L + K log K). :func:`aligned_average` aligns the members to a
reference (first the best-scoring member, then their own average) a few times. In a basis that is not
steerable (PCA) the average is the plain mean of the members' coefficients (``ClassViews.aligned`` False).
Shifts are not aligned: the models do not model them. Plain NumPy, no Qt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunks import Chunks, LocalChunks

__all__ = ["ClassViews", "class_views", "aligned_average", "component_kinds", "PARTICLE", "N_ANGLES",
           "ALIGN_ITERATIONS", "MAX_MEMBERS_AVERAGED"]

#: The kind of a component when the model does not say (every component of today's models is a particle class).
PARTICLE = "particle"
#: The kind shown for a particle class whose mean carries no particle (core/contamination.py).
JUNK_CLASS = "junk class"
#: Angles tried in the in-plane alignment (1 degree apart).
N_ANGLES = 360
#: Alignment rounds: to the best-scoring member, then to the average of the previous round.
ALIGN_ITERATIONS = 3
#: At most this many members of a class are averaged (an even sample of them by score), to bound the cost.
MAX_MEMBERS_AVERAGED = 3000


@dataclass(frozen=True)
class ClassViews:
    """The components of a fitted mixture as classes (M components, N particles).

    Attributes:
        assignment: (N,) int, the component each particle belongs to most (largest responsibility).
        kinds: (M,) str, what each component models: "particle" (a particle class), "outlier" (images far off a
            particle class), "junk class" (a particle class whose mean carries no particle, so scored as junk), "noise"
            (empty boxes) or "background" (unstructured junk such as ice and carbon), from the model's
            ``component_kinds`` and ``junk_classes`` (all "particle" without them).
        counts: (M,) int, members of each component.
        weights: (M,) float, the mixing weights (each component's share of the images).
        mean_scores: (M,) float, the mean final junk score of each component's members (NaN without members).
        averages: (M, box, box) float32, each component's aligned average of its members (in the sorted,
            Fourier-cropped box; its mean image where it has no member).
        aligned: True when the averages are aligned in-plane (steerable basis).
    """

    assignment: np.ndarray
    kinds: tuple[str, ...]
    counts: np.ndarray
    weights: np.ndarray
    mean_scores: np.ndarray
    averages: np.ndarray
    aligned: bool

    @property
    def n_components(self) -> int:
        return len(self.kinds)

    def members(self, component: int) -> np.ndarray:
        """(n,) int, the particles of ``component``, ascending."""
        return np.flatnonzero(self.assignment == component)


def component_kinds(parameters, n_components: int) -> tuple[str, ...]:
    """What each component models: the parameters' ``component_kinds`` if the model gives them, else all particle."""
    kinds = getattr(parameters, "component_kinds", None)
    if kinds is None:
        return (PARTICLE,) * n_components
    kinds = [str(kind) for kind in kinds]
    if len(kinds) != n_components:
        raise ValueError(f"component_kinds has {len(kinds)} entries for {n_components} components")
    particle_columns = [column for column, kind in enumerate(kinds) if kind == PARTICLE]
    for m in getattr(parameters, "junk_classes", ()):  # a particle class found to hold junk
        kinds[particle_columns[m]] = JUNK_CLASS
    return tuple(kinds)


def class_views(model, parameters, basis, coefficients, scores: np.ndarray) -> ClassViews:
    """The :class:`ClassViews` of a fitted ``model`` (with its ``parameters`` snapshot) on every particle.

    coefficients : (N, L) basis coefficients of all particles, or the :class:`~napari_ppcasort.core.chunks.Chunks`
        that hold them (those of a sort on Dask: each chunk's assignment is computed where the chunk is, and only
        the rows averaged, at most MAX_MEMBERS_AVERAGED per component, come to this process).
    scores : (N,) their final junk scores.
    """
    chunks = (coefficients if isinstance(coefficients, Chunks) else LocalChunks(np.asarray(coefficients))).all_rows()
    scores = np.asarray(scores, dtype=np.float64)
    # a model with junk components gives the means and weights of all of them (particle classes first)
    means = np.asarray(getattr(parameters, "component_means", parameters.means), dtype=np.float64)
    n_components = means.shape[0]
    assignment = chunks.concat(_assign, model.expectation_state()).astype(np.int64)
    counts = np.bincount(assignment, minlength=n_components)
    weights = getattr(parameters, "component_weights", None)
    weights = np.asarray(parameters.weights if weights is None else weights, dtype=np.float64)
    averages = means.copy()
    mean_scores = np.full(n_components, np.nan)
    steerable = _is_steerable(basis)
    averaged = {}  # component -> its members to average, best score first
    for component in range(n_components):
        members = np.flatnonzero(assignment == component)
        if members.size == 0:
            continue
        mean_scores[component] = float(np.nanmean(scores[members])) if np.isfinite(scores[members]).any() else np.nan
        order = members[np.argsort(np.nan_to_num(scores[members], nan=np.inf), kind="stable")]
        if order.size > MAX_MEMBERS_AVERAGED:
            order = order[np.linspace(0, order.size - 1, MAX_MEMBERS_AVERAGED).round().astype(np.int64)]
        averaged[component] = order
    if averaged:  # the rows of every component's averaged members, in one pass over the chunks
        wanted = np.unique(np.concatenate(list(averaged.values())))
        taken = chunks.take(wanted)
    for component, order in averaged.items():
        rows = np.asarray(taken[np.searchsorted(wanted, order)], dtype=np.float64)
        averages[component] = aligned_average(rows, basis) if steerable else rows.mean(axis=0)
    images = np.asarray(basis.evaluate(averages), dtype=np.float32)
    return ClassViews(assignment=assignment, kinds=component_kinds(parameters, n_components), counts=counts,
                      weights=weights.copy(), mean_scores=mean_scores,
                      averages=images, aligned=steerable)


def _assign(rows: np.ndarray, offset: int, model) -> np.ndarray:
    """(c,) int32, the most responsible component of each row of a chunk (a ``Chunks.concat`` function)."""
    return np.argmax(model.log_densities(rows), axis=1).astype(np.int32)


def _is_steerable(basis) -> bool:
    return all(hasattr(basis, name) for name in ("angular_frequencies", "is_sine", "radial_indices"))


def _pairs(basis) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns of the steerable basis: N = 0 ones, and the (cos, sin) column pairs with their frequency N."""
    frequencies = np.asarray(basis.angular_frequencies)
    sine = np.asarray(basis.is_sine, dtype=bool)
    radial = np.asarray(basis.radial_indices)
    zero = np.flatnonzero(frequencies == 0)
    cosines = np.flatnonzero((frequencies > 0) & ~sine)
    sines_by_key = {(int(frequencies[i]), int(radial[i])): i for i in np.flatnonzero(sine)}
    sines = np.array([sines_by_key[(int(frequencies[i]), int(radial[i]))] for i in cosines], dtype=np.int64)
    return zero, cosines, sines, frequencies[cosines].astype(np.int64)


def aligned_average(coefficients: np.ndarray, basis, *, iterations: int = ALIGN_ITERATIONS,
                    n_angles: int = N_ANGLES, reference: np.ndarray | None = None) -> np.ndarray:
    """The average of images (rows of ``coefficients``, (n, L), in a steerable basis) aligned in-plane.

    Each image is rotated (by multiples of 360 / ``n_angles`` degrees) to its best correlation with the
    reference: ``reference`` (L,) if given, else the first row (pass the rows best first); then
    ``iterations - 1`` more times to the previous average. Returns the (L,) float64 coefficients.
    """
    rows = np.asarray(coefficients, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"expected coefficients of shape (n >= 1, L), got {rows.shape}")
    zero, cosines, sines, frequencies = _pairs(basis)
    if frequencies.size and frequencies.max() >= n_angles:
        raise ValueError(f"{n_angles} angles cannot resolve angular frequency {frequencies.max()}")
    pairs = rows[:, cosines] + 1j * rows[:, sines]  # (n, P)
    reference = rows[0] if reference is None else np.asarray(reference, dtype=np.float64)
    average = reference
    angle_index = np.arange(n_angles)
    # C_N = sum of the pair products of frequency N: a product with the (P, K) one-hot matrix of the frequencies
    # (a BLAS call, which lets a GUI thread run meanwhile)
    by_frequency = np.zeros((frequencies.size, n_angles))
    by_frequency[np.arange(frequencies.size), frequencies] = 1.0
    for _ in range(max(1, iterations)):
        reference_pairs = average[cosines] + 1j * average[sines]
        spectrum = (pairs * np.conj(reference_pairs)) @ by_frequency
        correlation = np.fft.fft(spectrum, axis=1).real  # (n, K): rotation by 2 pi k / K
        best = np.argmax(correlation, axis=1)
        phases = np.exp(-2j * np.pi * np.outer(angle_index[best], frequencies) / n_angles)
        rotated = pairs * phases
        average = np.empty(rows.shape[1])
        average[zero] = rows[:, zero].mean(axis=0)
        mean_pairs = rotated.mean(axis=0)
        average[cosines] = mean_pairs.real
        average[sines] = mean_pairs.imag
        others = np.setdiff1d(np.arange(rows.shape[1]), np.concatenate([zero, cosines, sines]))
        if others.size:
            average[others] = rows[:, others].mean(axis=0)
    return average

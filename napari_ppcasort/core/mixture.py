"""What both mixtures of probabilistic PCA share: parameters, the EM driver, data checks, chunked reading,
scores from log-densities, and the k-means used to initialise them.

The models are :class:`~napari_ppcasort.core.mppca.MixturePPCA` (the paper's, unconstrained subspaces) and
:class:`~napari_ppcasort.core.steerable.SteerableMixturePPCA` (subspaces closed under in-plane rotation).
Each implements ``initialize(data)``, ``step(data)`` (one EM iteration) and ``log_densities(data)``; this
module gives them, like scikit-learn's ``GaussianMixture``, ``fit``, ``score_samples``, ``predict_proba``
and ``score``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .chunks import CHUNK_BYTES, Chunks, LocalChunks, default_chunk_size

__all__ = ["EStep", "MixtureEM", "MixtureParameters", "NOISE_MODELS", "NotFittedError", "check_is_fitted",
           "expectation", "kmeans_labels", "logsumexp_rows", "score_rows"]

NOISE_MODELS = ("shared", "per_component")
DEFAULT_CHUNK_BYTES = CHUNK_BYTES


class NotFittedError(ValueError, AttributeError):
    """A mixture was used (scored, stepped, asked for a fitted attribute) before ``fit`` or ``initialize``,
    as scikit-learn's ``NotFittedError``."""


def check_is_fitted(model) -> None:
    """NotFittedError unless ``model`` has been fitted (or initialised)."""
    if "means_" not in vars(model):
        raise NotFittedError(f"this {type(model).__name__} is not fitted yet: call fit(data) (or initialize(data)) "
                             "first")


def logsumexp_rows(values: np.ndarray) -> np.ndarray:
    """log(sum(exp(values), axis=1)) of a (n, M) array, without overflow."""
    peak = values.max(axis=1)
    return peak + np.log(np.exp(values - peak[:, None]).sum(axis=1))


@dataclass
class EStep:
    """What the E-step of a mixture gives over some images; ``+`` merges two (the sums over two sets of images).

    moments: the model's sufficient statistics (an object with ``+``: the block statistics of
        core/steerable.py, the sums of core/mppca.py).
    responsibilities: (C,) float64, sum_i r_ic, for every component c of the mixture.
    log_likelihood: sum_i log p(y_i) under the parameters the E-step ran with.
    n_samples: the number of images.
    """

    moments: object
    responsibilities: np.ndarray
    log_likelihood: float
    n_samples: int

    def __add__(self, other: "EStep") -> "EStep":
        return EStep(self.moments + other.moments, self.responsibilities + other.responsibilities,
                     self.log_likelihood + other.log_likelihood, self.n_samples + other.n_samples)


def expectation(rows: np.ndarray, offset: int, model) -> EStep:
    """The E-step of ``model`` over a chunk of float64 rows (c, L) (a :meth:`Chunks.reduce` function)."""
    return model.expectation(rows)


def score_rows(rows: np.ndarray, offset: int, model, scorer) -> np.ndarray:
    """(c,) the junk scores ``scorer(model, rows)`` of a chunk of rows (c, L) (a :meth:`Chunks.concat` function)."""
    return np.asarray(scorer(model, rows), dtype=np.float64)


@dataclass(frozen=True)
class MixtureParameters:
    """A snapshot of the fitted parameters (copies, safe to keep while the model goes on learning).

    Attributes
    ----------
    means : (M, L) float64
    components : (M, K, L) float64, the loading matrices W_m transposed (rows are not orthonormal).
    weights : (M,) float64, mixing proportions summing to 1.
    noise_variance : (M,) float64, sigma_m^2 (all equal when the noise is shared).
    """

    means: np.ndarray
    components: np.ndarray
    weights: np.ndarray
    noise_variance: np.ndarray

    def orthonormal_components(self) -> tuple[np.ndarray, np.ndarray]:
        """Orthonormal basis of each subspace, ordered by variance.

        Returns
        -------
        axes : (M, K, L) float64, rows orthonormal within each subspace.
        variances : (M, K) float64, the model variance along each axis (singular value^2 + sigma^2).
        """
        axes = np.empty_like(self.components)
        variances = np.empty(self.components.shape[:2])
        for m, loadings in enumerate(self.components):
            _, singular, vt = np.linalg.svd(loadings, full_matrices=False)
            axes[m] = vt
            variances[m] = singular**2 + self.noise_variance[m]
        return axes, variances


class MixtureEM:
    """Base of the mixture models: parameters, checks, chunks, ``fit`` and the scores.

    Parameters
    ----------
    n_components : int
        M, the number of subspaces.
    n_dims : int
        K, the dimension of each subspace.
    noise : {"shared", "per_component"}
        One noise variance for all subspaces (the paper's model) or one per subspace.
    max_iter, tol : stopping rule of :meth:`fit`: at most ``max_iter`` iterations, stop when the mean
        log-likelihood per sample improves by less than ``tol`` (relative).
    random_state : int or None
        Seed of the initialisation.
    init_sample_size : int
        Number of samples the initialisation uses (its cost does not grow with N).
    chunk_bytes : int
        Rows are processed in float64 chunks of about this many bytes.

    Subclasses implement ``expectation`` (the E-step over a chunk of rows, an :class:`EStep`),
    ``maximization`` (the M-step from the merged EStep), ``log_densities``, :meth:`_check_features` and
    :meth:`_set_from_clusters` (and may choose the :meth:`_clustering_features` of the initialisation).
    :meth:`step` is one EM iteration: the E-step summed over the chunks of the data (an array, or the
    :class:`~napari_ppcasort.core.chunks.Chunks` of a sort, possibly on Dask workers), then the M-step.

    As scikit-learn's estimators: scoring or stepping before ``fit``/``initialize``, or reading a fitted
    attribute (a public name ending in ``_``) before, raises :class:`NotFittedError`; ``converged_`` says
    whether ``fit`` met its tolerance; ``predict`` gives the most responsible component.
    """

    def __getattr__(self, name: str):
        # only called for attributes that are not set: the fitted ones before fitting
        if name.endswith("_") and not name.startswith("_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(data) (or "
                                 f"initialize(data)) before reading {name}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __init__(
        self,
        n_components: int = 1,
        n_dims: int = 10,
        *,
        noise: str = "shared",
        max_iter: int = 100,
        tol: float = 1e-6,
        random_state: int | None = 0,
        init_sample_size: int = 20000,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.n_components = n_components
        self.n_dims = n_dims
        self.noise = noise
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.init_sample_size = init_sample_size
        self.chunk_bytes = chunk_bytes

    # ------------------------------------------------------------------ to implement
    def _set_from_clusters(self, sample: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        """Set every parameter from ``sample`` (n, L) float64 split into clusters ``labels`` (n,)."""
        raise NotImplementedError

    def expectation(self, rows: np.ndarray) -> EStep:
        """The E-step over a float64 chunk ``rows`` (c, L): its sufficient statistics, mergeable with ``+``."""
        raise NotImplementedError

    def maximization(self, statistics: EStep, data: Chunks) -> None:
        """The M-step from the E-step ``statistics`` summed over all of ``data`` (which a re-seeding may read)."""
        raise NotImplementedError

    def expectation_state(self) -> "MixtureEM":
        """What the E-step and the scores need of this model, to send where the data are: a shallow copy
        (models holding what only their M-step reads drop it here)."""
        return copy.copy(self)

    def log_densities(self, data) -> np.ndarray:
        """log pi_m + log N(y_i | mu_m, C_m) for each row of ``data`` (N, L) and component, shape (N, M)."""
        raise NotImplementedError

    def _check_features(self, n_features: int, *, fitting: bool) -> None:
        """Raise ValueError if data of ``n_features`` columns cannot be fitted (or scored) by this model."""
        raise NotImplementedError

    def _initialize_from_sample(self, sample: np.ndarray, rng: np.random.Generator) -> None:
        """Set the parameters from a random sample (n, L) of the data: k-means clusters, then a fit per cluster."""
        labels = kmeans_labels(self._clustering_features(sample), self.n_components, rng, min_size=self.n_dims + 2)
        self._set_from_clusters(sample, labels, rng)

    def _clustering_features(self, sample: np.ndarray) -> np.ndarray:
        """The features k-means groups the initial sample (n, L) by; the coefficients themselves by default."""
        return sample

    # ------------------------------------------------------------------ EM driver and scores
    def initialize(self, data) -> "MixtureEM":
        """Set the parameters from a random sample (:meth:`_initialize_from_sample`; by default k-means++ seeding
        and Lloyd iterations, then a fit per cluster).

        Runs on a random sample of at most ``init_sample_size`` rows of ``data`` (N, L), so its cost does not
        grow with N. Checks the data for NaN and infinite values (``step`` does not again).
        """
        self._check_parameters()
        data = self._chunked(data, fitting=True)
        rng = np.random.default_rng(self.random_state)
        rows = np.sort(rng.choice(data.n_rows, size=min(data.n_rows, self.init_sample_size), replace=False))
        self._initialize_from_sample(data.take(rows), rng)
        self.log_likelihood_ = []
        self.n_iter_ = 0
        self.n_reseeded_ = 0
        self.converged_ = False
        return self

    def fit(self, data) -> "MixtureEM":
        """Initialise and run EM until convergence or ``max_iter``. ``data``: (N, L) array."""
        self.initialize(data)
        for _ in range(self.max_iter):
            self.step(data)
            trace = self.log_likelihood_
            if len(trace) >= 2 and abs(trace[-1] - trace[-2]) < self.tol * max(1.0, abs(trace[-1])):
                self.converged_ = True
                break
        return self

    def step(self, data) -> float:
        """One EM iteration on ``data``: an (N, L) array (any subset of the samples) or :class:`Chunks`.

        Returns the mean log-likelihood per sample under the parameters BEFORE the update (the value that EM
        guarantees not to decrease), also appended to ``log_likelihood_``. The data are checked for NaN and
        infinite values by :meth:`initialize`, not again here.
        """
        data = self._chunked(data, fitting=False, check_finite=False)
        statistics = data.reduce(expectation, self.expectation_state())
        self.maximization(statistics, data)
        mean_log_likelihood = statistics.log_likelihood / statistics.n_samples
        self.log_likelihood_.append(mean_log_likelihood)
        self.n_iter_ += 1
        return mean_log_likelihood

    def score_samples(self, data) -> np.ndarray:
        """Log-likelihood log p(y_i) of each row of ``data`` (N, L) under the mixture, shape (N,)."""
        return logsumexp_rows(self.log_densities(data))

    def predict_proba(self, data) -> np.ndarray:
        """Responsibilities p(component m | y_i), shape (N, M), rows summing to 1."""
        log_dens = self.log_densities(data)
        return np.exp(log_dens - logsumexp_rows(log_dens)[:, None])

    def predict(self, data) -> np.ndarray:
        """The most responsible component of each row of ``data`` (N, L), shape (N,) int."""
        return np.argmax(self.log_densities(data), axis=1)

    def score(self, data) -> float:
        """Mean log-likelihood per sample."""
        return float(self.score_samples(data).mean())

    # ------------------------------------------------------------------ shared internals
    def _check_parameters(self) -> None:
        for name in ("n_components", "n_dims", "max_iter", "init_sample_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {self.noise!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")

    def _check_data(self, data, *, fitting: bool, check_finite: bool = True) -> np.ndarray:
        """``data`` as a 2-D array of real numbers (memory maps stay maps), or a ValueError saying what is wrong.

        fitting : also check that there are enough samples for the model.
        check_finite : scan the data (in chunks) for NaN and infinite values, naming the first bad row.
        """
        if not fitting:
            check_is_fitted(self)
        data = data if isinstance(data, np.memmap) else np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"data must be a 2-D array (n_samples, n_features), got shape {data.shape}")
        if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
            data = data.astype(np.float64)
        elif not np.issubdtype(data.dtype, np.floating):
            raise ValueError(f"data must be real numbers, got dtype {data.dtype}")
        self._check_features(data.shape[1], fitting=fitting)
        if fitting:
            self._check_sample_count(data.shape[0])
        for start, rows in self._chunks(data) if check_finite else ():
            finite_rows = np.isfinite(rows).all(axis=1)
            if not finite_rows.all():
                bad = start + int(np.flatnonzero(~finite_rows)[0])
                raise ValueError(f"data contains NaN or infinite values (first in row {bad}); remove or fix those samples")
        return data

    def _chunked(self, data, *, fitting: bool, check_finite: bool = True) -> Chunks:
        """``data`` as Chunks: an array is checked (see :meth:`_check_data`) and cut into chunks of about
        ``chunk_bytes`` of float64; Chunks (a sort's, whose rows were checked when they were made) are checked
        against the model only."""
        if not isinstance(data, Chunks):
            data = self._check_data(data, fitting=fitting, check_finite=check_finite)
            return LocalChunks(data, default_chunk_size(data.shape[1], self.chunk_bytes))
        if not fitting:
            check_is_fitted(self)
        self._check_features(data.n_features, fitting=fitting)
        if fitting:
            self._check_sample_count(data.n_rows)
        return data

    def _check_sample_count(self, n_samples: int) -> None:
        m, k = self.n_components, self.n_dims
        needed = m * (k + 1) + 1
        if n_samples < needed:
            raise ValueError(
                f"{n_samples} samples are too few for {m} subspace(s) of dimension {k}: "
                f"need at least n_components * (n_dims + 1) + 1 = {needed}"
            )

    def _chunks(self, data):
        """Yield (start, rows) over row chunks of ``data`` as float64.

        The rows are a view into one reused buffer (or into ``data`` itself if it is float64 already),
        valid until the next chunk is yielded.
        """
        step = max(1, self.chunk_bytes // (8 * max(data.shape[1], 1)))
        if data.dtype == np.float64:
            for start in range(0, data.shape[0], step):
                yield start, np.asarray(data[start : start + step])
            return
        buffer = np.empty((min(step, data.shape[0]), data.shape[1]))
        for start in range(0, data.shape[0], step):
            rows = buffer[: min(step, data.shape[0] - start)]
            np.copyto(rows, data[start : start + step])
            yield start, rows


def kmeans_labels(sample: np.ndarray, n_clusters: int, rng: np.random.Generator, min_size: int,
                  n_iter: int = 10) -> np.ndarray:
    """Cluster labels of ``sample`` (n, L) by k-means++ seeding (Arthur & Vassilvitskii 2007) and Lloyd steps.

    A cluster left with fewer than ``min_size`` members takes the ``min_size`` samples nearest its centre,
    so that every cluster can be given a PCA.
    """
    n = sample.shape[0]
    if n_clusters == 1:
        return np.zeros(n, dtype=np.intp)
    sq_norms = np.einsum("ij,ij->i", sample, sample)
    centres = [sample[rng.integers(n)]]
    closest = np.maximum(sq_norms - 2 * sample @ centres[0] + centres[0] @ centres[0], 0.0)
    for _ in range(1, n_clusters):
        candidates = rng.choice(n, size=2 + int(np.log(n_clusters)), p=closest / closest.sum())
        # greedy k-means++: of a few candidates, keep the one that lowers the potential most
        candidate_dists = np.maximum(
            sq_norms[:, None] - 2 * sample @ sample[candidates].T + sq_norms[candidates][None, :], 0.0
        )
        best = np.argmin(np.minimum(closest[:, None], candidate_dists).sum(axis=0))
        centres.append(sample[candidates[best]])
        closest = np.minimum(closest, candidate_dists[:, best])
    centres = np.array(centres)
    labels = np.zeros(n, dtype=np.intp)
    for _ in range(n_iter):
        dists = sq_norms[:, None] - 2 * sample @ centres.T + np.einsum("ij,ij->i", centres, centres)[None, :]
        labels = np.argmin(dists, axis=1)
        for c in range(n_clusters):
            members = labels == c
            if members.any():
                centres[c] = sample[members].mean(axis=0)
    for c in np.flatnonzero(np.bincount(labels, minlength=n_clusters) < min_size):
        labels[np.argsort(dists[:, c])[:min_size]] = c
    return labels

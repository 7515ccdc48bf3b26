"""Mixture of probabilistic PCA with subspaces closed under in-plane rotation, and its junk score.

Steerable coefficients. In a steerable basis (:class:`~napari_ppcasort.core.bases.PSWFBasis`) the
coefficients of angular frequency N > 0 come in (cos, sin) pairs (a_n, b_n), n the radial index; write
z_n = a_n + i b_n. Rotating the image by alpha multiplies z by exp(-i N alpha) and leaves the N = 0
coefficients x unchanged.

Rotation-invariant PPCA. A Gaussian whose density is invariant under every in-plane rotation has
(steerable PCA, Zhao, Shkolnisky and Singer 2016) its mean in the N = 0 block (the rotational average of
the images) and a covariance that is block-diagonal by angular frequency: a real symmetric block for
N = 0 and, for N > 0, a circular complex Gaussian, E[z z^H] = C_N Hermitian and E[z z^T] = 0. A unit
eigenvector u of C_N with eigenvalue kappa is a plane of images (Re(u^H z), Im(u^H z)) that every rotation
maps onto itself, with variance kappa / 2 along both of its axes. Each component m of the mixture is such
a Gaussian with the PPCA structure of Tipping & Bishop (1999): K real axes with variances lambda_j >=
sigma_m^2 (a plane counts as two axes of equal variance) and the isotropic noise sigma_m^2 on the L - K
other dimensions. A particle rotated in-plane has exactly the same likelihood, responsibilities and score.

EM. One pass over the data per iteration: each chunk's responsibilities (E-step, one (c, L) x (L, M K)
product) weight its contribution to the sufficient statistics, which are the N = 0 sums and, per angular
frequency block, the weighted second moments sum_i r_im z_i z_i^H (sum_N n_N^2 per image and component,
less than the E-step's L K). The M-step is exact: the maximum-likelihood rotation-invariant covariance of
component m is the rotational average of its weighted sample covariance (its diagonal blocks), and the ML
PPCA of that is its top K eigen-directions (Tipping & Bishop 1999, eq. 7-8): the eigenvalues of all blocks
are ranked together, a plane taking two of the K dimensions; sigma_m^2 is the mean variance left over
(pooled over the components when the noise is shared). No L x L matrix is formed.

Junk score (:class:`MeanEvidenceScore`). The evidence that an image y carries the mean mu_m of a
component, measured against the component's covariance C_m: the whitened correlation
t_m(y) = mu_m^T C_m^-1 y / sqrt(mu_m^T C_m^-1 mu_m), in standard deviations (N(0, 1) for an image without
that mean, N(sqrt(mu_m^T C_m^-1 mu_m), 1) for one with it). With rotation-closed components the means are
rotational averages, so t_m asks whether the image carries the radial profile of class m. The image must
carry the profile of its own class (t weighted by the responsibilities) and that of a class drawn from the
population (t weighted by the mixing weights): score = -min(own class, population). The first term
rejects pure noise and contamination; the second a class that the mixture devotes to a coherent group of
contaminants, whose members carry their own class's profile but not the particle classes', which dominate
the population.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from .chunks import Chunks
from .mixture import DEFAULT_CHUNK_BYTES, EStep, MixtureEM, MixtureParameters, logsumexp_rows

__all__ = [
    "MeanEvidenceScore",
    "SteerableLayout",
    "SteerableMixturePPCA",
    "SteerableParameters",
    "mean_evidence",
]

_LOG_2PI = np.log(2.0 * np.pi)
#: Rows per pass of the block second moments (a (SUB_ROWS, L) float64 block: 4.9 MB at L = 299; measured best of
#: 512, 2048, 8192 and a whole chunk with benchmarks/bench_em.py --default).
SUB_ROWS = 2048


@dataclass(frozen=True)
class SteerableParameters(MixtureParameters):
    """Parameters of a :class:`SteerableMixturePPCA` (copies).

    Besides the :class:`~napari_ppcasort.core.mixture.MixtureParameters` fields -- means (M, L), zero
    outside the N = 0 coefficients; components (M, K, L), sqrt(lambda_j - sigma_m^2) times the axes;
    weights (M,); noise_variance (M,) -- it holds the exact axes:

    axes : (M, K, L) float64, orthonormal rows spanning each rotation-closed subspace, by decreasing
        variance (the two axes of a plane are consecutive).
    variances : (M, K) float64, lambda_j, the model variance along each axis (>= sigma_m^2).
    """

    axes: np.ndarray
    variances: np.ndarray

    def orthonormal_components(self) -> tuple[np.ndarray, np.ndarray]:
        """The axes (M, K, L) and their variances (M, K), as fitted."""
        return self.axes.copy(), self.variances.copy()


class SteerableLayout:
    """Which columns of a coefficient vector form each angular-frequency block.

    Parameters
    ----------
    angular_frequencies : (L,) int >= 0, N of each coefficient.
    is_sine : (L,) bool, True for the sin(N theta) member of a pair (False for every N = 0 coefficient).
    radial_indices : (L,) int, n of each coefficient; the cos and sin members of a pair share (N, n).

    Attributes
    ----------
    n_features : L.
    zero_columns : (n_0,) int, the N = 0 columns.
    cos_columns, sin_columns : lists of int arrays, the cos and sin columns of each block N > 0 (ascending
        N), paired by radial index.
    size_groups : list of (cos (g, s) int, sin (g, s) int): the columns of the g blocks of each size s,
        for batched products.
    block_order : (L,) int, the columns laid out block by block: the N = 0 columns, then for each size group, for
        each of its blocks, its s cos columns and its s sin columns.
    group_offsets : (n_groups,) int, where each size group starts in ``block_order``.
    """

    def __init__(self, angular_frequencies, is_sine, radial_indices):
        frequencies = np.asarray(angular_frequencies)
        sine = np.asarray(is_sine)
        radial = np.asarray(radial_indices)
        if frequencies.ndim != 1 or sine.shape != frequencies.shape or radial.shape != frequencies.shape:
            raise ValueError(
                "angular_frequencies, is_sine and radial_indices must be 1-D arrays of one length, got shapes "
                f"{frequencies.shape}, {sine.shape}, {radial.shape}"
            )
        if frequencies.size == 0:
            raise ValueError("the steerable layout has no coefficients")
        if not np.issubdtype(frequencies.dtype, np.integer) or frequencies.min() < 0:
            raise ValueError("angular_frequencies must be non-negative integers")
        sine = sine.astype(bool)
        if np.any(sine & (frequencies == 0)):
            raise ValueError("a coefficient of angular frequency 0 cannot be a sine")
        self.n_features = int(frequencies.size)
        self.zero_columns = np.flatnonzero(frequencies == 0)
        self.cos_columns, self.sin_columns = [], []
        for n in np.unique(frequencies[frequencies > 0]):
            cos = np.flatnonzero((frequencies == n) & ~sine)
            sin = np.flatnonzero((frequencies == n) & sine)
            cos, sin = cos[np.argsort(radial[cos], kind="stable")], sin[np.argsort(radial[sin], kind="stable")]
            if cos.size != sin.size or not np.array_equal(radial[cos], radial[sin]):
                raise ValueError(
                    f"angular frequency {n}: every cos coefficient needs a sin partner of the same radial index "
                    f"({cos.size} cos, {sin.size} sin); keep (cos, sin) pairs whole when truncating the basis"
                )
            self.cos_columns.append(cos)
            self.sin_columns.append(sin)
        sizes = np.array([cos.size for cos in self.cos_columns], dtype=np.int64)
        self.size_groups = []
        for size in np.unique(sizes):
            blocks = np.flatnonzero(sizes == size)
            self.size_groups.append((
                np.stack([self.cos_columns[b] for b in blocks]),
                np.stack([self.sin_columns[b] for b in blocks]),
            ))
        order = [self.zero_columns]
        offsets = []
        for cos, sin in self.size_groups:
            offsets.append(sum(part.size for part in order))
            order.append(np.concatenate([cos, sin], axis=1).ravel())  # block by block: [cos | sin]
        self.block_order = np.concatenate(order).astype(np.int64)
        self.group_offsets = np.array(offsets, dtype=np.int64)


class _Statistics:
    """Responsibility-weighted sufficient statistics of M rotation-invariant Gaussians, accumulated by chunk.

    totals (M,): sum_i r_im. zero_sums (M, n_0): sum_i r_im x_i. zero_moments (M, n_0, n_0):
    sum_i r_im x_i x_i^T. energies (M,): sum_i r_im |y_i|^2. group_moments[g] (M, g, s, s) complex:
    sum_i r_im z_i z_i^H for each block of size group g.

    Sums over images: the statistics of two sets of images merge with ``+`` (chunks of a sort, possibly
    computed on different Dask workers).
    """

    def __init__(self, layout: SteerableLayout, n_components: int):
        self.layout = layout
        n_zero = layout.zero_columns.size
        self.totals = np.zeros(n_components)
        self.zero_sums = np.zeros((n_components, n_zero))
        self.zero_moments = np.zeros((n_components, n_zero, n_zero))
        self.energies = np.zeros(n_components)
        self.group_moments = [
            np.zeros((n_components, *cos.shape, cos.shape[1]), dtype=np.complex128) for cos, _ in layout.size_groups
        ]

    _ARRAYS = ("totals", "zero_sums", "zero_moments", "energies")

    def __add__(self, other: "_Statistics") -> "_Statistics":
        return self._derived(lambda name, mine: mine + getattr(other, name),
                             [mine + theirs for mine, theirs in zip(self.group_moments, other.group_moments)])

    def components(self, indices) -> "_Statistics":
        """The statistics of the components ``indices`` only."""
        return self._derived(lambda name, mine: mine[indices], [moments[indices] for moments in self.group_moments])

    def _derived(self, array, group_moments: list) -> "_Statistics":
        """Statistics with ``array(name, this one's array)`` for each array and the given ``group_moments``."""
        derived = _Statistics.__new__(_Statistics)
        derived.layout = self.layout
        for name in self._ARRAYS:
            setattr(derived, name, array(name, getattr(self, name)))
        derived.group_moments = group_moments
        return derived

    def add(self, rows: np.ndarray, weights: np.ndarray, mean_weights: np.ndarray | None = None,
            total_weights: np.ndarray | None = None) -> None:
        """Add a float64 chunk ``rows`` (c, L) with responsibilities ``weights`` (c, M).

        ``mean_weights`` and ``total_weights`` (c, M), if given, replace ``weights`` in the sums of the rows and in
        the totals: an image of amplitude a (y = a x) enters a component's mean as sum r a y / sum r a^2 and its
        second moment as sum r y y^T / sum r a^2 (see core/contamination.py).
        """
        layout = self.layout
        self.totals += (weights if total_weights is None else total_weights).sum(axis=0)
        self.energies += weights.T @ np.einsum("ij,ij->i", rows, rows)
        zero = rows[:, layout.zero_columns]
        self.zero_sums += (weights if mean_weights is None else mean_weights).T @ zero
        # Second moments as real products: with x = [a | b] (c, 2s) a block's cos and sin columns side by side and
        # G = x^T diag(r) x, sum r z z^H = (G_aa + G_bb) + i (G_ba - G_ab). The rows go in passes of SUB_ROWS, laid
        # out block by block once per pass; each size group's columns are scaled by sqrt(r) just before its
        # product, so that the scaled copy is read from cache.
        roots = np.sqrt(np.maximum(weights, 0.0))
        n_zero = layout.zero_columns.size
        grams = [np.zeros((weights.shape[1], cos.shape[0], 2 * cos.shape[1], 2 * cos.shape[1]))
                 for cos, _ in layout.size_groups]
        for start in range(0, rows.shape[0], SUB_ROWS):
            ordered = rows[start:start + SUB_ROWS][:, layout.block_order]  # (c', L)
            for m in range(weights.shape[1]):
                root = roots[start:start + SUB_ROWS, m, None]
                x = ordered[:, :n_zero] * root
                self.zero_moments[m] += x.T @ x
                for (cos, _), offset, gram in zip(layout.size_groups, layout.group_offsets, grams):
                    n_blocks, width = cos.shape[0], 2 * cos.shape[1]
                    scaled = ordered[:, offset:offset + n_blocks * width] * root
                    blocks = scaled.reshape(-1, n_blocks, width).transpose(1, 0, 2)  # (g, c', 2s)
                    gram[m] += np.matmul(blocks.transpose(0, 2, 1), blocks)  # (g, 2s, 2s): a GEMM per block
        for (cos, _), gram, moments in zip(layout.size_groups, grams, self.group_moments):
            s = cos.shape[1]
            moments += gram[..., :s, :s] + gram[..., s:, s:] + 1j * (gram[..., s:, :s] - gram[..., :s, s:])


class SteerableMixturePPCA(MixtureEM):
    """Mixture of M probabilistic PCA models whose subspaces are closed under in-plane rotation.

    Same interface as :class:`~napari_ppcasort.core.mppca.MixturePPCA` (``initialize``, ``step``, ``fit``,
    ``score_samples``, ``predict_proba``, ``parameters``), so that
    :class:`~napari_ppcasort.core.sorting.OnlineSorter` runs it unchanged. The data are (N, L)
    coefficients in a steerable basis whose layout is given here.

    Parameters
    ----------
    angular_frequencies, is_sine, radial_indices : (L,) arrays describing the basis (see
        :class:`SteerableLayout`); for a PSWFBasis ``b``: ``b.angular_frequencies, b.is_sine, b.radial_indices``.
    n_components : int
        M, the number of subspaces.
    n_dims : int
        K, the real dimension of each subspace (a rotation-closed plane counts 2).
    noise, max_iter, tol, random_state, init_sample_size, chunk_bytes : as for
        :class:`~napari_ppcasort.core.mixture.MixtureEM`.

    Attributes
    ----------
    layout : SteerableLayout.
    means_ : (M, L) float64, zero outside the N = 0 columns.
    axes_ : (M, K, L) float64, orthonormal rotation-closed axes of each subspace.
    variances_ : (M, K) float64, variance along each axis (>= the noise variance).
    components_ : (M, K, L) float64, loadings W_m^T = sqrt(variances - noise) * axes.
    noise_variance_ : (M,) float64.
    weights_ : (M,) float64.
    log_likelihood_ : list of float, mean log-likelihood per sample before each EM iteration.
    n_iter_ : int, EM iterations done.
    n_reseeded_ : int, number of times a collapsed component was re-seeded.
    """

    def __init__(
        self,
        angular_frequencies,
        is_sine,
        radial_indices,
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
        self.layout = SteerableLayout(angular_frequencies, is_sine, radial_indices)
        super().__init__(n_components, n_dims, noise=noise, max_iter=max_iter, tol=tol, random_state=random_state,
                         init_sample_size=init_sample_size, chunk_bytes=chunk_bytes)

    def _check_features(self, n_features: int, *, fitting: bool) -> None:
        layout = self.layout
        if n_features != layout.n_features:
            raise ValueError(f"data has {n_features} features but the steerable basis has {layout.n_features} coefficients")
        if self.n_dims >= layout.n_features:
            raise ValueError(
                f"n_dims ({self.n_dims}) must be smaller than the number of coefficients ({layout.n_features})"
            )
        if self.n_dims % 2 and layout.zero_columns.size == 0:
            raise ValueError(
                f"n_dims ({self.n_dims}) is odd but the basis has no angular-frequency-0 coefficient: a "
                "rotation-closed subspace of odd dimension needs one; use an even n_dims"
            )

    # ------------------------------------------------------------------ public API
    @property
    def components_(self) -> np.ndarray:
        scales = np.sqrt(np.maximum(self.variances_ - self.noise_variance_[:, None], 0.0))
        return scales[:, :, None] * self.axes_

    def _set_from_clusters(self, sample: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        """An M-step with each image of ``sample`` (n, L) given wholly to its cluster."""
        m_count, k, n_features = self.n_components, self.n_dims, self.layout.n_features
        self.means_ = np.zeros((m_count, n_features))
        self.axes_ = np.zeros((m_count, k, n_features))
        self.variances_ = np.ones((m_count, k))
        self.noise_variance_ = np.ones(m_count)
        self.weights_ = np.full(m_count, 1.0 / m_count)
        statistics = _Statistics(self.layout, m_count)
        statistics.add(sample, np.eye(m_count)[labels])
        self._maximize(statistics, np.ones(m_count, dtype=bool))

    def expectation(self, rows: np.ndarray) -> EStep:
        """The E-step over a float64 chunk ``rows`` (c, L): block statistics of the responsibilities."""
        log_dens = self._log_densities(rows)
        log_norm = logsumexp_rows(log_dens)
        statistics = _Statistics(self.layout, self.n_components)
        statistics.add(rows, np.exp(log_dens - log_norm[:, None]))
        return EStep(statistics, statistics.totals.copy(), float(log_norm.sum()), rows.shape[0])

    def maximization(self, statistics: EStep, data: Chunks) -> None:
        """The exact M-step; a component left with fewer than K + 1 images' worth of responsibility is re-seeded
        on a random subset of ``data``."""
        healthy = statistics.moments.totals >= self.n_dims + 1
        self._maximize(statistics.moments, healthy)
        if not healthy.all():
            self._reseed(data, np.flatnonzero(~healthy))

    def log_densities(self, data) -> np.ndarray:
        """log pi_m + log N(y_i | mu_m, C_m) for each row of ``data`` (N, L) and component, shape (N, M)."""
        data = self._check_data(data, fitting=False)
        out = np.empty((data.shape[0], self.n_components))
        for start, rows in self._chunks(data):
            out[start : start + rows.shape[0]] = self._log_densities(rows)
        return out

    def parameters(self) -> SteerableParameters:
        """A copy of the current parameters."""
        return SteerableParameters(
            means=self.means_.copy(),
            components=self.components_,
            weights=self.weights_.copy(),
            noise_variance=self.noise_variance_.copy(),
            axes=self.axes_.copy(),
            variances=self.variances_.copy(),
        )

    # ------------------------------------------------------------------ internals
    def _clustering_features(self, rows: np.ndarray) -> np.ndarray:
        """(n, n_0 + sum_N n_N) rotation-invariant features of ``rows`` (n, L): the N = 0 coefficients and the
        moduli |z| of the others, so that the initial clusters group views, not in-plane orientations."""
        layout = self.layout
        parts = [rows[:, layout.zero_columns]]
        parts += [np.hypot(rows[:, cos], rows[:, sin]) for cos, sin in zip(layout.cos_columns, layout.sin_columns)]
        return np.concatenate(parts, axis=1)

    def _log_densities(self, rows: np.ndarray) -> np.ndarray:
        """log pi_m + log N(y | mu_m, C_m) for a float64 chunk (c, L) -> (c, M)."""
        m_count, k = self.n_components, self.n_dims
        n_features = rows.shape[1]
        projections = (rows @ self.axes_.reshape(m_count * k, n_features).T).reshape(-1, m_count, k)
        projections -= np.einsum("mkl,ml->mk", self.axes_, self.means_)[None]
        sq_dist = (
            np.einsum("ij,ij->i", rows, rows)[:, None] - 2.0 * rows @ self.means_.T
            + np.einsum("ml,ml->m", self.means_, self.means_)[None]
        )
        squared = projections**2
        in_subspace = squared.sum(axis=2)
        # Mahalanobis distance: sum_j p_j^2 / lambda_j + (|y - mu|^2 - sum_j p_j^2) / sigma^2
        mahalanobis = np.einsum("imk,mk->im", squared, 1.0 / self.variances_)
        mahalanobis += np.maximum(sq_dist - in_subspace, 0.0) / self.noise_variance_[None]
        log_det = np.log(self.variances_).sum(axis=1) + (n_features - k) * np.log(self.noise_variance_)
        return np.log(self.weights_)[None] - 0.5 * (n_features * _LOG_2PI + log_det[None] + mahalanobis)

    def _maximize(self, statistics: _Statistics, update: np.ndarray) -> None:
        """Exact M-step from the statistics; only the components with ``update`` (M,) True change."""
        layout = self.layout
        n_features, k = layout.n_features, self.n_dims
        totals = statistics.totals
        safe = np.maximum(totals, 1e-300)
        zero_means = statistics.zero_sums / safe[:, None]
        # trace of the weighted covariance: mean squared distance to the mean
        traces = statistics.energies / safe - np.einsum("ml,ml->m", zero_means, zero_means)
        axes, variances = self.axes_.copy(), self.variances_.copy()
        residual = self.noise_variance_.copy()
        for m in np.flatnonzero(update):
            zero_covariance = statistics.zero_moments[m] / safe[m] - np.outer(zero_means[m], zero_means[m])
            group_covariances = [moments[m] / safe[m] for moments in statistics.group_moments]
            axes[m], variances[m] = self._top_axes(zero_covariance, group_covariances)
            residual[m] = max(traces[m] - variances[m].sum(), 0.0) / (n_features - k)
        weights = totals / max(totals.sum(), 1e-300)
        if self.noise == "shared":
            residual[update] = np.sum(weights[update] * residual[update]) / max(weights[update].sum(), 1e-300)
        floor = 1e-10 * max(float(np.max(traces[update])) / n_features, 1e-300)
        residual = np.where(update, np.maximum(residual, floor), residual)
        self.means_[update] = 0.0
        self.means_[np.ix_(update, layout.zero_columns)] = zero_means[update]
        self.axes_ = axes
        self.variances_ = np.where(update[:, None], np.maximum(variances, residual[:, None]), variances)
        self.noise_variance_ = residual
        self.weights_ = np.where(update, weights, self.weights_)
        self.weights_ = self.weights_ / self.weights_.sum()

    def _top_axes(self, zero_covariance: np.ndarray, group_covariances: list) -> tuple[np.ndarray, np.ndarray]:
        """The K leading rotation-closed axes of a block-diagonal covariance, and their variances.

        zero_covariance (n_0, n_0) real; group_covariances[g] (g, s, s) Hermitian, E[z z^H] of the blocks
        of size group g. A block eigenvalue kappa is a plane of two axes of variance kappa / 2. N = 0 axes
        and planes are taken by decreasing variance while they fit in K dimensions; if that ends one
        dimension short with no N = 0 axis left, the weakest N = 0 axis taken is traded for the next plane.
        """
        layout = self.layout
        values, vectors = np.linalg.eigh(zero_covariance)
        # every candidate direction: its variance, size group (-1 for N = 0), block within the group, column
        variance, group = [values], [np.full(values.size, -1)]
        block, column = [np.zeros(values.size, dtype=np.int64)], [np.arange(values.size)]
        group_vectors = []
        for g, covariances in enumerate(group_covariances):
            block_values, block_vectors = np.linalg.eigh(covariances)  # (g, s), (g, s, s)
            group_vectors.append(block_vectors)
            n_blocks, size = block_values.shape
            variance.append(block_values.ravel() / 2.0)
            group.append(np.full(block_values.size, g))
            block.append(np.repeat(np.arange(n_blocks), size))
            column.append(np.tile(np.arange(size), n_blocks))
        variance, group, block, column = (np.concatenate(parts) for parts in (variance, group, block, column))
        order = np.argsort(-variance, kind="stable")
        dims = np.where(group < 0, 1, 2)
        taken, filled = [], 0
        for index in order:
            if filled + dims[index] <= self.n_dims:
                taken.append(index)
                filled += dims[index]
                if filled == self.n_dims:
                    break
        if filled < self.n_dims:
            # one dimension short and no N = 0 axis left: trade the weakest N = 0 axis for the next plane
            spare_planes = [i for i in order if group[i] >= 0 and i not in taken]
            taken.remove(max((i for i in taken if group[i] < 0), key=lambda i: -variance[i]))
            taken.append(spare_planes[0])
        taken.sort(key=lambda i: -variance[i])
        axes = np.zeros((self.n_dims, layout.n_features))
        chosen = np.zeros(self.n_dims)
        row = 0
        for index in taken:
            g = group[index]
            if g < 0:
                axes[row, layout.zero_columns] = vectors[:, column[index]]
                chosen[row] = variance[index]
                row += 1
            else:
                cos, sin = layout.size_groups[g]
                u = group_vectors[g][block[index], :, column[index]]
                cos, sin = cos[block[index]], sin[block[index]]
                # Re(u^H z) = Re(u) . a + Im(u) . b ;  Im(u^H z) = -Im(u) . a + Re(u) . b
                axes[row, cos], axes[row, sin] = u.real, u.imag
                axes[row + 1, cos], axes[row + 1, sin] = -u.imag, u.real
                chosen[row : row + 2] = variance[index]
                row += 2
        return axes, chosen

    def _reseed(self, data: Chunks, collapsed: np.ndarray) -> None:
        """Restart each collapsed component as the ML model of a random subset of the data (its statistics
        summed over the chunks, where the rows are)."""
        seed = None if self.random_state is None else self.random_state + 7919 * (self.n_iter_ + 1)
        rng = np.random.default_rng(seed)
        n_samples = data.n_rows
        for m in collapsed:
            size = min(n_samples, max(self.n_dims + 2, n_samples // (4 * self.n_components)))
            rows = np.sort(rng.choice(n_samples, size=size, replace=False))
            statistics = data.reduce(component_statistics, self.layout, self.n_components, rows, int(m))
            only = np.arange(self.n_components) == m
            weights = self.weights_.copy()
            self._maximize(statistics, only)
            weights[m] = 1.0 / self.n_components
            self.weights_ = weights / weights.sum()
            self.n_reseeded_ += 1


def component_statistics(rows: np.ndarray, offset: int, layout: SteerableLayout, n_components: int,
                         positions: np.ndarray, component: int) -> _Statistics:
    """The statistics of the rows at ``positions`` (ascending, among all kept rows) that fall in this chunk
    (rows (c, L) from kept row ``offset`` on), each given wholly to ``component`` (a Chunks.reduce function)."""
    local = positions[(positions >= offset) & (positions < offset + rows.shape[0])] - offset
    statistics = _Statistics(layout, n_components)
    weights = np.zeros((local.size, n_components))
    weights[:, component] = 1.0
    statistics.add(rows[local], weights)
    return statistics


def _evidence_directions(parameters: MixtureParameters) -> np.ndarray:
    """C_m^-1 mu_m / sqrt(mu_m^T C_m^-1 mu_m) for each component, (M, L).

    C_m = W_m W_m^T + sigma_m^2 I, inverted by Woodbury: C^-1 v = (v - W (sigma^2 I + W^T W)^-1 W^T v) / sigma^2.
    """
    directions = np.empty_like(parameters.means)
    for m, (mean, w_t, sigma2) in enumerate(zip(parameters.means, parameters.components, parameters.noise_variance)):
        inner = sigma2 * np.eye(w_t.shape[0]) + w_t @ w_t.T
        whitened = (mean - w_t.T @ linalg.solve(inner, w_t @ mean, assume_a="pos")) / sigma2
        directions[m] = whitened / max(np.sqrt(max(mean @ whitened, 0.0)), np.finfo(np.float64).tiny)
    return directions


def mean_evidence(parameters: MixtureParameters, data) -> np.ndarray:
    """Evidence that each row of ``data`` (N, L) carries each component's mean, in standard deviations, (N, M).

    t_m(y) = mu_m^T C_m^-1 y / sqrt(mu_m^T C_m^-1 mu_m), the whitened correlation of y with the mean of
    component m (C_m = W_m W_m^T + sigma_m^2 I). If y ~ N(0, C_m) (no mean), t_m ~ N(0, 1); if
    y ~ N(mu_m, C_m), t_m ~ N(d_m, 1) with d_m^2 = mu_m^T C_m^-1 mu_m, and
    t_m d_m - d_m^2 / 2 = log N(y | mu_m, C_m) - log N(y | 0, C_m). Works for any mixture of PPCA
    parameters (means, components, noise_variance).
    """
    directions = _evidence_directions(parameters)
    data = data if isinstance(data, np.memmap) else np.asarray(data)
    out = np.empty((data.shape[0], directions.shape[0]))
    step = max(1, DEFAULT_CHUNK_BYTES // (8 * max(data.shape[1], 1)))
    for start in range(0, data.shape[0], step):
        out[start : start + step] = np.asarray(data[start : start + step], dtype=np.float64) @ directions.T
    return out


@dataclass(frozen=True)
class MeanEvidenceScore:
    """Junk score: minus the evidence that an image carries both its own class's mean and the population's.

        score_i = -min(sum_m p(m | y_i) t_m(y_i), sum_m pi_m t_m(y_i))   (standard deviations; larger = junk)

    with t_m the evidences of :func:`mean_evidence`, weighted by the responsibilities (the image's own
    class) and by the mixing weights (a class drawn from the population). The image must carry both (an
    intersection-union test): the first term rejects images without their class's signal (noise,
    contamination unlike every class), the second the members of a junk class the mixture has learned (a
    coherent group of contaminants carries its own class mean, not those of the particle classes, which
    dominate the population; particle classes share the particle's profile and vouch for each other).
    With :class:`SteerableMixturePPCA` the means are rotational averages and the score is exactly invariant
    under in-plane rotation. Any model with ``parameters()`` and ``predict_proba(data)`` can be scored.
    """

    def __call__(self, model, data) -> np.ndarray:
        parameters = model.parameters()
        evidence = mean_evidence(parameters, data)
        own_class = np.einsum("im,im->i", model.predict_proba(data), evidence)
        return -np.minimum(own_class, evidence @ parameters.weights)

"""Mixture of probabilistic PCA models fitted by EM (Tipping & Bishop 1999).

Each of the M components models a vector y in R^L as

    y = W_m x + mu_m + eps,    x ~ N(0, I_K),    eps ~ N(0, sigma_m^2 I_L),

so that y ~ N(mu_m, C_m) with C_m = W_m W_m^T + sigma_m^2 I_L. All products with C_m go through the
K x K matrix S_m = W_m^T W_m + sigma_m^2 I_K (Woodbury identity and the matrix determinant lemma):

    C_m^{-1}     = (I - W_m S_m^{-1} W_m^T) / sigma_m^2
    log det C_m  = (L - K) log sigma_m^2 + log det S_m

One EM iteration reads the data once, in row chunks converted to float64: each chunk gives P = Y W
(c x MK), the responsibilities R (in the log domain), and the sums the M-step needs (:class:`_Sums`):
sum_i r_im, sum_i r_im y_i, sum_i r_im |y_i|^2, sum_i r_im y_i p_im^T and sum_i r_im p_im. They merge
with ``+`` over chunks (and over Dask workers). The M-step gets S_m W_m from them, centred on the new mean
(sum_i r_im (y_i - mu)(p_im - W^T mu)^T = sum r y p^T - (sum r y)(W^T mu)^T - mu (sum r p - T W^T mu)^T),
without ever forming an L x L matrix (S_m is the responsibility-weighted sample covariance). Time
O(N L M K), memory O(L M K) beyond one chunk, and an L x L array is never built.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from .chunks import Chunks
from .mixture import EStep, MixtureEM, MixtureParameters, logsumexp_rows

__all__ = ["MixturePPCA"]

_LOG_2PI = np.log(2.0 * np.pi)


class MixturePPCA(MixtureEM):
    """Mixture of M probabilistic PCA models of dimension K each, fitted by EM.

    Parameters: those of :class:`~napari_ppcasort.core.mixture.MixtureEM` (n_components M, n_dims K,
    noise, max_iter, tol, random_state, init_sample_size, chunk_bytes); M * K must be smaller than the
    data dimension L. The initialisation is k-means++ seeding on a sample, Lloyd iterations and a PCA
    per cluster.

    Attributes
    ----------
    means_ : (M, L) float64
    components_ : (M, K, L) float64, W_m transposed.
    weights_ : (M,) float64
    noise_variance_ : (M,) float64
    log_likelihood_ : list of float, mean log-likelihood per sample before each EM iteration.
    n_iter_ : int, EM iterations done.
    n_reseeded_ : int, number of times a collapsed component was re-seeded.
    """

    def _check_features(self, n_features: int, *, fitting: bool) -> None:
        m, k = self.n_components, self.n_dims
        if fitting and m * k >= n_features:
            raise ValueError(
                f"n_components * n_dims = {m} * {k} = {m * k} must be smaller than the number of "
                f"features ({n_features}): use fewer or smaller subspaces, or more basis coefficients"
            )
        if not fitting and hasattr(self, "means_") and n_features != self.means_.shape[1]:
            raise ValueError(f"data has {n_features} features but the model was fitted on {self.means_.shape[1]}")

    # ------------------------------------------------------------------ EM
    def expectation(self, rows: np.ndarray) -> EStep:
        """The E-step over a float64 chunk ``rows`` (c, L): the sums of :class:`_Sums`."""
        m_count, k = self.n_components, self.n_dims
        loadings = self.components_.transpose(0, 2, 1)  # (M, L, K)
        stacked = loadings.transpose(1, 0, 2).reshape(rows.shape[1], m_count * k)  # (L, M*K)
        projections = rows @ stacked
        sq_norms = np.einsum("ij,ij->i", rows, rows)
        log_dens = self._log_densities(rows, sq_norms, projections)
        log_norm = logsumexp_rows(log_dens)
        resp = np.exp(log_dens - log_norm[:, None])
        weighted_proj = (projections.reshape(-1, m_count, k) * resp[:, :, None]).reshape(-1, m_count * k)
        sums = _Sums(
            totals=resp.sum(axis=0),
            weighted_sum=(rows.T @ resp).T,  # as (L, c) @ (c, M): OpenBLAS is slow on the (M, c) @ (c, L) form
            weighted_sq_norm=sq_norms @ resp,
            cross=rows.T @ weighted_proj,
            weighted_proj_sum=weighted_proj.sum(axis=0),
        )
        return EStep(sums, sums.totals.copy(), float(log_norm.sum()), rows.shape[0])

    def maximization(self, statistics: EStep, data: Chunks) -> None:
        """The M-step of Tipping & Bishop (1999, eq. 29) from the summed E-step; collapsed components (less
        than K + 1 images' worth of responsibility) are re-seeded from ``data``."""
        sums = statistics.moments
        n_samples = statistics.n_samples
        n_features = sums.weighted_sum.shape[1]
        m_count, k = self.n_components, self.n_dims
        loadings = self.components_.transpose(0, 2, 1)  # (M, L, K)
        totals = sums.totals  # N_m
        collapsed = totals < (k + 1)
        safe_totals = np.where(collapsed, 1.0, totals)
        new_means = sums.weighted_sum / safe_totals[:, None]
        # S_m W_m = (1/N_m) sum_i R_im (y_i - mu_m)(p_im - W_m^T mu_m)^T, from the uncentred sums
        mean_proj = np.einsum("ml,mlk->mk", new_means, loadings)  # W_m^T mu_m, (M, K)
        cross = sums.cross.reshape(n_features, m_count, k).transpose(1, 0, 2)  # (M, L, K)
        cross = cross - sums.weighted_sum[:, :, None] * mean_proj[:, None, :]
        weighted_proj_sum = sums.weighted_proj_sum.reshape(m_count, k) - totals[:, None] * mean_proj
        cov_loadings = (cross - new_means[:, :, None] * weighted_proj_sum[:, None, :]) / safe_totals[:, None, None]
        # trace(S_m) = (1/N_m) sum_i R_im |y_i - mu_m|^2
        cov_traces = sums.weighted_sq_norm / safe_totals - np.einsum("ml,ml->m", new_means, new_means)

        new_loadings = np.empty_like(loadings)
        residual_variance = np.empty(m_count)
        for m in range(m_count):
            sigma2 = self.noise_variance_[m]
            inner = loadings[m].T @ loadings[m] + sigma2 * np.eye(k)  # K x K
            inner_chol = linalg.cho_factor(inner, check_finite=False)
            inner_inv_wtsw = linalg.cho_solve(inner_chol, loadings[m].T @ cov_loadings[m], check_finite=False)
            # W_new = S W (sigma^2 I + M^-1 W^T S W)^-1  (Tipping & Bishop 1999, eq. 29)
            new_loadings[m] = linalg.solve((sigma2 * np.eye(k) + inner_inv_wtsw).T, cov_loadings[m].T).T
            # sigma^2_new = (1/L) tr(S - S W M^-1 W_new^T)
            explained = np.trace(linalg.cho_solve(inner_chol, new_loadings[m].T @ cov_loadings[m], check_finite=False))
            residual_variance[m] = (cov_traces[m] - explained) / n_features

        new_weights = totals / n_samples
        floor = 1e-10 * max(float(np.max(cov_traces)) / n_features, 1e-300)
        if self.noise == "shared":
            valid = ~collapsed
            pooled = np.sum(new_weights[valid] * residual_variance[valid]) / max(new_weights[valid].sum(), 1e-300)
            residual_variance[:] = pooled
        residual_variance = np.maximum(residual_variance, floor)

        self.means_ = np.where(collapsed[:, None], self.means_, new_means)
        self.components_ = np.where(collapsed[:, None, None], self.components_, new_loadings.transpose(0, 2, 1))
        self.noise_variance_ = np.where(collapsed, self.noise_variance_, residual_variance)
        self.weights_ = new_weights
        if collapsed.any():
            self._reseed(data, np.flatnonzero(collapsed))
        self.weights_ = self.weights_ / self.weights_.sum()

    def parameters(self) -> MixtureParameters:
        """A copy of the current parameters."""
        return MixtureParameters(
            means=self.means_.copy(),
            components=self.components_.copy(),
            weights=self.weights_.copy(),
            noise_variance=self.noise_variance_.copy(),
        )

    # ------------------------------------------------------------------ internals
    def log_densities(self, data) -> np.ndarray:
        """log pi_m + log N(y_i | mu_m, C_m) for each row of ``data`` (N, L) and component, shape (N, M)."""
        data = self._check_data(data, fitting=False)
        stacked = self.components_.transpose(2, 0, 1).reshape(data.shape[1], -1)
        out = np.empty((data.shape[0], self.n_components))
        for start, rows in self._chunks(data):
            sq_norms = np.einsum("ij,ij->i", rows, rows)
            out[start : start + rows.shape[0]] = self._log_densities(rows, sq_norms, rows @ stacked)
        return out

    def _log_densities(self, rows: np.ndarray, sq_norms: np.ndarray, projections: np.ndarray) -> np.ndarray:
        """log pi_m + log N(y_i | mu_m, C_m) for a chunk.

        rows (c, L); sq_norms (c,) their squared norms; projections = rows @ W_all, (c, M*K).
        """
        n_features = rows.shape[1]
        k = self.n_dims
        mean_dots = rows @ self.means_.T  # (c, M)
        out = np.empty((rows.shape[0], self.n_components))
        for m in range(self.n_components):
            loadings_t = self.components_[m]  # (K, L)
            sigma2 = self.noise_variance_[m]
            inner = loadings_t @ loadings_t.T + sigma2 * np.eye(k)
            chol = linalg.cholesky(inner, lower=True, check_finite=False)
            centred = projections[:, m * k : (m + 1) * k] - loadings_t @ self.means_[m]  # W^T (y - mu)
            whitened = linalg.solve_triangular(chol, centred.T, lower=True, check_finite=False)  # L^-1 W^T d
            sq_dist = sq_norms - 2.0 * mean_dots[:, m] + self.means_[m] @ self.means_[m]
            mahalanobis = np.maximum(sq_dist - np.einsum("ki,ki->i", whitened, whitened), 0.0) / sigma2
            log_det = (n_features - k) * np.log(sigma2) + 2.0 * np.log(np.diag(chol)).sum()
            out[:, m] = np.log(self.weights_[m]) - 0.5 * (n_features * _LOG_2PI + log_det + mahalanobis)
        return out

    def _set_from_clusters(self, sample: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        """Maximum-likelihood PPCA of each cluster (Tipping & Bishop 1999, eq. 7-8)."""
        m_count, k = self.n_components, self.n_dims
        n_features = sample.shape[1]
        self.means_ = np.empty((m_count, n_features))
        self.components_ = np.empty((m_count, k, n_features))
        self.noise_variance_ = np.empty(m_count)
        self.weights_ = np.empty(m_count)
        for m in range(m_count):
            members = sample[labels == m]
            self.means_[m], self.components_[m], self.noise_variance_[m] = _ppca_fit(members, k, rng)
            self.weights_[m] = members.shape[0]
        self.weights_ /= self.weights_.sum()
        if self.noise == "shared":
            self.noise_variance_[:] = self.weights_ @ self.noise_variance_

    def _reseed(self, data: Chunks, collapsed: np.ndarray) -> None:
        """Restart collapsed components on the samples the other components explain worst (of a set of at most
        ``init_sample_size``; a random sample of a larger one)."""
        rng = np.random.default_rng(None if self.random_state is None else self.random_state + 7919 * (self.n_iter_ + 1))
        n_samples = data.n_rows
        log_lik = data.concat(_log_likelihoods, self.expectation_state()) if n_samples <= self.init_sample_size else None
        for m in collapsed:
            if log_lik is not None:
                candidates = np.argsort(log_lik)[: max(self.n_dims + 2, n_samples // (4 * self.n_components))]
            else:
                candidates = rng.choice(n_samples, size=min(n_samples, self.init_sample_size), replace=False)
            members = data.take(np.sort(candidates))
            self.means_[m], self.components_[m], sigma2 = _ppca_fit(members, self.n_dims, rng)
            self.noise_variance_[m] = self.noise_variance_[m] if self.noise == "shared" else sigma2
            self.weights_[m] = 1.0 / self.n_components
            self.n_reseeded_ += 1


class _Sums:
    """The sums of one E-step of :class:`MixturePPCA` over some images (p = W^T y with the loadings of the E-step):

    totals (M,): sum_i r_im. weighted_sum (M, L): sum_i r_im y_i. weighted_sq_norm (M,): sum_i r_im |y_i|^2.
    cross (L, M*K): sum_i y_i (r_im p_im)^T. weighted_proj_sum (M*K,): sum_i r_im p_im. ``+`` merges.
    """

    def __init__(self, totals, weighted_sum, weighted_sq_norm, cross, weighted_proj_sum):
        self.totals, self.weighted_sum, self.weighted_sq_norm = totals, weighted_sum, weighted_sq_norm
        self.cross, self.weighted_proj_sum = cross, weighted_proj_sum

    def __add__(self, other: "_Sums") -> "_Sums":
        return _Sums(*(getattr(self, name) + getattr(other, name)
                       for name in ("totals", "weighted_sum", "weighted_sq_norm", "cross", "weighted_proj_sum")))


def _log_likelihoods(rows: np.ndarray, offset: int, model: MixturePPCA) -> np.ndarray:
    """(c,) log p(y_i) of a chunk of rows (c, L) (a Chunks.concat function)."""
    return model.score_samples(rows)


def _ppca_fit(members: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """ML PPCA of ``members`` (n, L): mean (L,), loadings W^T (K, L), noise variance."""
    n, n_features = members.shape
    mean = members.mean(axis=0)
    centred = members - mean
    total_variance = float(np.einsum("ij,ij->", centred, centred)) / max(n, 1)
    if n > k:
        _, singular, vt = _randomized_svd(centred, k, rng)
        eigenvalues = singular**2 / n
    else:  # too few points: random orientation, isotropic variance
        vt = np.linalg.qr(rng.standard_normal((n_features, k)))[0].T
        eigenvalues = np.full(k, total_variance / n_features)
    sigma2 = max((total_variance - eigenvalues.sum()) / (n_features - k), 1e-12 * max(total_variance, 1e-300))
    scales = np.sqrt(np.maximum(eigenvalues - sigma2, 1e-3 * sigma2))
    return mean, scales[:, None] * vt, sigma2


def _randomized_svd(matrix: np.ndarray, rank: int, rng: np.random.Generator, n_oversamples: int = 10, n_iter: int = 4):
    """Top ``rank`` singular triplets of ``matrix`` (n, L) by a randomized range finder (Halko et al. 2011)."""
    n, n_features = matrix.shape
    width = min(rank + n_oversamples, n, n_features)
    basis = matrix @ rng.standard_normal((n_features, width))
    for _ in range(n_iter):
        basis, _ = np.linalg.qr(basis)
        basis, _ = np.linalg.qr(matrix.T @ basis)
        basis = matrix @ basis
    basis, _ = np.linalg.qr(basis)
    u_small, singular, vt = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], singular[:rank], vt[:rank]

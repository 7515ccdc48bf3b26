"""The contamination model: rotation-closed particle subspaces plus explicit junk components, and the junk probability.

Picked boxes hold particles and junk. The paper models the particles as a union of subspaces and lets junk
"lie off them"; here junk is modelled too, by three kinds of component that each explain a kind of pick the
particle subspaces cannot (all rotation-invariant, like the particle subspaces of
:class:`~napari_ppcasort.core.steerable.SteerableMixturePPCA`, on whitened coefficients):

* ``particle`` (M of them): a rotation-closed probabilistic PCA, y ~ N(mu_m, W_m W_m^T + sigma^2 I): a class
  of particle views with its rotational average and its K-dimensional variability.
* ``outlier`` (one per particle class): the class's *contaminated* twin (a contaminated normal, Aitkin and
  Wilson 1980; Punzo and McNicholas 2016), y ~ N(mu_m, eta W_m W_m^T + sigma^2 I): the same kind of image
  with ``eta`` times the signal variance, which is what an aggregate of particles or a particle with
  something on it looks like next to a clean particle. It has no parameters of its own but its weight.
* ``noise`` (one): y ~ N(0, s^2 I), an empty box: the noise alone (s^2 the mean squared coefficient of its
  members: about 1 on whitened, noise-normalised images).
* ``background`` (J of them): a stationary Gaussian (translation- and rotation-invariant), y ~ N(0, S_j)
  with S_j the coefficient covariance of an image with radial power spectrum sum_l theta_jl phi_l(|k|)
  (phi_l triangular bands of spatial frequency, theta_jl >= 0): structure of a given spectrum anywhere in
  the box, which is what ice, carbon and other contamination are, and what a centred particle is not.

The junk probability of an image is the posterior mass of the junk components,
P(junk | y) = sum_{c junk} pi_c N_c(y) / sum_c pi_c N_c(y), and its score is the log-odds
log P(junk | y) - log P(particle | y) (0 at even odds, larger = more junk-like). The mixing weights pi
estimate how much of each there is, so the cut at P = 1/2 needs no junk fraction from the user.

EM. One pass over the data per iteration: the E-step evaluates every component's log-density per chunk;
the sufficient statistics are those of the particle model (responsibility-weighted sums and block second
moments, core/steerable.py) for the particle and background components together; the M-step fits the
particle classes exactly as SteerableMixturePPCA does, and each background component's spectrum theta_j by
the method of moments, non-negative least squares on E[y^T G_l y] = sum_m theta_m tr(G_l G_m) with G_l the
coefficient covariance of band l (block-diagonal by angular frequency, computed once from the basis). The
noise component shares the particle classes' sigma^2.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.optimize

from .chunks import Chunks
from .mixture import DEFAULT_CHUNK_BYTES, EStep, kmeans_labels, logsumexp_rows
from .tables import cached_tables
from .steerable import _LOG_2PI, SteerableMixturePPCA, SteerableParameters, _Statistics

__all__ = ["COMPONENT_KINDS", "ContaminationMixture", "ContaminationParameters", "JunkLogOdds", "BackgroundBands"]

#: The kinds of component, in the order of the columns of ``log_densities`` and ``predict_proba``.
COMPONENT_KINDS = ("particle", "outlier", "noise", "background")
#: Kinds that are junk.
JUNK_KINDS = ("outlier", "noise", "background")
#: A particle class whose mean (its rotational average) carries less than this fraction of the energy of a
#: typical class's mean (the median over the classes, weighted by their sizes) is a class of junk: every view of
#: a particle carries the particle's mass in the same circle, so the rotational averages of true classes carry
#: comparable energy, while a class of empty or off-centre boxes has a mean near 0.
MIN_MEAN_ENERGY_FRACTION = 0.25
#: Spatial-frequency bands of the background spectra.
N_BANDS = 10
_LOG_PI = np.log(np.pi)
#: Rows per pass of the background densities: the block-ordered rows and their whitened copies (2.4 MB at L = 299,
#: J = 3) stay in cache, and every product of a pass stays below the size at which OpenBLAS starts a second thread
#: (measured against passes of 512 to 4,096 rows: docs/scaling.md).
DENSITY_ROWS = 256


@dataclass(frozen=True)
class ContaminationParameters(SteerableParameters):
    """Parameters of a :class:`ContaminationMixture` (copies).

    The SteerableParameters fields (means, components, weights, noise_variance, axes, variances) describe the
    M particle classes, with ``weights`` their shares among the particles. Besides:

    component_kinds: (C,) the kind of every component, in the order of ``predict_proba``'s columns.
    junk_classes: the particle classes (and so their outlier twins) found to hold junk (a mean without energy,
        see MIN_MEAN_ENERGY_FRACTION).
    component_weights: (C,) the mixing weight of every component (summing to 1): the share of the images it
        explains; ``component_weights[component_kinds != 'particle'].sum()`` is the estimated junk fraction.
    background_spectra: (J, n_bands) the background components' band powers theta.
    outlier_inflation: eta, the signal-variance factor of the outlier twins.
    """

    component_kinds: tuple = ()
    junk_classes: tuple = ()
    component_weights: np.ndarray = None
    background_spectra: np.ndarray = None
    outlier_inflation: float = 1.0

    @property
    def component_means(self) -> np.ndarray:
        """(C, L) the mean of every component: an outlier twin has its particle class's mean, the noise and the
        background components have mean zero."""
        kinds = np.array(self.component_kinds)
        means = np.zeros((kinds.size, self.means.shape[1]), dtype=self.means.dtype)
        means[kinds == "particle"] = self.means
        if (kinds == "outlier").any():
            means[kinds == "outlier"] = self.means
        return means

    @property
    def junk_components(self) -> np.ndarray:
        """(C,) bool, the components that model junk: the junk kinds and the junk classes with their twins."""
        kinds = np.array(self.component_kinds)
        return _junk_components(kinds, self.junk_classes)

    @property
    def junk_fraction(self) -> float:
        """The estimated fraction of junk among the images the model was fitted on."""
        return float(self.component_weights[self.junk_components].sum())


class BackgroundBands:
    """The coefficient covariances G_l of stationary noise in each band l of spatial frequency, for one basis.

    G_l = B^T C_l B, with B the basis (pixels x L) and C_l the covariance of stationary noise whose power
    spectrum is the triangular band phi_l(|k|) (a partition of unity on [0, k_max]: white noise of variance
    s^2 is sum_l s^2 G_l = s^2 B^T B = s^2 I). Kept as the diagonal blocks of each angular frequency, as
    :class:`_Statistics` holds the data: ``zero`` (n_bands, n_0, n_0) real and ``groups[g]`` (n_bands, g, s, s)
    complex, the covariance E[z z^H] of the complex block coefficients z = a + i b.

    ``gram`` (n_bands, n_bands): tr(G_l G_m), for the method-of-moments fit.
    """

    def __init__(self, basis, layout, n_bands: int = N_BANDS):
        key = {"box_size": basis.box_size, "radius": float(basis.radius), "truncation": basis.truncation,
               "bandlimit": float(basis.bandlimit), "n_coefficients": int(basis.n_coefficients), "n_bands": n_bands}
        tables = cached_tables("background-bands", key, lambda: self._tables(basis, layout, n_bands))
        self.n_bands = n_bands
        self.centres = tables["centres"]
        self.zero = tables["zero"]
        self.groups = [tables[f"group_{g}"] for g in range(len(layout.size_groups))]
        self.gram = tables["gram"]

    @staticmethod
    def _tables(basis, layout, n_bands: int) -> dict[str, np.ndarray]:
        """Compute the band centres, the blocks ``zero`` and ``group_<g>`` and ``gram`` (see the class docstring)."""
        box = basis.box_size
        images = basis.evaluate(np.eye(basis.n_coefficients, dtype=np.float32)).astype(np.float64)
        padded = 2 * box  # stationary noise is not periodic in the box: convolve on a canvas twice as large
        canvas = np.zeros((images.shape[0], padded, padded))
        canvas[:, :box, :box] = images
        spectra = scipy.fft.rfft2(canvas, workers=-1)
        frequency = np.hypot(scipy.fft.fftfreq(padded)[:, None], scipy.fft.rfftfreq(padded)[None, :])
        # the bands cover the frequencies the basis holds (its band limit c over the disk radius) and a margin
        k_max = min(0.5 * np.sqrt(2.0), 1.25 * basis.bandlimit / (2 * np.pi * basis.radius))
        centres = np.linspace(0.0, k_max, n_bands)
        width = centres[1] - centres[0]
        flat = images.reshape(images.shape[0], -1)
        zero_blocks = np.empty((n_bands, layout.zero_columns.size, layout.zero_columns.size))
        groups = [np.empty((n_bands, *cos.shape, cos.shape[1]), dtype=np.complex128) for cos, _ in layout.size_groups]
        for band, centre in enumerate(centres):
            profile = np.clip(1.0 - np.abs(frequency - centre) / width, 0.0, 1.0)
            if band == n_bands - 1:
                profile = np.where(frequency >= centre, 1.0, profile)
            filtered = scipy.fft.irfft2(spectra * profile, s=(padded, padded), workers=-1)[:, :box, :box]
            covariance = flat @ filtered.reshape(filtered.shape[0], -1).T
            covariance = 0.5 * (covariance + covariance.T)
            zero = layout.zero_columns
            zero_blocks[band] = covariance[np.ix_(zero, zero)]
            for g, (cos, sin) in enumerate(layout.size_groups):
                for b in range(cos.shape[0]):
                    c, s = cos[b], sin[b]
                    a_part = 0.5 * (covariance[np.ix_(c, c)] + covariance[np.ix_(s, s)])
                    b_part = 0.5 * (covariance[np.ix_(s, c)] - covariance[np.ix_(c, s)])
                    groups[g][band, b] = 2.0 * (a_part + 1j * b_part)
        gram = np.einsum("lab,mba->lm", zero_blocks, zero_blocks)
        for blocks in groups:
            gram += 0.5 * np.einsum("lgab,mgba->lm", blocks, blocks).real
        tables = {"centres": centres, "zero": zero_blocks, "gram": gram}
        tables.update({f"group_{g}": blocks for g, blocks in enumerate(groups)})
        return tables

    def moments(self, zero_moments: np.ndarray, group_moments: list) -> np.ndarray:
        """(n_bands,) sum_i r_i y_i^T G_l y_i from one component's second moments (uncentred): ``zero_moments``
        (n_0, n_0) = sum r x x^T and ``group_moments[g]`` (g, s, s) = sum r z z^H."""
        out = np.einsum("lab,ba->l", self.zero, zero_moments)
        for blocks, moments in zip(self.groups, group_moments):
            out += 0.5 * np.einsum("lgab,gba->l", blocks, moments).real
        return out

    def fit(self, zero_moments, group_moments, total: float) -> np.ndarray:
        """theta >= 0 (n_bands,) of the stationary model that matches one component's second moments."""
        theta, _ = scipy.optimize.nnls(self.gram, self.moments(zero_moments, group_moments) / max(total, 1e-300))
        return theta

    def covariances(self, theta: np.ndarray, floor: float) -> tuple[np.ndarray, list]:
        """The blocks of sum_l theta_l G_l with eigenvalues raised to at least ``floor`` (real N = 0 block) and
        ``2 * floor`` (complex blocks, E|z|^2 = 2 sigma^2): (n_0, n_0), [(g, s, s) complex]."""
        values, vectors = np.linalg.eigh(np.einsum("l,lab->ab", theta, self.zero))
        zero = (vectors * np.maximum(values, floor)) @ vectors.T
        groups = []
        for blocks in self.groups:
            values, vectors = np.linalg.eigh(np.einsum("l,lgab->gab", theta, blocks))
            groups.append(np.einsum("gab,gb,gcb->gac", vectors, np.maximum(values, 2 * floor), vectors.conj()))
        return zero, groups


class _Gaussian:
    """A zero-mean rotation-invariant Gaussian given by its diagonal blocks, ready to evaluate log-densities: the
    inverse Cholesky factors (whiteners) of its N = 0 block (n_0, n_0) and of its complex blocks [(g, s, s)], and its
    log-normaliser (see :class:`_Backgrounds`)."""

    def __init__(self, zero: np.ndarray, groups: list):
        self.zero_whitener = np.linalg.inv(np.linalg.cholesky(zero))
        self.group_whiteners = [np.linalg.inv(np.linalg.cholesky(blocks)) for blocks in groups]
        # log det of the real covariance of the N = 0 block, and log det(pi C) of each complex block
        self.log_normaliser = (2 * np.log(np.diag(np.linalg.cholesky(zero))).sum() + zero.shape[0] * _LOG_2PI) / 2
        for blocks in groups:
            chol_diag = np.abs(np.diagonal(np.linalg.cholesky(blocks), axis1=1, axis2=2))
            self.log_normaliser += 2 * np.log(chol_diag).sum() + blocks.shape[0] * blocks.shape[1] * _LOG_PI


def _real_whiteners(whiteners: np.ndarray) -> np.ndarray:
    """(g, 2s, 2s) real forms V of complex block whiteners W (g, s, s), for rows laid out block by block: the
    whitened block u = W z of z = a + i b is, as a real row, [Re u | Im u] = [a | b] V with
    V = [[W_r^T, W_i^T], [-W_i^T, W_r^T]]."""
    w_t = whiteners.transpose(0, 2, 1)
    return np.block([[w_t.real, w_t.imag], [-w_t.imag, w_t.real]])


class _Backgrounds:
    """The log-densities of J :class:`_Gaussian` side by side: one product per size group of blocks, all J at once.

    On rows laid out block by block (``SteerableLayout.block_order``), the Mahalanobis distance of a row under one
    Gaussian is 0.5 |x_0 W_0^T|^2 + sum_b |[a_b | b_b] V_b|^2 (x_0 the N = 0 part, a_b and b_b the cos and sin
    columns of block b, V_b its real whitener, :func:`_real_whiteners`). The whitened coefficients of every Gaussian
    go into one (r, width) buffer, j by j within the N = 0 part and within each block; its squares summed per
    Gaussian (one product with ``totals`` (width, J), which also holds the 1/2 of the real N = 0 part) are the
    Mahalanobis distances.
    """

    def __init__(self, gaussians: list, layout):
        count = len(gaussians)
        n_zero = layout.zero_columns.size
        self.zero = np.concatenate([g.zero_whitener.T for g in gaussians], axis=1)  # (n_0, J n_0)
        self.groups = [np.concatenate([_real_whiteners(w) for w in whiteners], axis=2)  # (g, 2s, J 2s)
                       for whiteners in zip(*(g.group_whiteners for g in gaussians))]
        self.order, self.offsets = layout.block_order, layout.group_offsets
        self.log_normalisers = np.array([g.log_normaliser for g in gaussians])
        owner = [np.repeat(np.arange(count), n_zero)]
        weight = [np.full(count * n_zero, 0.5)]
        for whiteners in self.groups:
            n_blocks, width = whiteners.shape[:2]
            owner.append(np.tile(np.repeat(np.arange(count), width), n_blocks))
            weight.append(np.ones(n_blocks * count * width))
        owner, weight = np.concatenate(owner), np.concatenate(weight)
        self.totals = np.zeros((owner.size, count))
        self.totals[np.arange(owner.size), owner] = weight
        self.n_zero = n_zero

    def log_densities(self, rows: np.ndarray, out: np.ndarray) -> None:
        """log N_j(y) of a float64 chunk ``rows`` (c, L) into ``out`` (c, J).

        The rows go in passes of DENSITY_ROWS, laid out block by block into one reused buffer; every product of a
        pass is small enough that a BLAS library runs it on one thread (on a loaded machine, waking a second thread
        for each of many small products costs more than the products).
        """
        order = self.order
        pass_rows = min(DENSITY_ROWS, rows.shape[0])
        ordered_buffer = np.empty((pass_rows, order.size))
        whitened_buffer = np.empty((pass_rows, self.totals.shape[0]))
        for start in range(0, rows.shape[0], DENSITY_ROWS):
            stop = min(start + DENSITY_ROWS, rows.shape[0])
            ordered = np.take(rows[start:stop], order, axis=1, out=ordered_buffer[: stop - start], mode="clip")
            whitened = whitened_buffer[: stop - start]
            np.matmul(ordered[:, : self.n_zero], self.zero, out=whitened[:, : self.zero.shape[1]])
            column = self.zero.shape[1]
            for whiteners, offset in zip(self.groups, self.offsets):
                n_blocks, width, out_width = whiteners.shape
                blocks = ordered[:, offset : offset + n_blocks * width].reshape(-1, n_blocks, width).transpose(1, 0, 2)
                target = whitened[:, column : column + n_blocks * out_width].reshape(-1, n_blocks, out_width)
                np.matmul(blocks, whiteners, out=target.transpose(1, 0, 2))
                column += n_blocks * out_width
            np.square(whitened, out=whitened)
            np.matmul(whitened, self.totals, out=out[start:stop])
        np.subtract(-self.log_normalisers, out, out=out)


class _ClassDensities:
    """The log-densities of the particle classes and their outlier twins, at every amplitude, from one projection.

    For a class m, amplitude a and inflation eta (1 for the class, eta for its twin) the density is
    N(y | a mu, eta a^2 (C - sigma^2 I) + sigma^2 I). With p = A y the projections of y on the class's K axes
    (rows of A), q = A mu and v_k = eta a^2 (lambda_k - sigma^2) + sigma^2 its variances, the Mahalanobis distance
    is sum_k (p_k - a q_k)^2 / v_k + max(D_a, 0) / sigma^2, the residual off the subspace being
    D_a = |y|^2 - sum_k p_k^2 + 2 a (sum_k p_k q_k - y . mu) + a^2 (|mu|^2 - |q|^2). Both are linear in
    x = [p^2 | p | y . mu] (per class), so after one product with the axes and means, ``forms`` gives every
    amplitude and inflation at once: columns (eta, a, m) of sum_k p_k^2 / v_k - 2 a sum_k p_k q_k / v_k, then
    sum_k p_k^2 (m) and sum_k p_k q_k - y . mu (m).
    """

    def __init__(self, model: "ContaminationMixture"):
        means, axes, variances, sigma2 = model.means_, model.axes_, model.variances_, model.noise_variance_
        m_count, k, n_features = axes.shape
        amplitudes = model.amplitudes
        inflations = (1.0, model.outlier_inflation) if model.outlier_inflation else (1.0,)
        mk = m_count * k
        self.projector = np.concatenate([axes.reshape(mk, n_features), means]).T.copy()  # (L, MK + M)
        mean_projections = np.einsum("mkl,ml->mk", axes, means)  # (M, K)
        classes, dims = np.repeat(np.arange(m_count), k), np.arange(mk)
        forms = np.zeros((2 * mk + m_count, len(inflations), amplitudes.size, m_count))
        constants = np.empty((len(inflations), amplitudes.size, m_count))
        for e, inflation in enumerate(inflations):
            for i, a in enumerate(amplitudes):
                variance = inflation * a**2 * (variances - sigma2[:, None]) + sigma2[:, None]  # (M, K)
                forms[dims, e, i, classes] = 1.0 / variance.ravel()
                forms[mk + dims, e, i, classes] = (-2.0 * a * mean_projections / variance).ravel()
                log_det = np.log(variance).sum(axis=1) + (n_features - k) * np.log(sigma2)
                quadratic = a**2 * np.sum(mean_projections**2 / variance, axis=1)
                constants[e, i] = -0.5 * (n_features * _LOG_2PI + log_det + quadratic)
        residual_forms = np.zeros((2 * mk + m_count, 2, m_count))
        residual_forms[dims, 0, classes] = 1.0
        residual_forms[mk + dims, 1, classes] = mean_projections.ravel()
        residual_forms[2 * mk + np.arange(m_count), 1, np.arange(m_count)] = -1.0
        self.forms = np.concatenate([forms.reshape(2 * mk + m_count, -1), residual_forms.reshape(2 * mk + m_count, -1)],
                                    axis=1)
        self.constants = constants
        self.amplitudes = amplitudes
        self.twice_amplitudes = (2.0 * amplitudes)[:, None]  # (n_a, 1)
        self.residual_constants = np.outer(amplitudes**2, np.einsum("ml,ml->m", means, means)
                                           - np.einsum("mk,mk->m", mean_projections, mean_projections))  # (n_a, M)
        self.residual_scale = -0.5 / sigma2
        self.shape = (len(inflations), amplitudes.size, m_count)

    def log_densities(self, rows: np.ndarray, squared_norms: np.ndarray, out: np.ndarray,
                      moments: tuple | None) -> None:
        """log N of a float64 chunk ``rows`` (c, L) (``squared_norms`` (c,) = |y|^2) for every class and inflation,
        averaged over the amplitudes, into ``out`` (c, n_eta M): the classes, then their twins; with ``moments``
        ((c, M), (c, M)) also the posterior E[a] and E[a^2] of each image in each class."""
        n_rows = rows.shape[0]
        n_inflations, n_amplitudes, m_count = self.shape
        mk = self.projector.shape[1] - m_count
        products = np.empty((n_rows, mk + self.projector.shape[1]))
        np.matmul(rows, self.projector, out=products[:, mk:])
        np.square(products[:, mk : 2 * mk], out=products[:, :mk])
        forms = products @ self.forms
        per_amplitude = forms[:, : -2 * m_count].reshape(n_rows, *self.shape)  # (c, n_eta, n_a, M)
        in_subspace, cross = forms[:, -2 * m_count : -m_count], forms[:, -m_count:]
        residual = cross[:, None, :] * self.twice_amplitudes  # (c, n_a, M)
        residual += (squared_norms[:, None] - in_subspace)[:, None, :]
        residual += self.residual_constants
        np.maximum(residual, 0.0, out=residual)
        residual *= self.residual_scale
        per_amplitude *= -0.5
        per_amplitude += self.constants
        per_amplitude += residual[:, None]
        # the mean over the amplitudes, in the log domain; exp(per_amplitude) / total is then the amplitude posterior
        peak = per_amplitude.max(axis=2)  # (c, n_eta, M)
        per_amplitude -= peak[:, :, None]
        np.exp(per_amplitude, out=per_amplitude)
        total = per_amplitude.sum(axis=2)
        out[:] = (np.log(total) + peak - np.log(n_amplitudes)).reshape(n_rows, -1)
        if moments is not None:
            posterior = per_amplitude[:, 0] / total[:, 0, None]  # (c, n_a, M)
            np.einsum("ram,a->rm", posterior, self.amplitudes, out=moments[0])
            np.einsum("ram,a->rm", posterior, self.amplitudes**2, out=moments[1])


class ContaminationMixture(SteerableMixturePPCA):
    """Rotation-closed particle subspaces plus outlier, noise and background components (see the module docstring).

    Parameters
    ----------
    basis : the steerable basis of the coefficients (a PSWFBasis: its layout, and its functions for the
        background spectra).
    n_components : int
        M, the number of particle classes.
    n_dims : int
        K, the real dimension of each particle subspace.
    n_background : int
        J, the number of background (stationary) components.
    outlier_inflation : float > 1 or None
        eta, the factor on the signal variance of each particle class's outlier twin; None: no twins.
    noise, max_iter, tol, random_state, init_sample_size, chunk_bytes : as for SteerableMixturePPCA
        (``noise`` applies to the particle classes).

    Attributes (besides SteerableMixturePPCA's, which describe the particle classes)
    ----------
    component_kinds_ : tuple, the kind of every component (columns of ``log_densities``/``predict_proba``).
    component_weights_ : (C,) float64, mixing weights of all components.
    background_spectra_ : (J, n_bands) float64, theta of each background component.
    """

    def __init__(self, basis, n_components: int = 3, n_dims: int = 20, *, n_background: int = 3,
                 outlier_inflation: float | None = 8.0, amplitudes=(1.0,), noise: str = "shared", max_iter: int = 100,
                 tol: float = 1e-6,
                 random_state: int | None = 0, init_sample_size: int = 20000, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__(basis.angular_frequencies, basis.is_sine, basis.radial_indices, n_components, n_dims,
                         noise=noise, max_iter=max_iter, tol=tol, random_state=random_state,
                         init_sample_size=init_sample_size, chunk_bytes=chunk_bytes)
        if not isinstance(n_background, (int, np.integer)) or n_background < 0:
            raise ValueError(f"n_background must be a non-negative integer, got {n_background!r}")
        if outlier_inflation is not None and not outlier_inflation > 1:
            raise ValueError(f"outlier_inflation must be above 1 (or None for no outlier twins), got {outlier_inflation!r}")
        self.basis = basis
        self.amplitudes = np.asarray(amplitudes, dtype=np.float64)
        self.n_background = int(n_background)
        self.outlier_inflation = outlier_inflation
        self.bands = BackgroundBands(basis, self.layout) if self.n_background else None
        m = n_components
        self.component_kinds_ = (("particle",) * m + (("outlier",) * m if outlier_inflation else ())
                                 + ("noise",) + ("background",) * self.n_background)

    # ------------------------------------------------------------------ structure
    @property
    def _kinds(self) -> np.ndarray:
        return np.array(self.component_kinds_)

    @property
    def junk_columns(self) -> np.ndarray:
        """Columns of ``log_densities``/``predict_proba`` that are junk: the junk kinds, and the particle classes
        whose mean carries no particle (``junk_classes_``) with their outlier twins."""
        return np.flatnonzero(_junk_components(self._kinds, np.flatnonzero(self.junk_classes_)))

    # ------------------------------------------------------------------ initialisation
    def _initialize_from_sample(self, sample: np.ndarray, rng: np.random.Generator) -> None:
        """Start from the sample split by energy: the weakest fifth as noise, the strongest fifth as background
        (split among the J components at random), the rest as particles in M k-means clusters of
        rotation-invariant features."""
        energy = np.einsum("ij,ij->i", sample, sample)
        low, high = np.quantile(energy, [0.2, 0.8]) if self.n_background else (np.quantile(energy, 0.2), np.inf)
        kinds = self._kinds
        labels = np.empty(sample.shape[0], dtype=np.intp)
        middle = (energy >= low) & (energy <= high)
        labels[middle] = kmeans_labels(self._clustering_features(sample[middle]), self.n_components, rng,
                                       min_size=self.n_dims + 2)
        labels[energy < low] = np.flatnonzero(kinds == "noise")[0]
        if self.n_background:
            background = np.flatnonzero(kinds == "background")
            labels[energy > high] = background[rng.integers(0, background.size, np.count_nonzero(energy > high))]
        self.means_ = np.zeros((self.n_components, self.layout.n_features))
        self.axes_ = np.zeros((self.n_components, self.n_dims, self.layout.n_features))
        self.variances_ = np.ones((self.n_components, self.n_dims))
        self.noise_variance_ = np.ones(self.n_components)
        self.weights_ = np.full(self.n_components, 1.0 / self.n_components)
        responsibilities = np.eye(kinds.size)[labels]
        outliers = kinds == "outlier"
        responsibilities[:, outliers] = 0.02  # the twins start small: they take what the classes cannot explain
        responsibilities /= responsibilities.sum(axis=1, keepdims=True)
        self._m_step(self._statistics(sample, responsibilities), responsibilities.sum(axis=0))

    # ------------------------------------------------------------------ EM
    def _statistics(self, rows: np.ndarray, responsibilities: np.ndarray, moments=None) -> _Statistics:
        """Block statistics of the particle and background components (in that order) of a chunk; ``moments``
        (c, M) x 2, the posterior E[a] and E[a^2] of each image's amplitude in each particle class (None:
        amplitude 1)."""
        statistics = _Statistics(self.layout, self._statistics_columns.size)
        weights = responsibilities[:, self._statistics_columns]
        if moments is None:
            statistics.add(rows, weights)
            return statistics
        m = self.n_components
        mean_weights, total_weights = weights.copy(), weights.copy()
        mean_weights[:, :m] *= moments[0]
        total_weights[:, :m] *= moments[1]
        statistics.add(rows, weights, mean_weights, total_weights)
        return statistics

    @property
    def _statistics_columns(self) -> np.ndarray:
        """The components whose block statistics the M-step needs: particles, then backgrounds."""
        kinds = self._kinds
        return np.flatnonzero((kinds == "particle") | (kinds == "background"))

    def expectation(self, rows: np.ndarray) -> EStep:
        """The E-step over a float64 chunk ``rows`` (c, L): block statistics of the particle and background
        components (each image weighted by its posterior amplitude moments in the particle classes, computed
        here from the current parameters), and the responsibilities of every component."""
        log_dens, moments = self._log_densities(rows, amplitude_moments=True)
        log_norm = logsumexp_rows(log_dens)
        responsibilities = np.exp(log_dens - log_norm[:, None])
        statistics = self._statistics(rows, responsibilities, moments)
        return EStep(statistics, responsibilities.sum(axis=0), float(log_norm.sum()), rows.shape[0])

    def maximization(self, statistics: EStep, data: Chunks) -> None:
        """The M-step (:meth:`_m_step`) from the E-step summed over all of ``data``."""
        self._m_step(statistics.moments, statistics.responsibilities)

    def expectation_state(self) -> "ContaminationMixture":
        """A shallow copy without the basis and the background bands (what only the M-step reads)."""
        state = copy.copy(self)
        state.basis = None
        state.bands = None
        return state

    def _m_step(self, statistics: _Statistics, totals: np.ndarray) -> None:
        """Particle classes (:meth:`_maximize_classes`), background spectra by moments, and all weights; the
        empty-box component has the particle classes' noise variance (a variance of its own, fitted to its
        members, was measured to take faint particles in: benchmarks/README.md)."""
        m = self.n_components
        healthy = totals[:m] >= self.n_dims + 1
        if healthy.any():
            self._maximize_classes(statistics.components(np.arange(m)), totals[:m], healthy)
        self.junk_classes_ = empty_classes(self.means_, totals[:m])
        self.component_weights_ = np.maximum(totals, 1e-300) / max(totals.sum(), 1e-300)
        self.weights_ = self.component_weights_[:m] / self.component_weights_[:m].sum()
        sigma2 = float(np.average(self.noise_variance_, weights=self.weights_))
        self.empty_variance_ = sigma2
        self._noise_log_normaliser = 0.5 * self.layout.n_features * (_LOG_2PI + np.log(sigma2))
        self.background_spectra_ = np.zeros((self.n_background, self.bands.n_bands if self.bands else 0))
        self._backgrounds = []
        for j in range(self.n_background):
            index = m + j
            theta = self.bands.fit(statistics.zero_moments[index], [g[index] for g in statistics.group_moments],
                                   statistics.totals[index])
            self.background_spectra_[j] = theta
            self._backgrounds.append(_Gaussian(*self.bands.covariances(theta, sigma2)))

    def _maximize_classes(self, statistics: _Statistics, responsibilities: np.ndarray, update: np.ndarray) -> None:
        """Exact M-step of the particle classes with amplitudes (the classes ``update`` only).

        An image y = a (mu + W x) + noise of amplitude a enters its class scaled to amplitude 1 with weight
        r a^2 (its noise is then sigma^2 / a^2): mu = sum r a y / T, S = sum r y y^T / T - mu mu^T with
        T = sum r a^2 (``statistics.totals``; ``zero_sums`` = sum r a x), the rotation-closed axes are the top K
        of S (as SteerableMixturePPCA), and the noise is what the unscaled images leave off the subspace:
        sigma^2 = T (tr S - sum_K lambda) / (R (L - K)) with R = sum r (``responsibilities``). The signal
        variance along an axis is lambda - sigma^2 R / T (the scaled noise removed); ``variances_`` stores
        it plus sigma^2, so that amplitude a has variance a^2 (variances_ - sigma^2) + sigma^2 along it.
        """
        layout = self.layout
        n_features, k = layout.n_features, self.n_dims
        weights_a2 = np.maximum(statistics.totals, 1e-300)
        zero_means = statistics.zero_sums / weights_a2[:, None]
        traces = statistics.energies / weights_a2 - np.einsum("ml,ml->m", zero_means, zero_means)
        axes, variances, residual = self.axes_.copy(), self.variances_.copy(), self.noise_variance_.copy()
        for m in np.flatnonzero(update):
            zero_covariance = statistics.zero_moments[m] / weights_a2[m] - np.outer(zero_means[m], zero_means[m])
            group_covariances = [moments[m] / weights_a2[m] for moments in statistics.group_moments]
            axes[m], variances[m] = self._top_axes(zero_covariance, group_covariances)
            off_subspace = max(traces[m] - variances[m].sum(), 0.0) / (n_features - k)  # of the scaled images
            # all of it noise, which the scaling divided by a^2
            residual[m] = off_subspace * weights_a2[m] / max(responsibilities[m], 1e-300)
        if self.noise == "shared":
            share = responsibilities[update] / max(responsibilities[update].sum(), 1e-300)
            residual[update] = np.sum(share * residual[update])
        floor = 1e-10 * max(float(np.max(traces[update])) / n_features, 1e-300)
        residual = np.where(update, np.maximum(residual, floor), residual)
        # the noise's share of the scaled images' variance: sigma^2 / a^2 averaged with weights r a^2 = sigma^2 R / T
        scaled_noise = residual * np.maximum(responsibilities, 1e-300) / weights_a2
        signal = np.maximum(variances - scaled_noise[:, None], 0.0)
        self.means_[update] = 0.0
        self.means_[np.ix_(update, layout.zero_columns)] = zero_means[update]
        self.axes_ = np.where(update[:, None, None], axes, self.axes_)
        self.variances_ = np.where(update[:, None], signal + residual[:, None], self.variances_)
        self.noise_variance_ = residual

    def _log_densities(self, rows: np.ndarray, amplitude_moments: bool = False):
        """log pi_c + log N_c(y) for a float64 chunk (c, L) and every component -> (c, C); with
        ``amplitude_moments`` also (E[a], E[a^2]) (c, M) each, the posterior moments of each image's amplitude in
        each particle class.

        A particle class's density is the mean over the amplitude grid of N(y | a mu_m, a^2 (C_m - sigma^2 I) +
        sigma^2 I): the class's signal at amplitude a, with the noise unchanged (:class:`_ClassDensities`: two products
        over the whole chunk). The background components' densities (:class:`_Backgrounds`) take the chunk in passes
        of DENSITY_ROWS rows laid out block by block into one reused buffer.
        """
        n_rows = rows.shape[0]
        classes = _ClassDensities(self)
        n_classes = classes.shape[0] * classes.shape[2]  # the particle classes, then their outlier twins
        out = np.empty((n_rows, len(self.component_kinds_)))
        moments = (np.empty((n_rows, self.n_components)), np.empty((n_rows, self.n_components))) \
            if amplitude_moments else None
        squared_norms = np.einsum("ij,ij->i", rows, rows)
        classes.log_densities(rows, squared_norms, out[:, :n_classes], moments)
        out[:, n_classes] = -0.5 * squared_norms / self.empty_variance_ - self._noise_log_normaliser
        if self.n_background:
            _Backgrounds(self._backgrounds, self.layout).log_densities(rows, out[:, n_classes + 1 :])
        out += np.log(self.component_weights_)
        return (out, moments) if amplitude_moments else out

    def log_densities(self, data) -> np.ndarray:
        """log pi_c + log N_c(y_i) for each row of ``data`` (N, L) and every component, shape (N, C)."""
        data = self._check_data(data, fitting=False)
        out = np.empty((data.shape[0], len(self.component_kinds_)))
        for start, rows in self._chunks(data):
            out[start : start + rows.shape[0]] = self._log_densities(rows)
        return out

    def junk_log_odds(self, data) -> np.ndarray:
        """(N,) log P(junk | y) - log P(particle | y) for each row of ``data`` (N, L)."""
        log_dens = self.log_densities(data)
        junk = self.junk_columns
        particle = np.setdiff1d(np.arange(log_dens.shape[1]), junk)
        return logsumexp_rows(log_dens[:, junk]) - logsumexp_rows(log_dens[:, particle])

    def parameters(self) -> ContaminationParameters:
        """A copy of the current parameters."""
        return ContaminationParameters(
            means=self.means_.copy(), components=self.components_, weights=self.weights_.copy(),
            noise_variance=self.noise_variance_.copy(), axes=self.axes_.copy(), variances=self.variances_.copy(),
            component_kinds=self.component_kinds_, junk_classes=tuple(int(m) for m in np.flatnonzero(self.junk_classes_)),
            component_weights=self.component_weights_.copy(),
            background_spectra=self.background_spectra_.copy(), outlier_inflation=float(self.outlier_inflation or 1.0))


def empty_classes(means: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(M,) bool, the particle classes whose mean carries no particle: mean energy ``|mu_m|^2`` below
    MIN_MEAN_ENERGY_FRACTION of the size-weighted median over the classes.

    means: (M, L) the classes' means; sizes: (M,) their summed responsibilities. The median (not the largest
    class, which may be a class of strong junk) is the reference, so one junk class of either kind cannot make
    the true classes look empty.
    """
    energy = np.einsum("ml,ml->m", means, means)
    order = np.argsort(energy)
    cumulative = np.cumsum(np.maximum(sizes[order], 0.0))
    if cumulative[-1] <= 0:
        return np.zeros(energy.size, dtype=bool)
    typical = energy[order[np.searchsorted(cumulative, 0.5 * cumulative[-1])]]
    return energy < MIN_MEAN_ENERGY_FRACTION * typical


def _junk_components(kinds: np.ndarray, junk_classes) -> np.ndarray:
    """(C,) bool: components of a junk kind, and the junk classes (indices among the particle classes) with their
    outlier twins (the twins follow the classes in the same order)."""
    junk = np.isin(kinds, JUNK_KINDS)
    for kind in ("particle", "outlier"):
        columns = np.flatnonzero(kinds == kind)
        if columns.size:
            junk[columns[list(junk_classes)]] = True
    return junk


@dataclass(frozen=True)
class JunkLogOdds:
    """Junk score of a :class:`ContaminationMixture`: log P(junk | y) - log P(particle | y), larger = more
    junk-like; 0 at even odds. The junk probability is 1 / (1 + exp(-score))."""

    def __call__(self, model, data) -> np.ndarray:
        return model.junk_log_odds(data)

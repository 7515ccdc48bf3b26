"""Orthonormal bases for particle images on a disk, and chunked expansion of whole particle sets.

Every basis here is an (n_pixels, L) matrix ``B`` with orthonormal columns, sampled on the pixels inside
the disk of radius ``radius`` around the centre pixel ``(box // 2, box // 2)``:

* ``expand(images) = images[:, disk] @ B`` -- one matrix product per chunk, (n, L) float32;
* ``evaluate(coefficients) = coefficients @ B.T`` put back on the disk, zero outside, (n, box, box).

Because ``B`` is orthonormal, white pixel noise of variance s^2 gives white coefficient noise of variance
s^2 (the noise model of the mixture of PPCA), and ``evaluate(expand(x))`` is the orthogonal projection
of ``x`` (restricted to the disk) onto the span of the basis.

Angles: ``theta = atan2(row - box // 2, column - box // 2)``. A rotation by ``alpha`` as displayed with
row 0 at the top (counter-clockwise on screen, the direction of ``np.rot90``) maps ``f(r, theta)`` to
``f(r, theta + alpha)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.special

from .particles import CHUNK_BYTES
from .tables import cached_tables
from .preprocess import BadImageError, Preprocessor, as_image_stack, check_radius, default_radius, disk_mask

# 99th percentile of the Tracy-Widom distribution of order 1 (largest eigenvalue of a real Wishart matrix).
TRACY_WIDOM_99 = 2.0234

# The largest band limit accepted, in multiples of the Nyquist band limit pi * radius: beyond it every function
# is aliased on the pixel grid, and the radial eigenproblems (of size ~0.75 c) would take minutes.
MAX_BANDLIMIT_NYQUIST = 2.0

# A sampled PSWF that keeps less than this fraction of its norm once orthogonalised against the more
# concentrated ones is numerically a combination of them on the pixel grid.
MIN_INDEPENDENT_FRACTION = 0.05


@runtime_checkable
class Basis(Protocol):
    """What the engine needs from a basis of images on a disk (see the module docstring)."""

    box_size: int
    radius: float
    n_coefficients: int

    def expand(self, images) -> np.ndarray:
        """(n, box, box) images -> (n, L) float32 coefficients."""

    def evaluate(self, coefficients) -> np.ndarray:
        """(n, L) coefficients -> (n, box, box) float32 images, zero outside the disk."""


class _DiskMatrixBasis:
    """An orthonormal (n_pixels, L) float32 matrix sampled on the disk pixels of a square box."""

    def __init__(self, box_size: int, radius: float | None):
        self.box_size = int(box_size)
        self.radius = check_radius(self.box_size, default_radius(self.box_size) if radius is None else radius)
        self.mask = disk_mask(self.box_size, self.radius)
        # the flat indices of the disk pixels, found once: gathering them with np.take is about 8x faster than
        # indexing with the boolean mask, which looks for its True entries again in every chunk
        self.pixels = np.flatnonzero(self.mask.ravel())
        self.background_pixels = np.flatnonzero(~self.mask.ravel())
        self._matrix: np.ndarray | None = None

    @property
    def n_pixels(self) -> int:
        """Number of pixels inside the disk."""
        return int(self.mask.sum())

    @property
    def n_coefficients(self) -> int:
        """Number of basis functions L."""
        return self._fitted_matrix().shape[1]

    @property
    def matrix(self) -> np.ndarray:
        """(n_pixels, L) float32 orthonormal basis, rows in the order of ``images[:, mask]``."""
        return self._fitted_matrix()

    def _fitted_matrix(self) -> np.ndarray:
        if self._matrix is None:
            raise RuntimeError(f"this {type(self).__name__} has no basis yet: call fit() first")
        return self._matrix

    def expand(self, images) -> np.ndarray:
        """Coefficients of images in the basis (pixels outside the disk are ignored).

        Args:
            images: (n, box_size, box_size) images.

        Returns:
            (n, n_coefficients) float32 coefficients.
        """
        images = as_image_stack(images, self.box_size)
        return self._disk_pixels(images) @ self._fitted_matrix()

    def _disk_pixels(self, images: np.ndarray) -> np.ndarray:
        """(n, n_pixels) the pixels inside the disk of (n, box, box) images, in the order of the basis rows.

        Column-major (as indexing with the boolean mask gives them): OpenBLAS's product of a row-major (n, P) array
        with the basis rounds the rows of the last, partial tile of n differently, so that the coefficients of an
        image would depend on how many images its chunk holds; column-major, they do not (a sort on Dask, whose
        chunks differ from the local expansion's, computes the same coefficients).
        """
        return np.asfortranarray(np.take(images.reshape(images.shape[0], -1), self.pixels, axis=1))

    def evaluate(self, coefficients) -> np.ndarray:
        """Images from coefficients.

        Args:
            coefficients: (n, n_coefficients) coefficients.

        Returns:
            (n, box_size, box_size) float32 images, zero outside the disk.
        """
        matrix = self._fitted_matrix()
        coefficients = np.asarray(coefficients, dtype=np.float32)
        if coefficients.ndim != 2 or coefficients.shape[1] != matrix.shape[1]:
            raise ValueError(f"expected coefficients of shape (n, {matrix.shape[1]}), got {coefficients.shape}")
        images = np.zeros((coefficients.shape[0], self.box_size * self.box_size), dtype=np.float32)
        images[:, self.pixels] = coefficients @ matrix.T
        return images.reshape(-1, self.box_size, self.box_size)


# -- 2-D prolate spheroidal wave functions -------------------------------------------------------------
#
# On the unit disk, with band limit c, the PSWFs are psi_{N,n}(r, theta) = R_{N,n}(r) e^{i N theta}: the
# eigenfunctions of the band- and space-limiting operator (Slepian 1964). Their radial parts are also the
# eigenfunctions of Slepian's differential operator
#     -(1/r) d/dr [r (1 - r^2) dR/dr] + (N^2 / r^2 + c^2 r^2) R = chi R,
# which in the basis of normalised radial Zernike polynomials
#     T_{N,k}(r) = sqrt(2 (2k + N + 1)) r^N P_k^{(N,0)}(1 - 2 r^2),  orthonormal for r dr on [0, 1],
# is the symmetric tridiagonal matrix  diag((N + 2k)(N + 2k + 2)) + c^2 (I - X) / 2,  X being the
# (tridiagonal) matrix of multiplication by x = 1 - 2 r^2 (Shkolnisky 2007; Landa & Shkolnisky 2017).
# Ascending chi gives n = 0, 1, 2, ... The concentration lambda_{N,n} in (0, 1) (fraction of the energy of
# the band-limited function that lies inside the disk) is lambda = c^2 beta^2, beta being the eigenvalue
# of the radial integral operator (H R)(r) = int_0^1 J_N(c r s) R(s) s ds; with
#     int_0^1 T_{N,k}(s) J_N(u s) s ds = sqrt(2 (2k + N + 1)) J_{N+2k+1}(u) / u
# the Rayleigh quotient beta = <H R, R> needs only Bessel functions on a quadrature grid.


def _zernike_recurrence(N: int, n_terms: int) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal (n_terms,) and off-diagonal (n_terms - 1,) of the matrix of x = 1 - 2 r^2 in T_{N,k}."""
    k = np.arange(n_terms, dtype=np.float64)
    degree = N + 2 * k
    diagonal = np.zeros(n_terms) if N == 0 else -(N**2) / (degree * (degree + 2))
    k = k[:-1]
    off_diagonal = 2 * (k + 1) * (k + N + 1) / ((2 * k + N + 2) * np.sqrt((2 * k + N + 1) * (2 * k + N + 3)))
    return diagonal, off_diagonal


def _zernike_radial(N: int, r: np.ndarray, recurrence: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(len(r), n_terms) values of T_{N,k}(r), k < n_terms, by the three-term recurrence."""
    diagonal, off_diagonal = recurrence
    x = 1 - 2 * r**2
    values = np.empty((r.size, diagonal.size))
    values[:, 0] = np.sqrt(2 * (N + 1)) * r**N
    for k in range(diagonal.size - 1):
        values[:, k + 1] = (x - diagonal[k]) * values[:, k]
        if k:
            values[:, k + 1] -= off_diagonal[k - 1] * values[:, k - 1]
        values[:, k + 1] /= off_diagonal[k]
    return values


def _radial_prolates(bandlimit: float, truncation: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Radial PSWFs of every angular frequency N = 0, 1, ... with concentration above ``truncation``.

    Args:
        bandlimit: c, band limit for the unit disk.
        truncation: keep the functions whose concentration lambda exceeds it.

    Returns:
        One entry per angular frequency N (in order, up to the last N keeping a function):
        (concentrations (m,), descending; zernike_coefficients (n_terms, m), unit columns), the
        radial functions being ``_zernike_radial(N, r, _zernike_recurrence(N, n_terms)) @ coefficients``.
    """
    c = float(bandlimit)
    # Only radial indices n below about c / 3 have a non-negligible concentration, and their Zernike
    # coefficients decay super-exponentially past k ~ n + c / 4 (Landa & Shkolnisky 2017), so 0.75 c + 60
    # terms reach rounding level (checked in the tests).
    n_terms = int(np.ceil(0.75 * c)) + 60
    nodes, weights = scipy.special.roots_legendre(2 * n_terms + int(np.ceil(2 * c)) + 40)
    nodes, weights = (nodes + 1) / 2, weights / 2
    bessel = np.empty((0, nodes.size))  # row m: J_m(c * nodes), extended as N grows
    prolates = []
    while True:
        N = len(prolates)
        recurrence = _zernike_recurrence(N, n_terms)
        degree = N + 2 * np.arange(n_terms)
        _, vectors = scipy.linalg.eigh_tridiagonal(degree * (degree + 2) + c**2 * (1 - recurrence[0]) / 2,
                                                   -(c**2) * recurrence[1] / 2)
        largest = np.abs(vectors).argmax(axis=0)
        vectors *= np.sign(vectors[largest, np.arange(n_terms)])
        orders = N + 2 * np.arange(n_terms) + 1
        if orders[-1] >= len(bessel):
            new_orders = np.arange(len(bessel), orders[-1] + n_terms)
            bessel = np.vstack([bessel, scipy.special.jv(new_orders[:, None], c * nodes[None, :])])
        radial = _zernike_radial(N, nodes, recurrence) @ vectors
        hankel = (bessel[orders].T * np.sqrt(2 * (2 * np.arange(n_terms) + N + 1)) / (c * nodes[:, None])) @ vectors
        beta = np.einsum("q,qn,qn->n", weights * nodes, radial, hankel)
        concentration = c**2 * beta**2
        kept = np.flatnonzero(concentration > truncation)
        if kept.size == 0:
            return prolates
        kept = kept[np.argsort(-concentration[kept], kind="stable")]
        prolates.append((concentration[kept], vectors[:, kept]))


def _count_functions(prolates: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """Real basis functions of a set of radial prolates: one per N = 0 function, two (cos, sin) per N > 0."""
    return sum(concentration.size * (1 if N == 0 else 2) for N, (concentration, _) in enumerate(prolates))


def _bandlimit_for_count(count: int, largest: float, truncation: float) -> tuple[float, list]:
    """The smallest band limit (2% steps from the Shannon estimate 2 sqrt(count), at most ``largest``)
    with at least ``count`` functions above ``truncation``, and its radial prolates."""
    bandlimit = min(2.0 * np.sqrt(count), largest)
    while True:
        prolates = _radial_prolates(bandlimit, truncation)
        if _count_functions(prolates) >= count or bandlimit >= largest:
            return bandlimit, prolates
        bandlimit = min(bandlimit * 1.02, largest)


def _symmetry_class(angular_frequencies: np.ndarray, is_sine: np.ndarray) -> np.ndarray:
    """Label of the functions that can overlap on a pixel grid symmetric under 90-degree rotations.

    Sampled on a disk of pixels that is symmetric under the dihedral group of the square, cos / sin
    functions of frequencies N and N' are exactly orthogonal unless both are cos (or both sin) and N, N'
    are both odd or are both even with N = N' (mod 4). Labels: 0..5 for (N mod 4 class, sine).
    """
    frequency_class = np.where(angular_frequencies % 2 == 1, 2, (angular_frequencies % 4) // 2)
    return 2 * frequency_class + is_sine


class PSWFBasis(_DiskMatrixBasis):
    """2-D prolate spheroidal wave functions on the disk (Slepian 1964; Landa & Shkolnisky 2017).

    Real basis: for angular frequency N = 0 the functions ``R_{0,n}(r)``, for N > 0 the pairs
    ``R_{N,n}(r) cos(N theta)`` and ``R_{N,n}(r) sin(N theta)``, with r scaled so that the disk of
    ``radius`` pixels is the unit disk. Columns are sorted by decreasing concentration (ties: by N, n,
    cos before sin), so the first k columns span the k most concentrated sampled PSWFs.

    Sampling and orthonormalisation: the continuous functions are orthonormal on the disk; sampled on
    the pixels they are only nearly so (pixelated disk edge, band limit at Nyquist), so each set of
    functions that can overlap on the grid (see ``_symmetry_class``) is orthonormalised by Gram-Schmidt in
    the column order (as a Cholesky QR). This keeps the span of every leading set of columns, and, the
    pixel disk being symmetric under the square's symmetries, keeps steerability under 90-degree rotations
    and reflections exact: rotating an image by ``alpha`` (multiples of 90 degrees, see :meth:`rotate`)
    maps each (cos, sin) pair of frequency N through a rotation by ``N alpha``. For other angles
    steerability holds up to the sampling error (relative error ~1e-4 for a smooth blob inside the disk).
    Gram-Schmidt changes the well-concentrated columns by the sampling error only (~1e-3 for lambda >
    0.99), but the least concentrated ones (lambda near 0.5, energy near the disk edge) substantially:
    they keep 70% of their norm, the rest being overlap with more concentrated columns of frequencies
    N' = +-N (mod 4). ``angular_frequencies`` is the nominal frequency of each column.

    Args:
        box_size: image side length in pixels.
        radius: disk radius in pixels (default ``box_size // 2 - 1``); at most ``(box_size - 1) / 2``.
        bandlimit: c, band limit for the unit disk (frequencies up to c / radius radians per pixel).
            Default ``pi * radius``: Nyquist, the choice of Landa & Shkolnisky (beta = 1); with
            ``max_coefficients`` given, the default is instead the smallest band limit (in steps of 2%,
            at most Nyquist) that has that many functions above the truncation, so that a short basis is
            a low-pass one rather than an arbitrary pick among functions whose concentrations all round
            to 1.
        truncation: keep the functions whose concentration lambda in (0, 1) exceeds it. Default 0.5,
            Landa & Shkolnisky's default truncation (gamma = sqrt(lambda / (1 - lambda)) > 1). The
            number of functions is about the Shannon number c^2 / 4 (about 0.78 of the disk pixels at
            the Nyquist band limit). Much lower thresholds add functions concentrated outside the disk
            that are linearly dependent on the pixel grid; this raises a ValueError.
        max_coefficients: keep at most this many of the most concentrated functions (a (cos, sin)
            pair is kept or dropped whole, so the count may be one less).

    Cost: the basis holds n_pixels x L float32 values, about 31 radius^4 bytes at the defaults (29 MB at
    64 px, 0.5 GB at 128 px, 8 GB at 256 px); building it takes about n_pixels L^2 / 8 multiply-adds and
    expanding an image 2 n_pixels L flops. Fourier-crop large boxes first (see
    :class:`~napari_ppcasort.core.preprocess.Preprocessor`).

    Attributes:
        angular_frequencies: (L,) int, N of each column.
        radial_indices: (L,) int, n of each column (0 = most concentrated for its N).
        is_sine: (L,) bool, True for the ``sin(N theta)`` member of a pair.
        concentrations: (L,) float, lambda of each column.
        bandlimit: c used.
    """

    def __init__(self, box_size: int, radius: float | None = None, bandlimit: float | None = None,
                 truncation: float = 0.5, max_coefficients: int | None = None):
        super().__init__(box_size, radius)
        if not 0 < truncation < 1:
            raise ValueError(f"truncation is a concentration threshold in (0, 1), got {truncation:g}")
        if max_coefficients is not None and max_coefficients < 1:
            raise ValueError(f"max_coefficients must be at least 1, got {max_coefficients}")
        self.truncation = float(truncation)
        nyquist = np.pi * self.radius
        if bandlimit is not None and not 0 < bandlimit <= MAX_BANDLIMIT_NYQUIST * nyquist:
            raise ValueError(f"band limit must be positive and at most {MAX_BANDLIMIT_NYQUIST:g} x Nyquist "
                             f"(pi x radius = {nyquist:.4g} for a radius of {self.radius:g} px), got {bandlimit:g}")
        # the tables depend on these numbers only: built once, then read from the cache (see core.tables)
        key = {"box_size": self.box_size, "radius": float(self.radius), "truncation": self.truncation,
               "bandlimit": None if bandlimit is None else float(bandlimit),
               "max_coefficients": None if max_coefficients is None else int(max_coefficients)}
        tables = cached_tables("pswf", key, lambda: self._tables(bandlimit, max_coefficients, nyquist))
        self.bandlimit = float(tables["bandlimit"])
        self.angular_frequencies = tables["angular_frequencies"]
        self.radial_indices = tables["radial_indices"]
        self.is_sine = tables["is_sine"]
        self.concentrations = tables["concentrations"]
        self._matrix = tables["matrix"]

    def _tables(self, bandlimit: float | None, max_coefficients: int | None, nyquist: float) -> dict[str, np.ndarray]:
        """Compute the basis (see the class docstring): its band limit, the (L,) frequencies, radial indices, sine
        flags and concentrations of its columns, and the (n_pixels, L) float32 matrix."""
        if bandlimit is not None:
            self.bandlimit, prolates = float(bandlimit), _radial_prolates(float(bandlimit), self.truncation)
        elif max_coefficients is None:
            self.bandlimit, prolates = nyquist, _radial_prolates(nyquist, self.truncation)
        else:
            self.bandlimit, prolates = _bandlimit_for_count(max_coefficients, nyquist, self.truncation)
        if not self.bandlimit > 0:
            raise ValueError(f"band limit must be positive, got {self.bandlimit:g}")

        frequencies, radial, sine, concentrations = [], [], [], []
        for N, (concentration, _) in enumerate(prolates):
            for is_sine in (False, True) if N else (False,):
                frequencies.append(np.full(concentration.size, N))
                radial.append(np.arange(concentration.size))
                sine.append(np.full(concentration.size, is_sine))
                concentrations.append(concentration)
        frequencies, radial, sine, concentrations = (
            np.concatenate(parts) for parts in (frequencies, radial, sine, concentrations))
        order = np.lexsort((sine, radial, frequencies, -concentrations))
        if max_coefficients is not None and max_coefficients < order.size:
            cut = max_coefficients
            # a pair shares its concentration, so its sin column directly follows its cos column
            if frequencies[order[cut - 1]] > 0 and not sine[order[cut - 1]]:
                cut -= 1
            order = order[:cut]
        self.angular_frequencies = frequencies[order].astype(np.int64)
        self.radial_indices = radial[order].astype(np.int64)
        self.is_sine = sine[order].astype(bool)
        self.concentrations = concentrations[order]
        return {"bandlimit": np.float64(self.bandlimit), "angular_frequencies": self.angular_frequencies,
                "radial_indices": self.radial_indices, "is_sine": self.is_sine,
                "concentrations": self.concentrations, "matrix": self._sample(prolates)}

    def _sample(self, prolates: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Sample the selected functions on the disk pixels and orthonormalise them (see class docstring)."""
        centre = self.box_size // 2
        rows, columns = np.nonzero(self.mask)
        squared_distance = (rows - centre) ** 2 + (columns - centre) ** 2
        distinct, pixel_ring = np.unique(squared_distance, return_inverse=True)
        ring_radius = np.sqrt(distinct) / self.radius
        theta = np.arctan2(rows - centre, columns - centre)

        classes = _symmetry_class(self.angular_frequencies, self.is_sine)
        matrix = np.empty((rows.size, classes.size), dtype=np.float32, order="F")
        for label in np.unique(classes):
            columns_of_class = np.flatnonzero(classes == label)
            samples = np.empty((rows.size, columns_of_class.size), order="F")
            for N in np.unique(self.angular_frequencies[columns_of_class]):
                of_n = np.flatnonzero(self.angular_frequencies[columns_of_class] == N)
                vectors = prolates[N][1][:, self.radial_indices[columns_of_class[of_n]]]
                radial = _zernike_radial(int(N), ring_radius, _zernike_recurrence(int(N), vectors.shape[0])) @ vectors
                if N == 0:
                    angular = np.full(rows.size, 1 / np.sqrt(2 * np.pi))
                else:
                    angular = (np.sin if label % 2 else np.cos)(N * theta) / np.sqrt(np.pi)
                # pixel area in unit-disk coordinates is 1 / radius^2
                samples[:, of_n] = radial[pixel_ring] * (angular / self.radius)[:, None]
            matrix[:, columns_of_class] = self._orthonormalize(samples, columns_of_class)
        return matrix

    def _orthonormalize(self, samples: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Gram-Schmidt of the columns of ``samples`` (basis columns ``columns``) in order.

        Computed as Cholesky QR: samples = Q R with R the Cholesky factor of the Gram matrix. The
        sampled functions are well conditioned (see ``MIN_INDEPENDENT_FRACTION``), so one pass gives Q
        orthonormal to ~1e-13.
        """
        dependent = (f"truncation {self.truncation:g} keeps prolates that are linearly dependent on the "
                     f"{self.box_size} px grid; raise the truncation or lower the band limit")
        gram = scipy.linalg.blas.dsyrk(1.0, samples, trans=1, lower=0)  # upper triangle of samples^T samples
        try:
            factor = scipy.linalg.cholesky(gram, lower=False, overwrite_a=False)
        except np.linalg.LinAlgError:
            raise ValueError(dependent) from None
        independent = np.diag(factor) / np.sqrt(np.diag(gram))
        if independent.min() < MIN_INDEPENDENT_FRACTION:
            worst = columns[int(independent.argmin())]
            raise ValueError(f"{dependent} (N={self.angular_frequencies[worst]}, n={self.radial_indices[worst]}, "
                             f"lambda={self.concentrations[worst]:.2g} keeps {independent.min():.1%} of its norm "
                             "once orthogonalised against the more concentrated ones)")
        return scipy.linalg.blas.dtrsm(1.0, factor, samples, side=1, lower=0, overwrite_b=1)  # samples R^-1

    def rotate(self, coefficients, angle: float) -> np.ndarray:
        """Coefficients of the images rotated by ``angle`` radians (counter-clockwise on screen).

        Each (cos, sin) pair (a, b) of frequency N becomes
        (a cos(N angle) + b sin(N angle), -a sin(N angle) + b cos(N angle)). Exact for multiples of
        pi / 2 (``np.rot90`` for odd boxes; for even boxes rotate about pixel box // 2, i.e.
        ``np.roll(np.rot90(x), 1, axis=0)``), up to the sampling error for other angles.

        Args:
            coefficients: (n, L) coefficients.
            angle: rotation angle in radians.

        Returns:
            (n, L) float32 coefficients.
        """
        coefficients = np.asarray(coefficients, dtype=np.float32)
        if coefficients.ndim != 2 or coefficients.shape[1] != self.n_coefficients:
            raise ValueError(f"expected coefficients of shape (n, {self.n_coefficients}), got {coefficients.shape}")
        cosines = np.flatnonzero((self.angular_frequencies > 0) & ~self.is_sine)
        sines = self._sine_partner(cosines)
        phase = self.angular_frequencies[cosines] * angle
        a, b = coefficients[:, cosines], coefficients[:, sines]
        rotated = coefficients.copy()
        rotated[:, cosines] = a * np.cos(phase) + b * np.sin(phase)
        rotated[:, sines] = -a * np.sin(phase) + b * np.cos(phase)
        return rotated

    def _sine_partner(self, cosines: np.ndarray) -> np.ndarray:
        """Column index of the sin partner of each given cos column (same N and n)."""
        key = self.angular_frequencies * (self.radial_indices.max() + 1) + self.radial_indices
        sines = np.flatnonzero(self.is_sine)
        by_key = dict(zip(key[sines].tolist(), sines.tolist()))
        return np.array([by_key[k] for k in key[cosines].tolist()], dtype=np.int64)


# -- PCA -------------------------------------------------------------------------------------------------


def marchenko_pastur_edge(n_samples: int, n_dimensions: int, noise_variance: float) -> float:
    """Largest squared singular value expected from white noise, at the 99th percentile.

    For an (n_samples, n_dimensions) matrix of white noise of variance s^2, the eigenvalues of X^T X / n
    fill the Marchenko-Pastur bulk up to s^2 (1 + sqrt(n_dimensions / n_samples))^2; the largest squared
    singular value of X is about s^2 (mu + sigma W) with Johnstone's (2001) finite-size centring mu and
    scale sigma, W following the Tracy-Widom law of order 1. Squared singular values above the returned
    value are signal: pure noise exceeds it with probability 0.01.

    Args:
        n_samples, n_dimensions: shape of X.
        noise_variance: s^2.

    Returns:
        threshold on the squared singular values of X.
    """
    small, large = sorted((n_samples, n_dimensions))
    root_sum = np.sqrt(large - 1) + np.sqrt(small)
    centre = root_sum**2
    scale = root_sum * (1 / np.sqrt(large - 1) + 1 / np.sqrt(small)) ** (1 / 3)
    return float(noise_variance * (centre + TRACY_WIDOM_99 * scale))


class PCABasis(_DiskMatrixBasis):
    """Principal components of the pixels inside the disk, fitted on a random sample of images.

    The basis is the leading right singular vectors of the (uncentred) sample matrix, i.e. the leading
    eigenvectors of the second-moment matrix. The mean is NOT subtracted: ``expand`` and ``evaluate``
    stay linear like the PSWF basis (so the mixture model's means and principal directions are both
    shown with ``evaluate``), and the mean image, when it stands out of the noise, is itself one of the
    leading directions. ``mean_`` is kept for display.

    Number of components, when not given: the number of squared singular values of the sample above the
    Marchenko-Pastur edge for white noise (:func:`marchenko_pastur_edge`), at least 1 and at most
    min(m, n_pixels) // 2 for a sample of m images. The noise variance is estimated from the background:
    the mean over the sampled images of the variance of their pixels outside the disk (1 after RELION
    normalisation; the disk is assumed to hold the same noise plus the particle).

    Cost of :meth:`fit` on m images: the smaller Gram matrix of the sample, min(m, n_pixels)^2, and its
    leading eigenvectors (dense, O(min(m, n_pixels)^3)): seconds for 10000 images at 64-71 px, minutes
    at 128 px (lower ``sample_size`` or Fourier-crop for speed).

    Args:
        box_size: image side length in pixels.
        radius: disk radius in pixels (default ``box_size // 2 - 1``).
        n_components: number of components; None estimates it (see above).
        sample_size: fit on at most this many images drawn uniformly at random.
        random_state: seed of the sample.

    Attributes (after :meth:`fit`):
        mean_: (n_pixels,) float32 sample mean of the disk pixels (not subtracted, see above).
        eigenvalues_: (L,) descending eigenvalues of the sample second-moment matrix X^T X / m along
            the components.
        noise_variance_: background estimate of the pixel noise variance.
        n_samples_: number of images in the sample.
    """

    def __init__(self, box_size: int, radius: float | None = None, n_components: int | None = None,
                 sample_size: int = 10000, random_state=0):
        super().__init__(box_size, radius)
        if n_components is not None and not 1 <= n_components <= self.n_pixels:
            raise ValueError(f"n_components must be between 1 and the {self.n_pixels} disk pixels, "
                             f"got {n_components}")
        if sample_size < 2:
            raise ValueError(f"sample_size must be at least 2, got {sample_size}")
        self.n_components = n_components
        self.sample_size = int(sample_size)
        self.random_state = random_state

    def fit(self, images_or_chunks) -> PCABasis:
        """Fit the components on a random sample of images.

        Args:
            images_or_chunks: either an (n, box, box) array (NumPy, memory-mapped ...; only the sampled
                images are read), or an iterable of (c, box, box) image chunks (e.g. preprocessed chunks
                of a particle set), sampled in one pass with bounded memory (reservoir sampling).

        Returns:
            self.
        """
        sample, background_variances = self._draw_sample(images_or_chunks)
        n_samples, n_pixels = sample.shape
        if n_samples < 2:
            raise ValueError(f"PCA needs at least 2 images, got {n_samples}")
        if not (np.isfinite(sample).all() and np.isfinite(background_variances).all()):
            raise ValueError("cannot fit PCA: the sampled images contain NaN or infinite pixels")
        if self.n_components is not None and self.n_components > min(n_samples, n_pixels):
            raise ValueError(f"cannot fit {self.n_components} components on {n_samples} images of "
                             f"{n_pixels} disk pixels")
        self.noise_variance_ = float(background_variances.mean())
        # the smaller Gram matrix; both have the squared singular values of the sample as eigenvalues
        gram = (sample.T @ sample if n_samples >= n_pixels else sample @ sample.T).astype(np.float64)
        size = gram.shape[0]
        if self.n_components is None:
            edge = marchenko_pastur_edge(n_samples, n_pixels, self.noise_variance_)
            squared, vectors = scipy.linalg.eigh(gram, subset_by_value=(edge, np.inf))
            if squared.size == 0:  # no signal above the noise: keep the leading direction
                squared, vectors = scipy.linalg.eigh(gram, subset_by_index=(size - 1, size - 1))
            n_components = min(squared.size, max(1, min(n_samples, n_pixels) // 2))
        else:
            n_components = self.n_components
            squared, vectors = scipy.linalg.eigh(gram, subset_by_index=(size - n_components, size - 1))
        squared, vectors = squared[::-1][:n_components], vectors[:, ::-1][:, :n_components]
        if n_samples < n_pixels:
            # right singular vectors from the left ones: v = X^T u / singular value
            vectors = sample.T.astype(np.float64) @ vectors
            vectors /= np.linalg.norm(vectors, axis=0)
        largest = np.abs(vectors).argmax(axis=0)
        vectors *= np.sign(vectors[largest, np.arange(n_components)])
        self._matrix = vectors.astype(np.float32)
        self.mean_ = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.eigenvalues_ = squared / n_samples
        self.n_samples_ = n_samples
        return self

    def _draw_sample(self, images_or_chunks) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``sample_size`` images drawn uniformly at random.

        Returns:
            (m, n_pixels) float32 disk pixels and (m,) variances of the background pixels (ddof 1).
        """
        rng = np.random.default_rng(self.random_state)
        shape = getattr(images_or_chunks, "shape", None)
        if shape is not None and len(shape) == 3:
            n_images = shape[0]
            chosen = np.sort(rng.choice(n_images, size=min(n_images, self.sample_size), replace=False))
            step = max(1, CHUNK_BYTES // (4 * self.box_size**2))
            blocks = [self._split(images_or_chunks[chosen[start:start + step]])
                      for start in range(0, chosen.size, step)]
            return np.concatenate([pixels for pixels, _ in blocks]), np.concatenate([noise for _, noise in blocks])
        reservoir = np.empty((self.sample_size, self.n_pixels), dtype=np.float32)
        reservoir_noise = np.empty(self.sample_size)
        n_seen = 0
        for chunk in images_or_chunks:
            pixels, noise = self._split(chunk)
            # Algorithm R: image t (0-based) fills slot t while t < size, then replaces a uniformly random
            # slot of [0, t] if that slot is < size
            seen = n_seen + np.arange(pixels.shape[0])
            slots = np.where(seen < self.sample_size, seen, rng.integers(0, seen + 1))
            for image in np.flatnonzero(slots < self.sample_size):
                reservoir[slots[image]] = pixels[image]
                reservoir_noise[slots[image]] = noise[image]
            n_seen += pixels.shape[0]
        n_kept = min(n_seen, self.sample_size)
        return reservoir[:n_kept], reservoir_noise[:n_kept]

    def _split(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(c, n_pixels) disk pixels and (c,) background variances of a chunk of images."""
        images = as_image_stack(images, self.box_size)
        background = np.take(images.reshape(images.shape[0], -1), self.background_pixels, axis=1)
        return self._disk_pixels(images), background.var(axis=1, ddof=1, dtype=np.float64)


# -- streaming expansion ---------------------------------------------------------------------------------


def expand_particles(particles, basis: Basis, preprocessor: Preprocessor, indices=None, chunk_size: int | None = None,
                     out: np.ndarray | None = None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Preprocess and expand particle images chunk by chunk.

    Memory use is bounded by the chunk size (plus the basis and the output), so a memory-mapped stack
    larger than RAM expands with memory independent of the number of particles; the output itself can be
    a ``np.memmap``.

    Args:
        particles: a particle set with ``n_particles``, ``box_size`` and
            ``iter_chunks(indices, chunk_size)`` yielding ((c,) original indices, (c, box, box) float32
            images) -- a :class:`~napari_ppcasort.core.particles.ParticleSet` or
            :class:`~napari_ppcasort.core.particles.ArrayParticleSet`.
        basis: basis for images of ``preprocessor.output_box`` pixels.
        preprocessor: applied to every chunk; ``preprocessor.box_size`` must equal ``particles.box_size``.
        indices: (N,) distinct particle indices to expand, in the order of the output rows
            (default: all particles in order).
        chunk_size: images per chunk (default: the particle set's default).
        out: optional (N, basis.n_coefficients) float32 array (e.g. a ``np.memmap``) to fill.
        progress: called as ``progress(done, total)`` after each chunk.

    Returns:
        (N, basis.n_coefficients) float32 coefficients, row i for particle ``indices[i]`` (``out`` if given).

    Raises:
        ValueError: mismatched box sizes, bad indices or ``out``; BadImageError naming the particle
            whose image cannot be preprocessed.
    """
    steps = expansion_steps(particles, basis, preprocessor, indices, chunk_size, out)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(done, total)


def expansion_steps(particles, basis: Basis, preprocessor: Preprocessor, indices=None, chunk_size: int | None = None,
                    out: np.ndarray | None = None):
    """:func:`expand_particles` as a generator: yields (done, total) images after each chunk and returns the
    (N, L) coefficients, so that a caller can report progress or stop between chunks."""
    if preprocessor.box_size != particles.box_size:
        raise ValueError(f"the preprocessor expects {preprocessor.box_size} px images but the particles are "
                         f"{particles.box_size} px")
    if basis.box_size != preprocessor.output_box:
        raise ValueError(f"the basis is for {basis.box_size} px images but preprocessing gives "
                         f"{preprocessor.output_box} px images")
    if indices is None:
        indices = np.arange(particles.n_particles, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} of {indices.dtype}")
    order = np.argsort(indices, kind="stable")
    sorted_indices = indices[order]
    if sorted_indices.size and np.any(sorted_indices[1:] == sorted_indices[:-1]):
        raise ValueError(f"indices contain particle {sorted_indices[1:][sorted_indices[1:] == sorted_indices[:-1]][0]} "
                         "more than once")
    shape = (indices.size, basis.n_coefficients)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape {shape}, got {out.dtype} {out.shape}")

    done = 0
    for chunk_indices, images in particles.iter_chunks(indices, chunk_size):
        # rows of the output for these particles, whatever order the particle set yields them in
        rows = order[np.searchsorted(sorted_indices, chunk_indices)]
        try:
            prepared = preprocessor(images, chunk_indices)
        except BadImageError as error:
            raise error.of_particles(chunk_indices) from error
        out[rows] = basis.expand(prepared)
        done += len(chunk_indices)
        yield done, indices.size
    return out


# -- the bases a sort can use ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BasisSpec:
    """One basis of :data:`BASES`.

    Attributes:
        name: the value of the ``basis`` setting.
        summary: one line for the help of the ``basis`` setting.
        build: ``build(particles, preprocessor, settings) -> basis``: the basis for the preprocessed images of
            ``particles`` (fitted on them if it is learned from the data).
        steerable: True if rotating an image only turns its coefficients (see ``PSWFBasis.rotate``): what the
            models with ``steerable_basis`` need.
    """

    name: str
    summary: str
    build: Callable
    steerable: bool = False


def _pswf_for(particles, preprocessor: Preprocessor, settings) -> PSWFBasis:
    return PSWFBasis(preprocessor.output_box, radius=preprocessor.radius, max_coefficients=settings.n_coefficients)


def _pca_for(particles, preprocessor: Preprocessor, settings) -> PCABasis:
    basis = PCABasis(preprocessor.output_box, radius=preprocessor.radius, n_components=settings.n_coefficients,
                     random_state=settings.random_state)
    rng = np.random.default_rng(settings.random_state)
    n_sample = min(particles.n_particles, basis.sample_size)
    sample = np.sort(rng.choice(particles.n_particles, size=n_sample, replace=False))
    return basis.fit(preprocessor(images, indices) for indices, images in particles.iter_chunks(sample))


#: The bases a sort can use, by the value of the ``basis`` setting. Adding one is one entry.
BASES: dict[str, BasisSpec] = {spec.name: spec for spec in (
    BasisSpec("pswf", "prolate spheroidal wave functions, fixed and steerable (the paper's basis)", _pswf_for,
              steerable=True),
    BasisSpec("pca", "principal components of a sample of the images", _pca_for),
)}

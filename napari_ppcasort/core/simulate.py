"""Simulated cryo-EM particle stacks with ground truth (paper section 4.1 protocol).

A stack mixes three kinds of images, told apart by ``SimulatedStack.labels``:

* ``PARTICLE``: projections of a 3-D volume at Haar-uniform random orientations, shifted by a few
  pixels, optionally multiplied by a CTF, plus white Gaussian noise;
* ``OUTLIER``: random crops of scikit-image's "cameraman" picture (shipped with scikit-image, no
  download), energy-matched to the particles, plus the same noise;
* ``NOISE``: the noise alone.

Projections use the Fourier-slice theorem: one 3-D FFT of the volume (zero-padded x2), then each
image's central slice is read off by trilinear interpolation and inverse 2-D FFT'd. Work is chunked
over images and spread over threads, so memory stays bounded by the output array plus a fixed
interpolation table (64 bytes per voxel of half the x2-padded spectrum: 92 MB for a 71 px volume).

Coordinates: a volume array is indexed ``[z, y, x]`` and an image ``[y, x]`` (MRC order); the centre
of a volume or image of side ``L`` is the voxel/pixel ``L // 2``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np
import pandas as pd
import scipy.fft
import starfile
from scipy.spatial.transform import Rotation

# The microscope of every simulated CTF, written to the STAR optics block: VOLTAGE_KV, SPHERICAL_ABERRATION_MM,
# AMPLITUDE_CONTRAST (core.ctf).
from .ctf import (AMPLITUDE_CONTRAST, SPHERICAL_ABERRATION_MM, VOLTAGE_KV, _ctf_values, ctf_at,
                  electron_wavelength_angstrom)
from .outputs import atomic_files, write_mrc_stack

# One label table for both simulators. ``simulate_particles`` (Table-1 protocol) uses PARTICLE, OUTLIER
# and NOISE; the micrograph simulator (core.micrograph) uses PARTICLE and the five picking-junk classes,
# whose geometric rules are in ``core.micrograph.classify_pick``. PARTICLE always means a good particle.
PARTICLE, OUTLIER, NOISE = 0, 1, 2
OFF_CENTRE, AGGREGATE, ICE, CARBON, EMPTY = 3, 4, 5, 6, 7
LABEL_NAMES = {
    PARTICLE: "particle",
    OUTLIER: "outlier",
    NOISE: "noise",
    OFF_CENTRE: "off_centre",
    AGGREGATE: "aggregate",
    ICE: "ice",
    CARBON: "carbon",
    EMPTY: "empty",
}


# The volume is zero-padded to OVERSAMPLING times its side before the 3-D FFT. Measured relative
# L2 error of the interpolated central slices against the exact (non-uniform DFT) slice values of the
# ribosome map at 33 px, with the sinc^2 pre-compensation used here: x1 15%, x1.5 5.3%, x2 2.9%,
# x3 1.2% (without pre-compensation: 24%, 11%, 6.6%, 3.0%).
OVERSAMPLING = 2

DEFAULT_CHUNK_SIZE = 32  # images per work unit: measured fastest (16-128 within 20%, 256 is 2.5x slower)


class VolumeError(ValueError):
    """A volume file or array that cannot be projected (not cubic 3-D, not finite, unreadable)."""


@dataclass
class SimulatedStack:
    """A simulated particle stack and its ground truth.

    images:         (N, L, L) float32, in the volume's density units (a projection is a sum of voxels).
    labels:         (N,) int8, PARTICLE / OUTLIER / NOISE.
    rotations:      (N, 3, 3) float64 rotation of each particle (see ``project``), identity otherwise.
    shifts:         (N, 2) float64 shift (x, y) in pixels applied to each particle, zero otherwise.
    defocus_um:     (N,) float64 defocus in micrometres (positive = underfocus) drawn for every image,
                    or None when no CTF was simulated. The CTF is applied to particles only.
    snr:            the requested signal-to-noise ratio (definition in ``simulate_particles``).
    noise_variance: variance sigma^2 of the white Gaussian noise added to every image.
    pixel_size:     pixel size in angstrom.
    """

    images: np.ndarray
    labels: np.ndarray
    rotations: np.ndarray
    shifts: np.ndarray
    defocus_um: np.ndarray | None
    snr: float
    noise_variance: float
    pixel_size: float

    def star_blocks(self, stack_file_name: str) -> dict[str, pd.DataFrame]:
        """RELION 3.1 STAR blocks (see ``write_simulated``) for this stack written as ``stack_file_name``."""
        n_images, side = self.images.shape[:2]
        particles = pd.DataFrame(
            {
                "rlnImageName": image_names(n_images, stack_file_name),
                "rlnOpticsGroup": np.ones(n_images, dtype=int),
            }
        )
        if self.defocus_um is not None:
            particles["rlnDefocusU"] = self.defocus_um * 1e4
            particles["rlnDefocusV"] = self.defocus_um * 1e4
            particles["rlnDefocusAngle"] = 0.0
        particles["ppcasortTrueLabel"] = self.labels.astype(int)
        return {"optics": optics_block(self.pixel_size, side), "particles": particles}


# --------------------------------------------------------------------------------------------------
# Volumes


def phantom_volume(size: int = 64, random_state=0) -> np.ndarray:
    """Built-in asymmetric 3-D phantom: a sum of 14 randomly oriented anisotropic Gaussian blobs.

    Blob centres lie within 0.22 * size of the centre and blob widths (standard deviations) are
    0.025-0.07 * size (at least 1 voxel), so the density stays inside the sphere inscribed in the box
    and every projection stays inside the image. Random placement leaves no symmetry.

    Returns a (size, size, size) float32 array indexed [z, y, x] with maximum 1.
    """
    if int(size) != size or size < 8:
        raise ValueError(f"phantom size must be an integer >= 8, got {size!r}")
    size = int(size)
    rng = np.random.default_rng(random_state)
    n_blobs = 14
    directions = rng.standard_normal((n_blobs, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centres = directions * (0.22 * size * rng.uniform(0.0, 1.0, (n_blobs, 1)) ** (1 / 3))
    widths = np.maximum(rng.uniform(0.025, 0.07, (n_blobs, 3)) * size, 1.0)
    orientations = random_rotations(n_blobs, rng)
    weights = rng.uniform(0.5, 1.0, n_blobs)

    axis = np.arange(size, dtype=np.float64) - size // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    points = np.stack([x, y, z], axis=-1)  # (size, size, size, 3) as (x, y, z)
    volume = np.zeros((size,) * 3)
    for centre, width, orientation, weight in zip(centres, widths, orientations, weights):
        # Blob axes are the columns of `orientation`; coordinates along them scaled by the widths.
        local = (points - centre) @ orientation / width
        volume += weight * np.exp(-0.5 * np.einsum("...i,...i->...", local, local))
    return (volume / volume.max()).astype(np.float32)


# Side domains of ``elongated_volume``: (position t along the rod, azimuth about the rod in degrees,
# radius as a fraction of the volume side, distance of the centre from the rod axis in radii).
_ELONGATED_DOMAINS = ((-0.9, 30, 0.11, 0.5), (-0.75, 150, 0.10, 0.65), (-0.2, 260, 0.09, 0.8), (0.55, 60, 0.08, 0.8))


def elongated_volume(size: int = 64, random_state=0) -> np.ndarray:
    """Built-in elongated, asymmetric 3-D particle: a bent, twisted, tapering rod with four side domains,
    filled with pseudo-atoms.

    Shape: the rod is the union of spheres centred on the curve (x, y, z) = size * (0.27 t, b (t^2 - 1/3),
    c t^3), t in [-1, 1], with a bend b in [0.05, 0.07] and a twist c in [0.07, 0.09] drawn from
    ``random_state``, whose radius tapers from 0.09 * size (t = -1) to 0.042 * size (t = +1). Four
    spherical side domains (``_ELONGATED_DOMAINS``: a large head domain and a second one at the thick end,
    two smaller ones along the rod, at different azimuths; positions and azimuths jittered by +-0.05 and
    +-15 degrees) break every symmetry. Texture: 0.4 pseudo-atoms per voxel of the shape, uniformly placed
    (a protein's density is about uniform inside its envelope), each a Gaussian of 0.8 voxel, so the
    map's detail reaches Nyquist as a real map's does; the density is centred on its centre of mass.

    Measured over seeds 0-19 at size 64: length / width (square root of the ratio of the largest to the
    smallest eigenvalue of the density's second-moment tensor) 2.7-3.1; correlation of the volume with
    any of its axis flips or 90/180-degree rotations below 0.75; density above 1% of the maximum within
    0.47 * size of the centre.

    Returns a (size, size, size) float32 array indexed [z, y, x] with maximum 1, long axis along x.
    """
    if int(size) != size or size < 16:
        raise ValueError(f"elongated volume size must be an integer >= 16, got {size!r}")
    from scipy.ndimage import gaussian_filter

    size = int(size)
    rng = np.random.default_rng(random_state)
    bend = rng.uniform(0.05, 0.07)
    twist = rng.uniform(0.07, 0.09)

    def axis_point(t):
        return size * np.stack([0.27 * t, bend * (t**2 - 1 / 3), twist * t**3], axis=-1)

    t = np.linspace(-1.0, 1.0, 61)
    domain_t, azimuth, domain_radius, distance = (np.array(column) for column in zip(*_ELONGATED_DOMAINS))
    domain_t = domain_t + rng.uniform(-0.05, 0.05, len(domain_t))
    azimuth = np.deg2rad(azimuth + rng.uniform(-15, 15, len(azimuth)))
    domain_radius = size * domain_radius
    outward = np.stack([np.zeros_like(azimuth), np.cos(azimuth), np.sin(azimuth)], axis=1)
    centres = np.vstack([axis_point(t), axis_point(domain_t) + outward * (distance * domain_radius)[:, None]])
    radii = np.concatenate([size * (0.09 - 0.024 * (t + 1)), domain_radius])

    coordinates = np.arange(size, dtype=np.float64) - size // 2
    z, y, x = np.meshgrid(coordinates, coordinates, coordinates, indexing="ij", sparse=True)
    shape = np.zeros((size,) * 3, dtype=bool)
    for (centre_x, centre_y, centre_z), radius in zip(centres, radii):
        shape |= (x - centre_x) ** 2 + (y - centre_y) ** 2 + (z - centre_z) ** 2 <= radius**2
    inside = np.flatnonzero(shape)
    voxels = rng.choice(inside, size=int(0.4 * len(inside)))
    atoms = np.stack(np.unravel_index(voxels, shape.shape), axis=1) + rng.uniform(-0.5, 0.5, (len(voxels), 3))
    atoms -= atoms.mean(axis=0) - size // 2  # centre of mass on the centre voxel
    edges = np.arange(size + 1) - 0.5
    counts, _ = np.histogramdd(atoms, bins=(edges, edges, edges))
    volume = gaussian_filter(counts, 0.8)
    return (volume / volume.max()).astype(np.float32)


def load_volume(path, size: int | None = None) -> np.ndarray:
    """Read a cubic 3-D density map from an MRC file, optionally resampled to ``size`` voxels a side.

    Resampling crops or zero-pads the centred 3-D Fourier transform (e.g. 65 -> 71 px), which keeps
    the physical box, the band-limited content and the total mass (sum of voxels); the voxel size
    becomes old_voxel_size * old_size / size and voxel values scale by (old_size / size)^3.

    Returns a (size, size, size) float32 array indexed [z, y, x]. Raises FileNotFoundError or
    VolumeError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such volume file")
    try:
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            if mrc.is_image_stack():
                raise VolumeError(f"{path}: is an image stack (MRC space group 0), not a 3-D volume")
            volume = np.asarray(mrc.data, dtype=np.float32).copy()
    except VolumeError:
        raise
    except ValueError as error:
        raise VolumeError(f"{path}: not a readable MRC file ({error})") from error
    _check_volume(volume, source=str(path))
    if size is not None and size != volume.shape[0]:
        volume = resample_volume(volume, size)
    return volume


def resample_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """Resample a cubic volume to ``size`` voxels a side by Fourier cropping / zero-padding.

    The centred spectrum's central min(old, new)^3 block is kept; taking the real part of the inverse
    transform splits an unpaired Nyquist plane evenly between +/- Nyquist. The sum of voxels is kept.
    Returns float32 (size, size, size).
    """
    _check_volume(volume, source="volume")
    if int(size) != size or size < 2:
        raise ValueError(f"volume size must be an integer >= 2, got {size!r}")
    size = int(size)
    old = volume.shape[0]
    spectrum = np.fft.fftshift(np.fft.fftn(volume.astype(np.float64)))
    kept = min(old, size)
    source = slice(old // 2 - kept // 2, old // 2 - kept // 2 + kept)
    target = slice(size // 2 - kept // 2, size // 2 - kept // 2 + kept)
    resized = np.zeros((size,) * 3, dtype=np.complex128)
    resized[target, target, target] = spectrum[source, source, source]
    # ifftn divides by size^3 while the DC term (the total mass) is unchanged: the sum is preserved.
    return np.fft.ifftn(np.fft.ifftshift(resized)).real.astype(np.float32)


def _check_volume(volume: np.ndarray, source: str) -> None:
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise VolumeError(f"{source}: expected a cubic 3-D volume, got shape {volume.shape}")
    if volume.shape[0] < 2:
        raise VolumeError(f"{source}: volume side must be at least 2 voxels, got {volume.shape[0]}")
    if not np.isfinite(volume).all():
        raise VolumeError(f"{source}: volume contains NaN or infinite values")


# --------------------------------------------------------------------------------------------------
# Rotations, CTF


def random_rotations(n: int, random_state=None) -> np.ndarray:
    """``n`` rotation matrices drawn from the uniform (Haar) distribution on SO(3).

    Unit quaternions with i.i.d. Gaussian components are uniform on the 3-sphere, hence Haar
    rotations. Returns (n, 3, 3) float64.
    """
    rng = np.random.default_rng(random_state)
    quaternions = rng.standard_normal((int(n), 4))
    quaternions /= np.linalg.norm(quaternions, axis=1, keepdims=True)
    return Rotation.from_quat(quaternions).as_matrix().reshape(int(n), 3, 3)


def ctf(
    box: int,
    pixel_size: float,
    defocus_um: float,
    voltage_kv: float = VOLTAGE_KV,
    cs_mm: float = SPHERICAL_ABERRATION_MM,
    amplitude_contrast: float = AMPLITUDE_CONTRAST,
    *,
    defocus_v_um: float | None = None,
    defocus_angle_deg: float = 0.0,
    b_factor: float = 0.0,
) -> np.ndarray:
    """2-D contrast transfer function on a ``box`` x ``box`` grid (see ``ctf_at`` for the formula).

    ``defocus_um`` is the defocus U; ``defocus_v_um`` (default: U, no astigmatism), ``defocus_angle_deg``
    and ``b_factor`` as in ``ctf_at``. Without astigmatism and B-factor: CTF(k) = sin(pi * lambda * df *
    k^2 - pi/2 * Cs * lambda^3 * k^4 + arcsin(A)), CTF(0) = A > 0.

    Returns (box, box) float32 with zero frequency at [box // 2, box // 2] (numpy.fft.fftshift layout),
    row index = y frequency, column index = x frequency.
    """
    if int(box) != box or box < 1:
        raise ValueError(f"CTF box must be a positive integer, got {box!r}")
    _check_pixel_size(pixel_size)
    frequencies = np.fft.fftshift(np.fft.fftfreq(int(box), d=pixel_size))
    return ctf_at(
        frequencies[None, :],
        frequencies[:, None],
        defocus_um,
        defocus_v_um,
        defocus_angle_deg,
        b_factor,
        voltage_kv,
        cs_mm,
        amplitude_contrast,
    )


# --------------------------------------------------------------------------------------------------
# Projection


class _SliceProjector:
    """Interpolation table of one volume's x2-padded 3-D spectrum, and the central-slice grid.

    Table layout: for each base voxel (z, y, x) of the half spectrum x >= 0 (x counted from the
    centre), the 8 coefficients of the trilinear polynomial on the cell (z..z+1, y..y+1, x..x+1),
    real parts then imaginary parts, so one 64-byte gather fetches all that a sample needs. Samples
    with x < 0 are read at -k and conjugated (the spectrum of a real volume is Hermitian).
    """

    def __init__(self, volume: np.ndarray):
        _check_volume(volume, source="volume")
        side = volume.shape[0]
        padded_side = OVERSAMPLING * side
        centre = padded_side // 2
        self.image_side = side
        # Images are computed on a fast FFT size >= side (71 is prime) and cropped to `side`.
        self.fft_side = scipy.fft.next_fast_len(side, real=True)
        half_width = self.fft_side // 2 + 1

        # Largest frequency present symmetrically in the volume, in cycles per voxel: samples are
        # taken inside this sphere only, so every orientation sees the same band.
        max_frequency = ((side - 1) // 2) / side

        # Trilinear interpolation multiplies the object by sinc^2(x / padded_side) per axis (the
        # transform of the triangle kernel); divide it out beforehand.
        offsets = np.arange(side) - side // 2
        apodisation = np.sinc(offsets / padded_side) ** 2
        corrected = volume / (apodisation[:, None, None] * apodisation[None, :, None] * apodisation[None, None, :])
        padded = np.zeros((padded_side,) * 3, dtype=np.float32)
        start = centre - side // 2
        padded[start : start + side, start : start + side, start : start + side] = corrected
        spectrum = scipy.fft.fftshift(scipy.fft.fftn(scipy.fft.ifftshift(padded), workers=_thread_count()))
        del padded, corrected
        # One zero plane on the high side of each axis so that base + 1 is always a valid index.
        spectrum = np.pad(spectrum.astype(np.complex64), ((0, 1), (0, 1), (0, 1)))

        self.half_x = int(np.floor(padded_side * max_frequency)) + 1
        self.padded_side = padded_side
        self.centre = centre
        # corners[..., part, dz, dy, dx]: spectrum at base + (dz, dy, dx), part 0 = real, 1 = imaginary.
        corners = np.empty((padded_side, padded_side, self.half_x, 2, 2, 2, 2), dtype=np.float32)
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    block = spectrum[
                        dz : dz + padded_side, dy : dy + padded_side, centre + dx : centre + dx + self.half_x
                    ]
                    corners[..., 0, dz, dy, dx] = block.real
                    corners[..., 1, dz, dy, dx] = block.imag
        # Forward differences along dz, dy, dx turn corner values into the coefficients of the
        # trilinear polynomial: value = sum over (a, b, c) of coefficient[a, b, c] * fz^a * fy^b * fx^c.
        corners[..., 1, :, :] -= corners[..., 0, :, :]
        corners[..., :, 1, :] -= corners[..., :, 0, :]
        corners[..., :, :, 1] -= corners[..., :, :, 0]
        self.table = corners.reshape(-1, 16)

        # Half-plane (rfft) frequency grid of the fft_side images, restricted to the band sphere.
        ky = scipy.fft.fftfreq(self.fft_side) * self.fft_side
        kx = np.arange(half_width)
        grid_ky, grid_kx = np.meshgrid(ky, kx, indexing="ij")
        radius = np.hypot(grid_kx, grid_ky) / self.fft_side
        self.inside = np.flatnonzero((radius <= max_frequency).ravel())
        self.half_width = half_width
        # Sample coordinates in padded-grid units, (2, n_points): rows kx, ky.
        scale = padded_side / self.fft_side
        self.sample_kxy = (np.stack([grid_kx.ravel(), grid_ky.ravel()])[:, self.inside] * scale).astype(np.float32)
        self.kx = kx.astype(np.float64)
        self.ky = ky.astype(np.float64)
        self.sample_squared_frequency = (radius.ravel()[self.inside] ** 2).astype(np.float32)  # (cycles/pixel)^2

    def central_slices(self, rotations: np.ndarray) -> np.ndarray:
        """Interpolated spectra at the band-limited half-plane samples: (n, n_points) complex64."""
        n = len(rotations)
        n_points = self.sample_kxy.shape[1]
        # Frequency k = kx * r1 + ky * r2 (r1, r2 = first two rows of R); components in z, y, x order.
        basis = rotations[:, :2, ::-1].astype(np.float32)  # (n, 2, 3)
        position = np.empty((3, n, n_points), dtype=np.float32)
        for axis in range(3):
            np.matmul(basis[:, :, axis], self.sample_kxy, out=position[axis])
        sign = np.where(position[2] < 0, np.float32(-1), np.float32(1))
        position *= sign
        position[:2] += self.centre
        floor = np.floor(position)
        position -= floor  # now the fractional parts (fz, fy, fx)
        index = floor.astype(np.int32)
        del floor
        base = index[0]
        base *= self.padded_side
        base += index[1]
        base *= self.half_x
        base += index[2]
        del index

        # Monomials fz^a * fy^b * fx^c in the table's (a, b, c) order.
        frac_z, frac_y, frac_x = (part.ravel() for part in position)
        monomials = np.empty((8, frac_z.size), dtype=np.float32)
        monomials[0] = 1
        monomials[1] = frac_x
        monomials[2] = frac_y
        np.multiply(frac_y, frac_x, out=monomials[3])
        monomials[4] = frac_z
        np.multiply(frac_z, frac_x, out=monomials[5])
        np.multiply(frac_z, frac_y, out=monomials[6])
        np.multiply(monomials[6], frac_x, out=monomials[7])
        coefficients = np.take(self.table, base.ravel(), axis=0, mode="clip").reshape(-1, 2, 8)
        values = np.einsum("kp,pck->pc", monomials, coefficients)  # (points, [real, imag])
        values[:, 1] *= sign.ravel()
        return values.view(np.complex64).reshape(n, n_points)

    def render(
        self,
        rotations: np.ndarray,
        shifts: np.ndarray | None,
        defocus_um: np.ndarray | None,
        pixel_size: float,
    ) -> np.ndarray:
        """Projections of one chunk of orientations: (n, L, L) float32 (see ``project``)."""
        n = len(rotations)
        slices = self.central_slices(rotations)
        if defocus_um is not None:
            slices *= _ctf_values(self.sample_squared_frequency / np.float32(pixel_size**2), defocus_um[:, None])
        half = np.zeros((n, self.fft_side * self.half_width), dtype=np.complex64)
        half[:, self.inside] = slices
        half = half.reshape(n, self.fft_side, self.half_width)

        # Move the origin from pixel 0 to the centre fft_side // 2, plus the requested shift.
        centre_x = np.full(n, self.fft_side // 2, dtype=np.float64)
        centre_y = centre_x.copy()
        if shifts is not None:
            centre_x += shifts[:, 0]
            centre_y += shifts[:, 1]
        phase_x = np.exp((-2j * np.pi / self.fft_side) * np.outer(centre_x, self.kx)).astype(np.complex64)
        phase_y = np.exp((-2j * np.pi / self.fft_side) * np.outer(centre_y, self.ky)).astype(np.complex64)
        half *= phase_y[:, :, None]
        half *= phase_x[:, None, :]

        images = scipy.fft.irfft2(half, s=(self.fft_side, self.fft_side), workers=1)
        start = self.fft_side // 2 - self.image_side // 2
        return images[:, start : start + self.image_side, start : start + self.image_side]


def project(
    volume: np.ndarray,
    rotations: np.ndarray,
    shifts: np.ndarray | None = None,
    defocus_um: np.ndarray | None = None,
    pixel_size: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Fourier-slice projections of a cubic volume: (n, L, L) float32 for a (L, L, L) volume.

    Convention: the projection at rotation R is the line integral along z (sum over the z index) of
    the rotated volume v_R(x) = v(R^T x), with x = (x, y, z) measured in voxels from the centre voxel
    L // 2; image pixel [y, x] is at (x, y) from the centre pixel L // 2. Hence
    project(v, R1 @ R2) == project(v rotated by R2, R1), and the 2-D spectrum of the image at
    frequency (kx, ky) is the volume's 3-D spectrum at kx * R[0] + ky * R[1] (rows of R).

    Method: the volume, pre-divided by the trilinear kernel's sinc^2 apodisation, is zero-padded x2 and
    3-D FFT'd once; each central slice is sampled by trilinear (first-order) interpolation inside the
    sphere of radius ((L - 1) // 2) / L cycles/voxel (the band the volume holds in every direction)
    on the half plane of a fast FFT size >= L, inverse FFT'd and cropped to L x L.

    shifts:     optional (n, 2) shifts (x, y) in pixels; the image content moves by +shift (exact
                Fourier phase shift, periodic over the FFT box).
    defocus_um: optional (n,) defocus in micrometres: each projection is multiplied by ``ctf`` with
                the module's voltage, Cs and amplitude contrast.
    pixel_size: angstrom per pixel (only used by the CTF).
    chunk_size: images per work unit (work memory per thread ~ 0.3 MB per image at L = 71).
    """
    volume = np.asarray(volume, dtype=np.float32)
    _check_pixel_size(pixel_size)
    rotations = _check_rotations(rotations)
    n = len(rotations)
    shifts = _check_per_image(shifts, n, (n, 2), "shifts")
    defocus_um = _check_per_image(defocus_um, n, (n,), "defocus_um")
    projector = _SliceProjector(volume)
    images = np.empty((n, volume.shape[0], volume.shape[0]), dtype=np.float32)

    def render_chunk(rows: slice) -> None:
        images[rows] = projector.render(
            rotations[rows],
            None if shifts is None else shifts[rows],
            None if defocus_um is None else defocus_um[rows],
            pixel_size,
        )

    _run_chunked(render_chunk, n, chunk_size)
    return images


def _check_rotations(rotations) -> np.ndarray:
    rotations = np.asarray(rotations, dtype=np.float64)
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (n, 3, 3), got {rotations.shape}")
    gram = rotations @ rotations.transpose(0, 2, 1)
    if not np.allclose(gram, np.eye(3), atol=1e-4) or not np.all(np.linalg.det(rotations) > 0):
        raise ValueError("rotations must be proper rotation matrices (orthonormal, determinant +1)")
    return rotations


def _check_per_image(values, n: int, shape: tuple, name: str) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape} for {n} images, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def _check_pixel_size(pixel_size: float) -> None:
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel size must be a positive number of angstrom, got {pixel_size!r}")


def _thread_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _run_chunked(work: Callable[[slice], None], n: int, chunk_size: int) -> None:
    """Call ``work(rows)`` on consecutive slices of range(n), spread over the available cores.

    NumPy's gathers, ufuncs and einsum and scipy's FFT release the GIL, so threads run in parallel.
    ``work`` must write its results itself (disjoint rows), which keeps memory per chunk.
    """
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunks = [slice(start, min(start + int(chunk_size), n)) for start in range(0, n, int(chunk_size))]
    threads = min(_thread_count(), len(chunks))
    if threads <= 1:
        for rows in chunks:
            work(rows)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(work, chunks):
            pass


# --------------------------------------------------------------------------------------------------
# Stacks

# Images per block of noise: each block draws from its own generator seeded by (seed, block index),
# so the noise does not depend on chunk_size or on the number of threads.
_NOISE_BLOCK = 256


def simulate_particles(
    n_particles: int,
    n_outliers: int = 0,
    n_noise: int = 0,
    box_size: int = 71,
    volume: np.ndarray | None = None,
    snr: float = 0.1,
    max_shift: float = 2.0,
    defocus_um: tuple[float, float] | None = None,
    pixel_size: float = 1.0,
    random_state=0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SimulatedStack:
    """Simulate a shuffled stack of particle, outlier and pure-noise images with ground truth.

    Particles: ``project`` of ``volume`` (default: ``phantom_volume(box_size)``) at Haar-random
    rotations, shifted by (x, y) drawn uniformly from [-max_shift, max_shift] pixels each, and, when
    ``defocus_um = (low, high)`` is given, multiplied by ``ctf`` with a defocus drawn uniformly from
    [low, high] micrometres (a defocus is drawn for every image so the STAR file is complete, but the
    CTF is applied to particles only).

    SNR definition: SNR = mean over particle images of the clean image's power (sum of squared pixels
    / L^2) divided by the noise variance sigma^2. White Gaussian noise of variance sigma^2 is added to
    EVERY image (particles, outliers, noise); ``snr=np.inf`` adds none.

    Outliers: square crops of skimage.data.camera() (512 x 512, shipped with scikit-image) with side
    uniform in [L, min(4L, 512)] pixels at a uniform position, resized to L x L (anti-aliased),
    mean-subtracted and scaled so that each one's power equals the mean particle power.
    Noise images: the noise alone.

    The output is determined by ``random_state`` alone (chunk_size and the number of cores change the
    images by float32 rounding only).
    Memory: the (N, L, L) float32 output plus the projector table and per-chunk work arrays.
    """
    counts = {"n_particles": n_particles, "n_outliers": n_outliers, "n_noise": n_noise}
    for name, count in counts.items():
        if int(count) != count or count < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    if n_particles < 1:
        raise ValueError("n_particles must be at least 1 (the SNR is defined relative to the particles)")
    if not snr > 0:
        raise ValueError(f"snr must be positive (np.inf for no noise), got {snr!r}")
    if not (np.isfinite(max_shift) and max_shift >= 0):
        raise ValueError(f"max_shift must be a non-negative number of pixels, got {max_shift!r}")
    _check_pixel_size(pixel_size)
    if defocus_um is not None:
        if np.shape(defocus_um) != (2,) or not 0 < defocus_um[0] <= defocus_um[1]:
            raise ValueError(
                f"defocus_um must be a range (low, high) in micrometres with 0 < low <= high, got {defocus_um!r}"
            )
        low, high = (float(value) for value in defocus_um)
    if volume is None:
        volume = phantom_volume(box_size)
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != (box_size,) * 3:
        raise VolumeError(
            f"volume has shape {volume.shape} but box_size is {box_size}; "
            f"resample it first, e.g. load_volume(path, size={box_size})"
        )

    rng = np.random.default_rng(random_state)
    n_total = int(n_particles + n_outliers + n_noise)
    labels = rng.permutation(
        np.repeat(np.array([PARTICLE, OUTLIER, NOISE], dtype=np.int8), [n_particles, n_outliers, n_noise])
    )
    particle_rows = np.flatnonzero(labels == PARTICLE)
    rotations = np.tile(np.eye(3), (n_total, 1, 1))
    rotations[particle_rows] = random_rotations(len(particle_rows), rng)
    shifts = np.zeros((n_total, 2))
    shifts[particle_rows] = rng.uniform(-max_shift, max_shift, (len(particle_rows), 2))
    defocus = None if defocus_um is None else rng.uniform(low, high, n_total)
    noise_seed = int(rng.integers(2**63))

    images = np.empty((n_total, box_size, box_size), dtype=np.float32)
    particle_power = _render_particles(
        images, particle_rows, volume, rotations, shifts, defocus, pixel_size, chunk_size
    )
    mean_power = float(particle_power.mean())
    _insert_camera_outliers(images, np.flatnonzero(labels == OUTLIER), mean_power, rng)
    images[labels == NOISE] = 0
    noise_variance = mean_power / snr
    if noise_variance > 0:
        _add_noise(images, np.sqrt(noise_variance), noise_seed)
    return SimulatedStack(
        images=images,
        labels=labels,
        rotations=rotations,
        shifts=shifts,
        defocus_um=defocus,
        snr=float(snr),
        noise_variance=float(noise_variance),
        pixel_size=float(pixel_size),
    )


def _render_particles(images, rows, volume, rotations, shifts, defocus, pixel_size, chunk_size) -> np.ndarray:
    """Write the clean projections into images[rows]; return their powers (len(rows),) float64."""
    projector = _SliceProjector(volume)
    power = np.empty(len(rows))
    n_pixels = volume.shape[0] ** 2

    def render_chunk(chunk: slice) -> None:
        target = rows[chunk]
        clean = projector.render(
            rotations[target], shifts[target], None if defocus is None else defocus[target], pixel_size
        )
        power[chunk] = np.einsum("nij,nij->n", clean, clean) / n_pixels
        images[target] = clean

    _run_chunked(render_chunk, len(rows), chunk_size)
    return power


def _insert_camera_outliers(images: np.ndarray, rows: np.ndarray, power: float, rng: np.random.Generator) -> None:
    """Write energy-matched camera crops into images[rows] (see ``simulate_particles``)."""
    if len(rows) == 0:
        return
    from scipy.ndimage import gaussian_filter
    from skimage.data import camera
    from skimage.transform import resize

    picture = camera().astype(np.float32)
    side = images.shape[1]
    picture_side = picture.shape[0]
    crop_sides = rng.integers(min(side, picture_side), min(4 * side, picture_side) + 1, size=len(rows))
    corners = rng.integers(0, picture_side - crop_sides[:, None] + 1, size=(len(rows), 2))
    # Anti-aliasing as skimage.transform.resize does it (Gaussian of sigma (factor - 1) / 2), but
    # applied once to the whole picture per sigma rounded to 0.1 px instead of once per crop.
    sigmas = np.round(np.maximum(crop_sides / side - 1, 0) / 2, 1)
    blurred = {sigma: gaussian_filter(picture, sigma, mode="reflect") for sigma in np.unique(sigmas)}

    def crop_chunk(chunk: slice) -> None:
        for row, crop_side, (top, left), sigma in zip(rows[chunk], crop_sides[chunk], corners[chunk], sigmas[chunk]):
            window = blurred[sigma][top : top + crop_side, left : left + crop_side]
            crop = resize(window, (side, side), order=1, anti_aliasing=False)
            crop -= crop.mean()
            crop *= np.sqrt(power / np.mean(crop**2))
            images[row] = crop

    _run_chunked(crop_chunk, len(rows), DEFAULT_CHUNK_SIZE)


def _add_noise(images: np.ndarray, sigma: float, seed: int) -> None:
    """Add white Gaussian noise of standard deviation ``sigma`` to every image, in place."""

    def noise_block(block: slice) -> None:
        generator = np.random.default_rng([seed, block.start // _NOISE_BLOCK])
        noise = generator.standard_normal((block.stop - block.start,) + images.shape[1:], dtype=np.float32)
        noise *= np.float32(sigma)
        images[block] += noise

    _run_chunked(noise_block, len(images), _NOISE_BLOCK)


# --------------------------------------------------------------------------------------------------
# Files


def write_simulated(stack, out_dir, name: str = "simulated", overwrite: bool = False) -> dict[str, Path]:
    """Write a simulated stack as ``name.mrcs`` + ``name.star`` + ``name_labels.csv`` in ``out_dir``.

    ``stack`` is a ``SimulatedStack`` or a ``core.micrograph.PickedStack``: anything with ``images``
    (N, L, L), ``labels`` (N,), ``pixel_size`` and a ``star_blocks(stack_file_name)`` method.

    name.mrcs: float32 image stack (MRC space group 0), voxel size = pixel size.
    name.star: RELION 3.1 style; data_optics (``optics_block``: rlnOpticsGroup, rlnOpticsGroupName,
        rlnImagePixelSize, rlnImageSize, rlnImageDimensionality, rlnVoltage, rlnSphericalAberration,
        rlnAmplitudeContrast) and data_particles (rlnImageName "000001@name.mrcs", 1-based;
        rlnOpticsGroup; the stack's CTF and provenance columns; ppcasortTrueLabel with the label codes of
        ``LABEL_NAMES``). A SimulatedStack writes rlnDefocusU, rlnDefocusV in angstrom and
        rlnDefocusAngle when a CTF was simulated.
    name_labels.csv: columns index (0-based position in the stack), label (code), label_name.

    Each file is written under a temporary name in ``out_dir`` and renamed once all three are
    complete. Existing files are refused (FileExistsError) unless ``overwrite=True``.
    Returns {"stack": Path, "star": Path, "labels": Path}.
    """
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file name without directories, got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "stack": out_dir / f"{name}.mrcs",
        "star": out_dir / f"{name}.star",
        "labels": out_dir / f"{name}_labels.csv",
    }
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)}: already exist(s); pass overwrite=True to replace")
    with atomic_files(*paths.values()) as (stack_path, star_path, labels_path):
        _write_stack_mrcs(stack, stack_path)
        starfile.write(stack.star_blocks(paths["stack"].name), star_path)
        _labels_table(stack.labels).to_csv(labels_path, index=False)
    return paths


def _write_stack_mrcs(stack, path: Path) -> None:
    """Write the images as an MRC stack, block by block with header statistics (see write_mrc_stack)."""
    images = stack.images
    block = 4096
    write_mrc_stack(path, images.shape[0], images.shape[1], (images[start:start + block]
                                                             for start in range(0, len(images), block)),
                    voxel_size=stack.pixel_size)


def optics_block(pixel_size: float, image_size: int) -> pd.DataFrame:
    """The RELION 3.1 data_optics block of one optics group with the module's microscope constants."""
    return pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [pixel_size],
            "rlnImageSize": [image_size],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [VOLTAGE_KV],
            "rlnSphericalAberration": [SPHERICAL_ABERRATION_MM],
            "rlnAmplitudeContrast": [AMPLITUDE_CONTRAST],
        }
    )


def image_names(n_images: int, stack_file_name: str) -> list[str]:
    """RELION image names "000001@stack.mrcs" ... (1-based) of the images of a stack file."""
    return [f"{index:06d}@{stack_file_name}" for index in range(1, n_images + 1)]


def _labels_table(labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": np.arange(len(labels)),
            "label": labels.astype(int),
            "label_name": [LABEL_NAMES[int(code)] for code in labels],
        }
    )

"""Realistic picked particle stacks: whole micrographs are simulated, picked and extracted as real data are.

``simulate_picked_stack`` is the entry point (plain keyword arguments); ``write_simulated`` (from
core.simulate) writes its result as name.mrcs + a RELION 3.1 name.star + name_labels.csv.

One micrograph, step by step (coordinates in pixels, x = column, y = row, origin at pixel [0, 0]):

1. Scene. Particles (Fourier-slice projections of a volume at a Haar-random orientation, at a random
   sub-pixel position, some touching or overlapping; clumps of 2-4 overlapping particles), polygons and
   discs of contamination (crystalline ice, ethane: dense, sharp-edged, ~10-25 times a particle's peak
   projected potential), gold-like beads (small spheres, ~30-50 times), on some micrographs the edge of
   the carbon film (the outside of a large hole, so a sharp, slightly curved edge, with granular
   texture), and a smooth ice-thickness gradient (ramp plus long-wavelength undulation).
2. Record. The projected potential is multiplied in Fourier space by -CTF (``ctf_at``: astigmatic,
   B-factor envelope; particles come out dark, as in a real micrograph before contrast inversion), then
   noise of power spectrum ``noise_power_spectrum`` (CTF-shaped structural noise of the vitreous ice +
   detector noise shaped by its MTF, with a 1/f-like low-frequency excess) and a few hot pixels are
   added. The scene is rendered on a canvas larger than the micrograph (by the CTF's delocalisation
   and a particle radius), so that nothing wraps around into the micrograph.
3. Pick. An imperfect picker places picks of each class (``classify_pick`` gives the rules): true
   particles with a small centre jitter, particles far off-centre or partially in the box, clumps at
   their centre, high-contrast junk (contamination and bead edges, the carbon edge, the film) and
   empty ice. Picks are at least a particle radius apart and their boxes lie inside the micrograph.
4. Extract as RELION does: box at the integer pick, contrast inverted (particles bright), normalised
   by ``normalise_like_relion``.

Micrographs are independent given the random seed (each draws from its own generator seeded by the
seed and its index), so the stack does not depend on the number of threads; they are simulated one
per thread at a time, so memory is the output stack plus a few canvases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.fft
from scipy.ndimage import gaussian_filter
from scipy.spatial import ConvexHull

from .preprocess import normalize_background
from .simulate import (
    AGGREGATE,
    CARBON,
    EMPTY,
    ICE,
    LABEL_NAMES,
    OFF_CENTRE,
    PARTICLE,
    VOLTAGE_KV,
    _check_pixel_size,
    _check_volume,
    _run_chunked,
    _SliceProjector,
    ctf_at,
    electron_wavelength_angstrom,
    elongated_volume,
    image_names,
    optics_block,
    random_rotations,
    resample_volume,
    write_simulated,
)

__all__ = [
    "DEFAULT_JUNK_MIX",
    "JUNK_CLASSES",
    "Micrograph",
    "PickedStack",
    "classify_pick",
    "extraction_background_radius",
    "noise_power_spectrum",
    "normalise_like_relion",
    "support_radius",
    "simulate_picked_stack",
    "voxel_size_for_diameter",
    "write_simulated",
]

# Junk classes by name (the keys of ``junk_mix``) and the default mix: every class present.
JUNK_CLASSES = {"off_centre": OFF_CENTRE, "aggregate": AGGREGATE, "ice": ICE, "carbon": CARBON, "empty": EMPTY}
DEFAULT_JUNK_MIX = {"off_centre": 0.2, "aggregate": 0.15, "ice": 0.25, "carbon": 0.15, "empty": 0.25}

DEFAULT_BOX_SIZE = 64
# Without an explicit pixel size, the largest particle's diameter is this fraction of the box.
PARTICLE_BOX_FRACTION = 0.6
#: Without an explicit micrograph size, micrographs are this many boxes across (1,024 px for 64-px boxes), so that
#: the default number of picks per micrograph fits every box size.
MICROGRAPH_BOXES = 16
DEFAULT_PICKS_PER_MICROGRAPH = 120
DEFAULT_SNR = 1 / 20
DEFAULT_JUNK_FRACTION = 0.3
DEFAULT_DEFOCUS_UM = (0.8, 3.0)
DEFAULT_MAX_ASTIGMATISM_UM = 0.1
DEFAULT_B_FACTOR = 100.0

# The built-in particle (``elongated_volume(64)``) is given this diameter (its support diameter, see
# ``support_radius``), the size of a 70S ribosome.
ELONGATED_DIAMETER_ANGSTROM = 250.0
# A volume's support: voxels whose |density| is at least this fraction of the maximum |density|.
SUPPORT_THRESHOLD = 0.05

# Picking geometry, as fractions of the particle radius r (``PickedStack.particle_radius``).
CENTRE_TOLERANCE = 0.15  # a pick within 0.15 r of a particle's centre is centred on it
PICK_JITTER = 0.05  # standard deviation (per axis) of a centred pick's error
OFF_CENTRE_RANGE = (2 * CENTRE_TOLERANCE, 1.6)  # distance of an off-centre pick from its particle
MIN_PICK_SEPARATION = 1.0  # the picker's non-maximum suppression distance

# Noise: share of the noise variance from the vitreous ice's structural noise (CTF-shaped); the rest
# is detector noise with shape MTF(f)^2 + LOW_FREQUENCY_WEIGHT * f_c / (f + f_c), MTF(f) = sinc(f).
STRUCTURAL_NOISE_FRACTION = 0.4
LOW_FREQUENCY_WEIGHT = 2.0
LOW_FREQUENCY_CORNER = 0.02  # f_c, cycles per pixel
HOT_PIXELS_PER_MEGAPIXEL = 4.0
HOT_PIXEL_RANGE = (15.0, 40.0)  # hot pixel value, in noise standard deviations

# Scene, in units of the particle radius r (sizes) and of the mean peak projected potential of a
# particle (strengths).
CARBON_MICROGRAPH_FRACTION = 0.35  # share of micrographs crossed by a carbon edge
CARBON_THICKNESS = 3.0
CARBON_GRAIN = 0.05  # relative standard deviation of the film's granular texture (1-px grains)
CONTAMINATION_RADIUS = (0.8, 5.0)  # log-uniform
CONTAMINATION_THICKNESS = (10.0, 25.0)
BEAD_RADIUS = (0.18, 0.3)
BEAD_THICKNESS = (30.0, 50.0)
ICE_RAMP = 4.0  # peak-to-peak potential of the ice-thickness ramp across the micrograph
ICE_UNDULATION = 2.0  # amplitude of each of the three long-wavelength undulations
PARTICLES_ON_CARBON = 0.5  # density of particles on the film relative to the hole

_CALIBRATION_SAMPLES = 2048
_NORMALISATION_GRID = 256
_MAX_ATTEMPTS_PER_PICK = 400


@dataclass
class Micrograph:
    """One simulated micrograph and its ground truth (kept only with ``keep_micrographs=True``).

    Coordinates are in pixels, x = column and y = row of ``image``, origin at pixel [0, 0].

    image:                 (S, S) float32 micrograph as recorded: -CTF * projected potential + noise,
                           particles dark (before contrast inversion); units of the volumes' density.
    defocus_u_um, defocus_v_um, defocus_angle_deg: its CTF (``ctf_at`` convention).
    particle_centres:      (n, 2) float64 true centres (x, y) of every particle, including those up to a
                           particle radius outside the image.
    particle_volume_index: (n,) int index into ``PickedStack.volumes``.
    particle_rotations:    (n, 3, 3) orientation of each particle (``project`` convention).
    particle_radii:        (n,) support radius of each particle's volume, pixels.
    particle_clump:        (n,) clump number of each particle, -1 for a single particle.
    contamination_mask:    (S, S) bool, pixels covered by contamination or beads.
    carbon_mask:           (S, S) bool, pixels on the carbon film.
    pick_coordinates:      (m, 2) int64 picks (x, y); the box centre pixel.
    pick_labels:           (m,) int8 label of each pick.
    """

    image: np.ndarray
    defocus_u_um: float
    defocus_v_um: float
    defocus_angle_deg: float
    particle_centres: np.ndarray
    particle_volume_index: np.ndarray
    particle_rotations: np.ndarray
    particle_radii: np.ndarray
    particle_clump: np.ndarray
    contamination_mask: np.ndarray
    carbon_mask: np.ndarray
    pick_coordinates: np.ndarray
    pick_labels: np.ndarray


@dataclass
class PickedStack:
    """Particles picked from simulated micrographs and extracted, with the ground truth of every pick.

    images:            (N, box, box) float32, extracted at the picks, contrast inverted (particles
                       bright) and normalised like RELION (``normalise_like_relion``).
    labels:            (N,) int8 codes of ``LABEL_NAMES`` (PARTICLE or a junk class, ``classify_pick``).
    micrograph_index:  (N,) int32 micrograph each pick comes from (picks are in micrograph order).
    coordinates:       (N, 2) float64 pick (x, y) in micrograph pixels: the box centre pixel (RELION's
                       rlnCoordinateX / rlnCoordinateY).
    centre_offset:     (N, 2) float64 true centre of the nearest particle minus the pick, (dx, dy) pixels;
                       NaN when no particle centre lies in the box.
    particle_rotation: (N, 3, 3) float64 orientation of that particle, NaN when none.
    volume_index:      (N,) int16 index into ``volumes`` of that particle, -1 when none.
    defocus_u, defocus_v: (N,) float64 defocus of the pick's micrograph in angstrom (U >= V).
    defocus_angle:     (N,) float64 astigmatism angle in degrees (``ctf_at`` convention, as RELION).
    pixel_size:        angstrom per pixel of the micrographs and of the boxes.
    snr:               the requested signal-to-noise ratio (definition in ``simulate_picked_stack``).
    junk_fraction:     the requested fraction of picks that are not PARTICLE.
    particle_radius:   r, pixels: the largest support radius of the volumes at this pixel size (what a
                       user would enter as the particle diameter / 2).
    centre_tolerance:  pixels; a PARTICLE pick lies this close to its particle's centre.
    background_radius: pixels; RELION's background circle used to normalise the boxes.
    noise_variance:    variance per pixel of the micrograph noise, in micrograph units.
    b_factor:          angstrom^2, of every micrograph's CTF envelope.
    volumes:           the volumes as simulated: resampled to the pixel size, maximum |density| 1.
    micrographs:       the simulated micrographs with their ground truth (``keep_micrographs=True``),
                       else None.
    """

    images: np.ndarray
    labels: np.ndarray
    micrograph_index: np.ndarray
    coordinates: np.ndarray
    centre_offset: np.ndarray
    particle_rotation: np.ndarray
    volume_index: np.ndarray
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    pixel_size: float
    snr: float
    junk_fraction: float
    particle_radius: float
    centre_tolerance: float
    background_radius: int
    noise_variance: float
    b_factor: float
    volumes: tuple
    micrographs: list | None = None

    def star_blocks(self, stack_file_name: str) -> dict[str, pd.DataFrame]:
        """RELION 3.1 STAR blocks: ``optics_block`` and the particles block (rlnImageName,
        rlnMicrographName, rlnCoordinateX/Y, rlnDefocusU/V in angstrom, rlnDefocusAngle in degrees,
        rlnCtfBfactor, rlnOpticsGroup, ppcasortTrueLabel)."""
        n_images, side = self.images.shape[:2]
        particles = pd.DataFrame(
            {
                "rlnImageName": image_names(n_images, stack_file_name),
                "rlnMicrographName": [f"Micrographs/mic{index + 1:05d}.mrc" for index in self.micrograph_index],
                "rlnCoordinateX": self.coordinates[:, 0],
                "rlnCoordinateY": self.coordinates[:, 1],
                "rlnDefocusU": self.defocus_u,
                "rlnDefocusV": self.defocus_v,
                "rlnDefocusAngle": self.defocus_angle,
                "rlnCtfBfactor": np.full(n_images, self.b_factor),
                "rlnOpticsGroup": np.ones(n_images, dtype=int),
                "ppcasortTrueLabel": self.labels.astype(int),
            }
        )
        return {"optics": optics_block(self.pixel_size, side), "particles": particles}


# --------------------------------------------------------------------------------------------------
# Volumes


def support_radius(volume: np.ndarray) -> float:
    """Radius in voxels of a volume's support: the largest distance from the centre voxel (L // 2) of
    a voxel whose |density| is at least ``SUPPORT_THRESHOLD`` (5%) of the maximum |density|."""
    volume = np.asarray(volume)
    _check_volume(volume, source="volume")
    offsets = np.arange(volume.shape[0]) - volume.shape[0] // 2
    squared = offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2
    magnitude = np.abs(volume)
    if not magnitude.max() > 0:
        raise ValueError("volume is zero everywhere: it has no support")
    return float(np.sqrt(squared[magnitude >= SUPPORT_THRESHOLD * magnitude.max()].max()))


def voxel_size_for_diameter(volume: np.ndarray, diameter_angstrom: float) -> float:
    """Voxel size (angstrom) that makes the volume's support diameter (2 ``support_radius``) the given
    size, for maps whose header records no voxel size (e.g. 250 angstrom for a 70S ribosome)."""
    if not (np.isfinite(diameter_angstrom) and diameter_angstrom > 0):
        raise ValueError(f"diameter_angstrom must be a positive number, got {diameter_angstrom!r}")
    return float(diameter_angstrom) / (2 * support_radius(volume))


@dataclass(frozen=True)
class _Particles:
    """The volumes at the micrograph pixel size, their projectors, support radii (px) and weights."""

    volumes: tuple
    projectors: tuple
    radii: np.ndarray
    weights: np.ndarray


def _prepare_particles(volumes, voxel_sizes, volume_weights, box_size: int, pixel_size) -> tuple[_Particles, float]:
    """Check the volumes, pick the pixel size (when None) and resample every volume to it.

    Returns the particles and the pixel size. A volume of side L and voxel size v becomes
    round(L v / p) voxels at pixel size p (a relative scale error below 1 / (2 round(L v / p))) and is
    scaled to maximum |density| 1.
    """
    if volumes is None:
        if voxel_sizes is not None:
            raise ValueError("voxel_sizes given without volumes: the built-in volume has its own size")
        volume = elongated_volume(64)
        volumes = [volume]
        voxel_sizes = [voxel_size_for_diameter(volume, ELONGATED_DIAMETER_ANGSTROM)]
    elif isinstance(volumes, np.ndarray) and volumes.ndim == 3:
        volumes = [volumes]
    volumes = [np.asarray(volume, dtype=np.float32) for volume in volumes]
    if not volumes:
        raise ValueError("volumes must hold at least one volume")
    for index, volume in enumerate(volumes):
        _check_volume(volume, source=f"volumes[{index}]")
    if voxel_sizes is None:
        raise ValueError("voxel_sizes is required with volumes: angstrom per voxel of each volume "
                         "(see voxel_size_for_diameter for maps that do not record it)")
    voxel_sizes = np.atleast_1d(np.asarray(voxel_sizes, dtype=np.float64))
    if voxel_sizes.shape == (1,):
        voxel_sizes = np.repeat(voxel_sizes, len(volumes))
    if voxel_sizes.shape != (len(volumes),) or not (np.isfinite(voxel_sizes).all() and (voxel_sizes > 0).all()):
        raise ValueError(f"voxel_sizes must be one positive number of angstrom per volume ({len(volumes)}), "
                         f"got {voxel_sizes!r}")
    weights = np.ones(len(volumes)) if volume_weights is None else np.asarray(volume_weights, dtype=np.float64)
    if weights.shape != (len(volumes),) or not (np.isfinite(weights).all() and (weights >= 0).all()) \
            or not weights.sum() > 0:
        raise ValueError(f"volume_weights must be {len(volumes)} non-negative proportions, not all zero, "
                         f"got {volume_weights!r}")

    radii_angstrom = np.array([support_radius(volume) for volume in volumes]) * voxel_sizes
    if pixel_size is None:
        pixel_size = float(radii_angstrom.max() / (PARTICLE_BOX_FRACTION * box_size / 2))
    _check_pixel_size(pixel_size)
    radii = radii_angstrom / pixel_size
    if 2 * radii.max() >= box_size:
        raise ValueError(f"the particle ({2 * radii.max():.1f} px across at pixel_size {pixel_size:g} A) does not "
                         f"fit the {box_size} px box: use a larger pixel_size or box_size")
    resampled = []
    for volume, voxel_size in zip(volumes, voxel_sizes):
        side = max(8, int(round(volume.shape[0] * voxel_size / pixel_size)))
        volume = resample_volume(volume, side) if side != volume.shape[0] else volume.copy()
        resampled.append((volume / np.abs(volume).max()).astype(np.float32))
    particles = _Particles(
        volumes=tuple(resampled),
        projectors=tuple(_SliceProjector(volume) for volume in resampled),
        radii=radii,
        weights=weights / weights.sum(),
    )
    return particles, float(pixel_size)


# --------------------------------------------------------------------------------------------------
# Noise and extraction


def noise_power_spectrum(
    frequency_x,
    frequency_y,
    noise_variance: float,
    pixel_size: float,
    defocus_u_um: float,
    defocus_v_um: float | None = None,
    defocus_angle_deg: float = 0.0,
    b_factor: float = DEFAULT_B_FACTOR,
) -> np.ndarray:
    """Expected power spectrum of the micrograph noise at spatial frequencies (kx, ky) in cycles/pixel.

        S(k) = sigma^2 * [ s * T(k)^2 / <T^2>  +  (1 - s) * D(|k|) / <D> ]
        D(f) = sinc(f)^2 + w * f_c / (f + f_c)

    T is the micrograph's CTF with its envelope (``ctf_at`` at k / pixel_size): the vitreous ice's
    structural noise is white in potential and shaped by the CTF (it carries the Thon rings). D is the
    detector noise: its MTF, sinc(f) = sin(pi f) / (pi f), squared, plus a 1/f-like excess at low
    frequency. s = STRUCTURAL_NOISE_FRACTION (0.4), w = LOW_FREQUENCY_WEIGHT (2), f_c =
    LOW_FREQUENCY_CORNER (0.02 cycles/pixel). <.> is the mean over the Nyquist square |kx|, |ky| <= 1/2
    (midpoint rule on a 256 x 256 grid), so the variance per pixel, the mean of S over that square, is
    sigma^2 = ``noise_variance``.

    Convention: noise n on an N-pixel grid has E|DFT(n)(k)|^2 = N * S(k) (numpy's unnormalised FFT).
    Arrays broadcast; returns float64 of their shape.
    """
    transfer = ctf_at(np.asarray(frequency_x) / pixel_size, np.asarray(frequency_y) / pixel_size,
                      defocus_u_um, defocus_v_um, defocus_angle_deg, b_factor)
    structural = _structural_weight(pixel_size, defocus_u_um, defocus_v_um, defocus_angle_deg, b_factor)
    detector = _detector_term(np.hypot(frequency_x, frequency_y))
    return noise_variance * (np.square(transfer, dtype=np.float64) * structural + detector)


def _structural_weight(pixel_size, defocus_u_um, defocus_v_um, defocus_angle_deg, b_factor) -> float:
    """s / <T^2> of ``noise_power_spectrum``: the weight of T(k)^2 per unit noise variance."""
    frequency_x, frequency_y = _normalisation_grid()
    transfer = ctf_at(frequency_x / pixel_size, frequency_y / pixel_size, defocus_u_um, defocus_v_um,
                      defocus_angle_deg, b_factor)
    return STRUCTURAL_NOISE_FRACTION / float(np.mean(np.square(transfer, dtype=np.float64)))


def _detector_term(frequency) -> np.ndarray:
    """(1 - s) D(f) / <D> of ``noise_power_spectrum``: the detector noise per unit noise variance."""
    return (1 - STRUCTURAL_NOISE_FRACTION) * _detector_shape(frequency) / _mean_detector_shape()


def _detector_shape(frequency) -> np.ndarray:
    frequency = np.asarray(frequency, dtype=np.float64)
    return np.sinc(frequency) ** 2 + LOW_FREQUENCY_WEIGHT * LOW_FREQUENCY_CORNER / (frequency + LOW_FREQUENCY_CORNER)


def _normalisation_grid() -> tuple[np.ndarray, np.ndarray]:
    """Midpoints of a 256 x 256 grid over the Nyquist square, cycles per pixel (row and column vectors)."""
    points = (np.arange(_NORMALISATION_GRID) + 0.5) / _NORMALISATION_GRID - 0.5
    return points[None, :], points[:, None]


@lru_cache(maxsize=1)
def _mean_detector_shape() -> float:
    frequency_x, frequency_y = _normalisation_grid()
    return float(_detector_shape(np.hypot(frequency_x, frequency_y)).mean())


def extraction_background_radius(box_size: int) -> int:
    """RELION's default background radius for extraction: ROUND(0.375 * box), a circle of 75% of the box.

    relion_preprocess (--extract --norm) uses bg_radius = ROUND(0.375 * extract_size) when --bg_radius
    is not given ("Using default particle diameter of 75% of the box size"); the GUI's Extract job
    passes its "Diameter background circle" of -1 the same way.
    """
    return int(math.floor(0.375 * box_size + 0.5))


def normalise_like_relion(images, background_radius: float) -> np.ndarray:
    """Normalise boxes as RELION's extraction does (relion_preprocess --norm, default --ramp).

    RELION src/image.cpp, normalise(): with dust removal off (its default), subtractBackgroundRamp fits a
    plane a x + b y + c by least squares to the background pixels, those with x^2 + y^2 > bg_radius^2
    (x, y counted from the centre pixel box // 2), and subtracts it from the whole box; then
    calculateBackgroundAvgStddev takes the mean and standard deviation (population, 1/n) of the same
    pixels and the box becomes (box - mean) / stddev. So every box's background has mean 0 (exactly,
    the plane has a constant term), standard deviation 1 and no linear ramp.

    images: (n, box, box); returns (n, box, box) float32.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must have shape (n, box, box), got {images.shape}")
    box = images.shape[1]
    offsets = np.arange(box, dtype=np.float64) - box // 2
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    background = x**2 + y**2 > background_radius**2
    if background.sum() < 3:
        raise ValueError(f"background_radius {background_radius!r} leaves fewer than 3 background pixels "
                         f"in a {box} px box")
    design = np.stack([x[background], y[background], np.ones(background.sum())], axis=1)
    coefficients = np.linalg.pinv(design) @ images[:, background].T.astype(np.float64)  # (3, n)
    planes = np.einsum("kij,kn->nij", np.stack([x, y, np.ones_like(x)]), coefficients)
    # normalize_background uses the pixels strictly outside the disk of the radius: x^2 + y^2 > r^2.
    return normalize_background(images - planes.astype(np.float32), background_radius)


def _extract_boxes(image: np.ndarray, picks: np.ndarray, box_size: int) -> np.ndarray:
    """Boxes (m, box, box) float32 of ``image`` whose centre pixel (box // 2, box // 2) is each pick (x, y).

    As relion_preprocess windows a particle (extractParticlesFromOneFrame): the box spans the 0-based
    micrograph pixels xpos + FIRST_XMIPP_INDEX(size) = xpos - size // 2 onwards, xpos = rlnCoordinateX.
    """
    windows = np.lib.stride_tricks.sliding_window_view(image, (box_size, box_size))
    corner = picks - box_size // 2
    return windows[corner[:, 1], corner[:, 0]].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Labels


@lru_cache(maxsize=16)
def _disc(radius: float) -> np.ndarray:
    """(2R + 1, 2R + 1) bool, R = floor(radius): the pixels whose centre lies within ``radius`` of the centre."""
    reach = int(math.floor(radius))
    offsets = np.arange(-reach, reach + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _disc_touches(mask: np.ndarray, x: float, y: float, radius: float) -> bool:
    """Whether any True pixel of ``mask`` has its centre within ``radius`` of the pixel nearest (x, y)."""
    disc = _disc(float(radius))
    reach = disc.shape[0] // 2
    x, y = int(round(x)), int(round(y))
    top, bottom = max(y - reach, 0), min(y + reach + 1, mask.shape[0])
    left, right = max(x - reach, 0), min(x + reach + 1, mask.shape[1])
    if top >= bottom or left >= right:
        return False
    window = disc[top - y + reach : bottom - y + reach, left - x + reach : right - x + reach]
    return bool(np.any(mask[top:bottom, left:right] & window))


def classify_pick(
    x: int,
    y: int,
    particle_centres: np.ndarray,
    particle_radii: np.ndarray,
    contamination_mask: np.ndarray,
    carbon_mask: np.ndarray,
    particle_radius: float,
    centre_tolerance: float,
) -> int:
    """Label of the pick at pixel (x, y) from the ground truth in its particle circle.

    The particle circle: the pixels whose centre lies within r = ``particle_radius`` of the pick.
    A particle's centre is in the circle when it lies within r of the pick; a particle reaches the
    circle when its centre lies closer than r + its own support radius. The circle is clean when it
    holds no contamination pixel and no carbon-film pixel. The first rule that holds gives the label:

    1. particle:   clean, exactly one particle centre in the circle, within ``centre_tolerance`` of the pick;
    2. off_centre: clean, at most one particle centre in the circle, and a particle reaches the circle
                   (a badly centred particle, or a particle partly in the box);
    3. aggregate:  two or more particle centres in the circle;
    4. ice:        contamination (ice, ethane, beads) in the circle;
    5. carbon:     carbon film in the circle;
    6. empty:      anything else: no particle reaches the circle, no contamination, no film.

    particle_centres: (n, 2) (x, y); particle_radii: (n,) pixels; masks: (S, S) bool.
    Returns the label code (``LABEL_NAMES``).
    """
    contaminated = _disc_touches(contamination_mask, x, y, particle_radius)
    on_carbon = _disc_touches(carbon_mask, x, y, particle_radius)
    clean = not (contaminated or on_carbon)
    distances = np.hypot(particle_centres[:, 0] - x, particle_centres[:, 1] - y)
    n_inside = int(np.count_nonzero(distances <= particle_radius))
    if clean and n_inside == 1 and distances.min() <= centre_tolerance:
        return PARTICLE
    if clean and n_inside <= 1 and np.any(distances < particle_radius + particle_radii):
        return OFF_CENTRE
    if n_inside >= 2:
        return AGGREGATE
    if contaminated:
        return ICE
    if on_carbon:
        return CARBON
    return EMPTY


# --------------------------------------------------------------------------------------------------
# Settings and plan


@dataclass(frozen=True)
class _Settings:
    """Everything a micrograph needs, fixed before the first one is simulated."""

    particles: _Particles
    box_size: int
    pixel_size: float
    micrograph_size: int
    canvas_size: int
    canvas_offset: int
    particle_radius: float
    centre_tolerance: float
    b_factor: float
    noise_variance: float
    reference_potential: float
    seed: int


def _check_arguments(n_picks, box_size, snr, junk_fraction, defocus_um, max_astigmatism_um, b_factor,
                     micrograph_size, picks_per_micrograph) -> None:
    if int(n_picks) != n_picks or n_picks < 1:
        raise ValueError(f"n_picks must be a positive integer, got {n_picks!r}")
    if int(box_size) != box_size or box_size < 16:
        raise ValueError(f"box_size must be an integer of at least 16 pixels, got {box_size!r}")
    if not snr > 0:
        raise ValueError(f"snr must be positive (np.inf for no noise), got {snr!r}")
    if not 0 <= junk_fraction <= 1:
        raise ValueError(f"junk_fraction must be in [0, 1], got {junk_fraction!r}")
    if np.shape(defocus_um) != (2,) or not 0 < defocus_um[0] <= defocus_um[1] < 20:
        raise ValueError(f"defocus_um must be a range (low, high) in micrometres with 0 < low <= high < 20, "
                         f"got {defocus_um!r}")
    if not 0 <= max_astigmatism_um < 2 * defocus_um[0]:
        raise ValueError(f"max_astigmatism_um must be in [0, 2 * the lowest defocus), got {max_astigmatism_um!r}")
    if not (np.isfinite(b_factor) and b_factor >= 0):
        raise ValueError(f"b_factor must be a non-negative number of angstrom^2, got {b_factor!r}")
    if int(micrograph_size) != micrograph_size or micrograph_size < 4 * box_size:
        raise ValueError(f"micrograph_size must be an integer of at least 4 box sizes ({4 * box_size} px), "
                         f"got {micrograph_size!r}")
    if int(picks_per_micrograph) != picks_per_micrograph or picks_per_micrograph < 1:
        raise ValueError(f"picks_per_micrograph must be a positive integer, got {picks_per_micrograph!r}")
    pickable_area = (micrograph_size - box_size) ** 2
    if picks_per_micrograph * (box_size / 2) ** 2 * math.pi > pickable_area:
        raise ValueError(f"picks_per_micrograph {picks_per_micrograph} is too many for a {micrograph_size} px "
                         f"micrograph and {box_size} px boxes; use fewer or a larger micrograph_size")


def _largest_remainder(total: int, weights) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total`` (largest-remainder rounding)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: total - counts.sum()]] += 1
    return counts


def _class_counts(n_picks: int, junk_fraction: float, junk_mix) -> dict[int, int]:
    """Exact number of picks of each label: round(junk_fraction * n_picks) junk picks shared among the
    classes in proportion to ``junk_mix`` (largest remainders), the rest PARTICLE."""
    mix = DEFAULT_JUNK_MIX if junk_mix is None else dict(junk_mix)
    unknown = set(mix) - set(JUNK_CLASSES)
    if unknown:
        raise ValueError(f"junk_mix has unknown classes {sorted(unknown)}; the classes are {list(JUNK_CLASSES)}")
    shares = np.array([float(mix.get(name, 0.0)) for name in JUNK_CLASSES])
    if not (np.isfinite(shares).all() and (shares >= 0).all() and shares.sum() > 0):
        raise ValueError(f"junk_mix must give non-negative proportions, not all zero, got {junk_mix!r}")
    n_junk = int(round(junk_fraction * n_picks))
    junk = _largest_remainder(n_junk, shares)
    return {PARTICLE: n_picks - n_junk, **{code: int(count) for code, count in zip(JUNK_CLASSES.values(), junk)}}


@dataclass(frozen=True)
class _Plan:
    """Per micrograph: label counts of its picks, whether a carbon edge crosses it, its CTF (U, V, angle)."""

    quotas: list
    has_carbon: np.ndarray
    defoci: np.ndarray  # (n_micrographs, 3)


def _plan(n_picks, picks_per_micrograph, counts, defocus_um, max_astigmatism_um, rng) -> _Plan:
    """Share the picks among micrographs and draw every micrograph's CTF (``_draw_defocus``).

    Carbon picks go to the micrographs crossed by a carbon edge, in proportion to their pick counts: a
    share CARBON_MICROGRAPH_FRACTION of the micrographs, more if needed to keep carbon picks at most 60%
    of their picks. The other labels are dealt at random into the remaining places.
    """
    n_micrographs = -(-n_picks // picks_per_micrograph)
    sizes = np.full(n_micrographs, n_picks // n_micrographs)
    sizes[: n_picks % n_micrographs] += 1
    n_carbon = counts[CARBON]
    needed = -(-n_carbon // max(1, int(0.6 * sizes.min())))
    n_with_carbon = min(n_micrographs, max(round(CARBON_MICROGRAPH_FRACTION * n_micrographs), needed))
    has_carbon = np.zeros(n_micrographs, dtype=bool)
    has_carbon[rng.choice(n_micrographs, n_with_carbon, replace=False)] = True
    carbon_share = np.zeros(n_micrographs, dtype=int)
    if n_carbon:  # n_carbon <= the picks of the carbon micrographs, so no share exceeds its micrograph
        carbon_share[has_carbon] = _largest_remainder(n_carbon, sizes[has_carbon])

    others = rng.permutation(np.repeat([code for code in counts if code != CARBON],
                                       [count for code, count in counts.items() if code != CARBON]))
    quotas, start = [], 0
    for size, carbon in zip(sizes, carbon_share):
        dealt = others[start : start + size - carbon]
        start += size - carbon
        quota = {code: int(np.count_nonzero(dealt == code)) for code in counts}
        quota[CARBON] = int(carbon)
        quotas.append(quota)
    defoci = np.array([_draw_defocus(rng, defocus_um, max_astigmatism_um) for _ in range(n_micrographs)])
    return _Plan(quotas, has_carbon, defoci)


# --------------------------------------------------------------------------------------------------
# Calibration: the SNR's signal power


def _transfer_grid(shape: tuple[int, int], pixel_size: float, defocus, b_factor: float) -> np.ndarray:
    """CTF (with envelope) on the rfft2 grid of an image of ``shape``: (shape[0], shape[1] // 2 + 1), or
    (n, ...) for defocus = (U, V, angle) arrays of shape (n, 1, 1)."""
    frequency_y = scipy.fft.fftfreq(shape[0])[:, None]
    frequency_x = scipy.fft.rfftfreq(shape[1])[None, :]
    defocus_u, defocus_v, angle = defocus
    return ctf_at(frequency_x / pixel_size, frequency_y / pixel_size, defocus_u, defocus_v, angle, b_factor)


def _draw_defocus(rng: np.random.Generator, defocus_um, max_astigmatism_um) -> tuple[float, float, float]:
    """(U, V, angle): mean defocus uniform in the range, |U - V| uniform in [0, max], U >= V, angle in [0, 180)."""
    mean = rng.uniform(*defocus_um)
    astigmatism = rng.uniform(0.0, max_astigmatism_um)
    return mean + astigmatism / 2, mean - astigmatism / 2, rng.uniform(0.0, 180.0)


def _calibrate(particles: _Particles, box_size, pixel_size, plan: _Plan, b_factor, rng) -> tuple[float, float]:
    """Monte-Carlo estimates of (mean particle signal power in its box, mean peak projected potential).

    Draws ``_CALIBRATION_SAMPLES`` particles as the micrographs do (volume by weight, Haar orientation,
    sub-pixel position) on micrographs drawn in proportion to their picks, each with that micrograph's
    CTF; renders each alone with its CTF on a canvas wide enough for the CTF's delocalisation and averages
    the mean square over the box_size x box_size box centred on it. Relative standard error: about 1%.
    """
    n = _CALIBRATION_SAMPLES
    volume_index = rng.choice(len(particles.volumes), n, p=particles.weights)
    rotations = random_rotations(n, rng)
    shifts = rng.uniform(-0.5, 0.5, (n, 2))
    picks = np.array([sum(quota.values()) for quota in plan.quotas], dtype=np.float64)
    defoci = plan.defoci[rng.choice(len(picks), n, p=picks / picks.sum())]  # (n, 3)
    margin = _delocalisation(pixel_size, float(plan.defoci[:, 0].max()))
    power = np.empty(n)
    peak = np.empty(n)
    for index, projector in enumerate(particles.projectors):
        rows = np.flatnonzero(volume_index == index)
        side = projector.image_side
        canvas = scipy.fft.next_fast_len(max(box_size, side) + 2 * margin, real=True)
        for chunk in np.array_split(rows, max(1, len(rows) // 128)):
            if not len(chunk):
                continue
            images = projector.render(rotations[chunk], shifts[chunk], None, pixel_size)
            peak[chunk] = images.max(axis=(1, 2))
            padded = np.zeros((len(chunk), canvas, canvas), dtype=np.float32)
            start = canvas // 2 - side // 2
            padded[:, start : start + side, start : start + side] = images
            spectra = scipy.fft.rfft2(padded, workers=1)
            spectra *= _transfer_grid((canvas, canvas), pixel_size, defoci[chunk].T[:, :, None, None], b_factor)
            recorded = scipy.fft.irfft2(spectra, s=(canvas, canvas), workers=1)
            corner = canvas // 2 - box_size // 2
            boxes = recorded[:, corner : corner + box_size, corner : corner + box_size].astype(np.float64)
            power[chunk] = np.mean(boxes**2, axis=(1, 2))
    return float(power.mean()), float(peak.mean())


def _delocalisation(pixel_size: float, defocus_um: float) -> int:
    """Pixels over which the CTF spreads a point at the highest frequency of the grid (the corner,
    sqrt(2) / (2 pixel_size)): lambda * defocus * k_max / pixel_size, rounded up."""
    wavelength = electron_wavelength_angstrom(VOLTAGE_KV)
    return int(math.ceil(wavelength * defocus_um * 1e4 * math.sqrt(2) / (2 * pixel_size) / pixel_size))


# --------------------------------------------------------------------------------------------------
# Scene


@dataclass
class _Polygon:
    """A convex contamination polygon: vertices (k, 2) (x, y) counter-clockwise, nominal radius, thickness."""

    vertices: np.ndarray
    radius: float
    thickness: float


@dataclass
class _Scene:
    defocus: tuple[float, float, float]
    centres: list  # [(x, y)] float
    volume_index: list
    rotations: list  # drawn once every particle is placed
    clump: list
    polygons: list
    beads: list  # [(x, y, radius, thickness)]
    carbon: tuple | None  # (hole centre x, hole centre y, hole radius, edge direction angle)
    contamination_mask: np.ndarray
    carbon_mask: np.ndarray


def _signed_distance(vertices: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance outside a convex polygon (negative inside): the largest signed distance to its edge lines.
    Exact inside and near edges, a slight under-estimate near outer corners. x, y broadcast."""
    edges = np.roll(vertices, -1, axis=0) - vertices
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1) / np.linalg.norm(edges, axis=1, keepdims=True)
    distance = np.full(np.broadcast(x, y).shape, -np.inf)
    for (nx, ny), (vx, vy) in zip(normals, vertices):
        np.maximum(distance, nx * (x - vx) + ny * (y - vy), out=distance)
    return distance


def _random_polygon(rng, x, y, radius, thickness) -> _Polygon:
    """A disc-like ellipse (40-gon) or a faceted convex polygon (hull of 5-9 points), at random."""
    if rng.random() < 0.5:
        angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        axes = radius * np.array([1.0, rng.uniform(0.6, 1.0)])
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 10)))
        axes = radius * rng.uniform(0.75, 1.0, (2, len(angles)))
    points = np.stack([axes[0] * np.cos(angles), axes[1] * np.sin(angles)], axis=1)
    turn = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    points = points @ rotation.T
    hull = ConvexHull(points)
    return _Polygon(points[hull.vertices] + [x, y], radius, thickness)  # hull vertices are counter-clockwise


def _stamp_polygon(mask: np.ndarray, polygon: _Polygon) -> None:
    """Set the pixels of ``mask`` whose centre lies inside the polygon."""
    region = _bounding_region(polygon.vertices.min(axis=0), polygon.vertices.max(axis=0), mask.shape)
    if region is None:
        return
    rows, columns = region
    inside = _signed_distance(polygon.vertices, np.arange(columns.start, columns.stop)[None, :],
                              np.arange(rows.start, rows.stop)[:, None]) <= 0
    mask[rows, columns] |= inside


def _stamp_disc(mask: np.ndarray, x: float, y: float, radius: float) -> None:
    region = _bounding_region(np.array([x - radius, y - radius]), np.array([x + radius, y + radius]), mask.shape)
    if region is None:
        return
    rows, columns = region
    dx = np.arange(columns.start, columns.stop)[None, :] - x
    dy = np.arange(rows.start, rows.stop)[:, None] - y
    mask[rows, columns] |= dx**2 + dy**2 <= radius**2


def _bounding_region(low, high, shape, pad: int = 1) -> tuple[slice, slice] | None:
    """Row and column slices of ``shape`` covering the box [low, high] ((x, y) corners), or None if outside."""
    x0, y0 = (int(math.floor(value)) - pad for value in low)
    x1, y1 = (int(math.ceil(value)) + pad + 1 for value in high)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, shape[1]), min(y1, shape[0])
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


class _SceneBuilder:
    """Draws one micrograph's scene, then places its picks (adding objects when a class runs short)."""

    def __init__(self, settings: _Settings, rng: np.random.Generator, has_carbon: bool, defocus):
        self.settings = settings
        self.rng = rng
        size = settings.micrograph_size
        self.r = settings.particle_radius
        self.scene = _Scene(
            defocus=tuple(float(value) for value in defocus),
            centres=[], volume_index=[], rotations=[], clump=[], polygons=[], beads=[], carbon=None,
            contamination_mask=np.zeros((size, size), dtype=bool),
            carbon_mask=np.zeros((size, size), dtype=bool),
        )
        half = settings.box_size // 2
        self.pick_low = half
        self.pick_high = size - settings.box_size + half  # inclusive: the box stays inside the micrograph
        self.centres = np.empty((0, 2))  # array copies of the scene's lists, kept in step
        self.radii = np.empty(0)
        self.picks = np.empty((0, 2), dtype=np.int64)
        self.pick_labels: list[int] = []
        # Candidate particles (indices) and clumps for each particle-like label; a candidate that fails
        # three times is dropped from its pool.
        self.pools: dict[int, list[int]] = {PARTICLE: [], OFF_CENTRE: [], AGGREGATE: []}
        self.failures: dict[tuple[int, int], int] = {}
        self.n_clumps = 0
        if has_carbon:
            self._add_carbon()

    # --- objects ---------------------------------------------------------------------------------

    def _add_carbon(self) -> None:
        size = self.settings.micrograph_size
        hole_radius = size * self.rng.uniform(0.8, 1.5)
        direction = self.rng.uniform(0, 2 * np.pi)
        outward = np.array([np.cos(direction), np.sin(direction)])
        edge_point = np.full(2, size / 2) + outward * size * self.rng.uniform(0.1, 0.35)
        hole_centre = edge_point - hole_radius * outward
        self.scene.carbon = (hole_centre[0], hole_centre[1], hole_radius, direction)
        y, x = np.ogrid[:size, :size]
        self.scene.carbon_mask = (x - hole_centre[0]) ** 2 + (y - hole_centre[1]) ** 2 > hole_radius**2

    def add_contamination(self) -> None:
        size = self.settings.micrograph_size
        x, y = self.rng.uniform(0, size, 2)
        radius = self.r * math.exp(self.rng.uniform(*np.log(CONTAMINATION_RADIUS)))
        thickness = self.settings.reference_potential * self.rng.uniform(*CONTAMINATION_THICKNESS)
        polygon = _random_polygon(self.rng, x, y, radius, thickness)
        self.scene.polygons.append(polygon)
        _stamp_polygon(self.scene.contamination_mask, polygon)

    def add_bead(self, x=None, y=None) -> None:
        size = self.settings.micrograph_size
        x = self.rng.uniform(0, size) if x is None else x
        y = self.rng.uniform(0, size) if y is None else y
        radius = self.r * self.rng.uniform(*BEAD_RADIUS)
        thickness = self.settings.reference_potential * self.rng.uniform(*BEAD_THICKNESS)
        self.scene.beads.append((x, y, radius, thickness))
        _stamp_disc(self.scene.contamination_mask, x, y, radius)

    def _append_particle(self, x, y, clump=-1) -> None:
        particles = self.settings.particles
        volume = int(self.rng.choice(len(particles.volumes), p=particles.weights))
        index = len(self.scene.centres)
        self.scene.centres.append((x, y))
        self.scene.volume_index.append(volume)
        self.scene.clump.append(clump)
        self.centres = np.vstack([self.centres, [x, y]])
        self.radii = np.append(self.radii, particles.radii[volume])
        if clump < 0:
            self.pools[OFF_CENTRE].append(index)
            if self.pick_low <= x <= self.pick_high and self.pick_low <= y <= self.pick_high:
                self.pools[PARTICLE].append(index)

    def _acceptable_particle_site(self, x, y, clearance) -> bool:
        """Not on contamination (within half a particle radius), thinned on carbon, ``clearance`` from others."""
        if _disc_touches(self.scene.contamination_mask, x, y, 0.5 * self.r):
            return False
        inside = 0 <= x < self.settings.micrograph_size and 0 <= y < self.settings.micrograph_size
        if inside and self.scene.carbon_mask[int(y), int(x)] and self.rng.random() > PARTICLES_ON_CARBON:
            return False
        return not len(self.centres) or _nearest_distance(self.centres, x, y) >= clearance

    def add_singles(self, count: int) -> None:
        """Up to ``count`` single particles, centres uniform over the micrograph and a particle radius
        beyond, at least 1.2 r apart (so some touch or overlap)."""
        low, high = -self.r, self.settings.micrograph_size + self.r
        for _ in range(count):
            for _attempt in range(50):
                x, y = self.rng.uniform(low, high, 2)
                if self._acceptable_particle_site(x, y, 1.2 * self.r):
                    self._append_particle(x, y)
                    break

    def add_clump(self, free_of_picks: bool = False) -> bool:
        """A clump of 2-4 overlapping particles within 0.75 r of its centre, centre in the pickable area."""
        n_members = int(self.rng.integers(2, 5))
        for _attempt in range(100):
            x, y = self.rng.uniform(self.pick_low, self.pick_high, 2)
            if not self._acceptable_particle_site(x, y, 2.0 * self.r):
                continue
            if free_of_picks and not self._far_from_picks(x, y, 3 * self.r):
                continue
            start = self.rng.uniform(0, 2 * np.pi)
            angles = start + 2 * np.pi * np.arange(n_members) / n_members + self.rng.uniform(-0.3, 0.3, n_members)
            distances = self.r * self.rng.uniform(0.4, 0.75, n_members)
            members = np.stack([distances * np.cos(angles), distances * np.sin(angles)], axis=1)
            members += [x, y] - members.mean(axis=0)
            for member_x, member_y in members:
                self._append_particle(member_x, member_y, clump=self.n_clumps)
            self.pools[AGGREGATE].append(self.n_clumps)
            self.n_clumps += 1
            return True
        return False

    def add_free_single(self) -> bool:
        """One single particle that a centred pick would label PARTICLE (to fill a quota): no contamination
        or film within r + tolerance + 1 of it, no other particle centre within that distance, and far
        enough from every pick (2r + 1) not to reach its circle."""
        clearance = self.r + self.settings.centre_tolerance + 1
        for _attempt in range(200):
            x, y = self.rng.uniform(self.pick_low, self.pick_high, 2)
            if _disc_touches(self.scene.contamination_mask, x, y, clearance) or \
                    _disc_touches(self.scene.carbon_mask, x, y, clearance):
                continue
            if self._acceptable_particle_site(x, y, clearance) and self._far_from_picks(x, y, 2 * self.r + 1):
                self._append_particle(x, y)
                return True
        return False

    def add_free_bead(self) -> bool:
        """One bead far from every pick (to fill the ice quota)."""
        for _attempt in range(200):
            x, y = self.rng.uniform(self.pick_low, self.pick_high, 2)
            if self._far_from_picks(x, y, 2.5 * self.r):
                self.add_bead(x, y)
                return True
        return False

    # --- picks -----------------------------------------------------------------------------------

    def _far_from_picks(self, x, y, distance) -> bool:
        return not len(self.picks) or _nearest_distance(self.picks, x, y) >= distance

    def label(self, x: int, y: int) -> int:
        scene = self.scene
        return classify_pick(x, y, self.centres, self.radii, scene.contamination_mask, scene.carbon_mask, self.r,
                             self.settings.centre_tolerance)

    def place(self, label: int, count: int) -> None:
        """Place ``count`` picks of ``label``: propose, keep those that ``classify_pick`` agrees with."""
        propose = {
            PARTICLE: self._propose_centred,
            OFF_CENTRE: self._propose_off_centre,
            AGGREGATE: self._propose_clump,
            ICE: self._propose_contamination,
            CARBON: self._propose_carbon,
            EMPTY: self._propose_empty,
        }[label]
        refill = {PARTICLE: self.add_free_single, OFF_CENTRE: self.add_free_single,
                  AGGREGATE: lambda: self.add_clump(free_of_picks=True), ICE: self.add_free_bead}.get(label)
        placed, failures = 0, 0
        while placed < count:
            candidate = propose()
            if candidate is not None and self._accept(label, *candidate):
                placed += 1
                failures = 0
                continue
            failures += 1
            if refill is not None and (candidate is None or failures % 50 == 0):
                refill()
            if failures > _MAX_ATTEMPTS_PER_PICK:
                raise RuntimeError(
                    f"could not place {count - placed} more {LABEL_NAMES[label]} picks on a micrograph; it is too "
                    "crowded: use fewer picks_per_micrograph or a larger micrograph_size")

    def _accept(self, label, x, y, source) -> bool:
        """Keep the pick if it is in bounds, far enough from the others and of the wanted label."""
        if not (self.pick_low <= x <= self.pick_high and self.pick_low <= y <= self.pick_high) \
                or not self._far_from_picks(x, y, MIN_PICK_SEPARATION * self.r) or self.label(x, y) != label:
            if source is not None:
                failures = self.failures[label, source] = self.failures.get((label, source), 0) + 1
                if failures >= 3 and source in self.pools[label]:
                    self.pools[label].remove(source)
            return False
        self.picks = np.vstack([self.picks, [x, y]])
        self.pick_labels.append(label)
        if label in (PARTICLE, OFF_CENTRE):
            for pool in (self.pools[PARTICLE], self.pools[OFF_CENTRE]):
                if source in pool:
                    pool.remove(source)
        elif label == AGGREGATE:
            self.pools[AGGREGATE].remove(source)
        return True

    def _from_pool(self, label: int) -> int | None:
        pool = self.pools[label]
        return None if not pool else pool[int(self.rng.integers(len(pool)))]

    def _propose_centred(self):
        index = self._from_pool(PARTICLE)
        if index is None:
            return None
        x, y = self.centres[index] + self.rng.normal(0, PICK_JITTER * self.r, 2)
        return int(round(x)), int(round(y)), index

    def _propose_off_centre(self):
        index = self._from_pool(OFF_CENTRE)
        if index is None:
            return None
        distance = self.r * self.rng.uniform(*OFF_CENTRE_RANGE)
        angle = self.rng.uniform(0, 2 * np.pi)
        x, y = self.centres[index] + distance * np.array([np.cos(angle), np.sin(angle)])
        return int(round(x)), int(round(y)), index

    def _propose_clump(self):
        clump = self._from_pool(AGGREGATE)
        if clump is None:
            return None
        members = self.centres[np.asarray(self.scene.clump) == clump]
        x, y = members.mean(axis=0) + self.rng.normal(0, PICK_JITTER * self.r, 2)
        return int(round(x)), int(round(y)), clump

    def _propose_contamination(self):
        """Near the edge of a contamination polygon (pickers love its contrast) or on a bead."""
        polygons, beads = self.scene.polygons, self.scene.beads
        if not polygons and not beads:
            return None
        if beads and (not polygons or self.rng.random() < 0.3):
            x, y, _, _ = beads[self.rng.integers(len(beads))]
            offset = 0.8 * self.r * np.sqrt(self.rng.random()) * np.exp(2j * np.pi * self.rng.random())
            return int(round(x + offset.real)), int(round(y + offset.imag)), None
        polygon = polygons[self.rng.integers(len(polygons))]
        edges = np.roll(polygon.vertices, -1, axis=0) - polygon.vertices
        lengths = np.linalg.norm(edges, axis=1)
        edge = self.rng.choice(len(edges), p=lengths / lengths.sum())
        point = polygon.vertices[edge] + self.rng.random() * edges[edge]
        normal = np.array([edges[edge, 1], -edges[edge, 0]]) / lengths[edge]
        x, y = point + normal * self.rng.uniform(-min(polygon.radius, self.r), 0.8 * self.r)
        return int(round(x)), int(round(y)), None

    def _propose_carbon(self):
        """Half near the film's edge (its step and fringes), half anywhere on the film."""
        if self.scene.carbon is None:
            return None
        if self.rng.random() < 0.5:
            hole_x, hole_y, hole_radius, direction = self.scene.carbon
            angle = direction + self.rng.uniform(-1, 1) * 0.75 * self.settings.micrograph_size / hole_radius
            distance = hole_radius + self.rng.uniform(-0.8, 0.8) * self.r
            x, y = hole_x + distance * np.cos(angle), hole_y + distance * np.sin(angle)
        else:
            x, y = self.rng.uniform(self.pick_low, self.pick_high, 2)
            if not self.scene.carbon_mask[int(y), int(x)]:
                return None
        return int(round(x)), int(round(y)), None

    def _propose_empty(self):
        x, y = self.rng.integers(self.pick_low, self.pick_high + 1, 2)
        return int(x), int(y), None


def _nearest_distance(points: np.ndarray, x: float, y: float) -> float:
    """Distance from (x, y) to the nearest of ``points`` (n >= 1, 2)."""
    return float(np.sqrt(np.min((points[:, 0] - x) ** 2 + (points[:, 1] - y) ** 2)))


def _build_scene(settings: _Settings, quota: dict[int, int], has_carbon: bool, defocus, rng) -> _SceneBuilder:
    """The scene of one micrograph and its picks (in placement order).

    Objects: per 1024 x 1024 pixels, on average 1.5 contamination polygons, 1.5 beads, 0.5 clump and 4
    single particles more than the picks need; at least one contamination polygon per 4 ice picks, one
    clump per aggregate pick and 1.3 single particles per particle or off-centre pick.
    """
    builder = _SceneBuilder(settings, rng, has_carbon, defocus)
    area = (settings.micrograph_size / 1024) ** 2
    for _ in range(int(rng.poisson(1.5 * area)) + -(-quota[ICE] // 4)):
        builder.add_contamination()
    for _ in range(int(rng.poisson(1.5 * area))):
        builder.add_bead()
    for _ in range(quota[AGGREGATE] + int(rng.poisson(0.5 * area))):
        builder.add_clump()
    builder.add_singles(int(math.ceil(1.3 * (quota[PARTICLE] + quota[OFF_CENTRE]))) + int(rng.poisson(4 * area)))
    for label in (AGGREGATE, PARTICLE, OFF_CENTRE, ICE, CARBON, EMPTY):
        builder.place(label, quota[label])
    builder.scene.rotations = list(random_rotations(len(builder.scene.centres), rng))
    return builder


# --------------------------------------------------------------------------------------------------
# Rendering and recording


def _render_potential(settings: _Settings, scene: _Scene, rng) -> np.ndarray:
    """The projected potential on the canvas: (C, C) float32, micrograph pixel (x, y) at canvas
    (x + offset, y + offset)."""
    size, offset = settings.canvas_size, settings.canvas_offset
    reference = settings.reference_potential
    coordinates = np.arange(size, dtype=np.float64) - offset  # micrograph coordinates of canvas pixels
    potential = _ice_gradient(coordinates, settings.micrograph_size, reference, rng)

    if scene.carbon is not None:
        hole_x, hole_y, hole_radius, _ = scene.carbon
        along_x = (coordinates - hole_x).astype(np.float32)
        along_y = (coordinates - hole_y).astype(np.float32)
        distance = np.hypot(along_x[None, :], along_y[:, None]) - np.float32(hole_radius)
        film = np.clip(distance + np.float32(0.5), 0, 1, out=distance)  # anti-aliased sharp edge
        grain = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 0.8)
        grain *= np.float32(CARBON_GRAIN / grain.std())
        potential += np.float32(CARBON_THICKNESS * reference) * film * (1 + grain)

    for polygon in scene.polygons:
        region = _bounding_region(polygon.vertices.min(axis=0) + offset, polygon.vertices.max(axis=0) + offset,
                                  potential.shape)
        if region is None:
            continue
        rows, columns = region
        distance = _signed_distance(polygon.vertices, coordinates[columns][None, :], coordinates[rows][:, None])
        coverage = np.clip(0.5 - distance, 0.0, 1.0)
        depth = np.clip(-distance / (0.5 * polygon.radius), 0.0, 1.0)
        potential[rows, columns] += (polygon.thickness * coverage * (0.55 + 0.45 * depth)).astype(np.float32)

    for x, y, radius, thickness in scene.beads:
        region = _bounding_region(np.array([x - radius, y - radius]) + offset,
                                  np.array([x + radius, y + radius]) + offset, potential.shape)
        if region is None:
            continue
        rows, columns = region
        squared = ((coordinates[columns][None, :] - x) ** 2 + (coordinates[rows][:, None] - y) ** 2) / radius**2
        potential[rows, columns] += (thickness * np.sqrt(np.clip(1 - squared, 0.0, None))).astype(np.float32)

    _paste_particles(potential, settings, scene)
    return potential


def _ice_gradient(coordinates, micrograph_size, reference, rng) -> np.ndarray:
    """Smooth ice-thickness variation: a linear ramp plus three undulations of wavelength 0.5-1.5
    micrograph sizes. (C, C) float32."""
    coordinates = coordinates.astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(ICE_RAMP * reference / micrograph_size) * coordinates
    field = np.add.outer(np.float32(np.sin(direction)) * ramp, np.float32(np.cos(direction)) * ramp)
    amplitude = np.float32(ICE_UNDULATION * reference)
    for _ in range(3):
        wavevector = 2 * np.pi / (micrograph_size * rng.uniform(0.5, 1.5))
        angle, phase = rng.uniform(0, 2 * np.pi, 2)
        along_x = np.float32(wavevector * np.cos(angle)) * coordinates
        along_y = np.float32(wavevector * np.sin(angle)) * coordinates + np.float32(phase)
        # cos(a + b) = cos a cos b - sin a sin b: separable, so two outer products.
        field += (amplitude * np.cos(along_y))[:, None] * np.cos(along_x)[None, :]
        field -= (amplitude * np.sin(along_y))[:, None] * np.sin(along_x)[None, :]
    return field


def _paste_particles(potential: np.ndarray, settings: _Settings, scene: _Scene) -> None:
    """Add every particle's projection, shifted by its sub-pixel offset, at its centre."""
    if not scene.centres:
        return
    centres = np.asarray(scene.centres)
    volume_index = np.asarray(scene.volume_index)
    rotations = np.asarray(scene.rotations)
    nearest = np.round(centres)
    for index, projector in enumerate(settings.particles.projectors):
        rows = np.flatnonzero(volume_index == index)
        if not len(rows):
            continue
        images = projector.render(rotations[rows], centres[rows] - nearest[rows], None, settings.pixel_size)
        side = projector.image_side
        for image, (x, y) in zip(images, nearest[rows].astype(int)):
            left = x + settings.canvas_offset - side // 2
            top = y + settings.canvas_offset - side // 2
            target = _bounding_region(np.array([left, top]), np.array([left + side - 1, top + side - 1]),
                                      potential.shape, pad=0)
            if target is None:
                continue
            rows_slice, columns_slice = target
            potential[rows_slice, columns_slice] += image[rows_slice.start - top : rows_slice.stop - top,
                                                          columns_slice.start - left : columns_slice.stop - left]


@lru_cache(maxsize=4)
def _detector_grid(size: int) -> np.ndarray:
    """``_detector_term`` on the rfft2 grid of a (size, size) image: (size, size // 2 + 1) float32."""
    frequency = np.hypot(scipy.fft.fftfreq(size)[:, None], scipy.fft.rfftfreq(size)[None, :])
    return _detector_term(frequency).astype(np.float32)


def _white_noise_spectrum(size: int, rng: np.random.Generator) -> np.ndarray:
    """rfft2 of (size, size) unit white Gaussian noise, drawn directly: (size, size // 2 + 1) complex64.

    Away from the columns kx = 0 and kx = size / 2 the coefficients are independent complex Gaussians
    with E|X|^2 = size^2; those two columns are Hermitian in ky, so each is drawn as the 1-D FFT of a real
    white column of variance size (the sum of a row of the image), which has their exact statistics.
    """
    spectrum = rng.standard_normal((size, size // 2 + 1, 2), dtype=np.float32).view(np.complex64)[..., 0]
    spectrum *= np.float32(size / math.sqrt(2))
    for column in (0, size // 2) if size % 2 == 0 else (0,):
        spectrum[:, column] = np.fft.fft(rng.standard_normal(size)) * math.sqrt(size)
    return spectrum


def _record(settings: _Settings, potential: np.ndarray, defocus, rng) -> np.ndarray:
    """-CTF * potential + noise + hot pixels, cropped to the micrograph: (S, S) float32.

    The noise is white Gaussian noise filtered to ``noise_power_spectrum``."""
    size = settings.canvas_size
    spectrum = scipy.fft.rfft2(potential, workers=1)
    transfer = _transfer_grid((size, size), settings.pixel_size, defocus, settings.b_factor)
    spectrum *= -transfer
    sigma = math.sqrt(settings.noise_variance)
    if sigma > 0:
        power = np.square(transfer)  # noise_power_spectrum on the grid, in float32
        power *= np.float32(_structural_weight(settings.pixel_size, *defocus, settings.b_factor))
        power += _detector_grid(size)
        power *= np.float32(settings.noise_variance)
        white = _white_noise_spectrum(size, rng)
        white *= np.sqrt(power, out=power)
        spectrum += white
    recorded = scipy.fft.irfft2(spectrum, s=(size, size), workers=1)
    start, micrograph_size = settings.canvas_offset, settings.micrograph_size
    image = np.ascontiguousarray(recorded[start : start + micrograph_size, start : start + micrograph_size],
                                 dtype=np.float32)
    n_hot = int(rng.poisson(HOT_PIXELS_PER_MEGAPIXEL * micrograph_size**2 / 1e6))
    if sigma > 0 and n_hot:
        rows, columns = rng.integers(0, micrograph_size, (2, n_hot))
        image[rows, columns] += np.float32(sigma) * rng.uniform(*HOT_PIXEL_RANGE, n_hot).astype(np.float32)
    return image


# --------------------------------------------------------------------------------------------------
# The simulator


def simulate_picked_stack(
    n_picks: int,
    *,
    volumes: Sequence[np.ndarray] | np.ndarray | None = None,
    voxel_sizes: Sequence[float] | float | None = None,
    volume_weights: Sequence[float] | None = None,
    box_size: int = DEFAULT_BOX_SIZE,
    pixel_size: float | None = None,
    snr: float = DEFAULT_SNR,
    junk_fraction: float = DEFAULT_JUNK_FRACTION,
    junk_mix: Mapping[str, float] | None = None,
    defocus_um: tuple[float, float] = DEFAULT_DEFOCUS_UM,
    max_astigmatism_um: float = DEFAULT_MAX_ASTIGMATISM_UM,
    b_factor: float = DEFAULT_B_FACTOR,
    micrograph_size: int | None = None,
    picks_per_micrograph: int = DEFAULT_PICKS_PER_MICROGRAPH,
    random_state=0,
    keep_micrographs: bool = False,
) -> PickedStack:
    """Simulate micrographs, pick them with an imperfect picker and extract the picks as RELION would.

    n_picks:        number of boxes in the stack.
    volumes:        one (L, L, L) volume or a sequence of them (indexed [z, y, x]); default: the built-in
                    ``elongated_volume(64)``, ELONGATED_DIAMETER_ANGSTROM (250 A) across.
    voxel_sizes:    angstrom per voxel of each volume (one number for all), required with ``volumes``
                    (``voxel_size_for_diameter`` gives it for a map that does not record it).
    volume_weights: relative proportions of the volumes among the particles (default: equal).
    box_size:       extraction box, pixels (default 64).
    pixel_size:     angstrom per pixel of the micrographs; default: the one that makes the largest
                    particle's diameter (2 ``support_radius``) PARTICLE_BOX_FRACTION (60%) of the box,
                    as users extract. Volumes are resampled to it.
    snr:            signal-to-noise ratio, defined as

                        SNR = E[ (1 / box_size^2) * sum over the box of (CTF * p)^2 ] / sigma^2

                    where p is one particle's projected potential, CTF * p its image with its micrograph's
                    CTF and envelope, rendered alone in a box_size x box_size box centred on it, E the mean
                    over the particles of the stack (volumes, orientations and sub-pixel positions as drawn,
                    each micrograph weighted by its picks, at the micrographs' own CTFs), and sigma^2 the
                    variance per pixel of the micrograph noise (``noise_power_spectrum``), the same for every
                    micrograph. E is estimated by Monte Carlo before the micrographs are simulated: 2048
                    particles drawn like the stack's, on its micrographs' CTFs (~1% standard error).
                    np.inf: no noise and no hot pixels.
    junk_fraction:  fraction of picks that are not PARTICLE: exactly round(junk_fraction * n_picks).
    junk_mix:       proportions of the junk classes (keys of JUNK_CLASSES: off_centre, aggregate, ice,
                    carbon, empty; missing keys count 0), default DEFAULT_JUNK_MIX; counts are exact
                    (largest remainders).
    defocus_um:     range of the per-micrograph mean defocus (U + V) / 2, micrometres, drawn uniformly.
    max_astigmatism_um: U - V is drawn uniformly in [0, max]; the astigmatism angle uniformly in [0, 180).
    b_factor:       B-factor of the CTF envelope exp(-B k^2 / 4), angstrom^2.
    micrograph_size: side of the square micrographs, pixels (None: MICROGRAPH_BOXES boxes across).
    picks_per_micrograph: picks on each micrograph (the last ones may get one fewer).
    random_state:   seed or numpy Generator; the stack depends on it alone (not on the number of threads).
    keep_micrographs: also return every micrograph with its ground truth (memory: ~6 bytes per pixel).

    Labels: ``classify_pick`` (rules), with r = ``PickedStack.particle_radius``; particle picks are
    jittered by N(0, (0.05 r)^2) per axis, off-centre picks are 0.3-1.6 r from their particle.

    Time, measured at the defaults on a 2-core machine shared with other jobs: about 1 ms per 64-px pick
    on one core, 20,000 picks in 13-25 s on both. Memory: the output stack (16 kB per pick) plus ~60 MB
    per thread (peak 540 MB for 20,000 picks).
    """
    if micrograph_size is None:
        micrograph_size = MICROGRAPH_BOXES * box_size  # checked with box_size, which _check_arguments checks first
    _check_arguments(n_picks, box_size, snr, junk_fraction, defocus_um, max_astigmatism_um, b_factor,
                     micrograph_size, picks_per_micrograph)
    n_picks, box_size = int(n_picks), int(box_size)
    micrograph_size, picks_per_micrograph = int(micrograph_size), int(picks_per_micrograph)
    defocus_um = (float(defocus_um[0]), float(defocus_um[1]))
    counts = _class_counts(n_picks, junk_fraction, junk_mix)
    particles, pixel_size = _prepare_particles(volumes, voxel_sizes, volume_weights, box_size, pixel_size)

    rng = np.random.default_rng(random_state)
    seed = int(rng.integers(2**63))
    plan = _plan(n_picks, picks_per_micrograph, counts, defocus_um, max_astigmatism_um, rng)
    signal_power, reference_potential = _calibrate(particles, box_size, pixel_size, plan, b_factor,
                                                   np.random.default_rng([seed, 0]))
    particle_radius = float(particles.radii.max())
    margin = max(_delocalisation(pixel_size, float(plan.defoci[:, 0].max())), math.ceil(particle_radius)) + 8
    canvas_size = scipy.fft.next_fast_len(micrograph_size + 2 * margin, real=True)
    settings = _Settings(
        particles=particles,
        box_size=box_size,
        pixel_size=pixel_size,
        micrograph_size=micrograph_size,
        canvas_size=canvas_size,
        canvas_offset=(canvas_size - micrograph_size) // 2,
        particle_radius=particle_radius,
        centre_tolerance=CENTRE_TOLERANCE * particle_radius,
        b_factor=float(b_factor),
        noise_variance=0.0 if np.isinf(snr) else signal_power / snr,
        reference_potential=reference_potential,
        seed=seed,
    )
    stack = _empty_stack(n_picks, settings, snr, junk_fraction)
    starts = np.concatenate([[0], np.cumsum([sum(quota.values()) for quota in plan.quotas])])
    kept: list = [None] * len(plan.quotas) if keep_micrographs else []

    def simulate_micrographs(chunk: slice) -> None:
        for index in range(chunk.start, chunk.stop):
            micrograph = _simulate_micrograph(settings, plan, index)
            _store_picks(stack, settings, micrograph, index, slice(starts[index], starts[index + 1]))
            if keep_micrographs:
                kept[index] = micrograph

    _run_chunked(simulate_micrographs, len(plan.quotas), 1)
    stack.micrographs = kept if keep_micrographs else None
    return stack


def _simulate_micrograph(settings: _Settings, plan: _Plan, index: int) -> Micrograph:
    """Scene, picks, potential and record of micrograph ``index``, from its own generators."""
    builder = _build_scene(settings, plan.quotas[index], bool(plan.has_carbon[index]), plan.defoci[index],
                           np.random.default_rng([settings.seed, 1, index]))
    scene = builder.scene
    recording_rng = np.random.default_rng([settings.seed, 2, index])
    potential = _render_potential(settings, scene, recording_rng)
    image = _record(settings, potential, scene.defocus, recording_rng)
    order = builder.rng.permutation(len(builder.picks))  # picks in no particular order, as a picker lists them
    return Micrograph(
        image=image,
        defocus_u_um=scene.defocus[0],
        defocus_v_um=scene.defocus[1],
        defocus_angle_deg=scene.defocus[2],
        particle_centres=np.asarray(scene.centres, dtype=np.float64).reshape(-1, 2),
        particle_volume_index=np.asarray(scene.volume_index, dtype=int),
        particle_rotations=np.asarray(scene.rotations, dtype=np.float64).reshape(-1, 3, 3),
        particle_radii=builder.radii.copy(),
        particle_clump=np.asarray(scene.clump, dtype=int),
        contamination_mask=scene.contamination_mask,
        carbon_mask=scene.carbon_mask,
        pick_coordinates=builder.picks[order],
        pick_labels=np.asarray(builder.pick_labels, dtype=np.int8)[order],
    )


def _empty_stack(n_picks: int, settings: _Settings, snr: float, junk_fraction: float) -> PickedStack:
    box = settings.box_size
    return PickedStack(
        images=np.empty((n_picks, box, box), dtype=np.float32),
        labels=np.empty(n_picks, dtype=np.int8),
        micrograph_index=np.empty(n_picks, dtype=np.int32),
        coordinates=np.empty((n_picks, 2)),
        centre_offset=np.empty((n_picks, 2)),
        particle_rotation=np.empty((n_picks, 3, 3)),
        volume_index=np.empty(n_picks, dtype=np.int16),
        defocus_u=np.empty(n_picks),
        defocus_v=np.empty(n_picks),
        defocus_angle=np.empty(n_picks),
        pixel_size=settings.pixel_size,
        snr=float(snr),
        junk_fraction=float(junk_fraction),
        particle_radius=settings.particle_radius,
        centre_tolerance=settings.centre_tolerance,
        background_radius=extraction_background_radius(box),
        noise_variance=settings.noise_variance,
        b_factor=settings.b_factor,
        volumes=settings.particles.volumes,
    )


def _store_picks(stack: PickedStack, settings: _Settings, micrograph: Micrograph, index: int, rows: slice) -> None:
    """Extract, invert and normalise the micrograph's picks into ``stack`` rows, with their ground truth."""
    picks = micrograph.pick_coordinates
    boxes = _extract_boxes(micrograph.image, picks, settings.box_size)
    np.negative(boxes, out=boxes)  # contrast inversion: particles bright
    stack.images[rows] = normalise_like_relion(boxes, stack.background_radius)
    stack.labels[rows] = micrograph.pick_labels
    stack.micrograph_index[rows] = index
    stack.coordinates[rows] = picks
    stack.defocus_u[rows] = micrograph.defocus_u_um * 1e4
    stack.defocus_v[rows] = micrograph.defocus_v_um * 1e4
    stack.defocus_angle[rows] = micrograph.defocus_angle_deg

    if not len(micrograph.particle_centres):
        stack.centre_offset[rows] = np.nan
        stack.particle_rotation[rows] = np.nan
        stack.volume_index[rows] = -1
        return
    offsets = micrograph.particle_centres[None, :, :] - picks[:, None, :]  # (m, n, 2)
    nearest = np.argmin(np.hypot(offsets[..., 0], offsets[..., 1]), axis=1)
    offset = offsets[np.arange(len(picks)), nearest]
    in_box = np.all(np.abs(offset) <= settings.box_size / 2, axis=1)
    stack.centre_offset[rows] = np.where(in_box[:, None], offset, np.nan)
    stack.particle_rotation[rows] = np.where(in_box[:, None, None], micrograph.particle_rotations[nearest], np.nan)
    stack.volume_index[rows] = np.where(in_box, micrograph.particle_volume_index[nearest], -1)

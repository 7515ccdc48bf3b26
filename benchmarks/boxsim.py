"""A second simulator of picked boxes, written independently of core/micrograph.py, for held-out checks.

No setting of the product was chosen on it. It differs from the micrograph simulator on purpose: each box is
rendered on its own (on a canvas twice its size, so that the CTF spreads across the box edge), the particle
fills less of the box (38 of 64 px), the noise is white shaped by a detector MTF plus a steep 1/f part,
contamination is an irregular polygon of random density (half of them crystalline, with a lattice texture),
carbon is a curved half-plane with granular texture (30% with a particle on it), aggregates are 2-4
touching particles, and neighbours sit next to a quarter of the particles. Boxes are contrast-inverted and
normalised as RELION does (background circle of 0.75 * box / 2, plane subtracted).

    stack = simulate_boxes(6000, snr=1 / 20, junk_fraction=0.3, random_state=201)
"""

from __future__ import annotations

from dataclasses import dataclass

import mrcfile
import numpy as np
import pandas as pd
import scipy.fft
from scipy import ndimage

from napari_ppcasort.core.ctf import ctf_at
from napari_ppcasort.core.simulate import (AGGREGATE, CARBON, EMPTY, ICE, OFF_CENTRE, PARTICLE, image_names,
                                           optics_block, phantom_volume, project, random_rotations, resample_volume)

BOX = 64
DIAMETER_PX = 38
DIAMETER_ANGSTROM = 250.0
DEFAULT_MIX = {OFF_CENTRE: 0.1, AGGREGATE: 0.2, ICE: 0.25, CARBON: 0.2, EMPTY: 0.25}


@dataclass
class BoxStack:
    """Simulated boxes: images (N, 64, 64) float32, labels (N,) int8 (core.simulate codes), defocus (N,) in
    angstrom, pixel size in angstrom."""

    images: np.ndarray
    labels: np.ndarray
    defocus: np.ndarray
    pixel_size: float

    def star_blocks(self, stack_file_name: str) -> dict[str, pd.DataFrame]:
        particles = pd.DataFrame({
            "rlnImageName": image_names(len(self.labels), stack_file_name),
            "rlnDefocusU": self.defocus, "rlnDefocusV": self.defocus, "rlnDefocusAngle": np.zeros(len(self.labels)),
            "rlnOpticsGroup": np.ones(len(self.labels), dtype=int), "ppcasortTrueLabel": self.labels.astype(int)})
        return {"optics": optics_block(self.pixel_size, BOX), "particles": particles}


def _noise_filter(size: int) -> np.ndarray:
    ky, kx = np.meshgrid(scipy.fft.fftfreq(size), scipy.fft.fftfreq(size), indexing="ij")
    radius = np.hypot(kx, ky)
    mtf = np.sinc(kx) * np.sinc(ky) * (0.6 + 0.4 * np.exp(-(radius / 0.35) ** 2))
    return np.sqrt(mtf**2 + 0.45 / (1 + (radius / 0.02) ** 2))


def _normalise(boxes: np.ndarray) -> np.ndarray:
    offsets = np.arange(BOX) - BOX // 2
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    background = xx**2 + yy**2 > (0.375 * BOX) ** 2
    design = np.stack([np.ones(background.sum()), xx[background], yy[background]], 1)
    out = np.empty_like(boxes)
    for i, box in enumerate(boxes):
        coefficients, *_ = np.linalg.lstsq(design, box[background], rcond=None)
        box = box - (coefficients[0] + coefficients[1] * xx + coefficients[2] * yy)
        out[i] = box / box[background].std()
    return out


def simulate_boxes(n: int, snr: float = 1 / 20, junk_fraction: float = 0.3, random_state=0, mix=None,
                   volume_path=None) -> BoxStack:
    """``n`` boxes, a fraction ``junk_fraction`` of them junk (classes in proportion ``mix``), particles at
    ``snr`` (variance of the CTF-filtered particle over the box / noise variance)."""
    rng = np.random.default_rng(random_state)
    mix = DEFAULT_MIX if mix is None else mix
    classes = np.array(list(mix))
    shares = np.array([mix[c] for c in classes], dtype=float)
    labels = np.where(rng.random(n) < junk_fraction, rng.choice(classes, n, p=shares / shares.sum()),
                      PARTICLE).astype(np.int8)
    if volume_path is not None:
        volume = mrcfile.read(volume_path).astype(np.float32)
        volume = resample_volume(volume, int(round(volume.shape[0] * DIAMETER_PX / 50)) | 1)
    else:
        volume = phantom_volume(DIAMETER_PX + 11, random_state=random_state)
    volume /= volume.max()
    side = volume.shape[0]
    pixel_size = DIAMETER_ANGSTROM / DIAMETER_PX
    pool = project(volume, random_rotations(2 * n + 64, rng))
    draws = iter(range(len(pool)))
    canvas = 2 * BOX
    centre = canvas // 2
    yy, xx = np.mgrid[:canvas, :canvas].astype(float)
    radius = DIAMETER_PX / 2
    peak = float(pool.max())

    def paste(image, x, y):
        projection = pool[next(draws) % len(pool)]
        ix, iy = int(np.floor(x)), int(np.floor(y))
        projection = ndimage.shift(projection, (y - iy, x - ix), order=1)
        y0, x0 = iy - side // 2, ix - side // 2
        rows = slice(max(y0, 0), min(y0 + side, canvas))
        cols = slice(max(x0, 0), min(x0 + side, canvas))
        image[rows, cols] += projection[rows.start - y0:rows.stop - y0, cols.start - x0:cols.stop - x0]

    signals = np.zeros((n, canvas, canvas), np.float32)
    for i, label in enumerate(labels):
        image = np.zeros((canvas, canvas))
        slope = rng.normal(0, 0.02, 2)
        image += slope[0] * (xx - centre) / canvas + slope[1] * (yy - centre) / canvas
        if label == PARTICLE:
            paste(image, centre + rng.normal(0, 1.0), centre + rng.normal(0, 1.0))
        elif label == OFF_CENTRE:
            distance, angle = rng.uniform(0.35, 0.8) * DIAMETER_PX, rng.uniform(0, 2 * np.pi)
            paste(image, centre + distance * np.cos(angle), centre + distance * np.sin(angle))
        elif label == AGGREGATE:
            points = [np.zeros(2)]
            for _ in range(rng.integers(1, 4)):
                angle = rng.uniform(0, 2 * np.pi)
                points.append(points[rng.integers(len(points))]
                              + rng.uniform(0.6, 1.0) * DIAMETER_PX * np.array([np.cos(angle), np.sin(angle)]))
            points = np.array(points) - np.mean(points, axis=0)
            for point in points:
                paste(image, centre + point[0], centre + point[1])
        elif label == ICE:
            x0, y0 = centre + rng.normal(0, BOX / 6, 2)
            corners = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 12)))
            distances = rng.uniform(0.3, 1.2) * radius * rng.uniform(0.7, 1.3, corners.size)
            boundary = np.interp(np.arctan2(yy - y0, xx - x0) % (2 * np.pi), corners, distances, period=2 * np.pi)
            blob = ndimage.gaussian_filter((np.hypot(xx - x0, yy - y0) < boundary).astype(float), 0.7)
            blob *= rng.uniform(2, 8) * peak / 3
            if rng.random() < 0.5:
                period, direction = rng.uniform(0.15, 0.3), rng.uniform(0, np.pi)
                blob *= 1 + 0.3 * np.cos(2 * np.pi * period * (xx * np.cos(direction) + yy * np.sin(direction)))
            image += blob
        elif label == CARBON:
            direction, offset, bend = rng.uniform(0, 2 * np.pi), rng.uniform(-BOX / 3, BOX / 3), rng.normal(0, 0.003)
            across = (xx - centre) * np.cos(direction) + (yy - centre) * np.sin(direction) - offset
            along = -(xx - centre) * np.sin(direction) + (yy - centre) * np.cos(direction)
            film = ndimage.gaussian_filter(((across + bend * along**2) > 0).astype(float), 0.7)
            texture = ndimage.gaussian_filter(rng.standard_normal((canvas, canvas)), 1.2)
            image += film * rng.uniform(0.5, 2.0) * peak / 3 * (1 + 0.45 * texture / texture.std())
            if rng.random() < 0.3:
                paste(image, centre + rng.normal(0, 1), centre + rng.normal(0, 1))
        if label in (PARTICLE, OFF_CENTRE, EMPTY, CARBON) and rng.random() < 0.25:
            angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(1.05, 1.5) * DIAMETER_PX
            paste(image, centre + distance * np.cos(angle), centre + distance * np.sin(angle))
        signals[i] = image
    defocus = rng.uniform(8000, 30000, n)
    astigmatism, angle = rng.uniform(0, 1500, n), rng.uniform(0, 180, n)
    ky, kx = np.meshgrid(scipy.fft.fftfreq(canvas, d=pixel_size), scipy.fft.fftfreq(canvas, d=pixel_size), indexing="ij")
    spectra = scipy.fft.fft2(signals)
    for i in range(n):
        spectra[i] *= -ctf_at(kx, ky, (defocus[i] + astigmatism[i] / 2) / 1e4, (defocus[i] - astigmatism[i] / 2) / 1e4,
                              angle[i], b_factor=100.0)
    window = slice(centre - BOX // 2, centre + BOX // 2)
    clean = scipy.fft.ifft2(spectra).real[:, window, window]
    noise = scipy.fft.ifft2(scipy.fft.fft2(rng.standard_normal((n, canvas, canvas))) * _noise_filter(canvas)).real
    noise = noise[:, window, window]
    particle_power = clean[labels == PARTICLE].var(axis=(1, 2)).mean() if (labels == PARTICLE).any() else 1.0
    noise *= np.sqrt(particle_power / snr / noise.var())
    raw = clean + noise  # particles dark in the micrograph (the -CTF above)
    images = _normalise(-raw).astype(np.float32)  # extraction inverts the contrast
    return BoxStack(images=images, labels=labels, defocus=defocus, pixel_size=pixel_size)

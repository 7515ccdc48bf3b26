"""The noise of a particle stack: its power spectrum, whitening, each image's noise level, the particle's size.

Cryo-EM noise is not white: the detector's MTF lowers it towards Nyquist, the ice adds power at low
frequencies. The mixture's noise model (isotropic noise of one variance in every basis coefficient) holds
only after the images are *whitened*: each spatial frequency divided by the square root of the noise power
there. The spectrum is estimated from the stack itself, robustly: for each ring of spatial frequency, the
median over a sample of images of the ring's mean power (most images are mostly noise, and the median is
not moved by the minority that carry strong contamination).

RELION's normalisation divides each box by the standard deviation of its background, which a carbon edge
or a contamination in the background inflates: the particle of such a box looks faint. Once whitened, each
image is divided by its own noise level measured in its high-frequency band (where the particle's signal is
a small part of the power) instead: every image then has noise of variance 1, as the mixture assumes.

The particle's radius, when the user does not give it, is where the images' signal ends: the radius that
holds most of the excess (over the noise) low-frequency energy of the median image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.special

__all__ = ["NoiseSpectrum", "estimate_noise_spectrum", "noise_levels", "spectral_noise_levels",
           "estimate_particle_radius"]

#: Spatial frequencies (cycles per pixel) in which an image's own noise level is measured.
NOISE_BAND = (0.3, 0.5)
#: Smallest noise power whitening assumes, as a fraction of the largest (100x amplification at most).
WHITENING_RANGE = 1e-4
#: Gaussian low-pass (cycles per pixel, 1/e radius) of the energy profile that sizes the particle.
RADIUS_LOW_PASS = 0.15
#: Fraction of the median image's excess energy inside the estimated particle radius.
RADIUS_ENERGY_FRACTION = 0.95


def _ring_index(box: int) -> np.ndarray:
    """(box, box // 2 + 1) int, the ring |k| * box (rounded) of each rfft2 frequency of a ``box`` px image."""
    ky = scipy.fft.fftfreq(box)[:, None]
    kx = scipy.fft.rfftfreq(box)[None, :]
    return np.rint(np.hypot(kx, ky) * box).astype(np.intp)


@dataclass(frozen=True)
class NoiseSpectrum:
    """A radially symmetric noise power spectrum of ``box`` px images.

    power: (n_rings,) float64, the noise power in each ring r = round(|k| * box) of spatial frequency k
        (cycles per pixel), in the images' units squared per pixel.
    """

    box: int
    power: np.ndarray

    def whitening_filter(self) -> np.ndarray:
        """(box, box // 2 + 1) float32, 1 / sqrt(noise power) on the ``scipy.fft.rfft2`` grid."""
        return (1.0 / np.sqrt(self.power[_ring_index(self.box)])).astype(np.float32)

    def whiten(self, images: np.ndarray) -> np.ndarray:
        """(n, box, box) images with every spatial frequency divided by sqrt(noise power): white noise of
        variance 1 per pixel. float32."""
        spectrum = scipy.fft.rfft2(images, workers=-1)
        spectrum *= self.whitening_filter()
        return scipy.fft.irfft2(spectrum, s=(self.box, self.box), workers=-1).astype(np.float32, copy=False)


def estimate_noise_spectrum(images: np.ndarray, background_radius: float | None = None) -> NoiseSpectrum:
    """The noise power spectrum of a sample of ``images`` (n, box, box): per ring, the median over the
    images of the ring's mean power, corrected for the median's bias on a few samples (a ring's mean
    power over s independent coefficients of white noise is Gamma(s) / s distributed). The zero
    frequency, which normalisation removes, takes the value of the first ring.

    With ``background_radius``, only the pixels farther than it from the centre are used (the rest set to
    0, the power divided by their fraction of the box), so that the particles' own signal does not count
    as noise; None, or a background of less than a quarter of the box, uses the whole images.
    """
    images = np.asarray(images, dtype=np.float32)
    n, box = images.shape[0], images.shape[1]
    fraction = 1.0
    if background_radius is not None:
        offsets = np.arange(box) - box // 2
        background = np.hypot(offsets[:, None], offsets[None, :]) > background_radius
        if background.mean() >= 0.25:
            fraction = float(background.mean())
            images = images * background
    rings = _ring_index(box)
    # rfft2 holds each frequency once except the columns kx = 0 and Nyquist, whose halves mirror each other
    weights = np.full(rings.shape, 2.0)
    weights[:, 0] = 1.0
    if box % 2 == 0:
        weights[:, -1] = 1.0
    n_rings = int(rings.max()) + 1
    counts = np.bincount(rings.ravel(), weights.ravel(), minlength=n_rings)
    power = np.abs(scipy.fft.rfft2(images, workers=-1)) ** 2 / (box**2 * fraction)
    ring_power = np.stack([np.bincount(rings.ravel(), (p * weights).ravel(), minlength=n_rings) for p in power])
    ring_power /= counts
    independent = np.maximum(counts / 2.0, 1.0)
    bias = scipy.special.gammaincinv(independent, 0.5) / independent  # the median of Gamma(independent), scaled
    estimate = np.median(ring_power, axis=0) / bias
    estimate[0] = estimate[1]
    # a bounded dynamic range: whitening amplifies no frequency more than 1/sqrt(WHITENING_RANGE) times the
    # noisiest one (noise-free or band-limited data would otherwise be amplified without limit)
    floor = WHITENING_RANGE * max(float(estimate.max()), np.finfo(np.float32).tiny)
    return NoiseSpectrum(box=box, power=np.maximum(estimate, floor))


def noise_levels(whitened: np.ndarray) -> np.ndarray:
    """(n,) float64: each whitened image's (n, box, box) noise standard deviation (see
    :func:`spectral_noise_levels`)."""
    return spectral_noise_levels(scipy.fft.rfft2(whitened, workers=-1), whitened.shape[1])


def spectral_noise_levels(spectra: np.ndarray, box: int) -> np.ndarray:
    """(n,) float64: the noise standard deviation of whitened ``box`` px images from their ``scipy.fft.rfft2``
    spectra (n, box, box // 2 + 1): the median power of the frequencies in NOISE_BAND (the median of an
    exponential variable is ln 2 times its mean)."""
    ky = scipy.fft.fftfreq(box)[:, None]
    kx = scipy.fft.rfftfreq(box)[None, :]
    radius = np.hypot(kx, ky)
    band = np.flatnonzero(((radius >= NOISE_BAND[0]) & (radius <= NOISE_BAND[1])).ravel())
    values = np.take(spectra.reshape(spectra.shape[0], -1), band, axis=1)
    power = values.real**2 + values.imag**2
    return np.sqrt(np.median(power, axis=1) / (box**2 * np.log(2.0)))


def estimate_particle_radius(whitened: np.ndarray, largest: float) -> float:
    """The particle's radius in pixels from a sample of whitened, noise-normalised images (n, box, box).

    The images are low-passed (RADIUS_LOW_PASS); the median over the images of the energy in each 1-px ring
    around the centre, less the noise's (the median of the outermost rings), is the excess energy profile
    of a typical image; the radius holds RADIUS_ENERGY_FRACTION of it. Capped at ``largest``.
    """
    box = whitened.shape[1]
    ky = scipy.fft.fftfreq(box)[:, None]
    kx = scipy.fft.rfftfreq(box)[None, :]
    low_pass = np.exp(-(np.hypot(kx, ky) / RADIUS_LOW_PASS) ** 2).astype(np.float32)
    smooth = scipy.fft.irfft2(scipy.fft.rfft2(whitened, workers=-1) * low_pass, s=(box, box), workers=-1)
    offsets = np.arange(box) - box // 2
    distance = np.rint(np.hypot(offsets[:, None], offsets[None, :])).astype(np.intp)
    n_rings = box // 2
    inside = distance < n_rings
    counts = np.bincount(distance[inside], minlength=n_rings)
    energy = np.stack([np.bincount(distance[inside], (image**2)[inside], minlength=n_rings) for image in smooth])
    profile = np.median(energy / counts, axis=0)
    excess = np.maximum(profile - np.median(profile[-max(3, n_rings // 5):]), 0.0) * counts
    if not excess.any():
        return float(largest)
    cumulative = np.cumsum(excess) / excess.sum()
    return float(min(largest, np.searchsorted(cumulative, RADIUS_ENERGY_FRACTION) + 0.5))

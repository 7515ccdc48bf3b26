"""Image preprocessing before basis expansion: circular masks, background normalisation, Fourier cropping.

Conventions used throughout the engine:

* Images are square, shape ``(n, box, box)``; the particle centre is the pixel ``(box // 2, box // 2)``
  (the RELION / ``np.fft.fftshift`` convention, also for even boxes).
* A radius is in pixels of the box it applies to, at most ``(box - 1) / 2`` so that the disk is
  symmetric about the centre pixel (90-degree rotations and reflections map it onto itself) in odd and
  even boxes and background pixels remain in the corners. The default radius is ``box // 2 - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft


class BadImageError(ValueError):
    """An image cannot be processed (NaN or infinite pixels, constant background).

    Attributes:
        position: index of the offending image: its position in the batch passed in, or (label
            "particle") its particle index.
        reason: what is wrong with it, without the position.
        constant_background: the problem is a background without variation (so it cannot be normalised),
            as in noise-free simulations.
    """

    def __init__(self, position: int, reason: str, label: str = "image", constant_background: bool = False):
        super().__init__(f"{label} {position}: {reason}")
        self.position = position
        self.reason = reason
        self.label = label
        self.constant_background = constant_background

    def __reduce__(self):  # raised on a Dask worker, re-raised on the client
        return BadImageError, (self.position, self.reason, self.label, self.constant_background)

    def of_particles(self, indices) -> "BadImageError":
        """The same error naming the particle: ``indices`` are the particle indices of the batch's images."""
        return BadImageError(int(indices[self.position]), self.reason, label="particle",
                             constant_background=self.constant_background)


def default_radius(box_size: int) -> float:
    """Default mask and basis radius in pixels for a ``box_size`` box: ``box_size // 2 - 1``."""
    return float(box_size // 2 - 1)


def check_radius(box_size: int, radius: float) -> float:
    """Validate a disk radius for a box and return it as float.

    The disk must be symmetric about the centre pixel ``box // 2`` (so that rotating an image by 90
    degrees about its centre maps the disk onto itself) and must leave background pixels:
    ``0 < radius <= (box_size - 1) / 2``.

    Raises:
        ValueError: the radius is not in that range.
    """
    radius = float(radius)
    largest = (box_size - 1) / 2
    if not 0 < radius <= largest:
        raise ValueError(f"radius {radius:g} px does not fit a {box_size} px box: it must be in (0, {largest:g}] "
                         "so the disk is centred on pixel box // 2 and leaves background in the corners")
    return radius


def disk_mask(box_size: int, radius: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` of the centre pixel ``(box_size // 2, box_size // 2)``.

    Args:
        box_size: side length in pixels.
        radius: disk radius in pixels (a pixel at distance exactly ``radius`` is inside).

    Returns:
        (box_size, box_size) bool mask, True inside the disk.
    """
    if box_size < 1:
        raise ValueError(f"box size must be a positive number of pixels, got {box_size}")
    if radius < 0:
        raise ValueError(f"disk radius must be non-negative, got {radius:g} px")
    offsets = np.arange(box_size) - box_size // 2
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def as_image_stack(images, box_size: int | None = None) -> np.ndarray:
    """Return ``images`` as a float32 (n, box, box) array (no copy if it already is one).

    Raises:
        ValueError: not a stack of square real images, or not ``box_size`` pixels wide (when given).
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected a stack of square images of shape (n, box, box), got shape {images.shape}")
    if box_size is not None and images.shape[1] != box_size:
        raise ValueError(f"expected {box_size} x {box_size} px images, got {images.shape[1]} x {images.shape[2]}")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise ValueError(f"expected real-valued images, got dtype {images.dtype}")
    return images.astype(np.float32, copy=False)


def _check_finite(images: np.ndarray) -> None:
    """Raise :class:`BadImageError` for the first image of an (n, box, box) stack with NaN/inf pixels."""
    finite = np.isfinite(images).all(axis=(1, 2))
    if not finite.all():
        raise BadImageError(int(np.argmin(finite)), "contains NaN or infinite pixels")


def normalize_background(images, radius: float) -> np.ndarray:
    """Normalise each image on its background, as RELION does.

    For every image, subtract the mean and divide by the standard deviation (ddof 0) of the pixels
    strictly outside the disk of ``radius`` pixels around the centre pixel, so that the background has
    mean 0 and standard deviation 1.

    Args:
        images: (n, box, box) images.
        radius: particle radius in pixels; pixels farther than this from the centre are background.

    Returns:
        (n, box, box) float32 normalised images.

    Raises:
        ValueError: bad shape, or fewer than two background pixels.
        BadImageError: an image whose background is constant (standard deviation 0) or not finite.
    """
    images = as_image_stack(images)
    background = ~disk_mask(images.shape[1], radius)
    if background.sum() < 2:
        raise ValueError(f"radius {radius:g} px leaves fewer than 2 background pixels in a "
                         f"{images.shape[1]} px box; use a smaller radius")
    # np.take with the flat indices: much faster than indexing with the boolean mask (which looks for its True
    # entries again in every call)
    pixels = np.take(images.reshape(images.shape[0], -1), np.flatnonzero(background.ravel()), axis=1)
    mean = pixels.mean(axis=1, dtype=np.float64)
    std = pixels.std(axis=1, dtype=np.float64)
    usable = np.isfinite(std) & (std > 0)
    if not usable.all():
        position = int(np.argmin(usable))
        problem = "is constant" if std[position] == 0 else "contains NaN or infinite pixels"
        raise BadImageError(position, f"its background (pixels beyond {radius:g} px of the centre) {problem}, "
                                      "so it cannot be normalised", constant_background=bool(std[position] == 0))
    scale = (1.0 / std).astype(np.float32)[:, None, None]
    return (images - mean.astype(np.float32)[:, None, None]) * scale


def fourier_crop(images, new_box: int) -> np.ndarray:
    """Down-sample images by keeping their lowest ``new_box`` x ``new_box`` spatial frequencies.

    The centre pixel ``box // 2`` maps exactly onto the centre pixel ``new_box // 2`` (the transform is
    taken with the origin at the centre pixel), for odd and even boxes alike. Pixel values keep their
    scale: the result samples the band-limited image at ``box / new_box`` times the original pixel size,
    so a constant image stays the same constant and the image mean is preserved; the standard deviation
    of white noise shrinks by ``new_box / box``. When ``new_box`` is even, the unpaired Nyquist row and
    column of the cropped spectrum enter through the real part of the inverse transform.

    Args:
        images: (n, box, box) images.
        new_box: output side length, ``1 <= new_box <= box``.

    Returns:
        (n, new_box, new_box) float32 images (a float32 copy when ``new_box == box``).
    """
    images = as_image_stack(images)
    box = images.shape[1]
    if not 1 <= new_box <= box:
        raise ValueError(f"Fourier crop size must be between 1 and the box size {box}, got {new_box}")
    if new_box == box:
        return images.copy()
    centred = scipy.fft.ifftshift(images, axes=(1, 2))
    spectrum = scipy.fft.fftshift(scipy.fft.fft2(centred, workers=-1), axes=(1, 2))
    start = box // 2 - new_box // 2
    window = spectrum[:, start:start + new_box, start:start + new_box]
    cropped = scipy.fft.ifft2(scipy.fft.ifftshift(window, axes=(1, 2)), workers=-1).real
    cropped *= (new_box / box) ** 2
    return scipy.fft.fftshift(cropped, axes=(1, 2)).astype(np.float32)


@dataclass(frozen=True)
class Preprocessor:
    """The preprocessing applied to every particle image before expansion in a basis.

    Order: check that every pixel is finite, Fourier-crop to ``target_box`` (if set), normalise on the
    background outside ``radius`` (if ``normalize``), whiten with ``noise_spectrum`` (if set), flip the phases
    where each particle's CTF is negative (if ``ctf`` is set), and divide each whitened image by its own
    noise level (if ``noise_normalize``; see :mod:`napari_ppcasort.core.noise`).

    Attributes:
        box_size: side length (px) of the input images.
        target_box: Fourier-crop to this side length first; None keeps the input box.
        mask_radius: particle radius in pixels of the OUTPUT box; None uses ``output_box // 2 - 1``.
        normalize: normalise each image to background mean 0 and standard deviation 1.
        noise_spectrum: the noise power spectrum of the (cropped, normalised) images to whiten with, or None.
        ctf: the CTF of every particle (:class:`~napari_ppcasort.core.ctf.CTFParameters`) to phase-flip with,
            or None; calls must then pass the particles' indices.
        noise_normalize: divide each whitened image by its noise level (needs ``noise_spectrum``).
    """

    box_size: int
    target_box: int | None = None
    mask_radius: float | None = None
    normalize: bool = True
    noise_spectrum: object | None = None
    ctf: object | None = None
    noise_normalize: bool = False

    def __post_init__(self):
        if self.box_size < 3:
            raise ValueError(f"box size must be at least 3 px, got {self.box_size}")
        if self.target_box is not None and not 3 <= self.target_box <= self.box_size:
            raise ValueError(f"target box {self.target_box} px must be between 3 and the input box "
                             f"{self.box_size} px")
        check_radius(self.output_box, self.radius)
        if self.noise_spectrum is not None and self.noise_spectrum.box != self.output_box:
            raise ValueError(f"the noise spectrum is for {self.noise_spectrum.box} px images, not {self.output_box} px")
        if self.noise_normalize and self.noise_spectrum is None:
            raise ValueError("noise normalisation needs a noise spectrum to whiten with")

    @property
    def output_box(self) -> int:
        """Side length (px) of the preprocessed images."""
        return self.box_size if self.target_box is None else self.target_box

    @property
    def radius(self) -> float:
        """Particle radius in pixels of the output box."""
        return default_radius(self.output_box) if self.mask_radius is None else float(self.mask_radius)

    @property
    def output_pixel_size(self) -> float | None:
        """Angstrom per pixel of the preprocessed images (None without a CTF, which carries the pixel size)."""
        if self.ctf is None:
            return None
        return self.ctf.pixel_size * self.box_size / self.output_box

    def normalized(self, images) -> np.ndarray:
        """The first steps only: finite check, Fourier crop and background normalisation, (n, output_box,
        output_box) float32 (what a noise spectrum is estimated from)."""
        images = as_image_stack(images, self.box_size)
        _check_finite(images)
        if self.output_box != self.box_size:
            images = fourier_crop(images, self.output_box)
        if self.normalize:
            images = normalize_background(images, self.radius)
        return images

    def __call__(self, images, indices=None) -> np.ndarray:
        """Preprocess a batch.

        Args:
            images: (n, box_size, box_size) images.
            indices: (n,) the particles' indices in the set (needed with a ``ctf``, which is per particle).

        Returns:
            (n, output_box, output_box) float32 images.

        Raises:
            ValueError: wrong shape, or a CTF without indices.
            BadImageError: an image with NaN/infinite pixels or a constant background.
        """
        images = self.normalized(images)
        if self.noise_spectrum is None and self.ctf is None:
            return images
        if self.ctf is not None and indices is None:
            raise ValueError("phase flipping needs the particles' indices")
        # whitening, the phase flip and the noise level are all read in Fourier space: one transform there and back
        box = self.output_box
        spectra = scipy.fft.rfft2(images, workers=-1)
        if self.noise_spectrum is not None:
            spectra *= self.noise_spectrum.whitening_filter()
        if self.ctf is not None:
            spectra *= self.ctf.signs(indices, box, self.output_pixel_size)
        if self.noise_normalize:
            from .noise import spectral_noise_levels

            levels = spectral_noise_levels(spectra, box)
        else:
            levels = None
        images = scipy.fft.irfft2(spectra, s=(box, box), workers=-1).astype(np.float32, copy=False)
        if levels is not None:
            usable = np.isfinite(levels) & (levels > 0)
            if not usable.all():
                raise BadImageError(int(np.argmin(usable)), "has no noise at high spatial frequencies, so its noise "
                                                            "level cannot be measured", constant_background=True)
            images /= levels.astype(np.float32)[:, None, None]
        return images

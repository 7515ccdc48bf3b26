import numpy as np
import pytest

from napari_ppcasort.core.preprocess import (
    BadImageError,
    Preprocessor,
    check_radius,
    disk_mask,
    fourier_crop,
    normalize_background,
)


def test_disk_mask_counts_pixels_within_radius_of_centre_pixel():
    mask = disk_mask(7, 2)
    assert mask.shape == (7, 7) and mask.dtype == bool
    # offsets (0,0), 4 x (1,0), 4 x (1,1), 4 x (2,0): distance <= 2 (the edge is inside)
    assert mask.sum() == 13
    assert mask[3, 3] and mask[3, 5] and mask[1, 3] and not mask[1, 2]


def test_disk_mask_even_box_is_centred_on_pixel_box_half():
    mask = disk_mask(8, 3)
    assert mask[4, 4] and mask[4, 1] and mask[4, 7] and mask[1, 4] and mask[7, 4]
    assert not mask[4, 0] and not mask[0, 4]
    # symmetric about the centre pixel, so rows/columns 1..7 are mirror images
    inner = mask[1:, 1:]
    assert np.array_equal(inner, inner[::-1, :]) and np.array_equal(inner, inner.T)


def test_check_radius_requires_a_centred_disk_with_background():
    assert check_radius(64, 31) == 31.0
    assert check_radius(65, 32) == 32.0
    with pytest.raises(ValueError, match="does not fit a 64 px box"):
        check_radius(64, 32)
    with pytest.raises(ValueError, match="radius"):
        check_radius(64, 0)


def test_normalize_background_gives_background_mean_zero_std_one():
    rng = np.random.default_rng(0)
    box, radius = 40, 15
    images = rng.normal(size=(5, box, box)) * np.array([1, 2, 5, 0.1, 30])[:, None, None]
    images += np.array([0, 10, -3, 100, 7])[:, None, None]
    images[:, disk_mask(box, radius)] += 50.0  # a bright particle must not affect the statistics
    normalized = normalize_background(images.astype(np.float32), radius)
    assert normalized.dtype == np.float32 and normalized.shape == images.shape
    background = normalized[:, ~disk_mask(box, radius)]
    np.testing.assert_allclose(background.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(background.std(axis=1), 1, rtol=1e-5)
    # an affine map per image, the particle included
    original_background = images[:, ~disk_mask(box, radius)]
    mean, std = original_background.mean(axis=1), original_background.std(axis=1)
    expected = (images - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(normalized, expected, rtol=1e-4, atol=1e-4)


def test_normalize_background_rejects_constant_background_naming_the_image():
    images = np.random.default_rng(1).normal(size=(3, 16, 16)).astype(np.float32)
    images[2] = 4.0
    with pytest.raises(BadImageError, match="image 2: .*constant") as caught:
        normalize_background(images, 6)
    assert caught.value.position == 2


def test_normalize_background_needs_background_pixels():
    with pytest.raises(ValueError, match="fewer than 2 background pixels"):
        normalize_background(np.ones((1, 4, 4)), 10)


def _band_limited(box: int, new_box: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A periodic image of frequencies below the Nyquist of ``new_box``, sampled on both grids."""
    max_frequency = (new_box - 1) // 2
    waves = [(rng.integers(-max_frequency, max_frequency + 1), rng.integers(-max_frequency, max_frequency + 1),
              rng.uniform(0, 2 * np.pi), rng.normal()) for _ in range(12)]

    def sample(positions):
        y, x = np.meshgrid(positions, positions, indexing="ij")
        return sum(a * np.cos(2 * np.pi * (ky * y + kx * x) / box + phase) for ky, kx, phase, a in waves) + 0.7

    fine = sample(np.arange(box) - box // 2)
    coarse = sample((np.arange(new_box) - new_box // 2) * box / new_box)
    return fine, coarse


@pytest.mark.parametrize("box, new_box", [(64, 32), (71, 35), (64, 33), (71, 36), (50, 50)])
def test_fourier_crop_of_band_limited_image_is_its_down_sampled_version(box, new_box):
    fine, coarse = _band_limited(box, new_box, np.random.default_rng(box + new_box))
    cropped = fourier_crop(fine[None].astype(np.float32), new_box)
    assert cropped.shape == (1, new_box, new_box) and cropped.dtype == np.float32
    np.testing.assert_allclose(cropped[0], coarse, atol=2e-5 * np.abs(coarse).max())


def test_fourier_crop_keeps_constants_and_the_centre_pixel():
    box, new_box = 72, 36
    np.testing.assert_allclose(fourier_crop(np.full((2, box, box), 3.5), new_box), 3.5, rtol=1e-6)
    # a centred Gaussian stays centred on pixel new_box // 2 and keeps its peak value
    y, x = np.mgrid[:box, :box] - box // 2
    blob = np.exp(-(x**2 + y**2) / (2 * 6.0**2))[None]
    cropped = fourier_crop(blob, new_box)[0]
    assert np.unravel_index(cropped.argmax(), cropped.shape) == (new_box // 2, new_box // 2)
    assert cropped.max() == pytest.approx(1.0, abs=1e-4)


def test_fourier_crop_rejects_larger_box():
    with pytest.raises(ValueError, match="between 1 and the box size 16"):
        fourier_crop(np.zeros((1, 16, 16)), 20)


def test_preprocessor_crops_then_normalises_in_the_output_box():
    rng = np.random.default_rng(2)
    images = (rng.normal(size=(4, 64, 64)) * 3 + 5).astype(np.float32)
    preprocessor = Preprocessor(64, target_box=32)
    assert preprocessor.output_box == 32 and preprocessor.radius == 15.0
    out = preprocessor(images)
    assert out.shape == (4, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, normalize_background(fourier_crop(images, 32), 15.0), rtol=1e-6, atol=1e-6)
    background = out[:, ~disk_mask(32, 15)]
    np.testing.assert_allclose(background.std(axis=1), 1, rtol=1e-5)


def test_preprocessor_without_crop_or_normalisation_is_identity():
    images = np.random.default_rng(3).normal(size=(2, 20, 20)).astype(np.float32)
    out = Preprocessor(20, normalize=False)(images)
    np.testing.assert_array_equal(out, images)


def test_preprocessor_rejects_bad_settings_and_images():
    with pytest.raises(ValueError, match="target box 80 px must be between 3 and the input box 64"):
        Preprocessor(64, target_box=80)
    with pytest.raises(ValueError, match="does not fit a 32 px box"):
        Preprocessor(64, target_box=32, mask_radius=20)
    preprocessor = Preprocessor(16)
    with pytest.raises(ValueError, match="expected 16 x 16 px images, got 15 x 15"):
        preprocessor(np.zeros((1, 15, 15)))
    with pytest.raises(ValueError, match=r"shape \(n, box, box\)"):
        preprocessor(np.zeros((16, 16)))
    images = np.random.default_rng(4).normal(size=(3, 16, 16)).astype(np.float32)
    images[1, 8, 8] = np.nan
    with pytest.raises(BadImageError, match="image 1: contains NaN"):
        preprocessor(images)

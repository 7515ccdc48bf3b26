"""Tests of the particle-stack simulator (napari_ppcasort.core.simulate)."""


import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.ndimage import affine_transform

from napari_ppcasort.core.simulate import (
    NOISE,
    OUTLIER,
    PARTICLE,
    VolumeError,
    ctf,
    electron_wavelength_angstrom,
    load_volume,
    phantom_volume,
    project,
    random_rotations,
    resample_volume,
    simulate_particles,
    write_simulated,
)

from fixture_paths import VOLUME as RIBOSOME

BOX = 33


@pytest.fixture(scope="module")
def volume():
    return phantom_volume(BOX)


def power(images):
    return np.mean(images.astype(np.float64) ** 2, axis=(1, 2))


def correlation(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def clean_particles(stack, volume):
    """Recompute the noise-free particle images of a stack from its ground truth."""
    rows = np.flatnonzero(stack.labels == PARTICLE)
    defocus = None if stack.defocus_um is None else stack.defocus_um[rows]
    return rows, project(volume, stack.rotations[rows], stack.shifts[rows], defocus, stack.pixel_size)


def rotate_volume(volume, rotation):
    """v_R(x) = v(R^T x) about the centre voxel, (x, y, z) <-> array axes (2, 1, 0), cubic spline."""
    centre = np.full(3, volume.shape[0] // 2)
    reverse = np.eye(3)[::-1]
    matrix = reverse @ rotation.T @ reverse
    return affine_transform(volume, matrix, offset=centre - matrix @ centre, order=3)


# --- volumes ---------------------------------------------------------------------------------------


def test_phantom_is_asymmetric_normalised_and_deterministic(volume):
    assert volume.shape == (BOX,) * 3 and volume.dtype == np.float32
    assert volume.max() == pytest.approx(1.0)
    assert volume.min() >= 0
    for axis in range(3):
        assert correlation(volume, np.flip(volume, axis)) < 0.9
    for turns in (1, 2):
        assert correlation(volume, np.rot90(volume, turns, axes=(1, 2))) < 0.9
    np.testing.assert_array_equal(volume, phantom_volume(BOX))
    assert not np.array_equal(volume, phantom_volume(BOX, random_state=1))


def test_ribosome_resamples_to_71_px_with_the_same_mass():
    original = load_volume(RIBOSOME)
    assert original.shape == (65, 65, 65)
    resampled = load_volume(RIBOSOME, size=71)
    assert resampled.shape == (71, 71, 71) and resampled.dtype == np.float32
    assert resampled.sum() == pytest.approx(original.sum(), rel=1e-5)
    # Zero-padding the spectrum loses nothing: cropping it back restores the original map.
    np.testing.assert_allclose(resample_volume(resampled, 65), original, atol=1e-6 * np.abs(original).max())


def test_load_volume_rejects_what_is_not_a_cubic_volume(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mrc"):
        load_volume(tmp_path / "missing.mrc")
    flat = tmp_path / "flat.mrc"
    mrcfile.write(flat, np.zeros((8, 8, 9), dtype=np.float32))
    with pytest.raises(VolumeError, match=r"flat\.mrc.*cubic"):
        load_volume(flat)
    stack = tmp_path / "stack.mrcs"
    with mrcfile.new(stack) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), dtype=np.float32))
        mrc.set_image_stack()
    with pytest.raises(VolumeError, match=r"stack\.mrcs.*image stack"):
        load_volume(stack)
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(b"not an mrc file" * 100)
    with pytest.raises(VolumeError, match=r"garbage\.mrc"):
        load_volume(garbage)


# --- rotations and projection ----------------------------------------------------------------------


def test_random_rotations_are_haar_distributed():
    rotations = random_rotations(20000, random_state=3)
    assert rotations.shape == (20000, 3, 3)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-10)
    gram = rotations @ rotations.transpose(0, 2, 1)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(3), rotations.shape), atol=1e-10)
    # Haar: every entry has mean 0 and variance 1/3; the trace has mean 0 and second moment 1.
    assert np.abs(rotations.mean(axis=0)).max() < 0.02
    np.testing.assert_allclose((rotations**2).mean(axis=0), 1 / 3, atol=0.02)
    traces = np.trace(rotations, axis1=1, axis2=2)
    assert abs(traces.mean()) < 0.03
    assert (traces**2).mean() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(rotations, random_rotations(20000, random_state=3))


def test_identity_projection_is_the_sum_along_z(volume):
    image = project(volume, np.eye(3)[None])[0]
    expected = volume.sum(axis=0)
    assert np.linalg.norm(image - expected) / np.linalg.norm(expected) < 0.03


def test_quarter_turn_about_z_rotates_the_projection(volume):
    image = project(volume, np.eye(3)[None])[0]
    tolerance = 1e-5 * np.abs(image).max()
    turned_volume = np.rot90(volume, 1, axes=(1, 2))  # quarter turn in the (y, x) plane
    np.testing.assert_allclose(project(turned_volume, np.eye(3)[None])[0], np.rot90(image, 1), atol=tolerance)
    # The same turn as a rotation matrix: R maps x to y, so v_R(x, y) = v(y, -x).
    quarter_turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(project(volume, quarter_turn[None])[0], np.rot90(image, -1), atol=tolerance)


def test_even_box_rotates_about_pixel_half_the_side():
    # For an even side L the centre is pixel L // 2, not the array centre (L - 1) / 2 that np.rot90 uses.
    volume = phantom_volume(32)
    image = project(volume, np.eye(3)[None])[0]
    quarter_turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = np.roll(np.rot90(image, -1), 1, axis=1)
    np.testing.assert_allclose(project(volume, quarter_turn[None])[0], expected, atol=1e-5 * np.abs(image).max())


def test_projection_of_rotated_volume_matches_composed_rotation(volume):
    first = random_rotations(4, random_state=5)
    second = random_rotations(1, random_state=6)[0]
    composed = project(volume, first @ second)
    via_rotated_volume = project(rotate_volume(volume, second), first)
    for a, b in zip(composed, via_rotated_volume):
        assert correlation(a, b) > 0.995
    assert np.linalg.norm(composed - via_rotated_volume) / np.linalg.norm(composed) < 0.03


def test_projection_does_not_depend_on_chunking(volume):
    rotations = random_rotations(10, random_state=7)
    small_chunks = project(volume, rotations, chunk_size=3)
    np.testing.assert_allclose(small_chunks, project(volume, rotations, chunk_size=64), rtol=0, atol=1e-6)


def test_shift_moves_the_projection_by_whole_pixels(volume):
    rotations = random_rotations(2, random_state=8)
    still = project(volume, rotations)
    moved = project(volume, rotations, shifts=np.array([[3.0, -2.0], [-1.0, 4.0]]))
    for image, shifted, (dx, dy) in zip(still, moved, [(3, -2), (-1, 4)]):
        expected = np.roll(image, (dy, dx), axis=(0, 1))
        # Compare away from the border, where the periodic FFT box and the crop differ.
        np.testing.assert_allclose(shifted[6:-6, 6:-6], expected[6:-6, 6:-6], atol=2e-3 * np.abs(image).max())


def test_project_rejects_bad_rotations(volume):
    with pytest.raises(ValueError, match=r"\(n, 3, 3\)"):
        project(volume, np.eye(3))
    with pytest.raises(ValueError, match="proper rotation"):
        project(volume, 2 * np.eye(3)[None])


# --- CTF -------------------------------------------------------------------------------------------


def test_ctf_values_and_first_zero():
    assert electron_wavelength_angstrom(300) == pytest.approx(0.019687, abs=1e-6)
    transfer = ctf(128, pixel_size=1.5, defocus_um=2.0, cs_mm=0.0)
    assert transfer.shape == (128, 128)
    assert transfer[64, 64] == pytest.approx(0.1, abs=1e-6)  # amplitude contrast at zero frequency
    assert np.abs(transfer).max() <= 1.0
    np.testing.assert_allclose(transfer, transfer.T, atol=1e-6)
    # Without Cs the first zero is where pi * lambda * df * k^2 + arcsin(0.1) = pi.
    wavelength = electron_wavelength_angstrom(300)
    first_zero = np.sqrt((np.pi - np.arcsin(0.1)) / (np.pi * wavelength * 2.0e4))  # 1/angstrom
    profile = transfer[64, 64:]
    crossing = np.flatnonzero(np.diff(np.sign(profile)) != 0)[0]
    frequencies = np.arange(64) / (128 * 1.5)
    assert frequencies[crossing] <= first_zero <= frequencies[crossing + 1]


# --- stacks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_stack(volume):
    return simulate_particles(400, n_outliers=60, n_noise=60, box_size=BOX, volume=volume, snr=0.5, random_state=11)


def test_labels_counts_and_shuffling(noisy_stack):
    labels = noisy_stack.labels
    assert labels.dtype == np.int8 and labels.shape == (520,)
    assert np.bincount(labels).tolist() == [400, 60, 60]
    assert np.flatnonzero(labels != PARTICLE).min() < 400  # junk is spread through the stack
    assert noisy_stack.images.shape == (520, BOX, BOX) and noisy_stack.images.dtype == np.float32
    non_particles = labels != PARTICLE
    np.testing.assert_array_equal(noisy_stack.rotations[non_particles], np.broadcast_to(np.eye(3), (120, 3, 3)))
    np.testing.assert_array_equal(noisy_stack.shifts[non_particles], 0)
    assert np.abs(noisy_stack.shifts).max() <= 2.0


def test_labels_match_content(noisy_stack, volume):
    stack = noisy_stack
    sigma2 = stack.noise_variance
    rows, clean = clean_particles(stack, volume)
    noise_images = stack.images[stack.labels == NOISE]
    # Noise images hold no signal: noise power, and no correlation with any clean projection.
    assert power(noise_images).mean() == pytest.approx(sigma2, rel=0.03)
    cross = np.einsum("nij,mij->nm", noise_images, clean) / np.sqrt(
        np.outer((noise_images**2).sum(axis=(1, 2)), (clean**2).sum(axis=(1, 2)))
    )
    assert np.abs(cross).mean() < 2 / BOX
    # Particles carry the signal: power sigma^2 * (1 + SNR), strongly correlated with their projection.
    assert power(stack.images[rows]).mean() == pytest.approx(sigma2 * (1 + stack.snr), rel=0.03)
    assert np.mean([correlation(a, b) for a, b in zip(stack.images[rows], clean)]) > 0.4
    # Outliers: matched energy plus noise.
    assert power(stack.images[stack.labels == OUTLIER]).mean() == pytest.approx(sigma2 * (1 + stack.snr), rel=0.05)


@pytest.mark.parametrize("defocus_um", [None, (1.0, 2.5)])
def test_measured_snr_matches_requested(volume, defocus_um):
    stack = simulate_particles(
        300, n_outliers=20, n_noise=20, box_size=BOX, volume=volume, snr=0.1, defocus_um=defocus_um,
        pixel_size=2.0, random_state=12,
    )
    rows, clean = clean_particles(stack, volume)
    added_noise = stack.images[rows] - clean
    measured_snr = power(clean).mean() / added_noise.astype(np.float64).var()
    assert measured_snr == pytest.approx(0.1, rel=0.1)
    assert power(clean).mean() / stack.noise_variance == pytest.approx(0.1, rel=1e-4)
    if defocus_um is None:
        assert stack.defocus_um is None
    else:
        assert stack.defocus_um.shape == (340,)
        assert 1.0 <= stack.defocus_um.min() and stack.defocus_um.max() <= 2.5


def test_outliers_are_energy_matched_camera_crops(volume):
    stack = simulate_particles(50, n_outliers=30, n_noise=10, box_size=BOX, volume=volume, snr=np.inf, random_state=13)
    assert stack.noise_variance == 0
    particle_power = power(stack.images[stack.labels == PARTICLE]).mean()
    outliers = stack.images[stack.labels == OUTLIER]
    np.testing.assert_allclose(power(outliers), particle_power, rtol=1e-4)
    np.testing.assert_allclose(outliers.mean(axis=(1, 2)), 0, atol=1e-4 * np.sqrt(particle_power))
    flat = outliers.reshape(len(outliers), -1)
    pairwise = np.corrcoef(flat)[np.triu_indices(len(outliers), 1)]
    assert pairwise.max() < 0.99  # distinct crops
    np.testing.assert_array_equal(stack.images[stack.labels == NOISE], 0)


def test_simulation_is_deterministic(volume):
    kwargs = dict(n_outliers=5, n_noise=5, box_size=BOX, volume=volume, defocus_um=(1.0, 2.0), random_state=21)
    first = simulate_particles(40, **kwargs)
    again = simulate_particles(40, chunk_size=7, **kwargs)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.rotations, again.rotations)
    np.testing.assert_array_equal(first.defocus_um, again.defocus_um)
    np.testing.assert_allclose(first.images, again.images, rtol=0, atol=1e-5 * np.abs(first.images).max())
    other = simulate_particles(40, **{**kwargs, "random_state": 22})
    assert not np.array_equal(first.labels, other.labels)


def test_simulate_rejects_bad_arguments(volume):
    with pytest.raises(VolumeError, match="load_volume"):
        simulate_particles(10, box_size=BOX + 2, volume=volume)
    with pytest.raises(ValueError, match="snr"):
        simulate_particles(10, box_size=BOX, volume=volume, snr=0)
    with pytest.raises(ValueError, match="n_particles"):
        simulate_particles(0, n_noise=5, box_size=BOX, volume=volume)
    with pytest.raises(ValueError, match="defocus_um"):
        simulate_particles(10, box_size=BOX, volume=volume, defocus_um=(2.0, 1.0))


# --- files -----------------------------------------------------------------------------------------


def test_write_simulated_round_trips(tmp_path, volume):
    stack = simulate_particles(
        30, n_outliers=5, n_noise=5, box_size=BOX, volume=volume, defocus_um=(1.0, 2.0), pixel_size=1.7, random_state=31
    )
    paths = write_simulated(stack, tmp_path / "out", name="sim")
    assert paths == {
        "stack": tmp_path / "out" / "sim.mrcs",
        "star": tmp_path / "out" / "sim.star",
        "labels": tmp_path / "out" / "sim_labels.csv",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sim.mrcs", "sim.star", "sim_labels.csv"]

    with mrcfile.open(paths["stack"]) as mrc:
        assert mrc.is_image_stack()
        np.testing.assert_array_equal(mrc.data, stack.images)
        assert float(mrc.voxel_size.x) == pytest.approx(1.7)
        assert float(mrc.header.dmean) == pytest.approx(stack.images.mean(dtype=np.float64), abs=1e-6)
        assert float(mrc.header.rms) == pytest.approx(stack.images.std(dtype=np.float64), rel=1e-5)
        assert float(mrc.header.dmax) == stack.images.max()

    blocks = starfile.read(paths["star"], always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnImageSize"].tolist() == [BOX]
    assert optics["rlnImagePixelSize"].tolist() == [pytest.approx(1.7)]
    assert optics["rlnVoltage"].tolist() == [300.0]
    assert particles["rlnImageName"].tolist()[:2] == ["000001@sim.mrcs", "000002@sim.mrcs"]
    assert (particles["rlnOpticsGroup"] == 1).all()
    np.testing.assert_array_equal(particles["ppcasortTrueLabel"].to_numpy(), stack.labels)
    np.testing.assert_allclose(particles["rlnDefocusU"].to_numpy(), stack.defocus_um * 1e4, rtol=1e-6)
    np.testing.assert_allclose(particles["rlnDefocusV"].to_numpy(), stack.defocus_um * 1e4, rtol=1e-6)

    table = pd.read_csv(paths["labels"])
    assert table.columns.tolist() == ["index", "label", "label_name"]
    np.testing.assert_array_equal(table["label"].to_numpy(), stack.labels)
    assert set(table.loc[table["label"] == OUTLIER, "label_name"]) == {"outlier"}

    with pytest.raises(FileExistsError, match="sim.mrcs"):
        write_simulated(stack, tmp_path / "out", name="sim")
    write_simulated(stack, tmp_path / "out", name="sim", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sim.mrcs", "sim.star", "sim_labels.csv"]


def test_write_without_ctf_has_no_defocus_columns(tmp_path, volume):
    stack = simulate_particles(5, box_size=BOX, volume=volume, random_state=32)
    paths = write_simulated(stack, tmp_path)
    particles = starfile.read(paths["star"], always_dict=True)["particles"]
    assert "rlnDefocusU" not in particles.columns
    assert particles["rlnImageName"].iloc[-1] == "000005@simulated.mrcs"

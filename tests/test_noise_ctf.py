"""The per-particle CTF from particle files, phase flipping, the noise spectrum, whitening and the particle radius."""

import numpy as np
import pytest
import scipy.fft

from fixture_paths import CS, RELION31
from napari_ppcasort.core.ctf import CTFParameters, ctf_at, ctf_parameters
from napari_ppcasort.core.noise import estimate_noise_spectrum, estimate_particle_radius, noise_levels
from napari_ppcasort.core.particles import ArrayParticleSet, open_particles
from napari_ppcasort.core.preprocess import Preprocessor


def test_ctf_parameters_from_relion_31_star_join_the_optics_group():
    particles = open_particles(RELION31 / "relion31.star")
    ctf = ctf_parameters(particles)
    table = particles.table
    np.testing.assert_allclose(ctf.defocus_u_um, table["rlnDefocusU"].to_numpy() / 1e4)
    np.testing.assert_allclose(ctf.defocus_angle_deg, table["rlnDefocusAngle"].to_numpy())
    optics = particles.optics.set_index("rlnOpticsGroup")
    expected_kv = optics.loc[table["rlnOpticsGroup"].to_numpy(), "rlnVoltage"].to_numpy()
    np.testing.assert_allclose(ctf.voltage_kv, expected_kv)
    assert ctf.pixel_size == pytest.approx(particles.pixel_size)


def test_ctf_parameters_from_cryosparc_fields_in_micrometres_and_degrees():
    particles = open_particles(CS / "cryosparc_P12_J24_001_particles.cs")
    ctf = ctf_parameters(particles)
    records = particles.records
    np.testing.assert_allclose(ctf.defocus_v_um, records["ctf/df2_A"] / 1e4, rtol=1e-6)
    np.testing.assert_allclose(ctf.defocus_angle_deg, np.rad2deg(records["ctf/df_angle_rad"]), rtol=1e-5)
    np.testing.assert_allclose(ctf.amplitude_contrast, records["ctf/amp_contrast"], rtol=1e-6)


def test_no_ctf_without_defocus():
    assert ctf_parameters(ArrayParticleSet(np.zeros((3, 8, 8), np.float32), pixel_size=1.0)) is None


def _ctf(n, defocus_um=1.5, pixel_size=2.0, angle=0.0, astigmatism=0.0):
    full = np.full(n, 1.0)
    return CTFParameters(defocus_u_um=full * defocus_um + astigmatism, defocus_v_um=full * defocus_um,
                         defocus_angle_deg=full * angle, phase_shift_deg=full * 0.0, voltage_kv=full * 300.0,
                         cs_mm=full * 2.7, amplitude_contrast=full * 0.1, pixel_size=pixel_size)


def test_phase_flip_turns_the_ctf_into_its_magnitude_and_twice_is_identity():
    rng = np.random.default_rng(0)
    box = 48
    spectrum = scipy.fft.rfft2(rng.standard_normal((2, box, box)))
    spectrum[:, box // 2, :] = spectrum[:, :, -1] = 0  # no Nyquist terms, where an astigmatic CTF is not Hermitian
    images = scipy.fft.irfft2(spectrum, s=(box, box)).astype(np.float32)
    ctf = _ctf(2, astigmatism=0.3, angle=30.0)
    ky = scipy.fft.fftfreq(box, d=2.0)[:, None]
    kx = scipy.fft.rfftfreq(box, d=2.0)[None, :]
    values = ctf_at(kx, ky, 1.8, 1.5, 30.0, amplitude_contrast=0.1)
    filtered = scipy.fft.irfft2(scipy.fft.rfft2(images) * values, s=(box, box))
    phase_flip = Preprocessor(box, normalize=False, ctf=ctf)  # the flip alone: no crop, normalisation or whitening
    flipped = phase_flip(filtered, [0, 1])
    expected = scipy.fft.irfft2(scipy.fft.rfft2(images) * np.abs(values), s=(box, box))
    np.testing.assert_allclose(flipped, expected, atol=1e-4)
    np.testing.assert_allclose(phase_flip(flipped, [0, 1]), filtered, atol=1e-4)


def test_ctf_signs_are_those_of_ctf_at_for_every_particle():
    """The signs come from one product of per-particle terms with the frequency grid: the same as ctf_at's CTF for
    astigmatic particles with a phase shift, on two microscopes, except where the CTF is 0 to float32 precision."""
    rng = np.random.default_rng(3)
    n, box, pixel_size = 200, 40, 1.7
    u = rng.uniform(0.5, 3.5, n)
    parameters = CTFParameters(u, u - rng.uniform(0, 0.4, n), rng.uniform(-90, 180, n), rng.uniform(0, 90, n),
                               np.where(np.arange(n) % 2, 300.0, 200.0), np.where(np.arange(n) % 2, 2.7, 0.01),
                               np.where(np.arange(n) % 2, 0.1, 0.07), pixel_size)
    indices = rng.permutation(n)[:150]
    signs = parameters.signs(indices, box, pixel_size)
    ky = scipy.fft.fftfreq(box, d=pixel_size)[:, None]
    kx = scipy.fft.rfftfreq(box, d=pixel_size)[None, :]

    def column(values):
        return np.asarray(values)[indices][:, None, None]

    values = ctf_at(kx, ky, column(parameters.defocus_u_um), column(parameters.defocus_v_um),
                    column(parameters.defocus_angle_deg), 0.0, column(parameters.voltage_kv), column(parameters.cs_mm),
                    column(parameters.amplitude_contrast), column(parameters.phase_shift_deg))
    assert signs.shape == values.shape == (150, box, box // 2 + 1) and signs.dtype == np.float32
    differ = signs != np.where(values < 0, -1.0, 1.0)
    assert np.all(np.abs(values[differ]) < 1e-4)
    assert differ.mean() < 1e-4
    assert (signs < 0).mean() > 0.3  # the grid reaches many Thon rings


def _coloured_noise(n, box, rng):
    k = np.hypot(scipy.fft.fftfreq(box)[:, None], scipy.fft.rfftfreq(box)[None, :])
    power = 0.3 + 2.0 * np.exp(-(k / 0.12) ** 2)
    white = rng.standard_normal((n, box, box))
    return scipy.fft.irfft2(scipy.fft.rfft2(white) * np.sqrt(power), s=(box, box)).astype(np.float32), power


def test_noise_spectrum_is_recovered_and_whitening_gives_unit_white_noise():
    rng = np.random.default_rng(1)
    noise, power = _coloured_noise(600, 48, rng)
    spectrum = estimate_noise_spectrum(noise)
    rings = np.rint(np.hypot(scipy.fft.fftfreq(48)[:, None], scipy.fft.rfftfreq(48)[None, :]) * 48).astype(int)
    truth = np.bincount(rings.ravel(), power.ravel()) / np.bincount(rings.ravel())
    np.testing.assert_allclose(spectrum.power[2:30], truth[2:30], rtol=0.08)
    whitened = spectrum.whiten(noise)
    white_power = np.abs(scipy.fft.rfft2(whitened)) ** 2 / 48**2
    per_ring = np.bincount(rings.ravel(), white_power.mean(axis=0).ravel()) / np.bincount(rings.ravel())
    np.testing.assert_allclose(per_ring[2:30], 1.0, rtol=0.1)
    np.testing.assert_allclose(noise_levels(3.0 * whitened), 3.0, rtol=0.12)


def test_noise_spectrum_from_the_background_ignores_the_particles():
    rng = np.random.default_rng(2)
    noise, _ = _coloured_noise(400, 48, rng)
    offsets = np.arange(48) - 24
    blob = 4.0 * np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 5.0**2))
    with_particles = noise + blob.astype(np.float32)
    whole = estimate_noise_spectrum(with_particles).power
    background = estimate_noise_spectrum(with_particles, background_radius=14).power
    reference = estimate_noise_spectrum(noise).power
    assert whole[1] > 3 * reference[1]  # the particle's low frequencies counted as noise
    np.testing.assert_allclose(background[1:20], reference[1:20], rtol=0.25)


def test_particle_radius_estimate_follows_the_particle_size():
    rng = np.random.default_rng(3)
    offsets = np.arange(64) - 32
    distance = np.hypot(offsets[:, None], offsets[None, :])
    for radius in (10, 18):
        disc = (distance <= radius).astype(np.float32)
        images = rng.standard_normal((300, 64, 64)).astype(np.float32) + 0.6 * disc
        estimate = estimate_particle_radius(images, largest=31)
        assert radius - 3 <= estimate <= radius + 3


def test_preprocessor_flips_with_the_crop_pixel_size_and_needs_indices():
    ctf = _ctf(4, pixel_size=1.0)
    preprocessor = Preprocessor(64, target_box=32, normalize=False, ctf=ctf)
    assert preprocessor.output_pixel_size == 2.0
    with pytest.raises(ValueError, match="indices"):
        preprocessor(np.zeros((4, 64, 64), np.float32))

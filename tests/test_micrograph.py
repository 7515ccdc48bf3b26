"""Tests of the micrograph simulator (napari_ppcasort.core.micrograph): whole micrographs, picked and
extracted, with ground truth.

The rules and definitions checked here are re-derived from the simulator's ground truth (particle centres,
contamination and carbon masks, CTF parameters) with code of the tests' own, not read back from it.
"""

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.ndimage import distance_transform_edt

import napari_ppcasort.core.simulate as simulate_module
from napari_ppcasort.core.micrograph import (
    DEFAULT_JUNK_MIX,
    JUNK_CLASSES,
    MICROGRAPH_BOXES,
    noise_power_spectrum,
    simulate_picked_stack,
    voxel_size_for_diameter,
)
from napari_ppcasort.core.simulate import (
    AGGREGATE,
    CARBON,
    EMPTY,
    ICE,
    LABEL_NAMES,
    NOISE,
    OFF_CENTRE,
    OUTLIER,
    PARTICLE,
    ctf,
    ctf_at,
    elongated_volume,
    load_volume,
    project,
    write_simulated,
)

from fixture_paths import VOLUME as RIBOSOME

# The ribosome map's header records no voxel size; a 70S ribosome is about 250 angstrom across, so its
# support diameter is taken to be 250 angstrom (about 4.4 angstrom per voxel).
RIBOSOME_DIAMETER = 250.0
SNR = 1 / 20
JUNK_FRACTION = 0.5
# 50 micrographs of 512 px with 32 picks each: enough defoci for the SNR and every label many times.
SETTINGS = dict(n_picks=1600, micrograph_size=512, picks_per_micrograph=32, junk_fraction=JUNK_FRACTION,
                random_state=7, keep_micrographs=True)
BOX = 64


@pytest.fixture(scope="module")
def volumes():
    ribosome = load_volume(RIBOSOME)
    elongated = elongated_volume(64)
    voxel_sizes = [voxel_size_for_diameter(ribosome, RIBOSOME_DIAMETER), voxel_size_for_diameter(elongated, 250.0)]
    return dict(volumes=[ribosome, elongated], voxel_sizes=voxel_sizes, volume_weights=[0.6, 0.4])


@pytest.fixture(scope="module")
def stack(volumes):
    return simulate_picked_stack(**SETTINGS, **volumes, snr=SNR)


@pytest.fixture(scope="module")
def noise_free(volumes):
    return simulate_picked_stack(**SETTINGS, **volumes, snr=np.inf)


def circle_content(micrograph, x, y, radius):
    """What lies in the circle of ``radius`` around pick (x, y): the tests' own geometry."""
    rows, columns = np.ogrid[: micrograph.image.shape[0], : micrograph.image.shape[1]]
    circle = (columns - x) ** 2 + (rows - y) ** 2 <= radius**2
    distances = np.hypot(*(micrograph.particle_centres - [x, y]).T)
    return dict(
        contamination=bool(micrograph.contamination_mask[circle].any()),
        carbon=bool(micrograph.carbon_mask[circle].any()),
        centres_inside=int(np.sum(distances <= radius)),
        nearest=float(distances.min()) if len(distances) else np.inf,
        reaching=bool(np.any(distances < radius + micrograph.particle_radii)),
    )


def clean_projections(volumes, volume_index, rotations, shifts, side):
    """Noise-free projections (no CTF) of particles of ``volumes[volume_index]`` at ``rotations`` (n, 3, 3),
    shifted by ``shifts`` (n, 2) pixels, centred in ``side`` x ``side`` images: (n, side, side)."""
    images = np.zeros((len(volume_index), side, side))
    for index, volume in enumerate(volumes):
        mine = np.flatnonzero(volume_index == index)
        if len(mine):
            length = volume.shape[0]
            start = side // 2 - length // 2
            images[mine, start : start + length, start : start + length] = project(volume, rotations[mine],
                                                                                  shifts[mine])
    return images


def background(box, radius):
    offsets = np.arange(box) - box // 2
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 > radius**2


# --- label table -------------------------------------------------------------------------------------


def test_one_label_table_for_both_simulators():
    assert PARTICLE == 0 and (OUTLIER, NOISE) == (1, 2)
    codes = [PARTICLE, OUTLIER, NOISE, OFF_CENTRE, AGGREGATE, ICE, CARBON, EMPTY]
    assert len(set(codes)) == len(codes) and set(LABEL_NAMES) == set(codes)
    assert {LABEL_NAMES[code] for code in JUNK_CLASSES.values()} == set(JUNK_CLASSES)
    assert set(DEFAULT_JUNK_MIX) == set(JUNK_CLASSES) and all(share > 0 for share in DEFAULT_JUNK_MIX.values())


# --- labels against the content of each box ---------------------------------------------------------


def test_every_label_matches_what_is_in_its_box(stack):
    r, tolerance = stack.particle_radius, stack.centre_tolerance
    seen = set()
    for index, micrograph in enumerate(stack.micrographs):
        rows = np.flatnonzero(stack.micrograph_index == index)
        np.testing.assert_array_equal(stack.coordinates[rows], micrograph.pick_coordinates)
        np.testing.assert_array_equal(stack.labels[rows], micrograph.pick_labels)
        for (x, y), label in zip(micrograph.pick_coordinates, micrograph.pick_labels):
            box = circle_content(micrograph, x, y, r)
            clean = not (box["contamination"] or box["carbon"])
            seen.add(int(label))
            if label == PARTICLE:
                assert clean and box["centres_inside"] == 1 and box["nearest"] <= tolerance, box
            elif label == OFF_CENTRE:
                assert clean and box["centres_inside"] <= 1 and box["nearest"] > tolerance and box["reaching"], box
            elif label == AGGREGATE:
                assert box["centres_inside"] >= 2, box
            elif label == ICE:
                assert box["contamination"] and box["centres_inside"] <= 1, box
            elif label == CARBON:
                assert box["carbon"] and not box["contamination"] and box["centres_inside"] <= 1, box
            else:
                assert label == EMPTY and clean and not box["reaching"], box
            # Every box lies inside its micrograph.
            assert BOX // 2 <= min(x, y) and max(x, y) <= micrograph.image.shape[0] - BOX // 2
    assert seen == {PARTICLE, *JUNK_CLASSES.values()}


def test_picks_follow_the_picker(stack):
    particle = stack.labels == PARTICLE
    offsets = np.hypot(*stack.centre_offset[particle].T)
    assert np.all(offsets <= stack.centre_tolerance)
    assert 0.5 < np.median(offsets) < stack.centre_tolerance  # jittered, not exact
    off_centre = np.hypot(*stack.centre_offset[stack.labels == OFF_CENTRE].T)
    assert np.nanmin(off_centre) > stack.centre_tolerance and np.nanmax(off_centre) > stack.particle_radius
    # Picks keep the picker's minimum distance; clumps hold 2-4 particles; some single particles overlap.
    for micrograph in stack.micrographs:
        picks = micrograph.pick_coordinates
        gaps = np.hypot(*(picks[:, None] - picks[None]).transpose(2, 0, 1))
        assert gaps[np.triu_indices(len(picks), 1)].min() >= stack.particle_radius
        sizes = np.bincount(micrograph.particle_clump[micrograph.particle_clump >= 0])
        assert np.all((sizes == 0) | ((sizes >= 2) & (sizes <= 4)))
    singles = [m.particle_centres[m.particle_clump < 0] for m in stack.micrographs]
    overlapping = sum(int(np.sum(np.hypot(*(c[:, None] - c[None]).transpose(2, 0, 1))[np.triu_indices(len(c), 1)]
                                 < 2 * stack.particle_radius)) for c in singles)
    assert overlapping > 0


def test_junk_fraction_and_class_mix_are_as_requested(stack, volumes):
    n_junk = round(JUNK_FRACTION * SETTINGS["n_picks"])
    assert np.count_nonzero(stack.labels != PARTICLE) == n_junk
    for name, code in JUNK_CLASSES.items():
        # 800 junk picks share out exactly for the default mix.
        share = DEFAULT_JUNK_MIX[name] / sum(DEFAULT_JUNK_MIX.values())
        assert np.count_nonzero(stack.labels == code) == n_junk * share

    custom = simulate_picked_stack(210, **volumes, micrograph_size=384, picks_per_micrograph=21, junk_fraction=0.3,
                                   junk_mix={"ice": 2, "empty": 1}, random_state=3)
    counts = np.bincount(custom.labels, minlength=8)
    assert counts[PARTICLE] == 147 and counts[ICE] == 42 and counts[EMPTY] == 21 and counts.sum() == 210

    clean = simulate_picked_stack(120, **volumes, micrograph_size=384, picks_per_micrograph=20, junk_fraction=0.0,
                                  random_state=3)
    assert np.all(clean.labels == PARTICLE)


# --- extraction ---------------------------------------------------------------------------------------


def test_boxes_are_normalised_as_relion_does(stack):
    # RELION's default background circle: ROUND(0.375 * box).
    assert stack.background_radius == 24
    outside = background(BOX, stack.background_radius)
    pixels = stack.images[:, outside].astype(np.float64)
    np.testing.assert_allclose(pixels.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(pixels.std(axis=1), 1, atol=1e-4)
    # No ramp is left in the background: a plane fitted to it is flat.
    offsets = np.arange(BOX) - BOX // 2
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    design = np.stack([x[outside], y[outside], np.ones(outside.sum())], axis=1)
    slopes = np.linalg.lstsq(design, pixels.T, rcond=None)[0][:2]
    assert np.abs(slopes).max() < 1e-5

    # Re-extract a few picks from the micrographs: window, invert, fit and subtract the background plane,
    # normalise the background to mean 0 and std 1.
    for index in (0, 17, 33):
        micrograph = stack.micrographs[index]
        rows = np.flatnonzero(stack.micrograph_index == index)
        for row, (px, py) in zip(rows, micrograph.pick_coordinates):
            raw = -micrograph.image[py - BOX // 2 : py + BOX // 2, px - BOX // 2 : px + BOX // 2].astype(np.float64)
            a, b, c = np.linalg.lstsq(design, raw[outside], rcond=None)[0]
            flat = raw - (a * x + b * y + c)
            expected = (flat - flat[outside].mean()) / flat[outside].std()
            np.testing.assert_allclose(stack.images[row], expected, atol=2e-4)


def test_contrast_is_inverted_particles_are_bright(stack):
    rows = np.flatnonzero(stack.labels == PARTICLE)[:300]
    clean = clean_projections(stack.volumes, stack.volume_index[rows], stack.particle_rotation[rows],
                              stack.centre_offset[rows], BOX)
    inside = ~background(BOX, stack.particle_radius)

    def correlations(images):
        return np.array([np.corrcoef(projection[inside], image[inside])[0, 1]
                         for projection, image in zip(clean, images)])

    particle = correlations(stack.images[rows])
    t_statistic = particle.mean() / (particle.std() / np.sqrt(len(particle)))
    assert particle.mean() > 0.05 and t_statistic > 8
    # The same projections against empty boxes: no correlation.
    empty = correlations(stack.images[np.flatnonzero(stack.labels == EMPTY)[: len(rows)]])
    assert abs(empty.mean()) < 3 * empty.std() / np.sqrt(len(empty))


def test_particles_are_dark_in_the_micrograph_and_contamination_edges_show_fringes(noise_free):
    micrograph = noise_free.micrographs[0]
    image = micrograph.image.astype(np.float64)
    # Before inversion particles are darker than their surroundings (underfocus, amplitude contrast).
    centres = np.round(micrograph.particle_centres).astype(int)
    inside = (centres >= 0).all(axis=1) & (centres < image.shape[0]).all(axis=1)
    assert np.median(image[centres[inside, 1], centres[inside, 0]]) < np.median(image)
    # Underfocus gives a bright Fresnel fringe just outside a sharp, dense edge: pixels 1-2 px outside
    # contamination are brighter than the ice 6-12 px away.
    stack_with_edges = [m for m in noise_free.micrographs if m.contamination_mask.any()]
    fringe, ice = [], []
    for micrograph in stack_with_edges[:10]:
        distance = distance_transform_edt(~micrograph.contamination_mask)
        fringe.append(micrograph.image[(distance >= 1) & (distance <= 2)].mean())
        ice.append(micrograph.image[(distance >= 6) & (distance <= 12)].mean())
    assert np.all(np.array(fringe) > np.array(ice))


# --- CTF, noise and SNR --------------------------------------------------------------------------------


def isolated_particles(micrograph):
    """Particles with no other particle centre within a box of them and no contamination or film in the
    box centred on them, their box inside the micrograph: indices."""
    centres = micrograph.particle_centres
    gaps = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    np.fill_diagonal(gaps, np.inf)
    chosen = []
    for index, (x, y) in enumerate(np.round(centres).astype(int)):
        window = (slice(y - BOX // 2, y + BOX // 2), slice(x - BOX // 2, x + BOX // 2))
        if BOX // 2 <= min(x, y) and max(x, y) <= micrograph.image.shape[0] - BOX // 2 and gaps[index].min() >= BOX \
                and not micrograph.contamination_mask[window].any() and not micrograph.carbon_mask[window].any():
            chosen.append(index)
    return np.array(chosen, dtype=int)


def test_particles_carry_the_written_ctf(volumes):
    """Around an isolated particle, the noise-free micrograph is -CTF * (its projection) with the CTF written
    for the micrograph (astigmatic, B-factor): the defocus and the astigmatism angle are recovered."""
    stack = simulate_picked_stack(72, **volumes, micrograph_size=512, picks_per_micrograph=24, junk_fraction=0.0,
                                  snr=np.inf, defocus_um=(1.0, 3.0), max_astigmatism_um=0.8, random_state=2,
                                  keep_micrographs=True)
    offsets = np.arange(BOX) - BOX // 2
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    plane = np.stack([x.ravel(), y.ravel(), np.ones(BOX * BOX)], axis=1)
    plane_fit = np.linalg.pinv(plane)  # (3, BOX * BOX): least-squares plane coefficients of an image

    def without_plane(images):  # (n, BOX * BOX): remove the smooth ice gradient
        return images - (images @ plane_fit.T) @ plane.T

    n_checked = 0
    for index, micrograph in enumerate(stack.micrographs):
        chosen = isolated_particles(micrograph)
        if len(chosen) < 2:
            continue
        n_checked += 1
        centres = micrograph.particle_centres[chosen]
        corners = np.round(centres).astype(int) - BOX // 2
        windows = without_plane(np.array([micrograph.image[top : top + BOX, left : left + BOX].ravel()
                                          for left, top in corners], dtype=np.float64))
        canvas = 2 * BOX
        spectra = np.fft.fft2(clean_projections(stack.volumes, micrograph.particle_volume_index[chosen],
                                                micrograph.particle_rotations[chosen], centres - np.round(centres),
                                                canvas))

        def fit(u, v, angle):
            transfer = ctf(canvas, stack.pixel_size, u, defocus_v_um=v, defocus_angle_deg=angle,
                           b_factor=stack.b_factor)
            recorded = -np.fft.ifft2(spectra * np.fft.ifftshift(transfer)).real
            images = recorded[:, BOX // 2 : -BOX // 2, BOX // 2 : -BOX // 2]
            model = without_plane(images.reshape(len(chosen), -1))
            return np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(model, windows)])

        row = np.flatnonzero(stack.micrograph_index == index)[0]
        u, v, angle = stack.defocus_u[row] / 1e4, stack.defocus_v[row] / 1e4, stack.defocus_angle[row]
        assert (u, v, angle) == pytest.approx((micrograph.defocus_u_um, micrograph.defocus_v_um,
                                               micrograph.defocus_angle_deg))
        assert fit(u, v, angle) > 0.9
        mean, difference = (u + v) / 2, u - v
        defoci = mean + np.arange(-0.25, 0.25, 0.01)
        found = defoci[np.argmax([fit(d + difference / 2, d - difference / 2, angle) for d in defoci])]
        assert found == pytest.approx(mean, abs=0.035)
        if difference > 0.2:  # the astigmatism is strong enough to orient
            coarse = np.arange(0.0, 180.0, 6.0)
            found = coarse[np.argmax([fit(u, v, a) for a in coarse])]
            fine = found + np.arange(-6.0, 6.5, 1.0)
            found = fine[np.argmax([fit(u, v, a) for a in fine])]
            assert min(abs(found - angle) % 180, 180 - abs(found - angle) % 180) <= 3
            # Swapping U and V, or measuring the angle the other way round, fits worse.
            assert fit(u, v, angle) > max(fit(v, u, angle), fit(u, v, -angle))
    assert n_checked >= 2


def test_noise_has_the_documented_power_spectrum(stack, noise_free):
    ratios, variances = [], []
    for noisy, clean in list(zip(stack.micrographs, noise_free.micrographs))[:16]:
        noise = noisy.image.astype(np.float64) - clean.image
        noise[np.abs(noise) > 8 * np.sqrt(stack.noise_variance)] = 0  # the few hot pixels
        size = noise.shape[0]
        periodogram = np.abs(np.fft.fft2(noise)) ** 2 / noise.size
        frequency_x = np.fft.fftfreq(size)[None, :]
        frequency_y = np.fft.fftfreq(size)[:, None]
        documented = noise_power_spectrum(frequency_x, frequency_y, stack.noise_variance, stack.pixel_size,
                                          noisy.defocus_u_um, noisy.defocus_v_um, noisy.defocus_angle_deg,
                                          stack.b_factor)
        bins = np.floor(np.hypot(frequency_x, frequency_y) / 0.025).astype(int)
        measured = np.bincount(bins.ravel(), periodogram.ravel())
        expected = np.bincount(bins.ravel(), np.broadcast_to(documented, noise.shape).ravel())
        ratios.append(measured[1:20] / expected[1:20])  # 0.025-0.5 cycles per pixel
        variances.append(noise.var())
    ratio = np.mean(ratios, axis=0)
    # 16 micrographs: each ring holds >= 6000 periodogram values, 1-2% standard error.
    np.testing.assert_allclose(ratio, 1, atol=0.06)
    assert np.mean(variances) == pytest.approx(stack.noise_variance, rel=0.03)
    # Not white: the detector MTF falls to Nyquist, the 1/f term rises at low frequency.
    documented_radial = noise_power_spectrum(np.array([0.01, 0.1, 0.45]), 0.0, 1.0, stack.pixel_size, 2.0, 2.0, 0.0)
    assert documented_radial[0] > documented_radial[2] * 1.5


def particle_powers(stack):
    """Mean square over the box of every particle of every micrograph, rendered alone with its
    micrograph's CTF: (n,)."""
    canvas = 96  # the box plus the CTF's spread on both sides
    micrographs = stack.micrographs
    centres = np.concatenate([m.particle_centres for m in micrographs])
    volume_index = np.concatenate([m.particle_volume_index for m in micrographs])
    rotations = np.concatenate([m.particle_rotations for m in micrographs])
    owner = np.concatenate([np.full(len(m.particle_centres), index) for index, m in enumerate(micrographs)])
    transfers = [np.fft.ifftshift(ctf(canvas, stack.pixel_size, m.defocus_u_um, defocus_v_um=m.defocus_v_um,
                                      defocus_angle_deg=m.defocus_angle_deg, b_factor=stack.b_factor))
                 for m in micrographs]
    powers = []
    for chunk in np.array_split(np.arange(len(centres)), -(-len(centres) // 800)):
        spectra = np.fft.fft2(clean_projections(stack.volumes, volume_index[chunk], rotations[chunk],
                                                centres[chunk] - np.round(centres[chunk]), canvas))
        spectra *= np.array([transfers[index] for index in owner[chunk]])
        start = canvas // 2 - BOX // 2
        boxes = np.fft.ifft2(spectra).real[:, start : start + BOX, start : start + BOX]
        powers.append(np.mean(boxes**2, axis=(1, 2)))
    return np.concatenate(powers)


def test_snr_is_the_requested_one(stack, noise_free):
    # SNR = mean over the stack's particles of the power in its box (particle alone, with its micrograph's
    # CTF) / noise variance per pixel. Micrographs weigh by their picks: all have the same number here.
    signal = particle_powers(stack).mean()
    noise = np.mean([(noisy.image.astype(np.float64) - clean.image).var()
                     for noisy, clean in zip(stack.micrographs[:10], noise_free.micrographs[:10])])
    assert signal / noise == pytest.approx(SNR, rel=0.1)
    assert stack.snr == SNR and noise_free.noise_variance == 0


# --- determinism, volumes, files, arguments ------------------------------------------------------------


def test_same_seed_same_stack_whatever_the_threads(volumes, monkeypatch):
    settings = dict(n_picks=90, micrograph_size=384, picks_per_micrograph=20, random_state=11, **volumes)
    monkeypatch.setattr(simulate_module, "_thread_count", lambda: 1)
    one_thread = simulate_picked_stack(**settings)
    monkeypatch.setattr(simulate_module, "_thread_count", lambda: 3)
    three_threads = simulate_picked_stack(**settings)
    np.testing.assert_array_equal(one_thread.images, three_threads.images)
    np.testing.assert_array_equal(one_thread.labels, three_threads.labels)
    np.testing.assert_array_equal(one_thread.coordinates, three_threads.coordinates)
    other = simulate_picked_stack(**{**settings, "random_state": 12})
    assert not np.array_equal(one_thread.coordinates, other.coordinates)


def test_elongated_volume_is_elongated_and_asymmetric():
    volume = elongated_volume(64)
    assert volume.shape == (64, 64, 64) and volume.dtype == np.float32 and volume.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(volume, elongated_volume(64))
    assert not np.array_equal(volume, elongated_volume(64, random_state=1))
    offsets = np.arange(64) - 32
    z, y, x = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    points = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float64)
    weights = volume.reshape(-1).astype(np.float64) / volume.sum()
    centred = points - weights @ points
    eigenvalues = np.linalg.eigvalsh((centred * weights[:, None]).T @ centred)
    assert np.sqrt(eigenvalues[-1] / eigenvalues[0]) >= 2.5
    symmetric = [np.flip(volume, axis) for axis in range(3)]
    symmetric += [np.rot90(volume, turns, axes) for axes in ((0, 1), (1, 2), (0, 2)) for turns in (1, 2)]
    assert max(np.corrcoef(volume.ravel(), other.ravel())[0, 1] for other in symmetric) < 0.9


def test_ctf_astigmatism_and_envelope_follow_relion():
    # Along the angle the CTF is the isotropic one of defocus U, across it that of V (RELION's getDeltaF).
    k = np.linspace(0.0, 0.15, 200)
    angle = np.deg2rad(35.0)
    along = ctf_at(k * np.cos(angle), k * np.sin(angle), 2.0, 1.4, 35.0)
    across = ctf_at(-k * np.sin(angle), k * np.cos(angle), 2.0, 1.4, 35.0)
    np.testing.assert_allclose(along, ctf_at(k, 0.0, 2.0), atol=2e-4)
    np.testing.assert_allclose(across, ctf_at(k, 0.0, 1.4), atol=2e-4)
    # Angle measured from +x towards +y (increasing row index): the 2-D CTF's row is the y frequency.
    grid = ctf(128, 2.0, 2.0, defocus_v_um=1.4, defocus_angle_deg=90.0)
    np.testing.assert_allclose(grid[64:, 64], ctf_at(np.zeros(64), np.arange(64) / 256, 2.0), atol=2e-4)
    # The B-factor envelope is exp(-B k^2 / 4) and without astigmatism ``ctf`` is unchanged.
    with_b = ctf_at(k, 0.0, 2.0, b_factor=120.0)
    np.testing.assert_allclose(with_b, ctf_at(k, 0.0, 2.0) * np.exp(-120.0 * k**2 / 4), atol=2e-5)
    np.testing.assert_array_equal(ctf(64, 1.5, 2.0), ctf(64, 1.5, 2.0, defocus_v_um=2.0))


def test_written_files_carry_the_pick_truth(stack, tmp_path):
    paths = write_simulated(stack, tmp_path, name="picked")
    with mrcfile.open(paths["stack"]) as mrc:
        np.testing.assert_array_equal(mrc.data, stack.images)
        assert mrc.voxel_size.x == pytest.approx(stack.pixel_size, rel=1e-5)
    blocks = starfile.read(paths["star"], always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnImagePixelSize"][0] == pytest.approx(stack.pixel_size)
    assert optics["rlnImageSize"][0] == BOX and optics["rlnVoltage"][0] == 300
    assert optics["rlnSphericalAberration"][0] == 2.7 and optics["rlnAmplitudeContrast"][0] == 0.1
    assert particles["rlnImageName"].iloc[0] == "000001@picked.mrcs"
    np.testing.assert_allclose(particles[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), stack.coordinates)
    np.testing.assert_array_equal(particles["ppcasortTrueLabel"], stack.labels)
    first = stack.micrographs[0]
    row = particles.iloc[0]
    assert (row["rlnDefocusU"], row["rlnDefocusV"], row["rlnDefocusAngle"]) == pytest.approx(
        (first.defocus_u_um * 1e4, first.defocus_v_um * 1e4, first.defocus_angle_deg))
    assert row["rlnDefocusU"] >= row["rlnDefocusV"]
    assert particles["rlnMicrographName"].nunique() == len(stack.micrographs)
    labels = pd.read_csv(paths["labels"])
    assert list(labels["label_name"]) == [LABEL_NAMES[code] for code in stack.labels]


def test_default_micrographs_grow_with_the_box(volumes):
    """Without a micrograph size the micrographs are MICROGRAPH_BOXES boxes across: the default number of picks per
    micrograph fits large boxes too (a 128-px box on a fixed 1,024-px micrograph was refused)."""
    stack = simulate_picked_stack(24, **volumes, box_size=128, junk_fraction=0.5, random_state=3, keep_micrographs=True)
    assert stack.images.shape == (24, 128, 128)
    assert {micrograph.image.shape for micrograph in stack.micrographs} == {(MICROGRAPH_BOXES * 128,) * 2}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(n_picks=0), "n_picks"),
        (dict(box_size=10), "box_size"),
        (dict(snr=0), "snr"),
        (dict(junk_fraction=1.2), "junk_fraction"),
        (dict(junk_mix={"dust": 1.0}), "junk_mix"),
        (dict(junk_mix={"ice": -1.0}), "junk_mix"),
        (dict(defocus_um=(3.0, 1.0)), "defocus_um"),
        (dict(b_factor=-5.0), "b_factor"),
        (dict(micrograph_size=100), "micrograph_size"),
        (dict(picks_per_micrograph=5000), "picks_per_micrograph"),
        (dict(volumes=[np.ones((8, 8, 8))]), "voxel_sizes"),
        (dict(volumes=[np.ones((8, 8, 8))], voxel_sizes=[1.0, 2.0]), "voxel_sizes"),
        (dict(volume_weights=[1.0, 1.0]), "volume_weights"),
        (dict(pixel_size=1.0), "does not fit"),
        (dict(volumes=[np.ones((8, 8))], voxel_sizes=1.0), "cubic"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(arguments, message):
    with pytest.raises(ValueError, match=message):
        simulate_picked_stack(**{"n_picks": 10, **arguments})

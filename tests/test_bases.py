import numpy as np
import pytest
from fixture_paths import DATA

from napari_ppcasort.core.bases import (
    Basis,
    PCABasis,
    PSWFBasis,
    _radial_prolates,
    expand_particles,
    marchenko_pastur_edge,
)
from napari_ppcasort.core.particles import open_particles
from napari_ppcasort.core.particles import ArrayParticleSet, ParticleFileError
from napari_ppcasort.core.preprocess import BadImageError, Preprocessor, disk_mask


@pytest.fixture(scope="module")
def pswf33() -> PSWFBasis:
    return PSWFBasis(33)


def _gaussian(box: int, centre_x: float, centre_y: float, sigma: float) -> np.ndarray:
    y, x = np.mgrid[:box, :box] - box // 2
    return np.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * sigma**2))[None].astype(np.float32)


# -- PSWF -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bandlimit", [10.0, 30.0, 60.0])
def test_prolate_concentrations_sum_to_the_shannon_number(bandlimit):
    # trace of the space- and band-limiting operator on the unit disk = c^2 / 4
    prolates = _radial_prolates(bandlimit, 1e-12)
    total = sum(concentration.sum() * (1 if N == 0 else 2) for N, (concentration, _) in enumerate(prolates))
    assert total == pytest.approx(bandlimit**2 / 4, rel=1e-9)
    for concentration, coefficients in prolates:
        assert np.all(concentration <= 1 + 1e-9) and np.all(np.diff(concentration) <= 1e-12)
        # the Zernike expansion is long enough: the tail coefficients vanish
        assert np.abs(coefficients[-5:]).max() < 1e-12


def test_pswf_basis_is_orthonormal_on_the_grid(pswf33):
    matrix = pswf33.matrix.astype(np.float64)
    assert matrix.shape == (disk_mask(33, 15).sum(), pswf33.n_coefficients)
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(pswf33.n_coefficients), atol=1e-3)
    assert np.abs(matrix.T @ matrix - np.eye(pswf33.n_coefficients)).max() < 1e-5


def test_pswf_basis_layout(pswf33):
    basis = pswf33
    assert isinstance(basis, Basis)
    assert basis.radius == 15 and basis.bandlimit == pytest.approx(np.pi * 15)
    assert np.all(basis.concentrations > 0.5) and np.all(np.diff(basis.concentrations) <= 0)
    # about the Shannon number of functions
    assert 0.9 * basis.bandlimit**2 / 4 < basis.n_coefficients < 1.3 * basis.bandlimit**2 / 4
    assert not basis.is_sine[basis.angular_frequencies == 0].any()
    cosines = np.flatnonzero((basis.angular_frequencies > 0) & ~basis.is_sine)
    # every cos column is directly followed by its sin partner
    assert np.all(basis.is_sine[cosines + 1])
    assert np.array_equal(basis.angular_frequencies[cosines + 1], basis.angular_frequencies[cosines])
    assert np.array_equal(basis.radial_indices[cosines + 1], basis.radial_indices[cosines])
    assert basis.is_sine.sum() == cosines.size


def test_pswf_round_trip_of_basis_combination(pswf33):
    coefficients = np.random.default_rng(0).normal(size=(3, pswf33.n_coefficients)).astype(np.float32)
    images = pswf33.evaluate(coefficients)
    assert images.shape == (3, 33, 33) and images.dtype == np.float32
    assert np.all(images[:, ~pswf33.mask] == 0)
    error = np.linalg.norm(pswf33.expand(images) - coefficients) / np.linalg.norm(coefficients)
    assert error < 1e-3


@pytest.mark.parametrize("centre, sigma", [((0, 0), 2.0), ((3, -4), 2.5), ((-6, 2), 1.5)])
def test_pswf_round_trip_of_smooth_blob(pswf33, centre, sigma):
    blob = _gaussian(33, *centre, sigma)
    back = pswf33.evaluate(pswf33.expand(blob))
    inside = pswf33.mask
    assert np.linalg.norm(back[0][inside] - blob[0][inside]) / np.linalg.norm(blob[0][inside]) < 1e-3


def test_pswf_expansion_is_a_projection(pswf33):
    x = np.random.default_rng(1).normal(size=(2, 33, 33)).astype(np.float32)
    projected = pswf33.evaluate(pswf33.expand(x))
    np.testing.assert_allclose(pswf33.evaluate(pswf33.expand(projected)), projected, atol=1e-5)
    assert np.linalg.norm(projected) < np.linalg.norm(x[:, pswf33.mask])
    # the residual is orthogonal to the basis
    assert np.abs(pswf33.expand(x * pswf33.mask - projected)).max() < 1e-4


def _quarter_turns(images: np.ndarray, turns: int) -> np.ndarray:
    """Rotate (n, box, box) images counter-clockwise on screen by turns x 90 degrees about pixel box // 2."""
    for _ in range(turns):
        # np.rot90 rotates about pixel (box - 1) / 2; for even boxes shift one row to pivot on box // 2
        images = np.rot90(images, axes=(1, 2))
        images = images if images.shape[1] % 2 else np.roll(images, 1, axis=1)
    return images


@pytest.mark.parametrize("box", [33, 32])
def test_rotation_by_90_degrees_rotates_coefficient_pairs(box):
    basis = PSWFBasis(box)
    x = np.random.default_rng(2).normal(size=(2, box, box)).astype(np.float32)
    coefficients, rotated_coefficients = basis.expand(x), basis.expand(_quarter_turns(x, 1))
    scale = np.abs(coefficients).max()
    assert np.abs(rotated_coefficients - basis.rotate(coefficients, np.pi / 2)).max() < 1e-5 * scale
    # spelled out: the pair (a, b) of frequency N becomes (a cos(N pi/2) + b sin(N pi/2), -a sin + b cos)
    column = np.flatnonzero((basis.angular_frequencies == 3) & ~basis.is_sine)[0]
    a, b = coefficients[:, column], coefficients[:, column + 1]
    np.testing.assert_allclose(rotated_coefficients[:, column], -b, atol=1e-5 * scale)
    np.testing.assert_allclose(rotated_coefficients[:, column + 1], a, atol=1e-5 * scale)
    # frequency 0 does not change, frequency 2 changes sign
    for frequency, sign in [(0, 1), (2, -1)]:
        columns = basis.angular_frequencies == frequency
        np.testing.assert_allclose(rotated_coefficients[:, columns], sign * coefficients[:, columns], atol=1e-5 * scale)
    for turns in (2, 3):
        expected = basis.rotate(coefficients, turns * np.pi / 2)
        np.testing.assert_allclose(basis.expand(_quarter_turns(x, turns)), expected, atol=1e-5 * scale)


@pytest.mark.parametrize("degrees", [30, 45, 117])
def test_rotation_by_any_angle_is_steerable_up_to_sampling_error(pswf33, degrees):
    angle = np.deg2rad(degrees)
    radius, direction = 5.0, np.arctan2(-4, 3)
    blob = _gaussian(33, radius * np.cos(direction), radius * np.sin(direction), 2.5)
    # rotating counter-clockwise on screen (rows down) moves the polar angle from t to t - angle
    rotated = _gaussian(33, radius * np.cos(direction - angle), radius * np.sin(direction - angle), 2.5)
    expected = pswf33.expand(rotated)
    error = np.linalg.norm(pswf33.rotate(pswf33.expand(blob), angle) - expected) / np.linalg.norm(expected)
    assert error < 1e-3


def test_pswf_max_coefficients_alone_lowers_the_band_limit():
    """A short basis is a low-pass one: the smallest band limit with enough functions, not a pick at Nyquist."""
    short = PSWFBasis(71, max_coefficients=300)
    assert 299 <= short.n_coefficients <= 300
    assert short.bandlimit < np.pi * short.radius / 2
    assert PSWFBasis(71, bandlimit=short.bandlimit / 1.02).n_coefficients < 300
    nyquist = PSWFBasis(71, bandlimit=np.pi * 34)
    assert np.abs(short.angular_frequencies).max() < np.abs(nyquist.angular_frequencies).max() / 2


def test_pswf_max_coefficients_keeps_pairs_whole():
    full = PSWFBasis(25)
    cut = int(np.flatnonzero((full.angular_frequencies > 0) & ~full.is_sine)[5]) + 1  # ends on a cos column
    limited = PSWFBasis(25, bandlimit=full.bandlimit, max_coefficients=cut)
    assert limited.n_coefficients == cut - 1
    # Gram-Schmidt in concentration order: the leading columns are the same
    np.testing.assert_allclose(limited.matrix, full.matrix[:, :cut - 1], atol=1e-5)


def test_pswf_rejects_bad_parameters():
    with pytest.raises(ValueError, match="linearly dependent on the 33 px grid"):
        PSWFBasis(33, truncation=1e-3)
    with pytest.raises(ValueError, match="does not fit a 32 px box"):
        PSWFBasis(32, radius=16)
    with pytest.raises(ValueError, match="truncation"):
        PSWFBasis(32, truncation=1.5)
    basis = PSWFBasis(17)
    with pytest.raises(ValueError, match="expected 17 x 17 px images"):
        basis.expand(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match=f"shape \\(n, {basis.n_coefficients}\\)"):
        basis.evaluate(np.zeros((1, 3)))


def test_lower_band_limit_gives_fewer_smoother_functions(pswf33):
    half = PSWFBasis(33, bandlimit=pswf33.bandlimit / 2)
    assert 0.2 * pswf33.n_coefficients < half.n_coefficients < 0.3 * pswf33.n_coefficients
    # a blob too sharp for half the Nyquist band limit is not represented well
    sharp = _gaussian(33, 0, 0, 1.5)
    errors = [np.linalg.norm(b.evaluate(b.expand(sharp)) - sharp * b.mask) / np.linalg.norm(sharp)
              for b in (pswf33, half)]
    assert errors[0] < 1e-4 and errors[1] > 0.03


# -- PCA --------------------------------------------------------------------------------------------------


def _planted(n_images: int, box: int, standard_deviations, rng) -> tuple[np.ndarray, np.ndarray]:
    """Images = unit white noise + a random rank-k pattern inside the disk; returns (images, patterns)."""
    mask = disk_mask(box, box // 2 - 1)
    patterns = np.linalg.qr(rng.normal(size=(mask.sum(), len(standard_deviations))))[0]
    images = rng.normal(size=(n_images, box, box)).astype(np.float32)
    images[:, mask] += (rng.normal(size=(n_images, len(standard_deviations))) * standard_deviations) @ patterns.T
    return images, patterns


def test_pca_recovers_planted_subspace_and_rank():
    images, patterns = _planted(3000, 33, [8, 6, 5, 4], np.random.default_rng(3))
    basis = PCABasis(33).fit(images)
    assert isinstance(basis, Basis)
    assert basis.n_coefficients == 4
    assert basis.noise_variance_ == pytest.approx(1.0, rel=0.03)
    np.testing.assert_allclose(basis.eigenvalues_, np.array([8, 6, 5, 4]) ** 2 + 1, rtol=0.15)
    cosines = np.linalg.svd(patterns.T @ basis.matrix, compute_uv=False)
    assert cosines.min() > 0.98
    np.testing.assert_allclose(basis.matrix.T @ basis.matrix, np.eye(4), atol=1e-5)
    assert basis.mean_.shape == (basis.n_pixels,)


def test_pca_round_trip_of_image_in_span():
    images, _ = _planted(1000, 25, [6, 5, 4], np.random.default_rng(4))
    basis = PCABasis(25, n_components=6).fit(images)
    assert basis.n_coefficients == 6
    coefficients = np.random.default_rng(5).normal(size=(4, 6))
    np.testing.assert_allclose(basis.expand(basis.evaluate(coefficients)), coefficients, atol=1e-5)


def test_pca_on_pure_noise_finds_no_signal():
    noise = 2.0 * np.random.default_rng(6).normal(size=(2000, 25, 25))
    basis = PCABasis(25).fit(noise)
    assert basis.n_coefficients == 1  # rank 0, kept at the minimum of one component
    assert basis.noise_variance_ == pytest.approx(4.0, rel=0.03)


def test_marchenko_pastur_edge_bounds_pure_noise_tightly():
    rng = np.random.default_rng(7)
    ratios = []
    for n_samples, n_dimensions in [(300, 100), (100, 300)] * 10:
        largest = np.linalg.svd(3.0 * rng.normal(size=(n_samples, n_dimensions)), compute_uv=False)[0] ** 2
        edge = marchenko_pastur_edge(n_samples, n_dimensions, 9.0)
        assert edge == pytest.approx(9.0 * (np.sqrt(n_samples) + np.sqrt(n_dimensions)) ** 2, rel=0.1)
        ratios.append(largest / edge)
    assert np.mean(np.array(ratios) > 1) <= 0.1
    assert 0.9 < np.mean(ratios) < 1


def test_pca_fit_from_chunks_matches_fit_from_array():
    images, _ = _planted(600, 21, [7, 5], np.random.default_rng(8))
    from_array = PCABasis(21).fit(images)
    from_chunks = PCABasis(21).fit(images[start:start + 64] for start in range(0, 600, 64))
    assert from_array.n_coefficients == from_chunks.n_coefficients == 2
    np.testing.assert_allclose(from_chunks.matrix, from_array.matrix, atol=1e-4)


def test_pca_reservoir_sample_is_uniform():
    box = 5
    counts = np.zeros(300)
    for seed in range(100):
        basis = PCABasis(box, sample_size=30, random_state=seed)
        stream = (np.arange(start, start + 50, dtype=np.float32)[:, None, None] * np.ones((1, box, box))
                  for start in range(0, 300, 50))
        sample, background_variances = basis._draw_sample(stream)
        assert sample.shape == (30, basis.n_pixels) and np.all(background_variances == 0)
        chosen = sample[:, 0].astype(int)
        assert np.unique(chosen).size == 30
        counts[chosen] += 1
    # each image is chosen with probability 0.1: 10 expected times in 100 draws (sd 3)
    assert counts[:150].sum() == pytest.approx(counts[150:].sum(), rel=0.15)
    assert counts.min() >= 1 and counts.max() <= 25


def test_pca_errors():
    with pytest.raises(RuntimeError, match="call fit"):
        PCABasis(16).expand(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="n_components must be between 1"):
        PCABasis(16, n_components=0)
    with pytest.raises(ValueError, match="cannot fit 5 components on 3 images"):
        PCABasis(16, n_components=5).fit(np.random.default_rng(0).normal(size=(3, 16, 16)))


# -- streaming expansion ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    rng = np.random.default_rng(9)
    images = rng.normal(size=(53, 40, 40)).astype(np.float32)
    return images + 3 * _gaussian(40, 2, -1, 4.0)


def test_expand_particles_same_chunked_unchunked_and_permuted(stack, pswf33):
    preprocessor = Preprocessor(40, target_box=33)
    basis = pswf33
    reference = basis.expand(preprocessor(stack))
    particles = ArrayParticleSet(stack)
    whole = expand_particles(particles, basis, preprocessor, chunk_size=1000)
    np.testing.assert_allclose(whole, reference, atol=1e-5)
    chunked = expand_particles(particles, basis, preprocessor, chunk_size=7)
    np.testing.assert_allclose(chunked, reference, atol=1e-5)
    order = np.random.default_rng(10).permutation(53)[:40]
    permuted = expand_particles(particles, basis, preprocessor, indices=order, chunk_size=6)
    np.testing.assert_allclose(permuted, reference[order], atol=1e-5)


class _ReversedChunks(ArrayParticleSet):
    """A particle set that yields its chunks in reverse order (rows must still land in place)."""

    def iter_chunks(self, indices=None, chunk_size=None):
        return reversed(list(super().iter_chunks(indices, chunk_size)))


def test_expand_particles_places_rows_whatever_the_chunk_order(stack):
    preprocessor = Preprocessor(40, normalize=False, target_box=20)
    basis = PCABasis(20, n_components=5).fit(preprocessor(stack))
    indices = np.array([50, 3, 17, 8, 0, 44, 29])
    expanded = expand_particles(_ReversedChunks(stack), basis, preprocessor, indices=indices, chunk_size=3)
    np.testing.assert_allclose(expanded, basis.expand(preprocessor(stack[indices])), atol=1e-5)


def test_expand_particles_fills_memmap_and_reports_progress(stack, pswf33, tmp_path):
    preprocessor = Preprocessor(40, target_box=33)
    basis = pswf33
    out = np.lib.format.open_memmap(tmp_path / "coefficients.npy", mode="w+", dtype=np.float32,
                                    shape=(53, basis.n_coefficients))
    calls = []
    returned = expand_particles(ArrayParticleSet(stack), basis, preprocessor, chunk_size=20, out=out,
                                progress=lambda done, total: calls.append((done, total)))
    assert returned is out
    out.flush()
    np.testing.assert_allclose(np.load(tmp_path / "coefficients.npy"), basis.expand(preprocessor(stack)), atol=1e-5)
    assert calls == [(20, 53), (40, 53), (53, 53)]


def test_expand_particles_errors(stack, pswf33):
    particles = ArrayParticleSet(stack)
    basis = pswf33
    with pytest.raises(ValueError, match="preprocessor expects 33 px images but the particles are 40 px"):
        expand_particles(particles, basis, Preprocessor(33))
    with pytest.raises(ValueError, match="basis is for 33 px images but preprocessing gives 40 px"):
        expand_particles(particles, basis, Preprocessor(40))
    preprocessor = Preprocessor(40, target_box=33)
    with pytest.raises(ValueError, match="indices contain particle 4 more than once"):
        expand_particles(particles, basis, preprocessor, indices=[1, 4, 4])
    with pytest.raises(ValueError, match="out must be a float32 array"):
        expand_particles(particles, basis, preprocessor, out=np.zeros((53, 3), dtype=np.float32))
    broken = stack.copy()
    broken[31, 0, 0] = np.inf
    with pytest.raises(ParticleFileError, match="broken: image 31 contains NaN or infinite pixels"):
        expand_particles(ArrayParticleSet(broken, "broken"), basis, preprocessor, chunk_size=10)
    flat = stack.copy()
    flat[12] = 1.0
    with pytest.raises(BadImageError, match="particle 12: .*constant"):
        expand_particles(ArrayParticleSet(flat), basis, preprocessor, indices=[40, 12])


def test_expand_real_particles_from_star_file(pswf33):
    star = DATA / "aspire_sample_real17" / "sample_particles_relion31.star"
    particles = open_particles(star)
    preprocessor = Preprocessor(particles.box_size, target_box=33)
    basis = pswf33
    coefficients = expand_particles(particles, basis, preprocessor, chunk_size=5)
    assert coefficients.shape == (17, basis.n_coefficients) and np.isfinite(coefficients).all()
    images = preprocessor(particles.read(np.arange(17)))
    np.testing.assert_allclose(coefficients, basis.expand(images), atol=1e-4)
    # normalised noisy particles: most of the disk energy is in the (band-limited) span
    captured = np.linalg.norm(coefficients, axis=1) ** 2 / np.linalg.norm(images[:, basis.mask], axis=1) ** 2
    assert np.all((captured > 0.5) & (captured <= 1 + 1e-5))


# -- the PSWF tables are cached between runs (core.tables) ------------------------------------------------------


def test_pswf_tables_are_read_back_from_the_disk_cache_and_never_trusted_blindly(tmp_path, monkeypatch):
    from napari_ppcasort.core import bases as bases_module
    from napari_ppcasort.core import tables

    monkeypatch.setenv("PPCASORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tables, "_memory", type(tables._memory)())
    built = PSWFBasis(32, radius=13.5, max_coefficients=40)
    [stored] = (tmp_path / "cache").glob("pswf-*.npz")

    def computed(*args, **kwargs):
        raise AssertionError("computed again instead of read from the cache")

    tables._memory.clear()  # a new process: only the disk cache
    with monkeypatch.context() as patched:
        patched.setattr(bases_module, "_bandlimit_for_count", computed)
        read = PSWFBasis(32, radius=13.5, max_coefficients=40)
    np.testing.assert_array_equal(read.matrix, built.matrix)
    np.testing.assert_array_equal(read.angular_frequencies, built.angular_frequencies)
    assert read.bandlimit == built.bandlimit and not read.matrix.flags.writeable
    # another radius is another table
    other = PSWFBasis(32, radius=12.0, max_coefficients=40)
    assert len(list((tmp_path / "cache").glob("pswf-*.npz"))) == 2 and other.matrix.shape[0] < built.matrix.shape[0]
    # a damaged file is computed again (and replaced)
    stored.write_bytes(stored.read_bytes()[:200])
    tables._memory.clear()
    np.testing.assert_array_equal(PSWFBasis(32, radius=13.5, max_coefficients=40).matrix, built.matrix)
    tables._memory.clear()
    with monkeypatch.context() as patched:
        patched.setattr(bases_module, "_bandlimit_for_count", computed)
        np.testing.assert_array_equal(PSWFBasis(32, radius=13.5, max_coefficients=40).matrix, built.matrix)
    # a cache folder that cannot be written, or none: the basis is built all the same
    (tmp_path / "a file").write_text("")
    for folder in (str(tmp_path / "a file"), ""):
        monkeypatch.setenv("PPCASORT_CACHE_DIR", folder)
        tables._memory.clear()
        np.testing.assert_array_equal(PSWFBasis(32, radius=13.5, max_coefficients=40).matrix, built.matrix)
    assert (tmp_path / "a file").read_text() == ""


def test_an_image_has_the_same_coefficients_whatever_chunk_it_is_expanded_in():
    """Bit for bit: the local expansion's chunks (64 MB of images) and a sort's chunks on Dask differ."""
    basis = PSWFBasis(24, radius=10.5, max_coefficients=60)
    images = np.random.default_rng(0).standard_normal((760, 24, 24)).astype(np.float32)
    whole = basis.expand(images)
    for size in (150, 37, 2):  # (a chunk of one image is a matrix-vector product, which rounds otherwise)
        chunked = np.concatenate([basis.expand(images[start:start + size]) for start in range(0, 760, size)])
        np.testing.assert_array_equal(chunked, whole)

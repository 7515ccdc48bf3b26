"""Rotation-closed mixture of PPCA in the PSWF basis, and the mean-evidence junk score."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from napari_ppcasort.core.bases import PSWFBasis
from napari_ppcasort.core.mppca import MixturePPCA
from napari_ppcasort.core.sorting import OnlineSorter, SortingFactorScore
from napari_ppcasort.core.steerable import (
    MeanEvidenceScore,
    SteerableLayout,
    SteerableMixturePPCA,
    mean_evidence,
)

BOX, BANDLIMIT, NOISE_STD = 33, 18.0, 0.6
# two "views": blobs (radius px, angle rad, amplitude), rotated as a whole by a random in-plane angle
VIEWS = [
    [(0.0, 0.0, 1.0), (6.0, 0.3, 0.9), (9.0, 2.5, 0.6)],
    [(3.0, 1.0, 1.0), (7.0, -2.0, 0.8), (10.0, 0.5, 0.7)],
]


def view_images(view, angles, rng):
    """Noisy images (n, BOX, BOX) of ``view`` rotated by ``angles`` (n,), counter-clockwise on screen."""
    centre = BOX // 2
    rows, columns = np.mgrid[:BOX, :BOX] - centre
    images = np.zeros((len(angles), BOX, BOX))
    for radius, angle, amplitude in view:
        # theta = atan2(row, column) (the basis convention): a blob at (r, angle + alpha)
        blob_rows = radius * np.sin(angle + angles)[:, None, None]
        blob_columns = radius * np.cos(angle + angles)[:, None, None]
        images += amplitude * np.exp(-((rows - blob_rows) ** 2 + (columns - blob_columns) ** 2) / (2 * 2.5**2))
    return images + NOISE_STD * rng.standard_normal(images.shape)


@pytest.fixture(scope="module")
def basis():
    return PSWFBasis(BOX, bandlimit=BANDLIMIT)


@pytest.fixture(scope="module")
def stack(basis):
    """Coefficients (N, L) float32 of 1200 particles (two views, random in-plane angles) and 150 noise images."""
    rng = np.random.default_rng(3)
    particles = [view_images(view, rng.uniform(0, 2 * np.pi, 600), rng) for view in VIEWS]
    noise = NOISE_STD * rng.standard_normal((150, BOX, BOX))
    images = np.concatenate(particles + [noise]).astype(np.float32)
    labels = np.repeat([0, 1, 2], [600, 600, 150])
    order = rng.permutation(labels.size)
    return images[order], basis.expand(images[order]), labels[order]


def steerable_model(basis, n_components=2, n_dims=8, **kwargs):
    return SteerableMixturePPCA(basis.angular_frequencies, basis.is_sine, basis.radial_indices,
                                n_components, n_dims, **kwargs)


@pytest.fixture(scope="module")
def fitted(basis, stack):
    _, coefficients, _ = stack
    return steerable_model(basis, max_iter=40).fit(coefficients)


# -- the property the model relies on: exact invariance under in-plane rotation ---------------------


def test_np_rot90_of_an_image_gets_the_same_scores(basis, stack, fitted):
    images, coefficients, labels = stack
    chosen = np.flatnonzero(labels < 2)[:20]
    original = coefficients[chosen]
    for turns in (1, 2, 3):
        rotated = basis.expand(np.rot90(images[chosen], turns, axes=(1, 2)).copy())
        np.testing.assert_allclose(MeanEvidenceScore()(fitted, rotated), MeanEvidenceScore()(fitted, original),
                                   rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(SortingFactorScore()(fitted, rotated), SortingFactorScore()(fitted, original),
                                   rtol=1e-4)
        np.testing.assert_allclose(fitted.score_samples(rotated), fitted.score_samples(original), rtol=1e-6)


@pytest.mark.parametrize("angle", [0.37, 1.9, -2.6])
def test_coefficients_rotated_by_any_angle_get_the_same_scores(basis, stack, fitted, angle):
    _, coefficients, labels = stack
    original = coefficients[labels < 2][:50]
    rotated = basis.rotate(original, angle)
    np.testing.assert_allclose(MeanEvidenceScore()(fitted, rotated), MeanEvidenceScore()(fitted, original),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fitted.predict_proba(rotated), fitted.predict_proba(original), atol=1e-6)
    np.testing.assert_allclose(fitted.score_samples(rotated), fitted.score_samples(original), rtol=1e-7)


def test_every_subspace_is_closed_under_rotation_and_means_are_rotational_averages(basis, fitted):
    parameters = fitted.parameters()
    for axes in parameters.axes:
        np.testing.assert_allclose(axes @ axes.T, np.eye(axes.shape[0]), atol=1e-10)
        rotated = basis.rotate(axes, 0.81).astype(np.float64)
        residual = rotated - (rotated @ axes.T) @ axes
        assert np.abs(residual).max() < 1e-6
    assert np.all(parameters.means[:, basis.angular_frequencies > 0] == 0)


# -- scoring ------------------------------------------------------------------------------------------


def test_noise_images_score_above_the_cut(stack, fitted):
    _, coefficients, labels = stack
    scores = MeanEvidenceScore()(fitted, coefficients)
    cut = np.quantile(scores[labels < 2], 0.99)
    assert scores[labels == 2].min() > cut


def test_online_sorter_runs_the_model_and_removes_the_noise(basis, stack):
    _, coefficients, labels = stack
    sorter = OnlineSorter(steerable_model(basis), alpha=0.05, iterations_per_round=4, n_rounds=3,
                          scorer=MeanEvidenceScore())
    rounds = list(sorter.rounds(coefficients))
    removed = rounds[-1].removed
    assert removed.size == sum(sorter.schedule)
    assert removed.size > 150
    assert np.all(np.isin(np.flatnonzero(labels == 2), removed))  # every noise image is gone
    assert rounds[-1].log_likelihood.size == 12


def test_mean_evidence_equals_dense_whitened_correlations_for_either_model(basis, stack, fitted):
    _, coefficients, _ = stack
    rows = coefficients[:30].astype(np.float64)
    plain = MixturePPCA(2, 8, max_iter=5).fit(coefficients)
    for parameters in (fitted.parameters(), plain.parameters()):
        expected = []
        for mean, w_t, sigma2 in zip(parameters.means, parameters.components, parameters.noise_variance):
            whitened = np.linalg.solve(w_t.T @ w_t + sigma2 * np.eye(w_t.shape[1]), mean)
            expected.append(rows @ whitened / np.sqrt(mean @ whitened))
        np.testing.assert_allclose(mean_evidence(parameters, rows), np.array(expected).T, rtol=1e-7, atol=1e-7)


def test_mean_evidence_of_a_component_is_its_log_likelihood_ratio(fitted, stack):
    _, coefficients, _ = stack
    rows = coefficients[:20].astype(np.float64)
    parameters = fitted.parameters()
    w = parameters.components[0].T
    covariance = w @ w.T + parameters.noise_variance[0] * np.eye(w.shape[0])
    mean = parameters.means[0]
    ratio = (multivariate_normal(mean, covariance).logpdf(rows)
             - multivariate_normal(np.zeros(mean.size), covariance).logpdf(rows))
    length = np.sqrt(mean @ np.linalg.solve(covariance, mean))
    np.testing.assert_allclose(mean_evidence(parameters, rows)[:, 0] * length - length**2 / 2, ratio, rtol=1e-7)


def test_a_junk_class_learned_by_the_mixture_still_scores_as_junk(basis):
    # 100 contrast-inverted copies of a view form their own class: they carry their class's mean, not the
    # population's
    rng = np.random.default_rng(5)
    particles = [view_images(view, rng.uniform(0, 2 * np.pi, 600), rng) for view in VIEWS]
    inverted = -view_images(VIEWS[1], rng.uniform(0, 2 * np.pi, 100), rng)
    coefficients = basis.expand(np.concatenate(particles + [inverted]).astype(np.float32))
    model = steerable_model(basis, 3, 8, max_iter=40).fit(coefficients)
    inverted_class = model.predict_proba(coefficients[1200:]).mean(axis=0).argmax()
    assert model.predict_proba(coefficients[1200:])[:, inverted_class].min() > 0.9
    scores = MeanEvidenceScore()(model, coefficients)
    assert scores[1200:].min() > np.quantile(scores[:1200], 0.99)


# -- EM ------------------------------------------------------------------------------------------------


def planted_layout():
    """A steerable layout: frequencies 0..4 with 4, 3, 3, 2, 2 radial functions; (cos, sin) interleaved."""
    frequencies, sines, radial = [], [], []
    for n, count in enumerate([4, 3, 3, 2, 2]):
        for r in range(count):
            for sine in (False, True) if n else (False,):
                frequencies.append(n), sines.append(sine), radial.append(r)
    return np.array(frequencies), np.array(sines), np.array(radial)


def planted_rotation_invariant(n_samples, rng):
    """Samples of a rotation-invariant PPCA on ``planted_layout``: an N = 0 axis (variance 9), a plane of
    N = 2 (16) and one of N = 3 (4), noise 1, mean in the N = 0 block."""
    frequencies, sines, radial = planted_layout()
    n_features = frequencies.size
    mean = np.zeros(n_features)
    mean[frequencies == 0] = [3.0, -2.0, 1.0, 0.5]
    data = mean + rng.standard_normal((n_samples, n_features))
    zero_axis = np.zeros(n_features)
    zero_axis[frequencies == 0] = np.array([1.0, 1.0, 0.0, 1.0]) / np.sqrt(3)
    data += np.sqrt(9 - 1) * rng.standard_normal((n_samples, 1)) * zero_axis
    for n, variance, u in ((2, 16.0, np.array([0.6, 0.8j, 0.0])), (3, 4.0, np.array([1j, 1.0]) / np.sqrt(2))):
        # a circular complex Gaussian c u in block n: a = Re(c u), b = Im(c u), E|c|^2 = 2 (variance - 1)
        c = np.sqrt(variance - 1) * (rng.standard_normal(n_samples) + 1j * rng.standard_normal(n_samples))
        cos, sin = np.flatnonzero((frequencies == n) & ~sines), np.flatnonzero((frequencies == n) & sines)
        data[:, cos] += (c[:, None] * u).real
        data[:, sin] += (c[:, None] * u).imag
    return data, mean


def test_recovers_a_planted_rotation_invariant_model():
    rng = np.random.default_rng(0)
    data, mean = planted_rotation_invariant(20000, rng)
    model = SteerableMixturePPCA(*planted_layout(), 1, 5, max_iter=5).fit(data)
    np.testing.assert_allclose(model.variances_[0], [16, 16, 9, 4, 4], rtol=0.05)
    np.testing.assert_allclose(model.noise_variance_, 1.0, rtol=0.02)
    np.testing.assert_allclose(model.means_[0], mean, atol=0.05)


def test_log_densities_equal_dense_gaussians(fitted, stack):
    _, coefficients, _ = stack
    rows = coefficients[:40].astype(np.float64)
    parameters = fitted.parameters()
    expected = np.empty((rows.shape[0], 2))
    for m in range(2):
        covariance = (parameters.axes[m].T * parameters.variances[m]) @ parameters.axes[m]
        rest = np.eye(rows.shape[1]) - parameters.axes[m].T @ parameters.axes[m]
        covariance += parameters.noise_variance[m] * rest
        expected[:, m] = np.log(parameters.weights[m]) + multivariate_normal(parameters.means[m], covariance).logpdf(rows)
    np.testing.assert_allclose(fitted.log_densities(rows), expected, rtol=1e-9)


@pytest.mark.parametrize("noise", ["shared", "per_component"])
def test_log_likelihood_never_decreases(basis, stack, noise):
    _, coefficients, _ = stack
    model = steerable_model(basis, 3, 7, noise=noise, max_iter=25, tol=0).fit(coefficients)
    trace = np.asarray(model.log_likelihood_)
    assert trace.size == 25
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))


def test_shapes_and_parameter_snapshot(basis, fitted):
    parameters = fitted.parameters()
    n_features = basis.n_coefficients
    assert parameters.means.shape == (2, n_features)
    assert parameters.components.shape == parameters.axes.shape == (2, 8, n_features)
    assert parameters.variances.shape == (2, 8)
    assert parameters.noise_variance.shape == parameters.weights.shape == (2,)
    assert parameters.weights.sum() == pytest.approx(1.0)
    assert np.all(parameters.variances >= parameters.noise_variance[:, None])
    axes, variances = parameters.orthonormal_components()
    assert np.all(np.diff(variances, axis=1) <= 1e-12)
    # components are W^T: their Gram matrix is diag(lambda - sigma^2)
    gram = np.einsum("mkl,mjl->mkj", parameters.components, parameters.components)
    np.testing.assert_allclose(gram[0], np.diag(variances[0] - parameters.noise_variance[0]), atol=1e-9)
    parameters.means[:] = 0  # a copy
    assert np.any(fitted.means_ != 0)


def test_float32_and_small_chunks_give_the_same_fit(basis, stack):
    _, coefficients, _ = stack
    reference = steerable_model(basis, max_iter=5).fit(coefficients.astype(np.float64))
    chunked = steerable_model(basis, max_iter=5, chunk_bytes=8 * basis.n_coefficients * 97).fit(coefficients)
    np.testing.assert_allclose(chunked.log_likelihood_, reference.log_likelihood_, rtol=1e-6)
    np.testing.assert_allclose(chunked.noise_variance_, reference.noise_variance_, rtol=1e-6)


def test_odd_dimension_uses_an_angular_frequency_zero_axis(basis, stack):
    _, coefficients, _ = stack
    model = steerable_model(basis, 1, 5, max_iter=3).fit(coefficients)
    on_zero = np.abs(model.axes_[0][:, basis.angular_frequencies == 0]).sum(axis=1) > 0
    assert on_zero.sum() % 2 == 1


def test_even_dimension_with_one_frequency_zero_axis_takes_a_whole_plane():
    # the N = 0 axis has the largest variance, but a plane is the only way to fill exactly 2 dimensions
    frequencies, sines, radial = [0, 1, 1, 1, 1], [False, False, True, False, True], [0, 0, 0, 1, 1]
    data = np.random.default_rng(0).standard_normal((2000, 5)) * [5.0, 2.0, 2.0, 1.0, 1.0]
    model = SteerableMixturePPCA(frequencies, sines, radial, 1, 2, max_iter=3).fit(data)
    axes = model.axes_[0]
    assert np.all(axes[:, 0] == 0)
    # the strongest plane: (cos, sin) of N = 1, n = 0
    np.testing.assert_allclose(axes[:, 1:3] @ axes[:, 1:3].T, np.eye(2), atol=0.05)


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, message", [
    (([0, 1, 1], [False, False], [0, 0, 0]), "1-D arrays of one length"),
    (([0, -1, 1], [False, False, True], [0, 0, 0]), "non-negative integers"),
    (([0.0, 1.0, 1.0], [False, False, True], [0, 0, 0]), "non-negative integers"),
    (([0, 0, 1], [False, True, False], [0, 1, 0]), "frequency 0 cannot be a sine"),
    (([0, 1, 1, 1], [False, False, True, False], [0, 0, 0, 1]), "needs a sin partner"),
    (([], [], []), "no coefficients"),
])
def test_bad_layout_raises(layout, message):
    with pytest.raises(ValueError, match=message):
        SteerableLayout(*layout)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_components=0), "n_components must be a positive integer"),
    (dict(n_dims=2.5), "n_dims must be a positive integer"),
    (dict(noise="none"), "noise must be"),
    (dict(n_dims=80), "must be smaller than the number of coefficients"),
])
def test_bad_parameters_raise(basis, stack, kwargs, message):
    _, coefficients, _ = stack
    settings = dict(n_components=2, n_dims=8) | kwargs
    model = SteerableMixturePPCA(basis.angular_frequencies, basis.is_sine, basis.radial_indices, **settings)
    with pytest.raises(ValueError, match=message):
        model.fit(coefficients)


def test_odd_dimension_without_frequency_zero_raises():
    model = SteerableMixturePPCA([1, 1, 2, 2], [False, True, False, True], [0, 0, 0, 0], 1, 1)
    with pytest.raises(ValueError, match="odd but the basis has no angular-frequency-0"):
        model.fit(np.ones((10, 4)))


def test_bad_data_raises(basis, stack):
    _, coefficients, _ = stack
    model = steerable_model(basis)
    with pytest.raises(ValueError, match="80 coefficients"):
        model.fit(coefficients[:, :50])
    with pytest.raises(ValueError, match="2-D array"):
        model.fit(coefficients[0])
    with pytest.raises(ValueError, match="too few"):
        model.fit(coefficients[:10])
    bad = coefficients.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="first in row 7"):
        model.fit(bad)
    with pytest.raises(ValueError, match="real numbers"):
        model.fit(coefficients.astype(complex))

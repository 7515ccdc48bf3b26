"""The contamination model: its densities, its junk components, and the default sort on small realistic stacks."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from napari_ppcasort import SortSettings, open_particles, sort_particles
from napari_ppcasort.core.bases import PSWFBasis
from napari_ppcasort.core.classes import JUNK_CLASS, component_kinds
from napari_ppcasort.core.contamination import (BackgroundBands, ContaminationMixture, _Backgrounds, _Gaussian,
                                                 empty_classes)
from napari_ppcasort.core.micrograph import simulate_picked_stack
from napari_ppcasort.core.models import junk_probability
from napari_ppcasort.core.simulate import LABEL_NAMES, PARTICLE, write_simulated
from napari_ppcasort.core.steerable import SteerableLayout


@pytest.fixture(scope="module")
def small_basis():
    return PSWFBasis(24, radius=10, max_coefficients=60)


def test_background_bands_add_up_to_white_noise(small_basis):
    layout = SteerableLayout(small_basis.angular_frequencies, small_basis.is_sine, small_basis.radial_indices)
    bands = BackgroundBands(small_basis, layout)
    # the bands are a partition of unity over the frequencies the basis holds: white noise is sum_l G_l = B^T B = I
    np.testing.assert_allclose(bands.zero.sum(axis=0), np.eye(bands.zero.shape[1]), atol=0.03)
    for blocks in bands.groups:
        np.testing.assert_allclose(blocks.sum(axis=0), 2 * np.broadcast_to(np.eye(blocks.shape[-1]), blocks.shape[1:]),
                                   atol=0.06)
    # white noise of variance 2 is fitted as theta = 2 in every band the basis sees
    rng = np.random.default_rng(0)
    coefficients = np.sqrt(2.0) * rng.standard_normal((20000, small_basis.n_coefficients))
    zero = coefficients[:, layout.zero_columns]
    groups = [np.einsum("gca,gcb->gab", z, z.conj()) for z in
              [(coefficients[:, c] + 1j * coefficients[:, s]).transpose(1, 0, 2) for c, s in layout.size_groups]]
    theta = bands.fit(zero.T @ zero, groups, coefficients.shape[0])
    covariance_zero, _ = bands.covariances(theta, floor=1e-6)
    np.testing.assert_allclose(np.diag(covariance_zero), 2.0, rtol=0.1)


def test_block_gaussian_density_matches_the_real_gaussian(small_basis):
    layout = SteerableLayout(small_basis.angular_frequencies, small_basis.is_sine, small_basis.radial_indices)
    rng = np.random.default_rng(1)
    n0 = layout.zero_columns.size
    a = rng.standard_normal((n0, n0))
    zero = a @ a.T + np.eye(n0)
    groups = []
    for cos, _ in layout.size_groups:
        b = rng.standard_normal((cos.shape[0], cos.shape[1], cos.shape[1])) + 1j * rng.standard_normal(
            (cos.shape[0], cos.shape[1], cos.shape[1]))
        groups.append(np.einsum("gab,gcb->gac", b, b.conj()) + np.eye(cos.shape[1]))
    # the real covariance of y: E[x x^T] = zero; for a block with E[z z^H] = C, E[(a, b)(a, b)^T] = [[Re, -Im], [Im, Re]] / 2
    covariance = np.zeros((layout.n_features, layout.n_features))
    covariance[np.ix_(layout.zero_columns, layout.zero_columns)] = zero
    for (cos, sin), blocks in zip(layout.size_groups, groups):
        for c, s, block in zip(cos, sin, blocks):
            covariance[np.ix_(c, c)] = covariance[np.ix_(s, s)] = block.real / 2
            covariance[np.ix_(s, c)] = block.imag / 2
            covariance[np.ix_(c, s)] = -block.imag / 2
    rows = rng.multivariate_normal(np.zeros(layout.n_features), covariance, size=5)
    density = np.empty((rows.shape[0], 1))
    _Backgrounds([_Gaussian(zero, groups)], layout).log_densities(rows, density)
    np.testing.assert_allclose(density[:, 0], multivariate_normal(np.zeros(layout.n_features), covariance).logpdf(rows),
                               rtol=1e-8)


def test_particle_class_density_with_amplitudes_matches_the_gaussian_mixture(small_basis):
    rng = np.random.default_rng(2)
    data = rng.standard_normal((400, small_basis.n_coefficients))
    model = ContaminationMixture(small_basis, n_components=2, n_dims=4, amplitudes=(0.7, 1.0, 1.4)).initialize(data)
    model.step(data)
    rows = data[:3]
    log_dens = model._log_densities(rows)
    m = 0
    covariance_axes = model.axes_[m].T @ np.diag(model.variances_[m] - model.noise_variance_[m]) @ model.axes_[m]
    expected = np.log(model.component_weights_[m]) + np.log(np.mean([
        multivariate_normal(a * model.means_[m], a**2 * covariance_axes
                            + model.noise_variance_[m] * np.eye(rows.shape[1])).pdf(rows)
        for a in (0.7, 1.0, 1.4)], axis=0))
    np.testing.assert_allclose(log_dens[:, m], expected, rtol=1e-7)
    # the columns are the components, in the order of component_kinds_
    assert log_dens.shape[1] == len(model.component_kinds_)
    assert model.component_kinds_.count("particle") == 2 and "noise" in model.component_kinds_


def _reference_log_densities(model, rows):
    """The contamination model's log-densities and amplitude moments computed the plain way: every amplitude and
    inflation on its own (c, M, K) arrays, each background as a complex Gaussian from its covariance blocks."""
    m_count, k, n_features = model.axes_.shape
    kinds = np.array(model.component_kinds_)
    log_2pi = np.log(2 * np.pi)
    projections = np.einsum("il,mkl->imk", rows, model.axes_)
    squared_norm = np.einsum("ij,ij->i", rows, rows)
    mean_projections = np.einsum("mkl,ml->mk", model.axes_, model.means_)
    sigma2 = model.noise_variance_

    def class_log_density(a, inflation):
        variances = inflation * a**2 * (model.variances_ - sigma2[:, None]) + sigma2[:, None]
        squared = (projections - a * mean_projections[None]) ** 2
        centred = rows[:, None] - a * model.means_[None]
        sq_dist = np.einsum("iml,iml->im", centred, centred)
        residual = np.maximum(sq_dist - squared.sum(axis=2), 0) / sigma2
        mahalanobis = np.einsum("imk,mk->im", squared, 1.0 / variances) + residual
        log_det = np.log(variances).sum(axis=1) + (n_features - k) * np.log(sigma2)
        return -0.5 * (n_features * log_2pi + log_det + mahalanobis)

    out = np.empty((rows.shape[0], kinds.size))
    inflations = [1.0] + ([model.outlier_inflation] if model.outlier_inflation else [])
    for inflation, kind in zip(inflations, ("particle", "outlier")):
        per_amplitude = np.stack([class_log_density(a, inflation) for a in model.amplitudes])
        out[:, kinds == kind] = np.logaddexp.reduce(per_amplitude, axis=0) - np.log(model.amplitudes.size)
        if kind == "particle":
            posterior = np.exp(per_amplitude - np.logaddexp.reduce(per_amplitude, axis=0))
            moments = [np.einsum("aim,a->im", posterior, model.amplitudes**p) for p in (1, 2)]
    out[:, kinds == "noise"] = (-0.5 * squared_norm / model.empty_variance_ - model._noise_log_normaliser)[:, None]
    layout = model.layout
    for column, theta in zip(np.flatnonzero(kinds == "background"), model.background_spectra_):
        zero, groups = model.bands.covariances(theta, model.empty_variance_)
        x = rows[:, layout.zero_columns]
        log_density = -0.5 * np.einsum("ia,ab,ib->i", x, np.linalg.inv(zero), x) - 0.5 * (
            np.linalg.slogdet(zero)[1] + x.shape[1] * log_2pi)
        for (cos, sin), blocks in zip(layout.size_groups, groups):
            z = rows[:, cos] + 1j * rows[:, sin]  # (c, g, s), circular: density pi^-s det(C)^-1 exp(-z^H C^-1 z)
            log_density -= np.einsum("iga,gab,igb->i", z.conj(), np.linalg.inv(blocks), z).real + np.sum(
                np.linalg.slogdet(blocks)[1] + blocks.shape[1] * np.log(np.pi))
        out[:, column] = log_density
    return out + np.log(model.component_weights_), moments


@pytest.mark.parametrize("options", [
    {},
    {"n_components": 3, "n_dims": 6, "amplitudes": (0.8, 1.0, 1.2)},
    {"n_components": 1, "n_dims": 5, "outlier_inflation": None, "n_background": 0, "amplitudes": (0.9, 1.1)},
])
def test_log_densities_equal_the_plain_computation(small_basis, options):
    # more rows than a pass of the background densities (DENSITY_ROWS), structured so that the classes differ
    rng = np.random.default_rng(4)
    data = rng.standard_normal((700, small_basis.n_coefficients)) * np.linspace(3.0, 0.5, small_basis.n_coefficients)
    data[::3] *= 2.0
    model = ContaminationMixture(small_basis, **{"n_components": 2, "n_dims": 4, **options}).initialize(data)
    model.step(data)
    log_dens, moments = model._log_densities(data, amplitude_moments=True)
    expected, expected_moments = _reference_log_densities(model, data)
    np.testing.assert_allclose(log_dens, expected, rtol=1e-10)
    for got, want in zip(moments, expected_moments):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.log_densities(data), log_dens, rtol=1e-12)


def test_a_class_whose_mean_carries_no_particle_is_junk():
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((4, 30))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # three classes of comparable mean energy and one near 0 (empty or off-centre boxes)
    means = directions * np.sqrt([[20.0], [30.0], [25.0], [0.5]])
    assert empty_classes(means, np.array([100.0, 100.0, 100.0, 100.0])).tolist() == [False, False, False, True]
    # a class of strong junk (a hundred times the energy) does not make the true classes look empty
    strong = directions * np.sqrt([[20.0], [30.0], [2500.0], [0.5]])
    assert empty_classes(strong, np.array([100.0, 100.0, 30.0, 60.0])).tolist() == [False, False, False, True]
    # the reference is the size-weighted median: when the near-empty class is most of the images, nothing is
    # called empty (the rule cannot turn the bulk of the particles into junk)
    assert not empty_classes(means, np.array([10.0, 10.0, 10.0, 500.0])).any()
    # comparable classes are all kept
    assert not empty_classes(directions * np.sqrt([[4.0], [3.0], [5.0], [2.0]]), np.ones(4)).any()


def test_a_junk_class_and_its_twin_count_as_junk(small_basis):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((400, small_basis.n_coefficients))
    model = ContaminationMixture(small_basis, n_components=2, n_dims=4).initialize(data)
    model.step(data)
    model.junk_classes_ = np.array([False, True])
    kinds = np.array(model.component_kinds_)
    junk = model.junk_columns
    assert set(kinds[junk]) == {"particle", "outlier", "noise", "background"}
    assert np.flatnonzero(kinds == "particle")[1] in junk and np.flatnonzero(kinds == "particle")[0] not in junk
    assert np.flatnonzero(kinds == "outlier")[1] in junk
    # the junk log-odds count the class's share as junk
    log_dens = model.log_densities(data)
    particle = np.setdiff1d(np.arange(kinds.size), junk)
    expected = np.logaddexp.reduce(log_dens[:, junk], axis=1) - np.logaddexp.reduce(log_dens[:, particle], axis=1)
    np.testing.assert_allclose(model.junk_log_odds(data), expected)
    parameters = model.parameters()
    assert parameters.junk_classes == (1,)
    assert parameters.junk_fraction == pytest.approx(float(model.component_weights_[junk].sum()))
    assert component_kinds(parameters, kinds.size)[np.flatnonzero(kinds == "particle")[1]] == JUNK_CLASS


def _auc(positive, negative):
    return float(np.mean(positive[:, None] > negative[None, :]) + 0.5 * np.mean(positive[:, None] == negative[None, :]))


@pytest.fixture(scope="module")
def realistic_sort(tmp_path_factory):
    """The default sort of 2,000 simulated picks (30% junk, SNR 1/10), read from the STAR file like a user's."""
    stack = simulate_picked_stack(2000, snr=1 / 10, junk_fraction=0.3, random_state=7)
    paths = write_simulated(stack, tmp_path_factory.mktemp("picks"), name="picks")
    return sort_particles(open_particles(paths["star"])), stack.labels


def test_every_junk_class_scores_as_junk(realistic_sort):
    result, labels = realistic_sort
    particle_scores = result.scores[labels == PARTICLE]
    for code in np.unique(labels[labels != PARTICLE]):
        assert _auc(result.scores[labels == code], particle_scores) > 0.9, LABEL_NAMES[int(code)]
    assert _auc(result.scores[labels != PARTICLE], particle_scores) > 0.95


def test_the_default_cut_keeps_particles_and_removes_junk(realistic_sort):
    result, labels = realistic_sort
    kept = result.kept_mask
    assert np.mean(labels[kept] == PARTICLE) > 0.93
    assert np.mean(kept[labels == PARTICLE]) > 0.9
    # the cut is the model's own: junk probability 1/2 (log-odds 0), applied to every image the rounds left
    assert np.all(result.scores[kept] <= 0)
    assert np.all(result.scores[~kept] > 0)


def test_the_automatic_cut_lies_in_the_valley_of_the_histogram(realistic_sort):
    result, _ = realistic_sort
    scores = np.clip(result.scores, -40, 40)
    counts, edges = np.histogram(scores, bins=np.arange(-40, 41, 4.0))
    at_cut = counts[np.searchsorted(edges, 0.0, side="right") - 1]
    assert at_cut < 0.25 * counts[edges[:-1] < 0].max()
    assert at_cut < 0.5 * counts[edges[:-1] > 0].max()


def test_junk_probability_is_calibrated(realistic_sort):
    result, labels = realistic_sort
    probability = 1 / (1 + np.exp(-np.clip(result.scores, -50, 50)))
    bins = np.minimum((probability * 10).astype(int), 9)
    counts = np.bincount(bins, minlength=10)
    mean_p = np.bincount(bins, probability, minlength=10) / np.maximum(counts, 1)
    fraction = np.bincount(bins, (labels != PARTICLE).astype(float), minlength=10) / np.maximum(counts, 1)
    expected_calibration_error = np.sum(counts * np.abs(mean_p - fraction)) / counts.sum()
    assert expected_calibration_error < 0.06
    # the estimated junk fraction is the mean probability, within 5 points of the truth
    assert abs(probability.mean() - np.mean(labels != PARTICLE)) < 0.05


def test_a_stack_without_junk_keeps_almost_everything(tmp_path):
    stack = simulate_picked_stack(1500, snr=1 / 10, junk_fraction=0.0, random_state=8)
    result = sort_particles(stack.images)  # an array: no CTF, no pixel size
    assert result.kept_mask.mean() > 0.95


def test_empty_and_off_centre_boxes_are_not_kept_as_a_particle_class(tmp_path):
    """On the second simulator (benchmarks/boxsim.py: boxes rendered one by one, half of them junk), a particle
    class collects empty and off-centre boxes; counted as a junk class (its mean carries no particle), the kept
    set stays pure. Without the rule this stack kept 87.7% particles."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from boxsim import simulate_boxes
    finally:
        sys.path.pop(0)

    stack = simulate_boxes(2000, snr=1 / 10, junk_fraction=0.5, random_state=7)
    is_particle = stack.labels == PARTICLE
    result = sort_particles(open_particles(write_simulated(stack, tmp_path, name="boxes")["star"]))
    kept = result.kept_mask
    assert np.mean(is_particle[kept]) > 0.95
    assert np.mean(kept[is_particle]) > 0.97
    # and the junk probabilities say how much junk there was
    assert junk_probability(result.settings, result.scores).mean() == pytest.approx(0.5, abs=0.05)

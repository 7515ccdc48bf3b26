"""The mixture-of-PPCA EM on planted data: a union of known subspaces plus isotropic noise plus outliers."""

import numpy as np
import pytest

from napari_ppcasort.core.mppca import MixturePPCA

N_FEATURES, N_SUBSPACES, DIM, NOISE_STD = 100, 3, 5, 0.5
WEIGHTS = np.array([0.5, 0.3, 0.2])


def planted_data(n_samples=5000, outlier_fraction=0.15, seed=1, mean_scale=3.0):
    """Samples of a planted mixture: (data (N, L), labels (N,) with -1 for outliers, bases, means)."""
    rng = np.random.default_rng(seed)
    bases = [np.linalg.qr(rng.standard_normal((N_FEATURES, DIM)))[0] for _ in range(N_SUBSPACES)]
    means = [mean_scale * rng.standard_normal(N_FEATURES) for _ in range(N_SUBSPACES)]
    n_inliers = int(round(n_samples * (1 - outlier_fraction)))
    labels = rng.choice(N_SUBSPACES, size=n_inliers, p=WEIGHTS)
    scales = np.linspace(6.0, 3.0, DIM)
    latent = rng.standard_normal((n_inliers, DIM)) * scales
    inliers = np.stack([bases[m] @ x + means[m] for m, x in zip(labels, latent)])
    inliers += NOISE_STD * rng.standard_normal(inliers.shape)
    spread = np.sqrt(inliers.var(axis=0).sum() / N_FEATURES)
    outliers = spread * rng.standard_normal((n_samples - n_inliers, N_FEATURES))
    data = np.vstack([inliers, outliers])
    truth = np.concatenate([labels, -np.ones(n_samples - n_inliers, dtype=int)])
    return data, truth, bases, means


def mean_squared_cosine(basis, axes):
    """Mean squared cosine of the principal angles between span(basis (L, K)) and span(axes.T)."""
    cosines = np.linalg.svd(basis.T @ axes.T, compute_uv=False)
    return float(np.mean(cosines**2))


@pytest.fixture(scope="module")
def clean_fit():
    data, truth, bases, means = planted_data(outlier_fraction=0.0)
    model = MixturePPCA(N_SUBSPACES, DIM, random_state=0, max_iter=50).fit(data)
    return model, data, truth, bases, means


def test_recovers_planted_subspaces(clean_fit):
    model, _, _, bases, _ = clean_fit
    axes, _ = model.parameters().orthonormal_components()
    for basis in bases:
        best = max(mean_squared_cosine(basis, a) for a in axes)
        assert best >= 0.9


def test_recovers_noise_variance_and_weights(clean_fit):
    model, _, _, bases, means = clean_fit
    np.testing.assert_allclose(model.noise_variance_, NOISE_STD**2, rtol=0.05)
    # match fitted components to planted ones by their means
    order = [int(np.argmin([np.linalg.norm(mu - m) for mu in model.means_])) for m in means]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(model.weights_[order], WEIGHTS, atol=0.05)


def test_per_component_noise_recovers_different_levels():
    rng = np.random.default_rng(3)
    n, sigmas = 3000, (0.3, 1.0)
    parts = []
    for sigma in sigmas:
        basis = np.linalg.qr(rng.standard_normal((N_FEATURES, DIM)))[0]
        mean = 5 * rng.standard_normal(N_FEATURES)
        parts.append(rng.standard_normal((n, DIM)) * 4 @ basis.T + mean + sigma * rng.standard_normal((n, N_FEATURES)))
    model = MixturePPCA(2, DIM, noise="per_component", random_state=0, max_iter=30).fit(np.vstack(parts))
    np.testing.assert_allclose(np.sort(model.noise_variance_), np.square(sigmas), rtol=0.05)


def test_log_likelihood_never_decreases_and_matches_score():
    data, *_ = planted_data(n_samples=2000)
    model = MixturePPCA(N_SUBSPACES, DIM, random_state=0)
    model.initialize(data)
    before = model.score(data)
    for _ in range(15):
        model.step(data)
    trace = np.array(model.log_likelihood_)
    assert trace[0] == pytest.approx(before)
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    assert trace[-1] > trace[0]


def test_score_samples_equals_dense_gaussian_mixture():
    """Woodbury / determinant-lemma densities against the dense L x L formula on a small problem."""
    from scipy.stats import multivariate_normal

    data, *_ = planted_data(n_samples=400)
    model = MixturePPCA(N_SUBSPACES, DIM, random_state=0, max_iter=3).fit(data)
    dense = np.zeros((data.shape[0], N_SUBSPACES))
    for m in range(N_SUBSPACES):
        w = model.components_[m].T
        cov = w @ w.T + model.noise_variance_[m] * np.eye(N_FEATURES)
        dense[:, m] = np.log(model.weights_[m]) + multivariate_normal(model.means_[m], cov).logpdf(data)
    expected = np.logaddexp.reduce(dense, axis=1)
    np.testing.assert_allclose(model.score_samples(data), expected, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(data).sum(axis=1), 1.0)


def test_float32_data_and_chunking_give_the_same_fit():
    data, *_ = planted_data(n_samples=1500)
    whole = MixturePPCA(N_SUBSPACES, DIM, random_state=4, max_iter=10).fit(data.astype(np.float32))
    chunked = MixturePPCA(N_SUBSPACES, DIM, random_state=4, max_iter=10, chunk_bytes=8 * N_FEATURES * 97)
    chunked.fit(data.astype(np.float32))
    np.testing.assert_allclose(chunked.means_, whole.means_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(chunked.log_likelihood_, whole.log_likelihood_, rtol=1e-10)


def test_same_seed_same_result_and_other_seed_runs():
    data, *_ = planted_data(n_samples=1500)
    first = MixturePPCA(N_SUBSPACES, DIM, random_state=7, max_iter=5).fit(data)
    second = MixturePPCA(N_SUBSPACES, DIM, random_state=7, max_iter=5).fit(data)
    np.testing.assert_array_equal(first.components_, second.components_)
    np.testing.assert_array_equal(first.log_likelihood_, second.log_likelihood_)


def test_collapsed_component_is_reseeded_not_nan():
    data, *_ = planted_data(n_samples=1500, outlier_fraction=0.0)
    model = MixturePPCA(N_SUBSPACES, DIM, random_state=0)
    model.initialize(data)
    model.means_[2] = 1e3  # far from everything: no responsibility at all
    model.step(data)
    assert model.n_reseeded_ == 1
    for array in (model.means_, model.components_, model.weights_, model.noise_variance_):
        assert np.isfinite(array).all()
    assert model.weights_.sum() == pytest.approx(1.0)
    model.step(data)
    assert np.isfinite(model.log_likelihood_).all()


@pytest.mark.parametrize(
    "kwargs, data_shape, message",
    [
        (dict(n_components=3, n_dims=40), (500, 100), "must be smaller than the number of features"),
        (dict(n_components=2, n_dims=10), (20, 100), "too few"),
        (dict(n_components=0, n_dims=5), (500, 100), "n_components must be a positive integer"),
        (dict(n_components=1, n_dims=5, noise="diagonal"), (500, 100), "noise must be"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, data_shape, message):
    data = np.random.default_rng(0).standard_normal(data_shape)
    with pytest.raises(ValueError, match=message):
        MixturePPCA(**kwargs).fit(data)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_is_refused_with_the_row(bad):
    data = np.random.default_rng(0).standard_normal((300, 20))
    data[123, 4] = bad
    with pytest.raises(ValueError, match="row 123"):
        MixturePPCA(1, 3).fit(data)


def test_one_dimensional_data_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        MixturePPCA(1, 3).fit(np.zeros(30))

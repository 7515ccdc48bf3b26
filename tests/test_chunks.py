"""Chunks of the coefficients and mergeable E-step statistics: the one code path of the local and the Dask sort."""

import numpy as np
import pytest

from napari_ppcasort.core.bases import PSWFBasis
from napari_ppcasort.core.chunks import FAN_IN, LocalChunks, tree_sum
from napari_ppcasort.core.contamination import ContaminationMixture
from napari_ppcasort.core.mixture import expectation
from napari_ppcasort.core.mppca import MixturePPCA
from napari_ppcasort.core.steerable import SteerableMixturePPCA


@pytest.fixture(scope="module")
def basis():
    return PSWFBasis(24, radius=10, max_coefficients=60)


@pytest.fixture(scope="module")
def data(basis):
    """(1200, 60) float32 coefficients: three classes of different strength along a few axes, plus noise."""
    rng = np.random.default_rng(3)
    n, n_features = 1200, basis.n_coefficients
    data = rng.standard_normal((n, n_features))
    classes = rng.integers(0, 3, n)
    data[:, :8] *= (1.0 + 2.0 * classes)[:, None]
    data[:, basis.angular_frequencies == 0] += classes[:, None] * 0.5
    return data.astype(np.float32)


def models(basis):
    return {
        "paper": MixturePPCA(2, 6, random_state=0),
        "steerable": SteerableMixturePPCA(basis.angular_frequencies, basis.is_sine, basis.radial_indices, 2, 6,
                                          random_state=0),
        "contamination": ContaminationMixture(basis, 2, 6, amplitudes=(0.8, 1.0, 1.25), random_state=0),
    }


def flatten(statistics):
    """Every number of an EStep, as one float64 vector (complex parts side by side)."""
    parts = [statistics.responsibilities, [statistics.log_likelihood, statistics.n_samples]]
    parts += [np.asarray(value).ravel() for value in vars(statistics.moments).values() if isinstance(value, np.ndarray)]
    parts += [moments.ravel() for moments in getattr(statistics.moments, "group_moments", [])]
    vector = np.concatenate([np.asarray(part).ravel() for part in parts])
    return np.concatenate([vector.real, vector.imag]).astype(np.float64)


@pytest.mark.parametrize("name", ["paper", "steerable", "contamination"])
def test_estep_of_two_chunks_merges_to_the_estep_of_both(basis, data, name):
    model = models(basis)[name].initialize(data)
    rows = data.astype(np.float64)
    whole = model.expectation(rows)
    merged = model.expectation(rows[:500]) + model.expectation(rows[500:])
    assert merged.n_samples == whole.n_samples == 1200
    np.testing.assert_allclose(flatten(merged), flatten(whole), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("name", ["paper", "steerable", "contamination"])
def test_em_over_small_chunks_follows_em_over_one_chunk(basis, data, name):
    one, many = models(basis)[name], models(basis)[name]
    one.initialize(data)
    many.initialize(data)
    for _ in range(4):
        one.step(LocalChunks(data, chunk_size=data.shape[0]))
        many.step(LocalChunks(data, chunk_size=70))  # 18 chunks: two levels of the summation tree
    np.testing.assert_allclose(many.log_likelihood_, one.log_likelihood_, rtol=1e-10)
    np.testing.assert_allclose(many.means_, one.means_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(many.noise_variance_, one.noise_variance_, rtol=1e-8)


def test_steerable_reseed_sums_the_chosen_rows_over_chunks(basis, data):
    """A collapsed component is re-seeded from statistics summed over the chunks: the same whatever the chunking."""
    fitted = []
    for chunk_size in (data.shape[0], 50):
        model = models(basis)["steerable"].initialize(data)
        model.weights_ = np.array([1.0 - 1e-300, 1e-300])  # component 1 explains nothing: it collapses
        model.step(LocalChunks(data, chunk_size=chunk_size))
        assert model.n_reseeded_ == 1
        fitted.append(model)
    np.testing.assert_allclose(fitted[1].means_, fitted[0].means_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fitted[1].variances_, fitted[0].variances_, rtol=1e-9)


def test_local_chunks_loops_keep_and_take(data):
    chunks = LocalChunks(data, chunk_size=100)
    assert chunks.n_chunks == 12 and chunks.shape == data.shape
    kept = chunks.keep(np.flatnonzero(np.arange(1200) % 3 != 0))  # positions among the kept rows
    assert kept.n_rows == 800
    np.testing.assert_array_equal(kept.kept_indices(), np.flatnonzero(np.arange(1200) % 3 != 0))
    # concat visits the kept rows in particle order, with each chunk's offset among the kept rows
    np.testing.assert_array_equal(kept.concat(lambda rows, offset: offset + np.arange(rows.shape[0])), np.arange(800))
    np.testing.assert_array_equal(kept.concat(lambda rows, offset: rows[:, 0].copy()), data[kept.kept_indices(), 0])
    np.testing.assert_allclose(kept.reduce(lambda rows, offset: rows.sum(axis=0)),
                               data[kept.kept_indices()].astype(np.float64).sum(axis=0), rtol=1e-12)
    again = kept.keep([0, 1, 799])  # positions among the 800 kept rows
    np.testing.assert_array_equal(again.kept_indices(), kept.kept_indices()[[0, 1, 799]])
    np.testing.assert_array_equal(again.take([0, 2]), data[again.kept_indices()[[0, 2]]].astype(np.float64))
    assert [j for j in again.active_chunks()] == [0, 11]


def test_tree_sum_groups_consecutive_parts():
    parts = [(str(i),) for i in range(FAN_IN * 2 + 1)]  # tuples add by concatenation: the order is visible
    assert tree_sum(parts) == tuple(str(i) for i in range(FAN_IN * 2 + 1))
    with pytest.raises(ValueError, match="no chunk holds a kept row"):
        tree_sum([])


def test_expectation_is_a_reduce_function(basis, data):
    model = models(basis)["steerable"].initialize(data)
    statistics = LocalChunks(data, chunk_size=400).reduce(expectation, model.expectation_state())
    assert statistics.n_samples == data.shape[0]
    assert statistics.responsibilities.sum() == pytest.approx(data.shape[0])


def test_block_second_moments_are_the_weighted_complex_outer_products(basis):
    """_Statistics.add computes sum_i r_i z_i z_i^H by real products of [cos | sin] blocks (several passes of rows)."""
    from napari_ppcasort.core.steerable import SUB_ROWS, SteerableLayout, _Statistics

    layout = SteerableLayout(basis.angular_frequencies, basis.is_sine, basis.radial_indices)
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((SUB_ROWS + 300, basis.n_coefficients))
    weights = rng.random((rows.shape[0], 3))
    statistics = _Statistics(layout, 3)
    statistics.add(rows, weights)
    zero = rows[:, layout.zero_columns]
    for m in range(3):
        np.testing.assert_allclose(statistics.zero_moments[m], (zero * weights[:, m:m + 1]).T @ zero, rtol=1e-12)
    for (cos, sin), moments in zip(layout.size_groups, statistics.group_moments):
        z = (rows[:, cos] + 1j * rows[:, sin]).transpose(1, 0, 2)  # (g, c, s)
        for m in range(3):
            expected = np.matmul((z * weights[None, :, m, None]).transpose(0, 2, 1), z.conj())
            np.testing.assert_allclose(moments[m], expected, rtol=1e-11, atol=1e-9)

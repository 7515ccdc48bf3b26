"""Online sorting: pruning rounds, bookkeeping of indices and scores, stopping rules, errors."""

import numpy as np
import pytest

from napari_ppcasort.core.mppca import MixturePPCA
from napari_ppcasort.core.sorting import OnlineSorter, SortingFactorScore, sorting_factors

from test_mppca import DIM, N_SUBSPACES, planted_data


def run(data, **kwargs):
    scorer = kwargs.pop("scorer", None)
    sorter = OnlineSorter(MixturePPCA(N_SUBSPACES, DIM, random_state=0), scorer=scorer, **kwargs)
    return sorter, list(sorter.rounds(data))


@pytest.fixture(scope="module")
def planted():
    return planted_data(n_samples=3000, outlier_fraction=0.15, mean_scale=1.0)


def test_one_round_per_pruning_and_index_bookkeeping(planted):
    data, *_ = planted
    sorter, rounds = run(data, alpha=0.05, iterations_per_round=3, n_rounds=4)
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert [r.n_iterations for r in rounds] == [3, 6, 9, 12]
    assert [r.done for r in rounds] == [False, False, False, True]
    remaining = data.shape[0]
    for r in rounds:
        expected = int(round(0.05 * remaining))
        assert r.removed_this_round.size == expected
        remaining -= expected
        assert r.kept.size == remaining
        # kept and removed partition the original stack
        assert np.array_equal(np.sort(np.concatenate([r.kept, r.removed])), np.arange(data.shape[0]))
        # the removed images are exactly the worst-scoring ones of this round
        scores = dict(zip(r.scored, r.scores))
        assert min(scores[i] for i in r.removed_this_round) >= r.cut
        assert max(scores[i] for i in r.kept) == r.cut
        assert np.all(r.removal_round[r.removed_this_round] == r.round)
    last = rounds[-1]
    assert np.isfinite(last.final_scores).all()
    assert np.all(last.removal_round[last.kept] == 0)
    # removed images keep the score they had when removed
    first = rounds[0]
    np.testing.assert_array_equal(last.final_scores[first.removed_this_round], first.final_scores[first.removed_this_round])
    assert last.log_likelihood.size == 12


def test_log_likelihood_non_decreasing_between_prunings(planted):
    data, *_ = planted
    _, rounds = run(data, alpha=0.05, iterations_per_round=6, n_rounds=3)
    trace = rounds[-1].log_likelihood
    for r in range(3):
        segment = trace[6 * r : 6 * (r + 1)]
        assert np.all(np.diff(segment) >= -1e-9 * np.abs(segment[1:]))


@pytest.mark.parametrize("combine", ["min", "responsibility"])
@pytest.mark.parametrize("center", [False, True])
def test_pruning_removes_planted_outliers(planted, combine, center):
    data, truth, *_ = planted
    n_outliers = int((truth == -1).sum())
    _, rounds = run(data, alpha=0.05, n_rounds=5, scorer=SortingFactorScore(combine, center))
    removed = rounds[-1].removed  # 22.6% of the data, for 15% outliers
    assert (truth[removed] == -1).sum() >= 0.95 * n_outliers


def test_paper_sum_of_factors_is_weaker_but_enriches_outliers(planted):
    """Summing over subspaces (the paper) also penalises inliers for their distance to the OTHER subspaces."""
    data, truth, *_ = planted
    _, rounds = run(data, alpha=0.05, n_rounds=5, scorer=SortingFactorScore("sum"))
    removed = rounds[-1].removed
    assert (truth[removed] == -1).mean() > 1.3 * (truth == -1).mean()


def test_target_kept_fraction_stops_exactly(planted):
    data, *_ = planted
    sorter, rounds = run(data, alpha=0.1, iterations_per_round=2, n_rounds=None, target_kept_fraction=0.8)
    assert rounds[-1].kept.size == int(np.ceil(0.8 * data.shape[0]))
    assert len(rounds) == len(sorter.removal_schedule(data.shape[0])) == 3
    assert rounds[-1].done


def test_whichever_stop_comes_first(planted):
    data, *_ = planted
    _, rounds = run(data, alpha=0.05, iterations_per_round=1, n_rounds=2, target_kept_fraction=0.5)
    assert len(rounds) == 2


def test_same_seed_same_sort(planted):
    data, *_ = planted
    _, a = run(data, alpha=0.05, iterations_per_round=2, n_rounds=2)
    _, b = run(data, alpha=0.05, iterations_per_round=2, n_rounds=2)
    np.testing.assert_array_equal(a[-1].final_scores, b[-1].final_scores)
    np.testing.assert_array_equal(a[-1].removed, b[-1].removed)


def test_sorting_factor_matches_definition():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((50, 30))
    model = MixturePPCA(2, 4, random_state=0, max_iter=2).fit(data)
    params = model.parameters()
    factors = sorting_factors(params, data)
    centred = sorting_factors(params, data, center=True)
    axes, _ = params.orthonormal_components()
    for m in range(2):
        q = axes[m].T  # (L, K), orthonormal columns
        np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-10)
        for y, f, fc in zip(data, factors[:, m], centred[:, m]):
            proj = q @ q.T @ y
            assert f == pytest.approx(np.sum((proj - y) ** 2) / np.sum(proj**2), rel=1e-8)
            d = y - params.means[m]
            proj = q @ q.T @ d
            assert fc == pytest.approx(np.sum((proj - d) ** 2) / np.sum(proj**2), rel=1e-8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha must be a fraction strictly between 0 and 1"),
        (dict(alpha=1.0), "alpha must be a fraction strictly between 0 and 1"),
        (dict(alpha=-0.1), "alpha"),
        (dict(iterations_per_round=0), "iterations_per_round"),
        (dict(n_rounds=None, target_kept_fraction=None), "give n_rounds, target_kept_fraction, outlier_threshold or score_cut"),
        (dict(outlier_threshold=2.5, score_cut=4.6), "not both"),
        (dict(score_cut=4.6, final_cut=5.0), "final_cut needs a score_cut at or above it"),
        (dict(n_rounds=0), "n_rounds"),
        (dict(target_kept_fraction=1.5), "target_kept_fraction"),
    ],
)
def test_bad_sort_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OnlineSorter(MixturePPCA(1, 2), **kwargs)


def test_bad_combination_is_refused():
    with pytest.raises(ValueError, match="combine must be one of"):
        SortingFactorScore("max")


def test_automatic_mode_stops_when_no_outlier_is_left(planted):
    data, truth, *_ = planted
    sorter, rounds = run(data, alpha=0.05, n_rounds=None, outlier_threshold=2.0,
                         scorer=SortingFactorScore("min", center=True))
    last = rounds[-1]
    assert last.done and last.removed_this_round.size == 0
    assert len(rounds) < len(sorter.removal_schedule(data.shape[0]))  # it stopped on its own
    removed = last.removed
    assert (truth[removed] == -1).sum() >= 0.95 * (truth == -1).sum()  # the outliers went
    assert (truth[removed] != -1).sum() <= 0.08 * (truth != -1).sum()  # and few inliers with them


def test_automatic_mode_removes_nothing_from_clean_data():
    data, *_ = planted_data(n_samples=2000, outlier_fraction=0.0, mean_scale=1.0)
    _, rounds = run(data, alpha=0.05, n_rounds=None, outlier_threshold=4.0,
                    scorer=SortingFactorScore("min", center=True))
    assert rounds[-1].kept.size >= 0.99 * data.shape[0]


def test_automatic_mode_needs_a_positive_threshold():
    with pytest.raises(ValueError, match="outlier_threshold must be a positive"):
        OnlineSorter(MixturePPCA(1, 2), outlier_threshold=0.0)


def test_a_sort_with_nothing_to_remove_is_refused_at_start():
    data = np.random.default_rng(0).standard_normal((7, 10))
    with pytest.raises(ValueError, match="7 images are too few to sort with 2 subspaces of dimension 2"):
        OnlineSorter(MixturePPCA(2, 2), n_rounds=3).start(data)
    data = np.random.default_rng(0).standard_normal((100, 10))
    with pytest.raises(ValueError, match="target_kept_fraction 0.999 keeps all 100 images"):
        OnlineSorter(MixturePPCA(1, 2), n_rounds=None, target_kept_fraction=0.999).start(data)

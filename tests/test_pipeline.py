"""SortSettings and make_sorter: the model a sort uses, and the scores it reports."""

import numpy as np
import pytest
from scipy.stats import rankdata

from napari_ppcasort.core.bases import PCABasis
from napari_ppcasort.core.mppca import MixturePPCA
from napari_ppcasort.core.models import score_label
from napari_ppcasort.core.pipeline import SortSettings, make_sorter, prepare_coefficients
from napari_ppcasort.core.particles import ArrayParticleSet
from napari_ppcasort.core.simulate import NOISE, PARTICLE, simulate_particles
from napari_ppcasort.core.sorting import SortingFactorScore
from napari_ppcasort.core.steerable import MeanEvidenceScore, SteerableMixturePPCA

SMALL = dict(n_coefficients=120, total_dimension=30, n_rounds=3, iterations_per_round=4)


@pytest.fixture(scope="module")
def stack():
    return simulate_particles(900, n_outliers=100, n_noise=100, box_size=32, snr=0.3, random_state=2)


def sort(stack, settings):
    prepared = prepare_coefficients(ArrayParticleSet(stack.images), settings)
    sorter = make_sorter(settings, prepared.basis)
    *_, final = sorter.rounds(prepared.coefficients)
    return sorter, prepared.coefficients, final


def test_the_default_model_is_the_contamination_one_and_needs_the_pswf_basis():
    assert SortSettings().model == "contamination" and SortSettings().basis == "pswf"
    assert SortSettings().stop == "junk-left" and SortSettings().n_rounds is None
    with pytest.raises(ValueError, match="contamination model needs the steerable basis 'pswf', not 'pca'"):
        SortSettings(basis="pca")
    with pytest.raises(ValueError, match="combine applies to model 'paper' only; with the contamination model leave it at "
                                         "its default \\('sum'\\)"):
        SortSettings(combine="min")
    with pytest.raises(ValueError, match="center applies to model 'paper' only"):
        SortSettings(center=True)
    with pytest.raises(ValueError, match=r"model must be one of 'contamination', 'steerable', 'paper', got the text 'fancy'"):
        SortSettings(model="fancy")
    assert SortSettings(model="paper", basis="pca", combine="min", center=True).combine == "min"
    with pytest.raises(ValueError, match="needs coefficients in the PSWF basis, got PCABasis"):
        make_sorter(SortSettings(), PCABasis(32))
    # the schedule is still checked when the settings are made, before any data is read
    with pytest.raises(ValueError, match="alpha must be a number strictly between 0 and 1, got 1.5"):
        SortSettings(alpha=1.5)


def test_score_label_names_the_score_of_each_model():
    assert "junk log-odds" in score_label(SortSettings())
    assert "evidence" in score_label(SortSettings(model="steerable"))
    assert "sorting factor" in score_label(SortSettings(model="paper"))


def test_steerable_sort_reports_the_mean_evidence_of_its_model(stack):
    settings = SortSettings(model="steerable", stop="schedule", alpha=0.05, **SMALL)
    sorter, coefficients, final = sort(stack, settings)
    assert isinstance(sorter.model, SteerableMixturePPCA) and isinstance(sorter.scorer, MeanEvidenceScore)
    # the kept images' final scores are the last model's scores of them
    np.testing.assert_allclose(final.final_scores[final.kept],
                               MeanEvidenceScore()(sorter.model, coefficients[final.kept]), rtol=1e-6, atol=1e-9)
    # evidence in SD: particles carry their class average (negative score), pure noise does not (about 0)
    labels = stack.labels
    particle_median = np.median(final.final_scores[labels == PARTICLE])
    noise_median = np.median(final.final_scores[labels == NOISE])
    assert particle_median < -2 and abs(noise_median) < 2
    # 3 rounds of 5% remove 157 of the 200 junk images: all of them junk, and the scores rank junk last
    assert np.all(labels[final.removed] != PARTICLE) and final.removed.size == 157
    assert roc_auc(final.final_scores, labels != PARTICLE) > 0.995


def test_paper_sort_reports_the_sorting_factor(stack):
    settings = SortSettings(model="paper", stop="schedule", **SMALL)
    sorter, coefficients, final = sort(stack, settings)
    assert type(sorter.model) is MixturePPCA and sorter.scorer == SortingFactorScore("sum", False)
    np.testing.assert_allclose(final.final_scores[final.kept],
                               SortingFactorScore()(sorter.model, coefficients[final.kept]), rtol=1e-6)
    assert (final.final_scores > 0).all()


def roc_auc(scores, positive):
    """Probability that a random positive scores above a random negative (ties count half)."""
    ranks = rankdata(scores)
    n_positive = np.count_nonzero(positive)
    return (ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * (positive.size - n_positive))

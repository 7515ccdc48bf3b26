"""The models a sort can use, each with its junk score: one entry of :data:`MODELS` per model.

An entry says how to build the (unfitted) mixture and its scorer from the settings and the basis, what
its score is called, which bases it works in and which model-specific settings it reads. Adding a model
(or another score for an existing model) is one more :class:`ModelSpec` in :data:`MODELS`; the settings,
the command line's ``--model`` choices, the widget and the reports follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.special

from .contamination import ContaminationMixture, JunkLogOdds
from .mppca import MixturePPCA
from .sorting import SortingFactorScore
from .steerable import MeanEvidenceScore, SteerableMixturePPCA

__all__ = ["ModelSpec", "MODELS", "score_label", "junk_probability", "PRUNE_PROBABILITY"]

#: Junk probability above which the contamination model's rounds prune an image while the model learns; the
#: final cut is at 1/2.
PRUNE_PROBABILITY = 0.99
#: The contamination model's amplitude grid (particles of one class differ in contrast with ice thickness and
#: defocus) and the signal-variance factor of its outlier twins; chosen with the particle-mask margin on the
#: contamination benchmark's tuning seeds (benchmarks/README.md).
PARTICLE_AMPLITUDES = (2**-0.25, 1.0, 2**0.25)
OUTLIER_INFLATION = 8.0


@dataclass(frozen=True)
class ModelSpec:
    """One model of :data:`MODELS`.

    Attributes:
        name: the value of the ``model`` setting.
        summary: one line for the help of the ``model`` setting.
        build: ``build(settings, basis) -> (model, scorer)``: the unfitted mixture (initialised by the sort)
            and the junk score ``scorer(model, data (N, L)) -> (N,)``, larger = more junk-like.
        score_label: what the score is, for axis labels and reports.
        steerable_basis: True if the model needs a steerable basis (one whose ``BASES`` entry is steerable).
        settings: the model-specific settings (declared with ``model_specific=True``) that it reads; the
            others must stay at their defaults with this model.
        score_cut: for a score that is the log-odds of junk, the score above which the automatic mode prunes
            while the model learns (``OnlineSorter.score_cut``); None for a score without a probability (the
            automatic mode then removes robust outliers of each round's scores, see ``outlier_threshold``).
        final_cut: the score of the final decision once pruning finds nothing (``OnlineSorter.final_cut``): 0,
            a junk probability of 1/2, for the log-odds.
        score_limits: the widest range of scores worth drawing in a histogram (beyond it the scores go into the
            end bins), None for no limit: the junk log-odds of ice and carbon reach thousands, and nothing
            differs beyond a probability of 1e-17 or 1 - 1e-17.
    """

    name: str
    summary: str
    build: Callable
    score_label: str
    steerable_basis: bool = False
    settings: tuple[str, ...] = ()
    score_cut: float | None = None
    final_cut: float | None = None
    score_limits: tuple[float, float] | None = None


def _paper(settings, basis):
    model = MixturePPCA(settings.n_subspaces, settings.subspace_dimension, noise=settings.noise,
                        random_state=settings.random_state)
    return model, SortingFactorScore(settings.combine, settings.center)


def _steerable(settings, basis):
    model = SteerableMixturePPCA(basis.angular_frequencies, basis.is_sine, basis.radial_indices,
                                 settings.n_subspaces, settings.subspace_dimension, noise=settings.noise,
                                 random_state=settings.random_state)
    return model, MeanEvidenceScore()


def _contamination(settings, basis):
    model = ContaminationMixture(basis, settings.n_subspaces, settings.subspace_dimension,
                                 outlier_inflation=OUTLIER_INFLATION, amplitudes=PARTICLE_AMPLITUDES,
                                 noise=settings.noise, random_state=settings.random_state)
    return model, JunkLogOdds()


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("contamination", "rotation-closed particle subspaces plus explicit junk components (empty boxes, "
              "unstructured contamination, particle-like outliers), scored by the log-odds of junk (the default)",
              _contamination, "junk log-odds (larger = more junk-like; 0: probability 1/2)", steerable_basis=True,
              score_cut=float(np.log(PRUNE_PROBABILITY / (1 - PRUNE_PROBABILITY))), final_cut=0.0,
              score_limits=(-40.0, 40.0)),
    ModelSpec("steerable", "subspaces closed under in-plane rotation, scored by minus the evidence (SD) that an image "
              "carries its class's and the population's rotational average",
              _steerable, "junk score (minus mean evidence, SD)", steerable_basis=True),
    ModelSpec("paper", "the paper's mixture of PPCA scored by its sorting factor (with combine and center)",
              _paper, "junk score (sorting factor)", settings=("combine", "center")),
)}


def score_label(settings) -> str:
    """What the junk score of a sort with ``settings`` is, for axis labels and reports."""
    return MODELS[settings.model].score_label


def junk_probability(settings, scores) -> np.ndarray | None:
    """(N,) the junk probability of each image from its final ``scores`` (N,) under ``settings``' model, or None
    for a model whose score is not the log-odds of junk (those with a ``score_cut``)."""
    if MODELS[settings.model].score_cut is None:
        return None
    return scipy.special.expit(np.asarray(scores, dtype=np.float64))

"""Online sorting: EM on the remaining images, and every P iterations the worst fraction alpha is dropped.

The score of an image is a junk score: larger means further from the learned union of subspaces. The
paper's score is the sorting factor (equation 3.9)

    SF_m(y) = ||Q_m Q_m^T y - y||^2 / ||Q_m Q_m^T y||^2

with Q_m an orthonormal basis of the span of subspace m, summed over the subspaces. Here the combination
over subspaces ('sum', 'min', or weighted by the responsibilities) and the centring (y - mu_m instead of y)
are parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .chunks import Chunks, LocalChunks, default_chunk_size
from .mixture import MixtureParameters, score_rows
from .mppca import MixturePPCA

__all__ = ["COMBINATIONS", "SortRound", "OnlineSorter", "SortingFactorScore", "sorting_factors"]

COMBINATIONS = ("sum", "min", "responsibility")

#: A scorer maps (fitted model, data (N, L)) to junk scores (N,): larger means more junk-like.
Scorer = Callable[[MixturePPCA, np.ndarray], np.ndarray]


def sorting_factors(parameters: MixtureParameters, data: np.ndarray, *, center: bool = False) -> np.ndarray:
    """Sorting factor of every row of ``data`` (N, L) for every subspace, shape (N, M).

    ``center=False`` is the paper's equation 3.9 (the image y is projected as it is);
    ``center=True`` projects y - mu_m instead.
    """
    axes, _ = parameters.orthonormal_components()  # (M, K, L)
    n_subspaces, k, n_features = axes.shape
    rows = np.asarray(data, dtype=np.float64)
    projections = (rows @ axes.reshape(n_subspaces * k, n_features).T).reshape(-1, n_subspaces, k)
    sq_norms = np.einsum("ij,ij->i", rows, rows)[:, None] * np.ones(n_subspaces)
    if center:
        means = parameters.means
        projections = projections - np.einsum("mkl,ml->mk", axes, means)[None]
        sq_norms = sq_norms - 2.0 * rows @ means.T + np.einsum("ml,ml->m", means, means)[None]
    energy = np.einsum("imk,imk->im", projections, projections)
    error = np.maximum(sq_norms - energy, 0.0)
    return error / np.maximum(energy, np.finfo(np.float64).tiny)


@dataclass(frozen=True)
class SortingFactorScore:
    """The paper's junk score: sorting factors of equation 3.9 combined over subspaces.

    combine : 'sum' (the paper), 'min' (distance to the nearest subspace), or 'responsibility'
        (sum over m of p(m | y) SF_m(y)).
    center : project y - mu_m instead of y.
    """

    combine: str = "sum"
    center: bool = False

    def __post_init__(self):
        if self.combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, got {self.combine!r}")

    def __call__(self, model: MixturePPCA, data: np.ndarray) -> np.ndarray:
        factors = sorting_factors(model.parameters(), data, center=self.center)
        if self.combine == "sum":
            return factors.sum(axis=1)
        if self.combine == "min":
            return factors.min(axis=1)
        return np.einsum("im,im->i", model.predict_proba(data), factors)


@dataclass
class SortRound:
    """What one pruning round produced. Indices refer to the ORIGINAL stack.

    Attributes
    ----------
    round : int, 1-based.
    n_iterations : int, EM iterations done so far in total.
    kept : (n_kept,) int, images still in the set after this round, ascending.
    removed : (n_removed,) int, all images removed so far, in order of removal.
    removed_this_round : (r,) int.
    scored : (n,) int, the images scored in this round (those present before the pruning), ascending.
    scores : (n,) float, their junk scores (larger = more junk-like).
    cut : float, the largest score among the images kept in this round.
    parameters : MixtureParameters at the time of scoring.
    log_likelihood : (n_iterations,) float, mean log-likelihood per image before each EM iteration.
    final_scores : (N,) float, each image's latest score; removed images keep the score they were removed with.
    removal_round : (N,) int, the round an image was removed in, 0 if it is still kept.
    done : bool, True for the last round.
    """

    round: int
    n_iterations: int
    kept: np.ndarray
    removed: np.ndarray
    removed_this_round: np.ndarray
    scored: np.ndarray
    scores: np.ndarray
    cut: float
    parameters: MixtureParameters
    log_likelihood: np.ndarray
    final_scores: np.ndarray
    removal_round: np.ndarray
    done: bool

    @property
    def n_total(self) -> int:
        return self.final_scores.shape[0]

    @property
    def kept_fraction(self) -> float:
        return self.kept.size / self.n_total


class OnlineSorter:
    """EM of a :class:`MixturePPCA` interleaved with pruning of the worst-scoring images.

    Parameters
    ----------
    model : MixturePPCA
        The (unfitted) model; it is initialised on the data by :meth:`start`.
    alpha : float in (0, 1)
        Fraction of the REMAINING images removed at each pruning round.
    iterations_per_round : int
        P, the EM iterations between prunings.
    n_rounds : int or None
        Stop after this many rounds.
    target_kept_fraction : float in (0, 1) or None
        Stop when this fraction of the original images is left (the last round removes just enough).
        With both given, the sort stops at whichever comes first; at least one is needed.
    scorer : callable (model, data) -> (N,) scores
        The junk score; default :class:`SortingFactorScore` (the paper's).
    outlier_threshold : float or None
        An automatic mode for scores without a probability. When set, a round removes only the images whose
        score is an outlier of this round's score distribution (robust z-score, median and MAD of the
        log-scores, above the threshold), at most the scheduled count, and the sort stops after a round that
        finds none. With it, n_rounds and target_kept_fraction may both be None (they remain upper bounds on
        the removal).
    score_cut : float or None
        The automatic mode of a score with a probability (the junk log-odds of a contamination model): a round
        prunes only the images scoring above it, at most the scheduled count, and the sort stops after a round
        that finds none. Not together with ``outlier_threshold``.
    final_cut : float or None
        With ``score_cut``: the round that finds nothing above ``score_cut`` removes every image scoring above
        ``final_cut`` instead (the decision of the converged model: 0 is a junk probability of 1/2), and the
        sort ends. Pruning on a higher ``score_cut`` while the model learns removes only what is surely junk.

    Use :meth:`rounds` as a generator, or drive it step by step with :meth:`start`, :meth:`em_step` and
    :meth:`prune` (the GUI does, to stay cancellable between EM iterations).
    """

    def __init__(
        self,
        model: MixturePPCA,
        *,
        alpha: float = 0.05,
        iterations_per_round: int = 6,
        n_rounds: int | None = 5,
        target_kept_fraction: float | None = None,
        scorer: Scorer | None = None,
        outlier_threshold: float | None = None,
        score_cut: float | None = None,
        final_cut: float | None = None,
    ):
        if not (isinstance(alpha, (float, int)) and 0.0 < alpha < 1.0):
            raise ValueError(f"alpha must be a fraction strictly between 0 and 1, got {alpha!r}")
        if not isinstance(iterations_per_round, (int, np.integer)) or iterations_per_round < 1:
            raise ValueError(f"iterations_per_round must be a positive integer, got {iterations_per_round!r}")
        if outlier_threshold is not None and not outlier_threshold > 0:
            raise ValueError(f"outlier_threshold must be a positive robust z-score, got {outlier_threshold!r}")
        if outlier_threshold is not None and score_cut is not None:
            raise ValueError("give outlier_threshold or score_cut, not both: they are two automatic modes")
        if score_cut is not None and not np.isfinite(score_cut):
            raise ValueError(f"score_cut must be a finite score, got {score_cut!r}")
        if final_cut is not None and (score_cut is None or not final_cut <= score_cut):
            raise ValueError(f"final_cut needs a score_cut at or above it, got {final_cut!r} with {score_cut!r}")
        if n_rounds is None and target_kept_fraction is None and outlier_threshold is None and score_cut is None:
            raise ValueError("give n_rounds, target_kept_fraction, outlier_threshold or score_cut, so that the sort "
                             "knows when to stop")
        if n_rounds is not None and (not isinstance(n_rounds, (int, np.integer)) or n_rounds < 1):
            raise ValueError(f"n_rounds must be a positive integer or None, got {n_rounds!r}")
        if target_kept_fraction is not None and not 0.0 < target_kept_fraction < 1.0:
            raise ValueError(f"target_kept_fraction must be strictly between 0 and 1, got {target_kept_fraction!r}")
        self.model = model
        self.alpha = float(alpha)
        self.iterations_per_round = int(iterations_per_round)
        self.n_rounds = n_rounds
        self.target_kept_fraction = target_kept_fraction
        self.scorer = scorer if scorer is not None else SortingFactorScore()
        self.outlier_threshold = outlier_threshold
        self.score_cut = score_cut
        self.final_cut = final_cut

    @property
    def automatic(self) -> bool:
        """True when a round removes only what its rule finds, and the sort stops after a round that finds none."""
        return self.outlier_threshold is not None or self.score_cut is not None

    def removal_schedule(self, n_total: int) -> list[int]:
        """How many images each round removes from a set of ``n_total`` (upper bounds in the automatic mode).

        Each round removes round(alpha * remaining), at least one, never going below the target kept
        fraction nor below the smallest set the model can be fitted on.
        """
        floor = self.model.n_components * (self.model.n_dims + 1) + 1
        if self.target_kept_fraction is not None:
            floor = max(floor, math.ceil(self.target_kept_fraction * n_total))
        self._floor = floor
        counts, remaining = [], n_total
        while self.n_rounds is None or len(counts) < self.n_rounds:
            count = min(max(1, int(round(self.alpha * remaining))), remaining - floor)
            if count <= 0:
                break
            counts.append(count)
            remaining -= count
        return counts

    def start(self, data, chunk_size: int | None = None) -> None:
        """Initialise the model on all of ``data`` and reset the bookkeeping.

        data: the (N, L) coefficients (cut into chunks of ``chunk_size`` rows, default about the model's
            ``chunk_bytes`` of float64), or :class:`~napari_ppcasort.core.chunks.Chunks` (on Dask workers, say).
        ValueError if no round could remove an image (too few images for the model, or a target kept fraction
        already reached).
        """
        if not isinstance(data, Chunks):
            self.model.initialize(data)  # checks the array (shape, NaN) first
            data = data if isinstance(data, np.memmap) else np.asarray(data)
            data = LocalChunks(data, chunk_size or default_chunk_size(data.shape[1], self.model.chunk_bytes))
        else:
            self.model.initialize(data)
        self._data = data
        self._n_total = data.n_total
        self._kept = np.arange(self._n_total)
        self._active = data
        self._removed: list[np.ndarray] = []
        self._final_scores = np.full(self._n_total, np.nan)
        self._removal_round = np.zeros(self._n_total, dtype=np.int64)
        self._round = 0
        self.schedule = self.removal_schedule(self._n_total)
        self._found_no_outlier = False
        if not self.schedule:
            model = self.model
            if self.target_kept_fraction is not None and \
                    math.ceil(self.target_kept_fraction * self._n_total) >= self._n_total:
                raise ValueError(f"target_kept_fraction {self.target_kept_fraction:g} keeps all {self._n_total} "
                                 "images: there is nothing to remove")
            raise ValueError(f"{self._n_total} images are too few to sort with {model.n_components} subspaces of "
                             f"dimension {model.n_dims}: lower n_subspaces or total_dimension")

    @property
    def active(self) -> Chunks:
        """The remaining images (the chunks of the data with the kept mask)."""
        return self._active

    def em_step(self) -> float:
        """One EM iteration on the remaining images; returns the mean log-likelihood before it."""
        return self.model.step(self._active)

    @property
    def finished(self) -> bool:
        return self._round >= len(self.schedule) or self._found_no_outlier

    def _outlier_count(self, scores: np.ndarray) -> int:
        """Images whose score is a robust outlier of ``scores`` (see ``outlier_threshold``)."""
        values = np.log(scores) if (scores > 0).all() else scores
        median = np.median(values)
        spread = 1.4826 * np.median(np.abs(values - median))
        return int(np.sum(values > median + self.outlier_threshold * spread))

    def prune(self) -> SortRound:
        """Score the remaining images, remove the worst ones and report the round."""
        self._round += 1
        scores = self._active.concat(score_rows, self.model.expectation_state(), self.scorer)
        n_remove = self.schedule[self._round - 1]
        if self.automatic:
            found = (self._outlier_count(scores) if self.outlier_threshold is not None
                     else int(np.count_nonzero(scores > self.score_cut)))
            n_remove = min(n_remove, found)
            self._found_no_outlier = n_remove == 0
            if n_remove == 0 and self.final_cut is not None:
                n_remove = min(int(np.count_nonzero(scores > self.final_cut)), scores.size - self._floor)
        order = np.argsort(scores, kind="stable")
        keep_positions = np.sort(order[: scores.size - n_remove])
        drop_positions = order[scores.size - n_remove :][::-1]  # worst first
        scored = self._kept
        self._final_scores[scored] = scores
        removed_now = scored[drop_positions]
        self._removal_round[removed_now] = self._round
        self._removed.append(removed_now)
        self._kept = scored[keep_positions]
        self._active = self._active.keep(keep_positions)
        cut = float(scores[keep_positions].max()) if keep_positions.size else -np.inf
        return SortRound(
            round=self._round,
            n_iterations=self.model.n_iter_,
            kept=self._kept.copy(),
            removed=np.concatenate(self._removed),
            removed_this_round=removed_now,
            scored=scored,
            scores=scores,
            cut=cut,
            parameters=self.model.parameters(),
            log_likelihood=np.asarray(self.model.log_likelihood_),
            final_scores=self._final_scores.copy(),
            removal_round=self._removal_round.copy(),
            done=self.finished,
        )

    def rounds(self, data) -> Iterator[SortRound]:
        """Run the whole sort on ``data`` (N, L), yielding one :class:`SortRound` per pruning round."""
        self.start(data)
        while not self.finished:
            for _ in range(self.iterations_per_round):
                self.em_step()
            yield self.prune()

"""Reviewing a finished sort: the user's curation (a cut, whole classes, single particles) and the review controls.

:class:`Curation` is the state, with no Qt: the cut is a score threshold (the particles scoring at most it are
kept); a class decided as a whole ("keep all", "reject all") overrides the cut for its members; a particle
clicked in the gallery overrides both. What differs from the cut is exported as the manual overrides of
parameters.json (``SortResult.with_selection``), so the command line reproduces the kept set.

:class:`ReviewPanel` holds the controls: "keep the best" (the cut as a count, linked to the cut dragged on the
histogram), the counts, "undo hand edits" and Export.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import Container, Label, PushButton, Slider

from ._classes import BY_SCORE, KEEP_ALL, REJECT_ALL

__all__ = ["Curation", "ReviewPanel"]


class Curation:
    """What the user keeps of a finished sort.

    Args:
        result: the SortResult.
        assignment: (N,) int, the class of each particle (``ClassViews.assignment``), or None.

    Attributes:
        scores: (N,) float, the final scores; sorted_scores: (N,) ascending.
        automatic_cut: the sort's own cut (the largest score it kept in its last round).
        threshold: the cut now (starts at the automatic cut).
        class_decisions: {component: True (keep all) or False (reject all)}.
        hand: {particle: True (kept) or False (rejected)}, the tiles clicked.
    """

    def __init__(self, result, assignment: np.ndarray | None = None):
        self.result = result
        self.scores = np.asarray(result.scores, dtype=np.float64)
        self.sorted_scores = np.sort(self.scores)
        self.assignment = None if assignment is None else np.asarray(assignment)
        self.automatic_cut = float(result.final.cut)
        self.threshold = self.automatic_cut
        self.class_decisions: dict[int, bool] = {}
        self.hand: dict[int, bool] = {}

    @property
    def n_particles(self) -> int:
        return self.scores.size

    @property
    def n_best(self) -> int:
        """How many particles the cut keeps (by score alone)."""
        return int(np.searchsorted(self.sorted_scores, self.threshold, side="right"))

    def keep_best(self, count: int) -> None:
        """Move the cut to keep the ``count`` best-scoring particles (1 <= count <= N)."""
        count = int(np.clip(count, 1, self.n_particles))
        self.threshold = float(self.sorted_scores[count - 1])

    def move_cut(self, score: float) -> None:
        """Move the cut to ``score``, snapped to the largest particle score at most it (at least one is kept)."""
        at = int(np.searchsorted(self.sorted_scores, score, side="right"))
        self.keep_best(max(at, 1))

    def base_mask(self) -> np.ndarray:
        """(N,) bool, the particles the cut keeps."""
        return self.scores <= self.threshold

    def kept_mask(self) -> np.ndarray:
        """(N,) bool, the kept set: the cut, then the class decisions, then the particles clicked."""
        kept = self.base_mask()
        if self.assignment is not None:
            for component, keep in self.class_decisions.items():
                kept[self.assignment == component] = keep
        if self.hand:
            indices = np.fromiter(self.hand, dtype=np.int64, count=len(self.hand))
            kept[indices] = np.fromiter(self.hand.values(), dtype=bool, count=len(self.hand))
        return kept

    def moved_mask(self) -> np.ndarray:
        """(N,) bool, the particles on the other side than the cut puts them (by class or by hand)."""
        return self.kept_mask() != self.base_mask()

    def toggle(self, particle: int) -> bool:
        """Move ``particle`` across the cut (or back); returns whether it is kept now."""
        kept = not bool(self.kept_mask()[particle])
        self.hand[int(particle)] = kept
        return kept

    def decide_class(self, component: int, decision: str) -> None:
        """Keep all, reject all or let the cut decide (BY_SCORE) the members of ``component``; the particles of
        the class clicked by hand earlier follow the class decision."""
        if self.assignment is None:
            raise ValueError("no class assignment: the classes are not known")
        if decision == BY_SCORE:
            self.class_decisions.pop(component, None)
        elif decision in (KEEP_ALL, REJECT_ALL):
            self.class_decisions[component] = decision == KEEP_ALL
        else:
            raise ValueError(f"unknown class decision {decision!r}")
        members = set(np.flatnonzero(self.assignment == component).tolist())
        self.hand = {particle: kept for particle, kept in self.hand.items() if particle not in members}

    def undo_hand_edits(self) -> None:
        self.hand.clear()
        self.class_decisions.clear()

    def kept_per_class(self, n_components: int) -> np.ndarray | None:
        """(M,) int, the kept members of each class (None without classes)."""
        if self.assignment is None:
            return None
        return np.bincount(self.assignment[self.kept_mask()], minlength=n_components)

    def curated_result(self):
        """The SortResult with this cut and the overrides that make this kept set (what Export writes)."""
        return self.result.with_selection(self.threshold, self.kept_mask())


class ReviewPanel(Container):
    """The review controls (a magicgui Container): keep the best N, the counts, undo the hand edits, Export."""

    def __init__(self):
        self.threshold = Slider(label="keep the best", min=0, max=1, value=1, enabled=False,
                                tooltip="the cut, as the number of particles kept by score (lowest scores first); "
                                        "dragging the cut on the histogram moves it too")
        self.counts = Label(label="kept / rejected", value="-",
                            tooltip="particles kept and rejected now: the cut, whole classes and particles moved "
                                    "by hand")
        self.undo = PushButton(text="Undo hand edits", enabled=False,
                               tooltip="forget the particles moved by hand and the class decisions: the cut alone "
                                       "decides")
        self.export_button = PushButton(text="Export...", enabled=False,
                                        tooltip="write the kept and rejected sets (in the input's format), "
                                                "scores.csv, report.png and parameters.json (with the cut and the "
                                                "hand edits) into a folder, as the command line does")
        super().__init__(widgets=[self.threshold, self.counts, self.undo, self.export_button])

    def set_enabled(self, enabled: bool) -> None:
        for control in (self.threshold, self.undo, self.export_button):
            control.enabled = enabled

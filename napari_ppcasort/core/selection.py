"""Which particles a sort keeps: a cut on the final scores, then the user's manual overrides.

The kept set of a sort is, in this order:

1. the base: the particles whose final score is at most the ``score_threshold`` setting, or, without
   one, the particles the sort itself kept (never removed by a pruning round);
2. the manual overrides: particles the user moved across the cut (one by one, or a whole class at
   once) are kept (``Overrides.kept``) or rejected (``Overrides.rejected``) whatever their score.

``parameters.json`` records both (the threshold in its settings, the overrides in its "overrides"
entry), so that ``ppcasort sort --settings parameters.json`` on the same particles gives the same kept
set as the widget that exported it, and ``ppcasort select`` re-cuts an exported result without sorting
again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SettingsError, literal

__all__ = ["Overrides", "base_mask", "kept_mask", "read_overrides_file", "OVERRIDES_KEY"]

#: The entry of parameters.json that holds the overrides.
OVERRIDES_KEY = "overrides"


@dataclass(frozen=True)
class Overrides:
    """Particles moved across the cut by hand.

    kept : particle indices (0-based rows of the particle set) kept whatever their score, ascending.
    rejected : particle indices rejected whatever their score, ascending; disjoint from ``kept``.
    """

    kept: tuple[int, ...] = ()
    rejected: tuple[int, ...] = ()

    def __post_init__(self):
        kept = tuple(sorted({int(i) for i in self.kept}))
        rejected = tuple(sorted({int(i) for i in self.rejected}))
        both = set(kept) & set(rejected)
        if both:
            raise SettingsError(f"particle {min(both)} cannot be both kept and rejected by hand")
        if any(i < 0 for i in kept + rejected):
            raise SettingsError(f"particle indices start at 0, got {min(kept + rejected)}")
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "rejected", rejected)

    def __bool__(self) -> bool:
        return bool(self.kept or self.rejected)

    @classmethod
    def between(cls, kept_mask: np.ndarray, base: np.ndarray) -> "Overrides":
        """The overrides that turn the ``base`` selection (N,) bool into ``kept_mask`` (N,) bool."""
        kept_mask, base = np.asarray(kept_mask, dtype=bool), np.asarray(base, dtype=bool)
        return cls(tuple(np.flatnonzero(kept_mask & ~base).tolist()), tuple(np.flatnonzero(~kept_mask & base).tolist()))

    def apply(self, base: np.ndarray) -> np.ndarray:
        """(N,) bool: ``base`` with the overrides applied (a copy). IndexError if an index is out of range."""
        mask = np.array(base, dtype=bool)
        largest = max(self.kept + self.rejected, default=-1)
        if largest >= mask.size:
            raise IndexError(f"override of particle {largest}, but the set has {mask.size} particles")
        mask[list(self.kept)] = True
        mask[list(self.rejected)] = False
        return mask

    def to_dict(self) -> dict:
        return {"kept": list(self.kept), "rejected": list(self.rejected)}


def base_mask(scores: np.ndarray, sort_kept: np.ndarray, score_threshold: float | None) -> np.ndarray:
    """(N,) bool: the particles whose score is at most ``score_threshold``, or ``sort_kept`` without one.

    Scores that are NaN (never scored) count as rejected by a threshold.
    """
    if score_threshold is None:
        return np.array(sort_kept, dtype=bool)
    return np.asarray(scores, dtype=np.float64) <= score_threshold


def kept_mask(scores: np.ndarray, sort_kept: np.ndarray, score_threshold: float | None,
              overrides: Overrides = Overrides()) -> np.ndarray:
    """(N,) bool, the kept set: :func:`base_mask`, then ``overrides`` (see the module docstring)."""
    return overrides.apply(base_mask(scores, sort_kept, score_threshold))


def read_overrides_file(path, n_particles: int | None = None) -> Overrides:
    """The overrides recorded in a ``parameters.json`` (none if it has no "overrides" entry).

    n_particles : the size of the set they are applied to; the file's overrides must fit it, and the file's
        "n_particles" (the set it was written for) must equal it when there are overrides.
    SettingsError naming the file when the entry is malformed or does not fit the particles.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SettingsError(f"{literal(path)}: cannot read its overrides ({literal(error)})") from None
    entry = content.get(OVERRIDES_KEY) if isinstance(content, dict) else None
    if entry is None:
        return Overrides()
    if not (isinstance(entry, dict) and set(entry) <= {"kept", "rejected"}
            and all(isinstance(entry.get(key, []), list) for key in ("kept", "rejected"))
            and all(isinstance(i, int) and not isinstance(i, bool)
                    for key in ("kept", "rejected") for i in entry.get(key, []))):
        raise SettingsError(f"{literal(path)}: \"{OVERRIDES_KEY}\" must be an object with lists of particle indices "
                            "\"kept\" and \"rejected\"")
    try:
        overrides = Overrides(tuple(entry.get("kept", [])), tuple(entry.get("rejected", [])))
    except SettingsError as error:
        raise SettingsError(f"{literal(path)}: {error.template}") from None
    recorded = content.get("n_particles")
    if overrides and n_particles is not None and recorded != n_particles:
        raise SettingsError(f"{literal(path)}: its manual overrides are for a set of {literal(recorded)} particles, "
                            f"this one has {n_particles}; remove its \"{OVERRIDES_KEY}\" entry to reuse only the "
                            "settings")
    return overrides

"""The coefficients of a sort as chunks of the stack, and the loops over them that EM, scoring and pruning are.

A :class:`Chunks` object is the (N, L) coefficients of a particle set cut into fixed consecutive ranges of
particle indices (``chunk_size`` particles each), with a kept mask: the rows still in the sort. Everything
the sort does with the data is one of three loops over the chunks that hold kept rows:

    statistics = data.reduce(expectation, state)    # sum over chunks of expectation(rows, offset, state)
    scores = data.concat(score, state, scorer)      # (n_kept,) in particle order
    sample = data.take(positions)                   # (n, L) float64 kept rows, for the initialisation

``rows`` is a chunk's kept rows as float64 (c, L), valid during the call only (the local loops reuse one
buffer: a function returns what it computed, not a view of ``rows``), and ``offset`` the position of its
first kept row among all kept rows. :class:`LocalChunks` runs the loops in this process; ``DaskChunks``
(:mod:`napari_ppcasort.core.distributed`) runs them as tasks where the chunks are. Both sum the per-chunk
results in the same fixed tree (:func:`tree_sum`), so they compute the same numbers for the same chunking.
"""

from __future__ import annotations

import functools
import operator
from typing import Callable

import numpy as np

__all__ = ["Chunks", "LocalChunks", "tree_sum", "default_chunk_size", "FAN_IN", "ColumnRange", "column_range"]

#: Partial results summed per node of the reduction tree.
FAN_IN = 8
#: Bytes of a float64 chunk of rows (the E-step's working set; the mixtures' ``chunk_bytes``).
CHUNK_BYTES = 64 * 2**20


def default_chunk_size(n_features: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk of float64 rows of ``n_features`` columns is about ``chunk_bytes``."""
    return max(1, chunk_bytes // (8 * max(int(n_features), 1)))


def tree_sum(parts: list):
    """The sum (``+``) of ``parts`` in a fixed tree: groups of FAN_IN consecutive parts, then groups of those,
    until one is left (the order :class:`Chunks` implementations all use)."""
    if not parts:
        raise ValueError("nothing to sum: no chunk holds a kept row")
    while len(parts) > 1:
        parts = [sum_parts(*parts[start:start + FAN_IN]) for start in range(0, len(parts), FAN_IN)]
    return parts[0]


def sum_parts(*parts):
    """``parts[0] + parts[1] + ...`` from left to right."""
    return functools.reduce(operator.add, parts)


class Chunks:
    """(N, L) coefficients in chunks of consecutive particles, with the kept mask (see the module docstring).

    Attributes:
        n_total: N, the particles of the set.
        n_features: L.
        bounds: (n_chunks + 1,) int, chunk j holds particles bounds[j] to bounds[j + 1] - 1.
        kept: (N,) bool, the rows still in the sort (on the client, whatever holds the coefficients).
    """

    def __init__(self, n_total: int, n_features: int, chunk_size: int, kept: np.ndarray | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 particle, got {chunk_size}")
        self.n_total = int(n_total)
        self.n_features = int(n_features)
        self.chunk_size = int(chunk_size)
        self.bounds = np.append(np.arange(0, self.n_total, self.chunk_size), self.n_total).astype(np.int64)
        self.kept = np.ones(self.n_total, dtype=bool) if kept is None else np.asarray(kept, dtype=bool)
        if self.kept.shape != (self.n_total,):
            raise ValueError(f"kept must be a (n_total,) bool mask, got shape {self.kept.shape}")
        counts = np.add.reduceat(self.kept, self.bounds[:-1]) if self.n_total else np.zeros(0, dtype=np.int64)
        self.counts = counts.astype(np.int64)  # kept rows per chunk
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    # -- what the models read ----------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """Kept rows."""
        return int(self.counts.sum())

    @property
    def shape(self) -> tuple[int, int]:
        """(kept rows, L)."""
        return self.n_rows, self.n_features

    @property
    def n_chunks(self) -> int:
        return self.bounds.size - 1

    def kept_indices(self) -> np.ndarray:
        """(n_rows,) int64, the particle index of each kept row."""
        return np.flatnonzero(self.kept)

    def chunk_mask(self, j: int) -> np.ndarray:
        """(c,) bool, the kept rows of chunk j."""
        return self.kept[self.bounds[j]:self.bounds[j + 1]]

    def active_chunks(self) -> list[int]:
        """The chunks with at least one kept row, in order (the ones every loop visits)."""
        return [int(j) for j in np.flatnonzero(self.counts)]

    def all_rows(self) -> "Chunks":
        """The same chunks with every row kept (all N particles, whatever was pruned)."""
        return self._with_kept(np.ones(self.n_total, dtype=bool))

    def keep(self, positions) -> "Chunks":
        """The same chunks with only the kept rows at ``positions`` (indices into the kept rows) kept."""
        kept = np.zeros(self.n_total, dtype=bool)
        kept[self.kept_indices()[np.asarray(positions, dtype=np.int64)]] = True
        return self._with_kept(kept)

    # -- the loops -------------------------------------------------------------------------------------------
    def reduce(self, func: Callable, *args):
        """``tree_sum`` over the chunks with kept rows of ``func(rows, offset, *args)``."""
        raise NotImplementedError

    def concat(self, func: Callable, *args) -> np.ndarray:
        """``func(rows, offset, *args)`` ((c,) arrays) over the chunks with kept rows, concatenated: (n_rows,)."""
        raise NotImplementedError

    def take(self, positions) -> np.ndarray:
        """(len(positions), L) float64, the kept rows at the ascending ``positions`` (indices into the kept rows)."""
        raise NotImplementedError

    def _with_kept(self, kept: np.ndarray) -> "Chunks":
        raise NotImplementedError


class LocalChunks(Chunks):
    """Chunks of an (N, L) array (or memory map) in this process.

    data: (N, L) float coefficients (float32 from the expansion; any float type); not copied. The loops convert
    each chunk's kept rows into one float64 buffer (of a chunk's size), reused by every loop over these chunks.
    """

    def __init__(self, data, chunk_size: int | None = None, kept: np.ndarray | None = None):
        data = data if isinstance(data, np.memmap) else np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"data must be a 2-D array (n_samples, n_features), got shape {data.shape}")
        super().__init__(data.shape[0], data.shape[1],
                         default_chunk_size(data.shape[1]) if chunk_size is None else chunk_size, kept)
        self.data = data
        self._buffer = None

    def rows(self, j: int) -> np.ndarray:
        """(c, L) float64, the kept rows of chunk j: a view of the buffer, valid until the next call."""
        block = self.data[self.bounds[j]:self.bounds[j + 1]]
        mask = self.chunk_mask(j)
        if block.dtype == np.float64 and mask.all():
            return np.asarray(block)
        if self._buffer is None:
            self._buffer = np.empty((int(self.counts.max()), self.n_features))
        rows = self._buffer[:int(self.counts[j])]
        np.copyto(rows, block if mask.all() else block[mask])
        return rows

    def reduce(self, func: Callable, *args):
        return tree_sum([func(self.rows(j), int(self.offsets[j]), *args) for j in self.active_chunks()])

    def concat(self, func: Callable, *args) -> np.ndarray:
        parts = [np.asarray(func(self.rows(j), int(self.offsets[j]), *args)) for j in self.active_chunks()]
        return np.concatenate(parts) if parts else np.zeros(0)

    def take(self, positions) -> np.ndarray:
        return np.asarray(self.data[self.kept_indices()[np.asarray(positions, dtype=np.int64)]], dtype=np.float64)

    def _with_kept(self, kept: np.ndarray) -> "LocalChunks":
        return LocalChunks(self.data, self.chunk_size, kept)


class ColumnRange:
    """The smallest and largest value of every column over some rows: (L,) ``low`` and ``high``; ``+`` merges."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        self.low, self.high = low, high

    def __add__(self, other: "ColumnRange") -> "ColumnRange":
        return ColumnRange(np.minimum(self.low, other.low), np.maximum(self.high, other.high))


def column_range(rows: np.ndarray, offset: int) -> ColumnRange:
    """The :class:`ColumnRange` of a chunk's rows (c, L) (a ``reduce`` function)."""
    return ColumnRange(rows.min(axis=0), rows.max(axis=0))

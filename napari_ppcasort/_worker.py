"""The sort as a generator of progress events, run by the widget in a napari ``thread_worker``.

``run_sort`` computes the basis coefficients, then drives the OnlineSorter one EM iteration at a time and
yields after each one, so that a napari worker asked to quit stops within one EM iteration. Everything
heavy (coefficients, EM, subspace images) happens here, in the worker thread; the events it yields are
small and cheap to show on the main thread. No Qt in this module.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .core.pipeline import PreparedCoefficients, SortSettings, make_sorter, prepare_coefficients, subspace_images
from .core.sorting import SortRound

__all__ = ["CoefficientsProgress", "SortStarted", "IterationDone", "RoundDone", "RunFailed", "run_sort"]

#: Seconds between checks for cancellation while the coefficients are computed.
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class CoefficientsProgress:
    """``done`` of ``total`` images preprocessed and expanded in the basis."""

    done: int
    total: int


@dataclass(frozen=True)
class SortStarted:
    """The model is initialised: ``n_rounds`` pruning rounds on ``n_particles`` images of ``n_coefficients``.

    automatic : the automatic mode; the sort may stop before ``n_rounds`` (an upper bound), after a round
        that finds no outlier.
    """

    n_rounds: int
    n_particles: int
    n_coefficients: int
    automatic: bool = False


@dataclass(frozen=True)
class IterationDone:
    """One EM iteration finished.

    round : the 1-based pruning round it belongs to.
    iteration : EM iterations done in total.
    log_likelihood : mean log-likelihood per image before the iteration.
    n_kept : images the iteration ran on.
    started, finished : time.monotonic() at its start and end (seconds).
    """

    round: int
    iteration: int
    log_likelihood: float
    n_kept: int
    started: float
    finished: float


@dataclass(frozen=True)
class RoundDone:
    """A pruning round: the engine's SortRound and the subspaces as images.

    means : (M, box, box) float32, the subspace means through the basis.
    components : (M, n, box, box) float32, the top n components of each subspace.
    n_rounds : the number of rounds of the whole sort.
    """

    result: SortRound
    means: np.ndarray
    components: np.ndarray
    n_rounds: int


@dataclass(frozen=True)
class RunFailed:
    """The input or the parameters were rejected; ``message`` says why (and names the file)."""

    message: str


class _Cancelled(Exception):
    """Raised inside the coefficient computation when the run is cancelled."""


def run_sort(particles, settings: SortSettings, cancel: threading.Event, n_components_shown: int = 4,
             shown: threading.Event | None = None) -> Iterator:
    """Sort ``particles`` with ``settings``, yielding progress events (the classes of this module).

    Yields CoefficientsProgress while the coefficients are computed, SortStarted once, IterationDone
    after every EM iteration and RoundDone after every pruning round (the last one has
    ``result.done``; in the automatic mode that may come before ``SortStarted.n_rounds``), or RunFailed
    (then stops) when the data or the parameters are rejected.
    Stops quietly, before the next EM iteration, once ``cancel`` is set.

    With ``shown``, the sort pauses after each RoundDone until ``shown`` is set (by the GUI, once it
    has drawn the round), so that the GUI's update never competes with the sort for the CPU and the GIL.
    """
    try:
        prepared = yield from _prepare_coefficients(particles, settings, cancel)
        if prepared is None:
            return
        sorter = make_sorter(settings, prepared.basis)
        sorter.start(prepared.coefficients)
        n_rounds = len(sorter.schedule)
        yield SortStarted(n_rounds, prepared.coefficients.shape[0], prepared.coefficients.shape[1],
                          automatic=settings.outlier_threshold is not None)
        n_kept = prepared.coefficients.shape[0]
        round_number = 0
        while not sorter.finished:
            round_number += 1
            for _ in range(sorter.iterations_per_round):
                if cancel.is_set():
                    return
                started = time.monotonic()
                log_likelihood = sorter.em_step()
                yield IterationDone(round_number, sorter.model.n_iter_, float(log_likelihood), n_kept, started,
                                    time.monotonic())
            result = sorter.prune()
            n_kept = result.kept.size
            means, components = subspace_images(prepared.basis, result.parameters, n_components_shown)
            if shown is not None:
                shown.clear()
            yield RoundDone(result, means, components, n_rounds)
            if shown is not None and not _wait_unless_cancelled(shown, cancel):
                return
    except MemoryError as error:
        yield RunFailed(f"not enough memory for this sort ({error}); crop the box or sort fewer particles")
    except (ValueError, OSError) as error:
        yield RunFailed(str(error))


def _wait_unless_cancelled(event: threading.Event, cancel: threading.Event) -> bool:
    """Wait until ``event`` is set (True) or ``cancel`` is (False)."""
    while not event.wait(POLL_SECONDS):
        if cancel.is_set():
            return False
    return True


def _prepare_coefficients(particles, settings: SortSettings, cancel: threading.Event):
    """Compute the coefficients in a helper thread, yielding its progress; returns None if cancelled.

    prepare_coefficients reports progress through a callback; the helper thread lets this generator
    yield that progress (and stop at once when cancelled) while the computation runs.
    """
    updates: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict = {}
    abandoned = threading.Event()  # set when this generator stops early (cancelled, or closed by its worker)

    def report(done: int, total: int) -> None:
        if cancel.is_set() or abandoned.is_set():
            raise _Cancelled
        updates.put((done, total))

    def compute() -> None:
        try:
            outcome["prepared"] = prepare_coefficients(particles, settings, progress=report)
        except _Cancelled:
            pass
        except BaseException as error:  # handed over to the generator, which re-raises it
            outcome["error"] = error

    helper = threading.Thread(target=compute, name="ppcasort-coefficients", daemon=True)
    helper.start()
    try:
        while helper.is_alive() or not updates.empty():
            if cancel.is_set():
                return None
            try:
                done, total = updates.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            yield CoefficientsProgress(done, total)
    finally:
        abandoned.set()
    if "error" in outcome:
        raise outcome["error"]
    prepared: PreparedCoefficients | None = outcome.get("prepared")
    return prepared

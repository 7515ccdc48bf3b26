"""The run controller: starts a sort in a napari ``thread_worker``, cancels it, and stops it when the window closes.

One sort at a time: starting one cancels the running one, whose late signals are then ignored (each run has
a number; a signal of an older run is dropped). The sort pauses after each pruning round until the widget
has shown it (``round_shown``), so that drawing never competes with the sort for the CPU. No widgets here:
the events reach the widget through :attr:`RunController.event`, and the end of a run through
:attr:`RunController.finished` with its outcome.
"""

from __future__ import annotations

import threading
import time
import weakref

from napari.qt.threading import thread_worker
from qtpy.QtCore import QObject, Signal

from ._worker import RunFailed, run_sort

__all__ = ["RunController", "DONE", "CANCELLED", "FAILED", "SHUTDOWN_TIMEOUT"]

DONE, CANCELLED, FAILED = "done", "cancelled", "failed"
#: Longest wait (seconds) for a cancelled sort to stop when the viewer closes.
SHUTDOWN_TIMEOUT = 60.0


class RunController(QObject):
    """Runs :func:`~napari_ppcasort._worker.run_sort` in a worker thread.

    Signals:
        event(object): an event of the sort (CoefficientsProgress, SortStarted, IterationDone, RoundDone,
            SortFinished, RunFailed), on the main thread, for the current run only.
        finished(str): the current run ended: DONE, CANCELLED or FAILED; ``message`` says why it failed.
    """

    event = Signal(object)
    finished = Signal(str)

    def __init__(self, n_components_shown: int):
        super().__init__()
        self.n_components_shown = n_components_shown
        self.worker = None
        self.message = ""
        self.round_shown = threading.Event()
        self._cancel = threading.Event()
        self._run_number = 0
        self._outcome = DONE

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, particles, settings, dask_scheduler: str | None = None):
        """Start sorting ``particles`` with ``settings`` (cancelling a running sort), on the workers of the Dask
        scheduler at ``dask_scheduler`` if given; returns the worker."""
        self.shutdown()
        self._cancel = threading.Event()
        self.round_shown = threading.Event()
        self._outcome = DONE
        self.message = ""
        self._run_number += 1
        worker = thread_worker(run_sort, start_thread=False)(particles, settings, self._cancel,
                                                             self.n_components_shown, self.round_shown,
                                                             with_classes=True, dask_scheduler=dask_scheduler)
        worker.yielded.connect(_weak_slot(self, "_on_yielded", self._run_number))
        worker.finished.connect(_weak_slot(self, "_on_finished", self._run_number))
        worker.errored.connect(_weak_slot(self, "_on_crash", self._run_number))
        self.worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running sort to stop; it does before its next EM iteration (then ``finished(CANCELLED)``)."""
        if self.worker is None:
            return
        self._outcome = CANCELLED
        self._cancel.set()
        self.worker.quit()

    def shutdown(self) -> None:
        """Cancel a running sort and wait (at most one EM iteration) until its thread has stopped; its last
        signals are ignored."""
        worker = self.worker
        if worker is None:
            return
        self.cancel()
        self.worker = None
        self._run_number += 1
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        while worker.is_running and time.monotonic() < deadline:
            time.sleep(0.01)

    def _on_yielded(self, event) -> None:
        if isinstance(event, RunFailed):
            self._outcome = FAILED
            self.message = event.message
        self.event.emit(event)

    def _on_finished(self) -> None:
        self.worker = None
        self.finished.emit(self._outcome)

    def _on_crash(self, error: Exception) -> None:
        # napari shows the traceback as a notification; the widget shows the message
        self._outcome = FAILED
        self.message = f"{type(error).__name__}: {error}"


def _weak_slot(owner: QObject, name: str, run_number: int):
    """A slot calling ``owner.name(*args)`` while ``run_number`` is the owner's current run.

    It holds the owner weakly: napari keeps every worker in the window's task list, and a strong reference would
    keep the widget and the viewer alive.
    """
    reference = weakref.ref(owner)

    def slot(*args):
        controller = reference()
        if controller is not None and controller._run_number == run_number:
            getattr(controller, name)(*args)

    return slot

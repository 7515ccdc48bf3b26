"""The sort as the widget's napari ``thread_worker`` runs it: :func:`~napari_ppcasort.core.run.iter_sort`, with
its errors turned into a :class:`RunFailed` event that the widget shows.

Everything heavy (coefficients, EM, subspace images) happens in the worker thread, inside ``iter_sort``,
which yields after every chunk of the expansion and every EM iteration, so that a napari worker asked to
quit stops within one of them; no other thread is started. The events are small and cheap to show on the
main thread. No Qt in this module.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

from .core.distributed import dask_client
from .core.errors import PPCASortError
from .core.run import (CoefficientsProgress, IterationDone, RoundDone, SortFinished, SortStarted, iter_sort)
from .core.settings import CLUSTER_SETTINGS, SETTINGS, SortSettings

__all__ = ["CoefficientsProgress", "SortStarted", "IterationDone", "RoundDone", "SortFinished", "RunFailed",
           "run_sort", "widget_name"]


@dataclass(frozen=True)
class RunFailed:
    """The input or the parameters were rejected, or the computation failed; ``message`` says why (naming the
    file, and the settings by the widget's labels)."""

    message: str


#: How the widget names the options that are not settings.
OTHER_NAMES = {"force": 'Export\'s "Replace" (it asks when the folder holds results)'}


def widget_name(name: str, form: str = "") -> str:
    """How the widget names a setting in messages: its label in quotes (switched off: '"normalize" off')."""
    if name in OTHER_NAMES:
        return OTHER_NAMES[name]
    declaration = SETTINGS.get(name) or CLUSTER_SETTINGS.get(name)
    label = declaration.label if declaration is not None else name.replace("_", " ")
    return f'"{label}" off' if form == "off" else f'"{label}"'


def run_sort(particles, settings: SortSettings, cancel: threading.Event, n_components_shown: int = 4,
             shown: threading.Event | None = None, with_classes: bool = False,
             dask_scheduler: str | None = None) -> Iterator:
    """The events of :func:`~napari_ppcasort.core.run.iter_sort`, or RunFailed (then stops) when the data or the
    parameters are rejected or the computation fails. Stops quietly once ``cancel`` is set.

    dask_scheduler : the address of a running Dask scheduler (or its scheduler file) to sort on its workers, through
        a ``distributed.Client`` connected for this run (closed at its end); None sorts in this process. Without
        Dask, or when the scheduler cannot be reached, RunFailed names the "Dask scheduler" field and says why.
    """
    try:
        with dask_client(scheduler=dask_scheduler) as client:
            yield from iter_sort(particles, settings, cancel=cancel, n_components_shown=n_components_shown,
                                 shown=shown, with_classes=with_classes, client=client)
    except PPCASortError as error:
        yield RunFailed(error.describe(widget_name))

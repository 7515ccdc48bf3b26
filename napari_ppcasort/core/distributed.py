"""A sort on a Dask cluster (``pip install "napari-ppcasort[dask]"``): the chunks of the stack live on the workers.

    from distributed import Client, LocalCluster
    from napari_ppcasort import sort_particles

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:
        result = sort_particles("particles.star", client=client)

Each chunk of the stack is one task that reads its particles from the particle files (the workers must see
them at the paths the client sees), preprocesses them and expands them in the basis; its (c, L) float32
coefficients stay in the worker's memory for as long as the client holds the task's future.
:class:`DaskChunks` runs the loops of :class:`~napari_ppcasort.core.chunks.Chunks` (the E-step, the scores,
a re-seeding) as tasks on those chunks and sums their results in the same tree as the local sort; the
M-step and the kept mask stay on the client. Everything a worker holds is the result of a task the scheduler
can run again, so a worker that dies is replaced and its chunks are recomputed. See docs/scaling.md.

Dask itself is imported only when a sort is given a client (or ``--dask-workers``/``--dask-scheduler``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .chunks import FAN_IN, Chunks, default_chunk_size, sum_parts
from .errors import ComputeError, SettingsError, literal
from .particles import ArrayParticleSet, ParticleSet, open_particles
from .preprocess import BadImageError, Preprocessor

__all__ = ["INSTALL_HINT", "DaskChunks", "Traffic", "dask_client", "expansion_steps", "import_distributed",
           "load_chunk"]

#: What to run when the Dask options are used without Dask.
INSTALL_HINT = 'pip install "napari-ppcasort[dask]"'
#: Seconds to wait for the first worker of a scheduler given by address.
WORKER_WAIT_SECONDS = 60.0


def import_distributed(option: str = "dask_workers"):
    """The ``distributed`` module, or a SettingsError naming the setting ``option`` and how to install it."""
    try:
        import distributed
    except ImportError:
        raise SettingsError(f"{{{option}}} needs Dask (dask and distributed), which is not installed: "
                            f"{INSTALL_HINT}") from None
    return distributed


def require_dask(cluster) -> None:
    """For a :class:`~napari_ppcasort.core.settings.ClusterSettings` that asks for Dask: a SettingsError naming the
    setting that asks (``dask_workers``, else ``dask_scheduler``) and how to install Dask, when it is not."""
    if cluster.distributed:
        import_distributed("dask_workers" if cluster.dask_workers is not None else "dask_scheduler")


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None, *, timeout: float | None = None,
                worker_timeout: float = WORKER_WAIT_SECONDS):
    """A ``distributed.Client`` on a new LocalCluster of ``workers`` processes (one thread each), or connected to
    the running scheduler at ``scheduler`` (``tcp://host:8786``, as ``dask scheduler`` prints it, or the JSON file
    its ``--scheduler-file`` wrote); None when neither is given. Closed on exit (the LocalCluster too), which cancels whatever is still running.

    timeout: seconds to wait for the scheduler (default: Dask's ``distributed.comm.timeouts.connect``).
    SettingsError naming ``dask_scheduler`` when it cannot be reached or has no worker within
    ``worker_timeout``; SettingsError naming the option and the install command without Dask.
    """
    if workers is None and scheduler is None:
        yield None
        return
    if workers is not None and scheduler is not None:
        raise SettingsError("give {dask_workers} (a cluster on this machine) or {dask_scheduler} (a running "
                            "scheduler), not both")
    distributed = import_distributed("dask_workers" if workers is not None else "dask_scheduler")
    if workers is not None:
        # no dashboard, and its HTTP server (health, metrics) on any free local port, not on a busy 8787
        quiet = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
        with _interrupts_ignored():  # the worker processes ignore Ctrl-C: this process stops the sort and the cluster
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, scheduler_kwargs=quiet,
                                               silence_logs=logging.ERROR)
        with cluster, distributed.Client(cluster) as client, _quiet_interrupt():
            yield client
        return
    client = _connect(distributed, scheduler, timeout, worker_timeout)
    try:
        with _quiet_interrupt():
            yield client
    finally:
        client.close()


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT ignored while the block runs (in the main thread), so that the processes it starts inherit that: a
    Ctrl-C on the terminal, sent to the whole process group, then reaches this process only, which ends the sort
    and closes the cluster (instead of every worker printing its KeyboardInterrupt). A Ctrl-C during the few
    seconds the workers start is not seen."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _AbandonedGathers(logging.Filter):
    """Drops asyncio's report of a gather of the client that a Ctrl-C abandoned (distributed's ``AllExit``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and type(record.exc_info[1]).__name__ == "AllExit")


_ABANDONED_GATHERS = _AbandonedGathers()


@contextlib.contextmanager
def _quiet_interrupt():
    """On Ctrl-C (or SIGTERM), no 'Task exception was never retrieved' from asyncio for the gather the interrupt
    abandoned (only that report is dropped, from then on): the command line says it was interrupted, in one line."""
    try:
        yield
    except KeyboardInterrupt:
        logging.getLogger("asyncio").addFilter(_ABANDONED_GATHERS)  # adding it twice keeps one
        raise


def _connect(distributed, address: str, timeout: float | None, worker_timeout: float):
    where = literal(address)
    if address.endswith(".json") and not Path(address).is_file():
        raise SettingsError(f"{{dask_scheduler}} {where}: no such scheduler file (the one 'dask scheduler "
                            "--scheduler-file' writes)")
    target = {"scheduler_file": address} if Path(address).is_file() else {"address": address}
    if timeout is not None:
        target["timeout"] = timeout
    try:
        client = distributed.Client(**target)
    except (OSError, TimeoutError, ValueError) as error:
        reason = literal(str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise SettingsError(f"cannot reach the Dask scheduler at {where} given by {{dask_scheduler}} ({reason}); "
                            "start one with 'dask scheduler' (and workers with 'dask worker ADDRESS') or check the "
                            "address") from None
    try:
        client.wait_for_workers(1, timeout=worker_timeout)
    except (OSError, TimeoutError):
        client.close()
        raise SettingsError(f"the Dask scheduler at {where} given by {{dask_scheduler}} has no worker (waited "
                            f"{worker_timeout:g} s); start some with 'dask worker {where}'") from None
    return client


# -- what the client sends and receives ------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes (pickled sizes) the client sent to the cluster and received from it, and the tasks it submitted."""

    sent: int = 0
    received: int = 0
    tasks: int = 0


def _size(value) -> int:
    return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _identity(value):
    """A task that returns its argument: a value the workers share, which the scheduler can compute again."""
    return value


def _apply(func: Callable, coefficients: np.ndarray, mask_bits: np.ndarray | None, offset: int, constants: tuple):
    """``func(rows, offset, *constants)`` on a chunk's kept rows (float64), where the chunk is."""
    if mask_bits is None:
        rows = coefficients
    else:
        rows = coefficients[np.unpackbits(mask_bits, count=coefficients.shape[0]).view(bool)]
    return func(np.asarray(rows, dtype=np.float64), offset, *constants)


def _take_rows(coefficients: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(coefficients[rows], dtype=np.float64)


class DaskChunks(Chunks):
    """Chunks whose coefficients are held by Dask workers: one future per chunk (see the module docstring).

    client: the ``distributed.Client``; futures: one per chunk, each (c, L) float32 on a worker; keep_alive:
    futures the chunks were computed from (the basis), held so that a lost chunk can be recomputed.
    ``traffic`` counts what the client sent and received (shared by the copies :meth:`keep` makes).
    """

    def __init__(self, client, futures: list, n_total: int, n_features: int, chunk_size: int,
                 kept: np.ndarray | None = None, traffic: Traffic | None = None, keep_alive: tuple = ()):
        super().__init__(n_total, n_features, chunk_size, kept)
        if len(futures) != self.n_chunks:
            raise ValueError(f"expected one future per chunk ({self.n_chunks}), got {len(futures)}")
        self.client = client
        self.futures = list(futures)
        self.traffic = traffic if traffic is not None else Traffic()
        self.keep_alive = keep_alive

    def reduce(self, func: Callable, *args):
        parts = self._map(func, args)
        if not parts:
            raise ValueError("nothing to sum: no chunk holds a kept row")
        while len(parts) > 1:  # the tree of chunks.tree_sum, as tasks: the partial sums stay on the workers
            parts = [self._submit(sum_parts, *parts[start:start + FAN_IN]) for start in range(0, len(parts), FAN_IN)]
        return self._gather(parts)[0]

    def concat(self, func: Callable, *args) -> np.ndarray:
        parts = self._gather(self._map(func, args))
        return np.concatenate([np.asarray(part) for part in parts]) if parts else np.zeros(0)

    def take(self, positions) -> np.ndarray:
        indices = self.kept_indices()[np.asarray(positions, dtype=np.int64)]
        chunk_of = np.searchsorted(self.bounds, indices, side="right") - 1
        parts = [self._submit(_take_rows, self.futures[j], indices[chunk_of == j] - self.bounds[j])
                 for j in np.unique(chunk_of)]
        rows = self._gather(parts)
        return np.concatenate(rows) if rows else np.zeros((0, self.n_features))

    def release(self) -> None:
        """Let go of the chunks (a sort that stops half-way): the scheduler forgets their tasks, the workers free
        their memory. (Not ``client.cancel``, which fails inside the scheduler on chunks whose E-step tasks were
        already released.)"""
        for future in self.futures + list(self.keep_alive):
            future.release()

    def _with_kept(self, kept: np.ndarray) -> "DaskChunks":
        return DaskChunks(self.client, self.futures, self.n_total, self.n_features, self.chunk_size, kept,
                          self.traffic, self.keep_alive)

    # -- internals ---------------------------------------------------------------------------------------------
    def _map(self, func: Callable, args: tuple) -> list:
        """One task per chunk with kept rows: ``func`` on its rows, the ``args`` sent once for all of them."""
        active = self.active_chunks()
        if not active:
            return []
        self.traffic.sent += _size(args)
        constants = self._submit(_identity, args)
        parts = []
        for j in active:
            mask = self.chunk_mask(j)
            bits = None if mask.all() else np.packbits(mask)
            self.traffic.sent += 0 if bits is None else bits.nbytes
            parts.append(self._submit(_apply, func, self.futures[j], bits, int(self.offsets[j]), constants))
        return parts

    def _submit(self, func: Callable, *args):
        self.traffic.tasks += 1
        return self.client.submit(func, *args, pure=False)

    def _gather(self, futures: list) -> list:
        results = gather(self.client, futures)
        self.traffic.received += sum(_size(result) for result in results)
        return results


def gather(client, futures: list) -> list:
    """``client.gather(futures)``; a worker that keeps dying on a task, or a lost scheduler, is a ComputeError."""
    distributed = import_distributed()
    try:
        return client.gather(futures)
    except distributed.KilledWorker as error:
        raise ComputeError(f"a Dask worker died each time it ran a task of the sort ({literal(error)}); out of memory? "
                           "give the workers more memory, or lower {box_size} or {n_coefficients}") from None
    except distributed.client.FutureCancelledError as error:
        raise ComputeError(f"the Dask cluster cancelled the sort's tasks ({literal(error)}); was it shut down?") from None
    except distributed.comm.core.CommClosedError as error:
        raise ComputeError(f"lost the connection to the Dask scheduler ({literal(error)})") from None


# -- the chunks of the stack, on the workers ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileSource:
    """The particle file, opened once by each worker process (``path`` absolute, as the workers must see it)."""

    path: str

    def part(self, start: int, stop: int) -> "FileSource":
        return self

    def read(self, indices: np.ndarray):
        """(particle indices, (c, box, box) float32 images) in chunks of bounded memory."""
        yield from _opened(self.path).iter_chunks(indices)


@dataclass(frozen=True)
class ArrayPart:
    """Images held in memory (an array given to the sort): the task of each chunk carries that chunk's images.

    images: (c, box, box) float32, particles ``start`` to ``start + c - 1``.
    """

    images: np.ndarray
    start: int

    def read(self, indices: np.ndarray):
        part = ArrayParticleSet(self.images)
        for local, images in part.iter_chunks(np.asarray(indices) - self.start):
            yield local + self.start, images


class _ArraySource:
    def __init__(self, particles: ParticleSet):
        self.particles = particles

    def part(self, start: int, stop: int) -> ArrayPart:
        return ArrayPart(self.particles.read(np.arange(start, stop)), start)


def particle_source(particles: ParticleSet):
    """How a worker reads ``particles``: the file by its absolute path, or (an array) the chunk's images."""
    if isinstance(particles, ArrayParticleSet):
        return _ArraySource(particles)
    return FileSource(str(Path(particles.path).resolve()))


_OPENED: dict[tuple, ParticleSet] = {}
_OPENED_LOCK = threading.Lock()


def _opened(path: str) -> ParticleSet:
    """The particle set at ``path``, opened once per worker process (again if the file has changed)."""
    status = os.stat(path)
    key = (path, status.st_mtime_ns, status.st_size)
    with _OPENED_LOCK:
        if key not in _OPENED:
            for stale in [other for other in _OPENED if other[0] == path]:
                _OPENED.pop(stale).close()
            _OPENED[key] = open_particles(path)
        return _OPENED[key]


def chunk_preprocessor(preprocessor: Preprocessor, start: int, stop: int) -> Preprocessor:
    """The preprocessor for particles ``start`` to ``stop - 1`` only, called with indices from 0: its CTF holds
    those particles' values (not the whole set's)."""
    ctf = preprocessor.ctf
    if ctf is None:
        return preprocessor
    per_particle = {each.name: getattr(ctf, each.name)[start:stop] for each in fields(ctf)
                    if isinstance(getattr(ctf, each.name), np.ndarray)}
    return replace(preprocessor, ctf=replace(ctf, **per_particle))


def load_chunk(source, start: int, stop: int, preprocessor: Preprocessor, basis) -> np.ndarray:
    """(stop - start, L) float32, the coefficients of particles ``start`` to ``stop - 1``: read from ``source``,
    preprocessed by ``preprocessor`` (from :func:`chunk_preprocessor`) and expanded in ``basis``. A task."""
    out = np.empty((stop - start, basis.n_coefficients), dtype=np.float32)
    for indices, images in source.read(np.arange(start, stop)):
        try:
            prepared = preprocessor(images, indices - start)
        except BadImageError as error:
            raise error.of_particles(indices) from None
        out[indices - start] = basis.expand(prepared)
    return out


def expansion_steps(client, particles: ParticleSet, basis, preprocessor: Preprocessor, chunk_size: int | None = None):
    """:func:`napari_ppcasort.core.bases.expansion_steps` on the workers: one task per chunk of ``chunk_size``
    particles (default: :func:`~napari_ppcasort.core.chunks.default_chunk_size` of L). Yields (done, total)
    particles as the chunks finish and returns their :class:`DaskChunks`; the first failing chunk's error is
    raised (an InputError naming the particle for a bad image), and every task is cancelled."""
    distributed = import_distributed()
    n_total, n_features = particles.n_particles, basis.n_coefficients
    chunk_size = chunk_size or default_chunk_size(n_features)
    traffic = Traffic(sent=_size(basis))
    basis_future = client.submit(_identity, basis, pure=False)
    source = particle_source(particles)
    futures, sizes = [], {}
    for start in range(0, n_total, chunk_size):
        stop = min(start + chunk_size, n_total)
        part, chunk = source.part(start, stop), chunk_preprocessor(preprocessor, start, stop)
        traffic.sent += _size(part) + _size(chunk)
        futures.append(client.submit(load_chunk, part, start, stop, chunk, basis_future, pure=False))
        sizes[futures[-1].key] = stop - start
    traffic.tasks += len(futures) + 1
    try:
        done = 0
        for future in distributed.as_completed(futures):
            if future.status != "finished":
                gather(client, [future])  # raises the task's error
            done += sizes[future.key]
            yield done, n_total
    except BaseException:  # an error, the generator closed (cancel), Ctrl-C: nothing is left to run
        for future in futures + [basis_future]:
            future.release()
        raise
    return DaskChunks(client, futures, n_total, n_features, chunk_size, traffic=traffic, keep_alive=(basis_future,))

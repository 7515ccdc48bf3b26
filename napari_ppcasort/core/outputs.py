"""Writing outputs: output sets that appear all or nothing, the one atomic-write helper, streamed writers.

Output sets
-----------
The files of one run (a sort's kept and rejected sets, scores, parameters and report; a simulated stack)
are the user's curated data and live directly in an output folder that may hold other files too (even
the run's own input). :class:`OutputSet` writes them so that the folder shows either the complete previous
set or the complete new one:

1. **Lock.** ``.ppcasort.lock`` in the folder is locked (``fcntl.flock``, exclusive, non-blocking) for the
   whole run; a second run into the same folder is refused at once (:class:`OutputBusyError`). The lock
   file is removed when the run ends.
2. **Recover.** With the lock held, an interrupted commit of an earlier run is completed (rolled forward
   from its journal) and the staging and trash folders of dead runs are removed.
3. **Check, before any work.** The previous set (found by the caller, e.g. from its manifest) is refused
   unless ``force``; no file of the previous or the new set may be an input of the run (compared by
   ``os.path.samefile``); the free space must hold the estimated size; the folder must be writable.
4. **Stage.** Every file is written into the hidden folder ``.ppcasort-staging-<pid>-<token>`` inside the
   output folder (same file system, so the final renames are atomic), with plain writes (no memory maps:
   a full disk is an ``OSError``, turned into :class:`OutputWriteError` naming the final file) and modes
   from the umask. A failure or a signal removes the staging folder; SIGKILL leaves it for the next run
   to remove.
5. **Commit.** A journal ``.ppcasort-journal.json`` (written atomically) lists the old names and the new
   ones; then, with SIGINT and SIGTERM deferred, each old file is moved into ``.ppcasort-trash-<token>``,
   each staged file is renamed into place, the journal is removed and the trash deleted. The moves are
   idempotent, so a commit killed half-way is completed by :func:`recover` exactly as it would have ended.

Streamed writers
----------------
:func:`write_mrc_stack` writes the header with mrcfile and the images chunk by chunk with plain file
writes, so the memory used is one chunk whatever the size of the stack.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import InputError, OutputBusyError, OutputExistsError, OutputWriteError, literal

__all__ = [
    "OutputSet",
    "recover",
    "atomic_files",
    "atomic_write",
    "write_mrc_stack",
    "write_error",
    "LOCK_NAME",
    "JOURNAL_NAME",
    "STAGING_PREFIX",
    "TRASH_PREFIX",
]

LOCK_NAME = ".ppcasort.lock"
JOURNAL_NAME = ".ppcasort-journal.json"
STAGING_PREFIX = ".ppcasort-staging-"
TRASH_PREFIX = ".ppcasort-trash-"
#: Suffix of the temporary files of :func:`atomic_files` (``.<name>.<pid>.<token>.part``).
PART_SUFFIX = ".part"
#: The temporary files of atomic_files: .<name>.<pid>.<12 hex digits>.part
_PART_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{12}" + re.escape(PART_SUFFIX))
#: Free space kept in reserve beyond the estimated size of a set (bytes).
SPACE_MARGIN = 4 * 2**20


def write_error(path: Path, error: OSError) -> OutputWriteError:
    """An OutputWriteError naming the file the user will look for (not a temporary name)."""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return OutputWriteError(f"{literal(path)}: cannot be written ({literal(reason)}); nothing was left behind")


# -- the one atomic-write helper -------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_files(*finals) -> Iterator[list[Path]]:
    """Temporary names beside ``finals`` to write to; renamed into place when the block succeeds, removed
    when it fails. The files are created by their writers (modes from the umask).

        with atomic_files(folder / "a.star", folder / "a.mrcs") as (star, stack):
            write(star); write(stack)
    """
    finals = [Path(final) for final in finals]
    temporaries = [final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(6)}{PART_SUFFIX}")
                   for final in finals]
    try:
        yield temporaries
        for temporary, final in zip(temporaries, finals):
            _fsync_file(temporary)
        for temporary, final in zip(temporaries, finals):
            os.replace(temporary, final)
    finally:
        for temporary in temporaries:
            with contextlib.suppress(OSError):
                temporary.unlink()


def atomic_write(path, write: Callable, *, binary: bool = False) -> Path:
    """Write one file through :func:`atomic_files`: ``write(handle)`` fills it (text, or bytes with ``binary``).

    OutputWriteError naming ``path`` if it cannot be written.
    """
    path = Path(path)
    try:
        with atomic_files(path) as (temporary,):
            with open(temporary, "xb" if binary else "x", **({} if binary else {"newline": "", "encoding": "utf-8"})) \
                    as handle:
                write(handle)
    except OSError as error:
        if isinstance(error, OutputWriteError):
            raise
        raise write_error(path, error) from error
    return path


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# -- streamed writers ----------------------------------------------------------------------------------


def write_mrc_stack(path, n_images: int, box: int, chunks: Iterable[np.ndarray], voxel_size: float | None = None
                    ) -> None:
    """Write an MRC image stack (mode 2, float32, space group 0) of ``n_images`` images of box x box pixels.

    ``chunks`` yields (c, box, box) arrays in order, ``n_images`` images in all. The header (with mrcfile)
    comes first, then each chunk with a plain file write, then the header again with the statistics
    (min, max, mean, rms): memory one chunk, and a full disk is an OSError, never a SIGBUS.
    """
    from mrcfile.mrcinterpreter import MrcInterpreter

    header = MrcInterpreter()
    header._create_default_attributes()  # mrcfile's documented way to build a header for a write-only stream
    header._set_new_data(np.broadcast_to(np.float32(0), (n_images, box, box)))  # shape and dtype only
    header.update_header_from_data()
    header.set_image_stack()
    if voxel_size is not None:
        header.voxel_size = voxel_size
    total = total_squares = 0.0
    low, high = np.inf, -np.inf
    written = 0
    with open(path, "xb") as stream:
        stream.write(header.header.tobytes())
        stream.write(header.extended_header.tobytes())
        for block in chunks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.ndim != 3 or block.shape[1:] != (box, box):
                raise ValueError(f"expected chunks of {box} x {box} px images, got shape {block.shape}")
            stream.write(memoryview(block).cast("B"))
            written += block.shape[0]
            total += float(block.sum(dtype=np.float64))
            total_squares += float(np.einsum("nij,nij->", block, block, dtype=np.float64))
            low, high = min(low, float(block.min(initial=np.inf))), max(high, float(block.max(initial=-np.inf)))
        if written != n_images:
            raise ValueError(f"expected {n_images} images for {path}, got {written}")
        n_values = max(n_images * box * box, 1)
        mean = total / n_values
        record = header.header
        if n_images:
            record.dmin, record.dmax, record.dmean = low, high, mean
            record.rms = np.sqrt(max(total_squares / n_values - mean**2, 0.0))
        stream.seek(0)
        stream.write(record.tobytes())


# -- output sets ---------------------------------------------------------------------------------------


class OutputSet:
    """The files of one run in ``folder``, written into a staging folder and moved into place together.

    Args:
        folder: the output folder (created if missing; removed again if the run fails and it stays empty).
        previous: ``previous(folder) -> names`` of the files of the set already there (e.g. from its manifest);
            all of them are replaced by a commit.
        planned: every name the run may write (checked against the inputs before any work).
        force: replace a previous set; without it a previous set is refused (OutputExistsError).
        inputs: the run's input files (particle file and stacks, settings file, volume...): none of them may
            be replaced or removed.
        needed_bytes: estimated size of the new set, checked against the free space before any work.
        what: what the set is, for messages ("results", "a simulated stack named 'sim'").

    Use it as a context manager: entering locks, recovers and checks; :meth:`path` gives where to write each
    file; :meth:`commit` moves the set into place; leaving without a commit (an error, a signal) removes
    what was staged.
    """

    def __init__(self, folder, *, previous: Callable[[Path], list[str]], planned: Iterable[str] = (),
                 force: bool = False, inputs: Iterable = (), needed_bytes: int = 0, what: str = "results"):
        self.folder = Path(folder)
        self._previous = previous
        self.planned = list(planned)
        self.force = force
        self.inputs = [Path(path) for path in inputs if path is not None]
        self.needed_bytes = int(needed_bytes)
        self.what = what
        self.staging: Path | None = None
        self.names: list[str] = []
        self.committed = False
        self._lock_descriptor: int | None = None
        self._created: list[Path] = []
        self._journal_written = False

    # -- opening ---------------------------------------------------------------------------------------

    def __enter__(self) -> "OutputSet":
        try:
            self._open()
        except BaseException:
            self._release()
            raise
        return self

    def _open(self) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{literal(folder)}: exists and is not a folder")
        self._make_folder()
        self._lock()
        recover(folder)
        previous = sorted(set(self._previous(folder)))
        if previous and not self.force:
            raise OutputExistsError(f"{literal(folder)} already holds {self.what} ({', '.join(previous)}); choose "
                                    "another folder, or replace them with {force}")
        self._refuse_inputs(sorted(set(previous) | set(self.planned)))
        free = shutil.disk_usage(folder).free
        if free < self.needed_bytes + SPACE_MARGIN:
            raise InputError(f"{literal(folder)}: not enough free space for the {self.what}: about "
                             f"{_size(self.needed_bytes + SPACE_MARGIN)} needed, {_size(free)} free")
        staging = folder / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
        except OSError as error:
            raise InputError(f"{literal(folder)}: cannot write in the output folder ({literal(error.strerror)})"
                             ) from None
        self.staging = staging

    def _make_folder(self) -> None:
        missing = []
        parent = self.folder
        while not parent.exists():
            missing.append(parent)
            if parent.parent == parent:
                break
            parent = parent.parent
        self._created = missing  # deepest first: removed again, while empty, if the run fails
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"{literal(self.folder)}: cannot create the output folder "
                             f"({literal(error.strerror)})") from None

    def _lock(self) -> None:
        lock_path = self.folder / LOCK_NAME
        for _ in range(20):
            try:
                descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise InputError(f"{literal(self.folder)}: cannot write in the output folder "
                                 f"({literal(error.strerror)})") from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(descriptor)
                os.close(descriptor)
                raise OutputBusyError(
                    f"{literal(self.folder)}: another ppcasort run{f' (process {holder})' if holder else ''} is "
                    "writing its results in this folder; wait for it to end, or choose another folder") from None
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(descriptor)
                    raise
                # a file system without locks: go on unlocked rather than not at all
            # the lock file may have been removed (by the run that held it) between open and flock: retry
            try:
                same = os.path.samestat(os.fstat(descriptor), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{os.getpid()}\n".encode())
                self._lock_descriptor = descriptor
                return
            os.close(descriptor)
        raise OutputBusyError(f"{literal(self.folder)}: the lock of the output folder keeps changing; another run "
                              "is starting here")

    def _refuse_inputs(self, names: list[str]) -> None:
        for name in names:
            target = self.folder / name
            for source in self.inputs:
                if _same_file(target, source):
                    raise InputError(
                        f"{literal(target)}: refusing to overwrite an input file of this run"
                        f"{'' if target.resolve() == source.resolve() else f' ({literal(source)})'}; choose another "
                        "output folder")

    # -- staging ---------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` of the set now (inside the staging folder)."""
        if self.staging is None or self.committed:
            raise RuntimeError("the output set is not open for writing")
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"an output name must be a plain visible file name, got {name!r}")
        if name not in self.names:
            self.names.append(name)
        return self.staging / name

    def final_path(self, name: str) -> Path:
        """Where the file ``name`` will be once the set is committed."""
        return self.folder / name

    def write_error(self, error: OSError, name: str | None = None) -> OutputWriteError:
        """An OutputWriteError for a failure while staging, naming the final file (``name``, or the one the
        error names)."""
        if isinstance(error, OutputWriteError):
            return error
        if name is None and error.filename:
            written = Path(error.filename).name  # a staged file, or a temporary name of one (.NAME.<...>)
            name = next((each for each in self.names if written == each or written.startswith(f".{each}.")), None)
        return write_error(self.folder / name if name else self.folder, error)

    # -- committing ------------------------------------------------------------------------------------

    def commit(self) -> list[Path]:
        """Replace the previous set by the staged files; returns the final paths of the new set."""
        if self.staging is None or self.committed:
            raise RuntimeError("the output set is not open for writing")
        missing = [name for name in self.names if not (self.staging / name).exists()]
        if missing:
            raise RuntimeError(f"staged files missing: {missing}")
        old = sorted(set(self._previous(self.folder)) | {name for name in self.names
                                                         if os.path.lexists(self.folder / name)})
        self._refuse_inputs(old + self.names)
        for name in self.names:
            _fsync_file(self.staging / name)
        _fsync_folder(self.staging)
        journal = {"staging": self.staging.name, "trash": f"{TRASH_PREFIX}{secrets.token_hex(4)}", "old": old,
                   "new": list(self.names)}
        with _signals_deferred():  # from the journal on, the commit goes to its end (or is rolled forward)
            try:
                atomic_write(self.folder / JOURNAL_NAME, lambda handle: json.dump(journal, handle))
            except OutputWriteError as error:
                raise write_error(self.folder, error.__cause__ or error) from error
            self._journal_written = True
            try:
                _roll_forward(self.folder, journal)
            except OSError as error:
                raise OutputWriteError(
                    f"{literal(self.folder)}: the new {self.what} could not be moved into place "
                    f"({literal(error.strerror or str(error))}); the next ppcasort run into this folder completes "
                    "the move") from error
            self.committed = True  # before a deferred signal is raised
        return [self.folder / name for name in self.names]

    # -- closing ---------------------------------------------------------------------------------------

    def __exit__(self, *exc_info) -> None:
        self._release()

    def _release(self) -> None:
        if self.staging is not None and not self.committed and not self._journal_written:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock_descriptor is not None:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(self._lock_descriptor), os.stat(self.folder / LOCK_NAME)):
                    os.unlink(self.folder / LOCK_NAME)
            os.close(self._lock_descriptor)  # releases the lock
            self._lock_descriptor = None
        if not self.committed:
            for folder in self._created:  # deepest first; only while empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def recover(folder) -> None:
    """Complete an interrupted commit in ``folder`` (roll forward from its journal) and remove the staging and
    trash folders and temporary files of dead runs. Call it only while holding the folder's lock (an
    OutputSet does)."""
    folder = Path(folder)
    journal_path = folder / JOURNAL_NAME
    if journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text())
            valid = all(isinstance(journal.get(key), str) for key in ("staging", "trash")) and \
                all(isinstance(journal.get(key), list) for key in ("old", "new"))
        except (ValueError, OSError):
            valid = False
        if valid:
            _roll_forward(folder, journal)
        else:
            journal_path.unlink(missing_ok=True)
    for entry in folder.iterdir():
        name = entry.name
        if name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif _PART_NAME.fullmatch(name) and not _process_alive(int(_PART_NAME.fullmatch(name).group(1))):
            entry.unlink(missing_ok=True)


def _roll_forward(folder: Path, journal: dict) -> None:
    """Move the old files aside and the staged ones into place, idempotently (see the module docstring)."""
    staging, trash = folder / journal["staging"], folder / journal["trash"]
    new = set(journal["new"])
    trash.mkdir(exist_ok=True)
    for name in journal["old"]:
        if name in new and not (staging / name).exists():
            continue  # already replaced by the new file
        if os.path.lexists(folder / name):
            os.replace(folder / name, trash / name)
    for name in journal["new"]:
        if os.path.lexists(staging / name):
            os.replace(staging / name, folder / name)
    _fsync_folder(folder)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)
    _fsync_folder(folder)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block ends (main thread only: elsewhere Python does not handle them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received:
            signal.raise_signal(number)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return os.path.lexists(a) and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _read_pid(descriptor: int) -> int | None:
    try:
        return int(os.pread(descriptor, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes} bytes"

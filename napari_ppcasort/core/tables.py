"""Tables that cost seconds to compute and depend only on a few numbers (the PSWF basis of a box, a disk radius and
a size), kept on disk between runs and in memory within one.

    arrays = cached_tables("pswf", {"box_size": 64, "radius": 29.5, ...}, compute)   # compute() -> {name: array}

Where: ``$PPCASORT_CACHE_DIR``, else ``$XDG_CACHE_HOME/napari-ppcasort``, else ``~/.cache/napari-ppcasort``; an
empty ``PPCASORT_CACHE_DIR`` turns the disk cache off. Each table is one ``<kind>-<hash>.npz`` (the hash of its
key and of :data:`TABLES_VERSION`), written under a temporary name and renamed into place. A cached file is
used only if it reads back whole with the same key; anything else (a truncated or foreign file, a folder that
cannot be written) is computed as if there were no cache: the cache only saves time, it never fails a sort.
Within a process the last :data:`MEMORY_ENTRIES` tables are kept too, read-only (they are shared by the objects
built from them). Plain NumPy, no Qt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from .outputs import atomic_write

__all__ = ["cached_tables", "cache_folder", "TABLES_VERSION", "MEMORY_ENTRIES"]

#: Part of every key: raise it when a table's computation changes, so that older files are not used.
TABLES_VERSION = 1
#: Tables kept in memory within one process.
MEMORY_ENTRIES = 8

_memory: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()


def cache_folder() -> Path | None:
    """The folder of the disk cache, or None when it is turned off (``PPCASORT_CACHE_DIR=""``)."""
    configured = os.environ.get("PPCASORT_CACHE_DIR")
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-ppcasort"


def cached_tables(kind: str, key: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays ``compute()`` returns for ``key`` (JSON-serialisable numbers and texts; floats are compared
    exactly), from memory or the disk cache when they were computed before. The arrays are read-only."""
    text = json.dumps({"kind": kind, "version": TABLES_VERSION, **key}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    if digest in _memory:
        _memory.move_to_end(digest)
        return _memory[digest]
    folder = cache_folder()
    path = None if folder is None else folder / f"{kind}-{digest}.npz"
    arrays = _read(path, text) if path is not None else None
    if arrays is None:
        arrays = {name: np.asarray(value) for name, value in compute().items()}
        if path is not None:
            _write(path, text, arrays)
    for array in arrays.values():
        array.setflags(write=False)
    _memory[digest] = arrays
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)
    return arrays


def _read(path: Path, text: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file written for the key ``text``, or None (missing, unreadable, another key)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if "__key__" not in stored.files or str(stored["__key__"]) != text:
                return None
            return {name: stored[name] for name in stored.files if name != "__key__"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write(path: Path, text: str, arrays: dict[str, np.ndarray]) -> None:
    """Store the arrays for the key ``text``; a folder that cannot be written is skipped (nothing is left)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: np.savez(handle, __key__=np.array(text), **arrays), binary=True)

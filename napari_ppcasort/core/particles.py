"""Particle sets on disk: MRC stacks, RELION STAR and cryoSPARC .cs files in; curated subsets out.

A :class:`ParticleSet` holds the metadata table of a particle set in memory and reads the images lazily
from its MRC stacks (mapped to check them and to know their layout; read with plain reads, see
:func:`read_rows`), so stacks larger than RAM are never loaded whole and never mapped into memory. Open one with
:func:`open_particles`; write a subset of it with :func:`write_particles`.

Supported inputs
----------------
* ``.mrc`` / ``.mrcs``: an image stack (nz images of ny x nx pixels) or a single 2-D image (a stack of 1).
  Data modes 0 (int8), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16); images come out as float32.
* ``.star``: RELION 3.0, 3.1 and 5.0 particle tables. Blocks are found by name: ``particles`` (and
  ``optics`` when present); a RELION 3.0 file's single particle block (named ``""``, ``images``,
  ``model_class_1``, ...) is the block that has ``rlnImageName``. Image names are ``index@stack`` with a
  1-based index (zero-padded or not); a name without ``@`` is a single-image file.
* ``.cs``: cryoSPARC particle records (a NumPy structured array) with ``blob/path``, ``blob/idx``
  (0-based), ``blob/shape`` and ``blob/psize_A``. A ``>`` in front of ``blob/path`` marks a
  project-relative path. The compressed cryoSPARC format (``\\x95CSDAT``) is not supported.

Finding the stacks
------------------
A relative stack path from a STAR or .cs file is looked up, in this order, in the folder of that file, in
each of its parent folders (RELION and cryoSPARC write paths relative to the project folder, which is
usually one or two levels up), and finally by its bare file name next to the metadata file.

Metadata without images
-----------------------
A STAR or .cs file opens even when some or all of its stacks are missing, as long as the box size is known
(from the stacks that are present, ``rlnImageSize`` in the optics table, or ``blob/shape``): the table, the
count, the box and the pixel size are then available, :attr:`ParticleSet.missing_stacks` lists what was not
found, and reading an image of a missing stack raises :class:`ParticleFileError` naming that stack.
Every stack that is present is checked at open time (readable MRC, square images, one box size, every
index in range).
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import mrcfile
import numpy as np

from .errors import InputError
from .outputs import atomic_files, write_error, write_mrc_stack

if TYPE_CHECKING:  # pandas is imported where a table is built, not with this module (start-up of the CLI)
    import pandas as pd

__all__ = ["ArrayParticleSet", "FORMATS", "PARTICLE_SUFFIXES", "ParticleFileError", "ParticleFormat", "ParticleSet",
           "open_particles", "write_particles", "write_subset", "subset_paths", "input_files"]

#: Default amount of image data (bytes, float32) per chunk of :meth:`ParticleSet.iter_chunks`.
CHUNK_BYTES = 64 * 2**20
#: Number of stacks kept memory-mapped at once by one ParticleSet (RELION writes one stack per micrograph).
MAX_OPEN_STACKS = 64
#: Largest relative spread of per-particle pixel sizes that still counts as one pixel size.
PIXEL_SIZE_TOLERANCE = 0.02

_READABLE_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float16, np.int8, np.int16, np.uint16))
_CS_COMPRESSED_MAGIC = b"\x95CSDAT"
_CS_REQUIRED_FIELDS = ("blob/path", "blob/idx", "blob/shape")


class ParticleFileError(InputError):
    """A particle file (stack, STAR or .cs) is missing, unreadable or inconsistent.

    The message always names the offending file and says what is wrong with it (plain text, no placeholders).
    """

    uses_placeholders = False


class ParticleSet:
    """One particle set on disk: its metadata table plus lazily read images.

    Create it with :func:`open_particles`; the constructor expects already parsed metadata.

    Attributes:
        path: the file the user opened (``.mrc``/``.mrcs`` stack, ``.star`` or ``.cs``).
        kind: ``"stack"``, ``"star"`` or ``"cs"``.
        n_particles: number of particles (rows of :attr:`table`).
        box_size: image side length in pixels (images are square).
        pixel_size: Angstrom per pixel, or None when no file records it.
        table: one row per particle, in file order, with all original columns (STAR: the particle block;
            stack: a single ``rlnImageName`` column; cs: one column per field, a field of shape (k,)
            split into columns ``name[0]`` ... ``name[k-1]``, byte strings decoded).
        optics: the RELION >= 3.1 optics block, else None.
        records: ``.cs`` only: the original structured records, shape (n_particles,); else None.
        stack_paths: the image stacks, resolved (for a missing stack: where it was first looked for).
        missing_stacks: the entries of :attr:`stack_paths` that do not exist.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        table: pd.DataFrame,
        stack_names: list[str],
        stack_index: np.ndarray,
        slice_index: np.ndarray,
        *,
        optics: pd.DataFrame | None = None,
        records: np.ndarray | None = None,
        metadata_box_size: int | None = None,
        box_size_is_binding: bool = False,
        metadata_pixel_size: float | None = None,
        star_blocks: dict | None = None,
        particle_block: str | None = None,
    ):
        """
        Args:
            path: metadata file or stack the set was opened from.
            kind: "stack", "star" or "cs".
            table: per-particle metadata, n_particles rows.
            stack_names: stack paths as written in the metadata, one per distinct stack.
            stack_index: (n_particles,) int, index into ``stack_names`` of each particle.
            slice_index: (n_particles,) int, 0-based image index inside its stack.
            optics: RELION optics block, if any.
            records: .cs structured records, if any.
            metadata_box_size: box size (px) recorded in the metadata, used when no stack is present.
            box_size_is_binding: True when the metadata box size describes the stored images (.cs
                ``blob/shape``), so a stack of another size is an error; False when it is only a hint
                (RELION ``rlnImageSize``, which the stacks override).
            metadata_pixel_size: pixel size (Angstrom) from the metadata; None to use the MRC header.
            star_blocks: all blocks of the STAR file (written back around the particle block).
            particle_block: name of the particle block in ``star_blocks``.
        """
        self.path = Path(path)
        self.kind = kind
        self.table = table
        self.optics = optics
        self.records = records
        self.n_particles = len(table)
        self._stack_names = stack_names
        self._stack_index = np.asarray(stack_index, dtype=np.intp)
        self._slice_index = np.asarray(slice_index, dtype=np.int64)
        self._star_blocks = star_blocks
        self._particle_block = particle_block
        self._open_stacks: OrderedDict[int, tuple[mrcfile.mrcmemmap.MrcMemmap, np.ndarray]] = OrderedDict()
        self._lock = threading.RLock()

        if self.n_particles == 0:
            raise ParticleFileError(f"{self.path}: contains no particles")
        if np.any(self._slice_index < 0):
            row = int(np.flatnonzero(self._slice_index < 0)[0])
            raise ParticleFileError(f"{self.path}: particle {row} has a negative image index")

        resolved = [_resolve_stack(name, self.path.parent) for name in stack_names]
        self.stack_paths = [stack_path for stack_path, _ in resolved]
        self._stack_found = np.array([found for _, found in resolved], dtype=bool)
        self.missing_stacks = [stack_path for stack_path, found in resolved if not found]

        stack_box, header_pixel_size = self._check_present_stacks()
        if stack_box is not None:
            if box_size_is_binding and metadata_box_size is not None and stack_box != metadata_box_size:
                raise ParticleFileError(
                    f"{self.path}: the metadata says the images are {metadata_box_size} px but the "
                    f"stacks hold {stack_box} px images")
            self.box_size = stack_box
        elif metadata_box_size is not None:
            self.box_size = int(metadata_box_size)
        else:
            raise ParticleFileError(
                f"{self.path}: image stack {self.missing_stacks[0]} not found and the metadata does not "
                "record the box size")
        self.pixel_size = metadata_pixel_size if metadata_pixel_size is not None else header_pixel_size

    # -- public API ------------------------------------------------------------------------------------

    def locations(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each particle's image is stored.

        Returns:
            (stack_index, slice_index): two (n_particles,) integer arrays; ``stack_index`` indexes
            :attr:`stack_paths`, ``slice_index`` is the 0-based image index inside that stack.
        """
        return self._stack_index.copy(), self._slice_index.copy()

    def read(self, indices) -> np.ndarray:
        """Read the images of the given particles.

        Only the requested images are read, with one plain read per run of consecutive images of a stack
        (:func:`read_rows`): the memory used is the result, whatever the size of the stacks.

        Args:
            indices: particle indices (0-based rows of :attr:`table`), any order, repeats allowed.

        Returns:
            (len(indices), box_size, box_size) float32 images, in the order of ``indices``.

        Raises:
            IndexError: an index outside [0, n_particles).
            ParticleFileError: a stack is missing or unreadable, or an image has NaN or infinite pixels.
        """
        indices = self._check_indices(indices)
        images = np.empty((indices.size, self.box_size, self.box_size), dtype=np.float32)
        if indices.size == 0:
            return images
        stacks = self._stack_index[indices]
        slices = self._slice_index[indices]
        order = np.lexsort((slices, stacks))
        group_starts = np.flatnonzero(np.diff(stacks[order], prepend=-1))
        for positions in np.split(order, group_starts[1:]):
            stack = int(stacks[positions[0]])
            unique_slices, inverse = np.unique(slices[positions], return_inverse=True)
            with self._lock:  # another thread may close a map the cache lets go: read its file and layout here
                stack_images = self._stack_data(stack)
                source = _file_of(stack_images)
                if source is None:
                    block = read_rows(stack_images, unique_slices)
            if source is not None:
                block = _pread_rows(*source, stack_images.dtype, stack_images.shape[1:], unique_slices)
            block = block.astype(np.float32, copy=False)
            # A float64 sum of float32 pixels cannot overflow, so it is finite exactly when every pixel is.
            finite = np.isfinite(block.sum(axis=(1, 2), dtype=np.float64))
            if not finite.all():
                bad_slice = int(unique_slices[np.argmin(finite)])
                bad_particle = int(indices[positions[slices[positions] == bad_slice][0]])
                raise ParticleFileError(
                    f"{self.stack_paths[stack]}: image {bad_slice + 1} (particle {bad_particle} of "
                    f"{self.path}) contains NaN or infinite pixels")
            images[positions] = block if unique_slices.size == positions.size else block[inverse]
        return images

    def iter_chunks(self, indices=None, chunk_size: int | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate over particle images in chunks of bounded memory.

        Args:
            indices: particle indices to visit, in this order (default: all, in file order).
            chunk_size: images per chunk (default: about ``CHUNK_BYTES`` of float32 images).

        Yields:
            (chunk_indices, images): (c,) int64 particle indices and (c, box_size, box_size) float32 images.
        """
        indices = np.arange(self.n_particles) if indices is None else self._check_indices(indices)
        for chunk in index_chunks(indices, self.box_size, chunk_size):
            yield chunk, self.read(chunk)

    def close(self) -> None:
        """Release the memory-mapped stacks. A later read maps them again."""
        with self._lock:
            while self._open_stacks:
                _, (mrc, _) = self._open_stacks.popitem(last=False)
                mrc.close()

    def __enter__(self) -> ParticleSet:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ParticleSet({str(self.path)!r}, kind={self.kind!r}, n_particles={self.n_particles}, "
                f"box_size={self.box_size}, pixel_size={self.pixel_size}, stacks={len(self.stack_paths)})")

    # -- internals -------------------------------------------------------------------------------------

    def _check_indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise IndexError(f"particle indices must be a 1-D integer array, got shape {indices.shape} "
                             f"of {indices.dtype}")
        indices = indices.astype(np.int64, copy=False)
        outside = (indices < 0) | (indices >= self.n_particles)
        if outside.any():
            raise IndexError(f"particle index {indices[outside][0]} out of range for the "
                             f"{self.n_particles} particles of {self.path}")
        return indices

    def _stack_data(self, stack: int) -> np.ndarray:
        """The (n_images, box, box) memory-mapped images of one stack (kept in a small LRU cache)."""
        if stack in self._open_stacks:
            self._open_stacks.move_to_end(stack)
            return self._open_stacks[stack][1]
        if not self._stack_found[stack]:
            written = self._stack_names[stack]
            raise ParticleFileError(
                f"{self.path}: image stack {written!r} not found (looked in {self.path.parent}, its parent "
                f"folders, and for {Path(written).name} in {self.path.parent})")
        mrc, images = _map_stack(self.stack_paths[stack])
        self._open_stacks[stack] = (mrc, images)
        if len(self._open_stacks) > MAX_OPEN_STACKS:
            _, (oldest, _) = self._open_stacks.popitem(last=False)
            oldest.close()
        return images

    def _check_present_stacks(self) -> tuple[int | None, float | None]:
        """Check every stack that exists: one square box size, every image index in range.

        Returns:
            (box_size, header_pixel_size): box size of the stacks (None when none is present) and the
            voxel size of the first present stack's header (None when 0, i.e. not recorded).
        """
        n_stacks = len(self.stack_paths)
        last_slice = np.full(n_stacks, -1, dtype=np.int64)
        np.maximum.at(last_slice, self._stack_index, self._slice_index)
        box_size = header_pixel_size = None
        first_present = None
        with self._lock:
            for stack, stack_path in enumerate(self.stack_paths):
                if not self._stack_found[stack] or last_slice[stack] < 0:
                    continue
                images = self._stack_data(stack)
                if box_size is None:
                    box_size, first_present = images.shape[1], stack_path
                    voxel_size = float(self._open_stacks[stack][0].voxel_size.x)
                    header_pixel_size = voxel_size if voxel_size > 0 else None
                elif images.shape[1] != box_size:
                    raise ParticleFileError(
                        f"{self.path}: mixed box sizes: {first_present} holds {box_size} px images but "
                        f"{stack_path} holds {images.shape[1]} px images")
                if last_slice[stack] >= images.shape[0]:
                    rows = np.flatnonzero((self._stack_index == stack) & (self._slice_index >= images.shape[0]))
                    raise ParticleFileError(
                        f"{self.path}: particle {rows[0]} asks for image {self._slice_index[rows[0]] + 1} "
                        f"(1-based) of {stack_path}, which holds only {images.shape[0]} images")
        return box_size, header_pixel_size


# -- opening -------------------------------------------------------------------------------------------

class ArrayParticleSet(ParticleSet):
    """A particle set whose images come from an array instead of MRC files (a napari layer's data, a
    simulated stack, ``mrcfile.mmap(path).data``).

    It behaves like a ParticleSet opened from an ``.mrcs`` stack: a table with one ``rlnImageName`` per
    image (plus any extra columns), ``read`` and ``iter_chunks``, and it can be written out with
    :func:`write_particles` (as a new ``.mrcs`` + ``.star``). Only the requested images are read. For a
    memory-mapped array the pages read are unmapped again after each read (see
    :func:`release_mapped_pages`), so the resident set stays about one chunk.

    Args:
        images: (n, box, box) array-like supporting integer-array indexing on the first axis (NumPy,
            ``np.memmap``, dask, a napari ParticleStack).
        name: what the set is called in messages and image names (its stand-in stack is ``<name>.mrcs``).
        columns: optional per-image columns to add to the table (each of length n).
        pixel_size: Angstrom per pixel, or None.
    """

    def __init__(self, images, name: str = "array", columns: dict[str, np.ndarray] | None = None,
                 pixel_size: float | None = None):
        import pandas as pd

        shape = tuple(getattr(images, "shape", np.shape(images)))
        if len(shape) != 3 or shape[1] != shape[2] or shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty stack of square images (n, box, box), got shape {shape}")
        self._images = images
        self.name = name
        stack_name = f"<{name}>.mrcs"
        table = pd.DataFrame({"rlnImageName": [f"{k:06d}@{stack_name}" for k in range(1, shape[0] + 1)]})
        for column, values in (columns or {}).items():
            table[column] = np.asarray(values)
        super().__init__(Path(stack_name), "stack", table, [stack_name], np.zeros(shape[0], dtype=np.intp),
                         np.arange(shape[0]), metadata_box_size=shape[1], metadata_pixel_size=pixel_size,
                         star_blocks={"particles": table}, particle_block="particles")
        self.missing_stacks = []  # the images are the array, not a file

    def read(self, indices) -> np.ndarray:
        """(len(indices), box, box) float32 images, in the order of ``indices`` (see ParticleSet.read)."""
        indices = self._check_indices(indices)
        if isinstance(self._images, np.memmap):  # a file: plain reads of the images asked for (see read_rows)
            unique, inverse = np.unique(indices, return_inverse=True)
            images = read_rows(self._images, unique).astype(np.float32, copy=False)
            images = images if unique.size == indices.size and np.array_equal(unique, indices) else images[inverse]
        else:
            images = np.asarray(self._images[indices], dtype=np.float32)  # integer indexing copies
        finite = np.isfinite(images.sum(axis=(1, 2), dtype=np.float64))
        if not finite.all():
            raise ParticleFileError(f"{self.name}: image {int(indices[np.argmin(finite)])} contains NaN or infinite "
                                    "pixels")
        return images

    def __repr__(self) -> str:
        return f"ArrayParticleSet({self.name!r}, n_particles={self.n_particles}, box_size={self.box_size})"


def open_particles(path) -> ParticleSet:
    """Open a particle set: an MRC stack (``.mrc``/``.mrcs``), a RELION ``.star`` or a cryoSPARC ``.cs``.

    Args:
        path: the file to open.

    Returns:
        The ParticleSet (close it, or use it as a context manager, to release the memory maps).

    Raises:
        ParticleFileError: the file is missing, of an unknown type, unreadable or inconsistent.
    """
    path = Path(path)
    if not path.exists():
        raise ParticleFileError(f"{path}: no such file")
    if not path.is_file():
        raise ParticleFileError(f"{path}: not a file")
    suffix = path.suffix.lower()
    for particle_format in FORMATS.values():
        if suffix in particle_format.suffixes:
            return particle_format.open(path)
    raise ParticleFileError(f"{path}: unknown file type {suffix!r}; expected {', '.join(PARTICLE_SUFFIXES[:-1])} or "
                            f"{PARTICLE_SUFFIXES[-1]}")


def _open_stack(path: Path) -> ParticleSet:
    import pandas as pd

    mrc, images = _map_stack(path)
    n_images = images.shape[0]
    mrc.close()
    width = max(6, len(str(n_images)))
    table = pd.DataFrame({"rlnImageName": [f"{k:0{width}d}@{path.name}" for k in range(1, n_images + 1)]})
    return ParticleSet(path, "stack", table, [path.name], np.zeros(n_images, dtype=np.intp),
                       np.arange(n_images), star_blocks={"particles": table}, particle_block="particles")


def _open_star(path: Path) -> ParticleSet:
    import pandas as pd
    import starfile

    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as error:  # starfile does not document its failure modes
        raise ParticleFileError(f"{path}: cannot be read as a STAR file ({type(error).__name__}: {error})"
                                ) from error
    block_name = _particle_block_name(blocks, path)
    particles = blocks[block_name]
    if len(particles) == 0:
        raise ParticleFileError(f"{path}: contains no particles (data_{block_name} is empty)")
    optics = blocks.get("optics")
    if not isinstance(optics, pd.DataFrame):
        optics = None

    image_names = particles["rlnImageName"].astype(str).str.strip()
    has_at = image_names.str.contains("@", regex=False)
    split = image_names.str.split("@", n=1)
    index_text = split.str[0].where(has_at, "1")
    stack_text = split.str[1].where(has_at, image_names)
    numbers = pd.to_numeric(index_text, errors="coerce")
    bad = numbers.isna() | (numbers < 1) | (numbers != np.floor(numbers)) | (stack_text.str.len() == 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ParticleFileError(f"{path}: particle {row} has rlnImageName {image_names.iloc[row]!r}, "
                                "expected index@stack with a 1-based index")
    stack_index, stack_names = pd.factorize(stack_text)

    pixel_sizes = _star_pixel_sizes(particles, optics, path)
    box_sizes = _optics_values(particles, optics, "rlnImageSize", path)
    if box_sizes is not None and np.unique(box_sizes).size > 1:
        raise ParticleFileError(f"{path}: mixed box sizes in rlnImageSize: {sorted(set(box_sizes.tolist()))}")
    return ParticleSet(
        path, "star", particles, list(stack_names), stack_index, numbers.to_numpy(np.int64) - 1,
        optics=optics,
        metadata_box_size=None if box_sizes is None else int(box_sizes[0]),
        metadata_pixel_size=None if pixel_sizes is None else _common_pixel_size(pixel_sizes, path),
        star_blocks=blocks, particle_block=block_name)


def _particle_block_name(blocks: dict, path: Path) -> str:
    """Name of the particle block: ``particles``, else the one block with an ``rlnImageName`` column."""
    import pandas as pd

    if "particles" in blocks:
        candidates = ["particles"]
    else:
        candidates = [name for name, block in blocks.items()
                      if isinstance(block, pd.DataFrame) and "rlnImageName" in block.columns]
    if not candidates:
        raise ParticleFileError(f"{path}: no particle table (no data_particles block and no block with "
                                "rlnImageName)")
    if len(candidates) > 1:
        raise ParticleFileError(f"{path}: several blocks have rlnImageName ({', '.join(map(repr, candidates))}) "
                                "and none is called particles")
    block = blocks[candidates[0]]
    if not isinstance(block, pd.DataFrame) or "rlnImageName" not in block.columns:
        raise ParticleFileError(f"{path}: block data_{candidates[0]} is not a loop with rlnImageName")
    return candidates[0]


def _optics_values(particles: pd.DataFrame, optics: pd.DataFrame | None, label: str,
                   path: Path) -> np.ndarray | None:
    """Per-particle values of an optics-table label, through rlnOpticsGroup; None if there is no such label."""
    import pandas as pd

    if optics is None or label not in optics.columns or len(optics) == 0:
        return None
    if len(optics) == 1:
        return np.full(len(particles), optics[label].iloc[0])
    if "rlnOpticsGroup" not in optics.columns or "rlnOpticsGroup" not in particles.columns:
        raise ParticleFileError(f"{path}: {len(optics)} optics groups but no rlnOpticsGroup column to "
                                "tell which particle belongs to which")
    if optics["rlnOpticsGroup"].duplicated().any():
        raise ParticleFileError(f"{path}: data_optics lists an rlnOpticsGroup number twice")
    values = particles["rlnOpticsGroup"].map(pd.Series(optics[label].to_numpy(), index=optics["rlnOpticsGroup"]))
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ParticleFileError(f"{path}: particle {row} is in optics group "
                                f"{particles['rlnOpticsGroup'].iloc[row]}, which data_optics does not list")
    return values.to_numpy()


def _star_pixel_sizes(particles: pd.DataFrame, optics: pd.DataFrame | None,
                      path: Path) -> np.ndarray | None:
    """Per-particle pixel sizes (Angstrom) from a STAR file, or None if it does not record them.

    Sources in order: optics rlnImagePixelSize, particle rlnImagePixelSize or rlnPixelSize, and
    rlnDetectorPixelSize (micrometre) * 1e4 / rlnMagnification (RELION 3.0).
    """
    from_optics = _optics_values(particles, optics, "rlnImagePixelSize", path)
    if from_optics is not None:
        return from_optics.astype(float)
    for label in ("rlnImagePixelSize", "rlnPixelSize"):
        if label in particles.columns:
            return particles[label].to_numpy(float)
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):
        return particles["rlnDetectorPixelSize"].to_numpy(float) * 1e4 / particles["rlnMagnification"].to_numpy(float)
    return None


def _common_pixel_size(pixel_sizes: np.ndarray, path: Path) -> float:
    """The one pixel size of a set (median), refusing non-positive values and a spread above the tolerance."""
    if not np.all(np.isfinite(pixel_sizes) & (pixel_sizes > 0)):
        raise ParticleFileError(f"{path}: pixel sizes must be positive, found {np.min(pixel_sizes)}")
    median = float(np.median(pixel_sizes))
    if (pixel_sizes.max() - pixel_sizes.min()) > PIXEL_SIZE_TOLERANCE * median:
        raise ParticleFileError(
            f"{path}: particles have pixel sizes from {pixel_sizes.min():g} to {pixel_sizes.max():g} A; "
            "sort sets of one pixel size (e.g. one optics group) separately")
    return median


def _open_cs(path: Path) -> ParticleSet:
    import pandas as pd

    with open(path, "rb") as stream:
        if stream.read(len(_CS_COMPRESSED_MAGIC)) == _CS_COMPRESSED_MAGIC:
            raise ParticleFileError(
                f"{path}: compressed cryoSPARC .cs format (CSDAT) is not supported; export the particles "
                "from cryoSPARC (Export job, or cryosparc-tools Dataset.save(..., format=NUMPY_FORMAT)) "
                "to get a plain NumPy .cs file")
    try:
        records = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ParticleFileError(f"{path}: not a cryoSPARC .cs file (NumPy structured array): {error}"
                                ) from error
    if not isinstance(records, np.ndarray) or records.dtype.names is None or records.ndim != 1:
        raise ParticleFileError(f"{path}: not a cryoSPARC .cs file (expected a 1-D NumPy structured array)")
    missing = [field for field in _CS_REQUIRED_FIELDS if field not in records.dtype.names]
    if missing:
        raise ParticleFileError(f"{path}: no {', '.join(missing)} field(s); not a particle file with images")
    if records.size == 0:
        raise ParticleFileError(f"{path}: contains no particles")

    shapes = np.unique(records["blob/shape"].reshape(len(records), -1), axis=0)
    if len(shapes) > 1:
        raise ParticleFileError(f"{path}: mixed box sizes in blob/shape: {shapes.tolist()}")
    if shapes.shape[1] != 2 or shapes[0, 0] != shapes[0, 1]:
        raise ParticleFileError(f"{path}: images are not square (blob/shape {shapes[0].tolist()})")
    pixel_size = None
    if "blob/psize_A" in records.dtype.names:
        # via the float32's shortest decimal text: 1.345, not 1.3450001478
        pixel_size = float(str(np.float32(_common_pixel_size(records["blob/psize_A"].astype(float), path))))

    stack_text = pd.Series(np.char.decode(records["blob/path"], "utf-8")).str.removeprefix(">")
    stack_index, stack_names = pd.factorize(stack_text)
    return ParticleSet(path, "cs", _records_table(records), list(stack_names), stack_index,
                       records["blob/idx"].astype(np.int64), records=records,
                       metadata_box_size=int(shapes[0, 0]), box_size_is_binding=True,
                       metadata_pixel_size=pixel_size)


def _records_table(records: np.ndarray) -> pd.DataFrame:
    """Structured records as a DataFrame: one column per scalar field, ``name[k]`` per element of array fields."""
    import pandas as pd

    columns = {}
    for name in records.dtype.names:
        values = records[name]
        if values.dtype.kind == "S":
            values = np.char.decode(values, "utf-8")
        if values.ndim == 1:
            columns[name] = values
        else:
            for k, column in enumerate(values.reshape(len(records), -1).T):
                columns[f"{name}[{k}]"] = column
    return pd.DataFrame(columns)


def _resolve_stack(name: str, base_folder: Path) -> tuple[Path, bool]:
    """Find a stack named in a metadata file: relative to its folder, then its parents, then by file name.

    Returns:
        (path, found): the first existing candidate and True, or the first candidate and False.
    """
    written = Path(name)
    if written.is_absolute():
        candidates = [written]
    else:
        candidates = [base_folder / written] + [parent / written for parent in base_folder.absolute().parents]
    candidates.append(base_folder / written.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate, True
    return candidates[0], False


def index_chunks(indices: np.ndarray, box_size: int, chunk_size: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive pieces of ``indices``, each ``chunk_size`` long (default: about CHUNK_BYTES of float32 images)."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (4 * box_size**2))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    for start in range(0, indices.size, chunk_size):
        yield indices[start:start + chunk_size]


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` as a new array, for an (n, ...) array and ascending, unique ``rows`` ((k,) int).

    When ``array`` is a C-contiguous, file-backed ``np.memmap`` that starts where its mapping starts (an MRC
    stack's data as mrcfile maps it), each run of consecutive rows is read with one ``os.preadv`` into the result:
    the file's pages go through the kernel's page cache only and are never mapped into this process. Reading
    through the map instead would fault in the kernel's read-around window (``read_ahead_kb``, 8 MB here) for
    every scattered row: 2,000 random rows of a 3 GB stack mapped 2.1 GB. Anything else is indexed as usual
    (and a memory map's pages are released again, see :func:`release_mapped_pages`).

    Returns a (k, ...) array of ``array``'s dtype (byte order included).
    """
    rows = np.asarray(rows, dtype=np.int64)
    source = _file_of(array)
    if source is None:
        block = np.asarray(array[rows])
        release_mapped_pages(array)
        return block
    return _pread_rows(*source, array.dtype, array.shape[1:], rows)


def _pread_rows(path: str, offset: int, dtype: np.dtype, row_shape: tuple, rows: np.ndarray) -> np.ndarray:
    """(k, *row_shape) array of ``dtype``: the rows ``rows`` (ascending, unique) of the C-ordered array of such rows
    stored from byte ``offset`` of the file ``path``, one ``os.preadv`` per run of consecutive rows."""
    out = np.empty((rows.size, *row_shape), dtype=dtype)
    if rows.size == 0:
        return out
    row_bytes = out[0].nbytes
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [rows.size]])
    descriptor = os.open(path, os.O_RDONLY)
    try:
        for start, end in zip(starts.tolist(), ends.tolist()):
            view = memoryview(out[start:end].reshape(-1).view(np.uint8))
            position = offset + int(rows[start]) * row_bytes
            while view.nbytes:
                n_read = os.preadv(descriptor, [view], position)
                if n_read <= 0:
                    raise OSError(f"{path}: unexpected end of file at byte {position}")
                view, position = view[n_read:], position + n_read
    finally:
        os.close(descriptor)
    return out


def _file_of(array) -> tuple[str, int] | None:
    """(path, byte offset of ``array[0]``) for a C-contiguous, shared (not copy-on-write: its edits are not in the
    file) ``np.memmap`` whose data start at its ``offset`` in its file (not a view into the middle of one), else
    None."""
    if not isinstance(array, np.memmap) or not hasattr(os, "preadv") or array.ndim < 1 or not array.flags.c_contiguous \
            or getattr(array, "mode", None) not in ("r", "r+", "w+", "readonly", "readwrite", "write"):
        return None
    mapping, filename, offset = getattr(array, "_mmap", None), getattr(array, "filename", None), getattr(array, "offset", None)
    if mapping is None or filename is None or offset is None:
        return None
    # the mapping starts at the allocation granularity below ``offset`` (see np.memmap); the array must start at
    # ``offset`` itself, i.e. (offset mod granularity) bytes into the mapping
    try:
        base = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    except (TypeError, ValueError):
        return None
    if array.ctypes.data - base != offset % mmap.ALLOCATIONGRANULARITY:
        return None
    return filename, int(offset)


def release_mapped_pages(array) -> None:
    """Unmap the pages of a read-only or shared ``np.memmap`` that this process has read.

    The data stay in the kernel's page cache, but the process's resident set no longer grows to the size
    of the files it streams through (batch systems count mapped pages against memory limits). A
    copy-on-write map is left alone (its pages may hold edits); anything else is ignored.
    """
    mapping = getattr(array, "_mmap", None)  # the mmap.mmap behind an np.memmap and its views
    shared = getattr(array, "mode", None) in ("r", "r+", "readonly")
    if mapping is not None and shared and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _map_stack(path: Path) -> tuple[mrcfile.mrcmemmap.MrcMemmap, np.ndarray]:
    """Memory-map an MRC image stack (or single image) read-only and check it.

    The file is opened strictly first. If that fails, the header is checked for a known data mode, sane
    dimensions and a file long enough for its data; a file that passes is opened permissively (stacks
    written by older tools lack the MRC2014 map ID or machine stamp).

    Returns:
        (mrc, images): the open MrcMemmap and a read-only (n_images, box, box) view of its data.
    """
    if not path.is_file():
        raise ParticleFileError(f"{path}: no such file")
    try:
        mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError) as strict_error:
        problem = _header_problem(path)
        if problem is not None:
            raise ParticleFileError(f"{path}: {problem}") from strict_error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        if mrc.data is None:
            mrc.close()
            raise ParticleFileError(f"{path}: not a readable MRC file ({strict_error})") from strict_error
    try:
        return mrc, _stack_view(mrc, path)
    except ParticleFileError:
        mrc.close()
        raise


def _header_problem(path: Path) -> str | None:
    """What makes the file's 1024-byte MRC header unusable (little-endian reading), or None if it looks valid."""
    headers = np.fromfile(path, dtype=mrcfile.dtypes.HEADER_DTYPE, count=1)
    if headers.size == 0:
        return "not an MRC file (shorter than the 1024-byte MRC header)"
    header = headers[0]
    try:
        itemsize = mrcfile.utils.dtype_from_mode(header["mode"]).itemsize
    except ValueError:
        return f"not an MRC file (unknown data mode {int(header['mode'])})"
    dimensions = [int(header[axis]) for axis in ("nx", "ny", "nz")]
    if min(dimensions) <= 0 or int(header["nsymbt"]) < 0:
        return f"not an MRC file (dimensions {dimensions}, extended header {int(header['nsymbt'])} bytes)"
    expected = headers.itemsize + int(header["nsymbt"]) + int(np.prod(dimensions)) * itemsize
    actual = path.stat().st_size
    if actual < expected:
        return f"truncated MRC file: the header promises {expected} bytes, the file has {actual}"
    return None


def _stack_view(mrc: mrcfile.mrcmemmap.MrcMemmap, path: Path) -> np.ndarray:
    """The data of an MRC file as an (n_images, box, box) image stack, refusing volumes and odd data."""
    data = mrc.data
    header = mrc.header
    if data.dtype.newbyteorder("=") not in _READABLE_DTYPES:
        raise ParticleFileError(f"{path}: MRC mode {int(header.mode)} ({data.dtype}) is not supported; "
                                "expected real images (modes 0, 1, 2, 6 or 12)")
    if data.ndim == 2:
        data = data[np.newaxis]
    elif data.ndim != 3:
        raise ParticleFileError(f"{path}: is a stack of 3-D volumes (space group {int(header.ispg)}), "
                                "not a stack of 2-D particle images")
    n_images, ny, nx = data.shape
    # RELION writes .mrcs stacks with space group 1 and mz == nz, so only a cube in a .mrc file counts as a volume.
    if path.suffix.lower() != ".mrcs" and int(header.ispg) != 0 and n_images == ny == nx > 1:
        raise ParticleFileError(f"{path}: is a 3-D volume ({nx} x {ny} x {n_images} voxels, space group "
                                f"{int(header.ispg)}), not a stack of 2-D particle images")
    if ny != nx:
        raise ParticleFileError(f"{path}: images are not square ({nx} x {ny} pixels)")
    if n_images == 0:
        raise ParticleFileError(f"{path}: contains no images")
    return data


# -- writing -------------------------------------------------------------------------------------------

def write_particles(particles: ParticleSet, indices, out_dir, name: str,
                    extra_columns: dict[str, np.ndarray] | None = None, images=None,
                    image_root=None) -> list[Path]:
    """Write a subset of a particle set as a new, self-contained particle set.

    The subset is written in the original row order (``indices`` are sorted; a repeated index is
    written once).

    * STAR or stack input: ``out_dir/name.mrcs``, a new float32 stack with the voxel size set to the pixel
      size, and ``out_dir/name.star``, whose ``rlnImageName`` entries point at it. RELION resolves image
      names from the folder it runs in (its project folder), so the stack is named relative to
      ``image_root`` (default: the current working directory, where RELION users run commands), e.g.
      ``000001@PPCAsort/job001/name.mrcs``, or by its absolute path when it is not inside ``image_root``.
      :func:`open_particles` finds it either way. The original image name of each particle is kept in
      the column ``ppcasortSourceImageName``. The STAR keeps every block of the input (the optics table
      unchanged), every original column (unknown labels too) and the original row order, and adds
      ``extra_columns`` under the given names (no ``rln`` prefix: RELION keeps labels it does not know;
      an existing column of that name is replaced). Floats are written with full precision.
    * cs input: ``out_dir/name.cs``, the subset of :attr:`ParticleSet.records` with the same dtype, so
      ``blob/path`` and ``blob/idx`` still point at the original stacks, and ``extra_columns`` as
      ``ppcasort/...`` fields (:func:`cs_field`). ``images`` are not written (the .cs points at stacks).

    Each file is written under a temporary name in ``out_dir`` and renamed into place (see
    :func:`~napari_ppcasort.core.outputs.atomic_files`); the stack is written chunk by chunk with plain
    writes, so large subsets need one chunk of memory. The files of a whole sort are written as one output
    set instead (see :mod:`napari_ppcasort.core.outputs`).

    Args:
        particles: the set to take the subset from.
        indices: 0-based particle indices to keep.
        out_dir: output folder (created if missing).
        name: base name of the output files, without extension or folder.
        extra_columns: per-particle values to add as STAR columns, each of length ``n_particles``
            (values for ALL particles of the input, in original order; the subset is taken here).
        images: optional (n_particles, box_size, box_size) array (e.g. a memory map of processed
            images), indexed by original particle, written instead of the images read from the input.
        image_root: folder the STAR's image names are relative to (default: the current working directory).

    Returns:
        The written paths: [name.mrcs, name.star] or [name.cs].

    Raises:
        ParticleFileError: an output path is one of the input files (the metadata file or a stack).
        OutputWriteError: a file could not be written (full disk...); nothing is left behind.
        ValueError: empty subset, bad name, or extra_columns / images of the wrong length or shape.
        IndexError: an index outside [0, n_particles).
    """
    keep = np.unique(particles._check_indices(indices))
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"output name must be a plain file name without folders, got {name!r}")
    out_dir = Path(out_dir)
    outputs = subset_paths(particles, out_dir, name)
    _check_subset(particles, keep, name, extra_columns, images)
    out_dir.mkdir(parents=True, exist_ok=True)
    _refuse_overwriting_inputs(particles, list(outputs.values()))
    try:
        with atomic_files(*outputs.values()) as temporaries:
            write_subset(particles, keep, dict(zip(outputs, temporaries)), extra_columns=extra_columns, images=images,
                         stack_name=_stack_name(outputs, image_root))
    except OSError as error:
        failed = next((path for path in outputs.values() if error.filename and Path(error.filename).name.startswith(
            f".{path.name}.")), out_dir)
        raise write_error(failed, error) from error
    return list(outputs.values())


def subset_paths(particles: ParticleSet, out_dir, name: str) -> dict[str, Path]:
    """The files a subset of ``particles`` named ``name`` is written as in ``out_dir``, by suffix."""
    return {suffix: Path(out_dir) / f"{name}{suffix}" for suffix in FORMATS[particles.kind].output_suffixes}


def write_subset(particles: ParticleSet, keep: np.ndarray, files: dict[str, Path], *,
                 extra_columns: dict[str, np.ndarray] | None = None, images=None, stack_name: str | None = None) -> None:
    """Write the particles ``keep`` (sorted, unique) of ``particles`` in its format to ``files`` (by suffix, as
    :func:`subset_paths` gives them, here possibly temporary or staged names), the STAR naming its stack
    ``stack_name`` (where the stack will be). The checks are :func:`write_particles`'; OSError if a file cannot
    be written."""
    _check_subset(particles, keep, "subset", extra_columns, images)
    FORMATS[particles.kind].write(particles, keep, files, dict(extra_columns or {}), images, stack_name)


def _check_subset(particles: ParticleSet, keep: np.ndarray, name: str, extra_columns, images) -> None:
    if keep.size == 0:
        raise ValueError(f"nothing to write to {name}: the subset of {particles.path} is empty")
    for column, values in (extra_columns or {}).items():
        if len(values) != particles.n_particles:
            raise ValueError(f"extra column {column!r} has {len(values)} values, expected one per particle "
                             f"of {particles.path} ({particles.n_particles})")
    if images is not None:
        expected_shape = (particles.n_particles, particles.box_size, particles.box_size)
        if not FORMATS[particles.kind].writes_images:
            raise ValueError(f"cannot write images for {particles.path}: a .cs subset points at the original stacks")
        if tuple(images.shape) != expected_shape:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected {expected_shape}")


def _stack_name(outputs: dict[str, Path], image_root) -> str | None:
    return _image_path_name(outputs[".mrcs"], image_root) if ".mrcs" in outputs else None


def _image_path_name(stack: Path, image_root) -> str:
    """How a STAR names ``stack``: relative to ``image_root`` (default: the working directory) or absolute."""
    stack = stack.resolve()
    root = Path(image_root if image_root is not None else Path.cwd()).resolve()
    try:
        return stack.relative_to(root).as_posix()
    except ValueError:
        return stack.as_posix()


def input_files(particles: ParticleSet) -> list[Path]:
    """Every file a particle set reads: its metadata file and the stacks that exist (none for an array)."""
    if isinstance(particles, ArrayParticleSet):
        return []
    return [particles.path] + [path for path, found in zip(particles.stack_paths, particles._stack_found) if found]


def _refuse_overwriting_inputs(particles: ParticleSet, outputs: list[Path]) -> None:
    inputs = input_files(particles)
    for output in outputs:
        for source in inputs:
            same = output.resolve() == source.resolve() or (output.exists() and os.path.samefile(output, source))
            if same:
                raise ParticleFileError(f"{output}: refusing to overwrite an input file of {particles.path}")


def _write_star_subset(particles: ParticleSet, keep: np.ndarray, files: dict[str, Path],
                       extra_columns: dict[str, np.ndarray], images, stack_name: str | None) -> None:
    """The STAR + stack writer (STAR and stack inputs): ``files[".mrcs"]`` then ``files[".star"]``."""
    box = particles.box_size
    chunk_size = max(1, CHUNK_BYTES // (4 * box * box))

    def chunks():
        for start in range(0, keep.size, chunk_size):
            chunk = keep[start:start + chunk_size]
            yield particles.read(chunk) if images is None else read_rows(images, chunk).astype(np.float32, copy=False)

    write_mrc_stack(files[".mrcs"], keep.size, box, chunks(), voxel_size=particles.pixel_size)
    if stack_name is None:
        stack_name = _image_path_name(files[".mrcs"], None)
    _write_star(particles, keep, extra_columns, stack_name, files[".star"])


def _write_cs_subset(particles: ParticleSet, keep: np.ndarray, files: dict[str, Path],
                     extra_columns: dict[str, np.ndarray], images, stack_name: str | None) -> None:
    """The .cs writer: the subset of the records with every field of the input (blob paths still point at the
    original stacks), plus ``extra_columns`` as float64 fields of their own ``ppcasort/`` prefix (see
    :func:`cs_field`), as cryoSPARC groups a result's fields by prefix."""
    records = particles.records[keep]
    if extra_columns:
        fields = {cs_field(label): np.asarray(values)[keep] for label, values in extra_columns.items()}
        kept_names = [name for name in records.dtype.names if name not in fields]
        extended = np.empty(records.size, dtype=[*((name, records.dtype[name]) for name in kept_names),
                                                 *((name, "<f8") for name in fields)])
        for name in kept_names:
            extended[name] = records[name]
        for name, values in fields.items():
            extended[name] = values
        records = extended
    with open(files[".cs"], "xb") as stream:
        np.save(stream, records, allow_pickle=False)


def cs_field(label: str) -> str:
    """The .cs field of an extra STAR column: ``ppcasortJunkProbability`` -> ``ppcasort/junk_probability``."""
    name = label[len("ppcasort"):] if label.startswith("ppcasort") else label
    return "ppcasort/" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _write_star(particles: ParticleSet, keep: np.ndarray, extra_columns: dict[str, np.ndarray],
                stack_name: str, path: Path) -> None:
    """Write the STAR file of the subset ``keep``, its images numbered 1.. in ``stack_name``."""
    import pandas as pd
    import starfile

    table = particles.table.iloc[keep].reset_index(drop=True)
    if "rlnImageName" in table.columns:
        table["ppcasortSourceImageName"] = table["rlnImageName"]
    table["rlnImageName"] = [f"{k:06d}@{stack_name}" for k in range(1, keep.size + 1)]
    for column, values in extra_columns.items():
        table[column] = np.asarray(values)[keep]
    blocks = dict(particles._star_blocks)
    blocks[particles._particle_block] = table
    blocks = {block_name: _floats_as_text(block) if isinstance(block, pd.DataFrame) else block
              for block_name, block in blocks.items()}
    starfile.write(blocks, path, na_rep="nan")


def _floats_as_text(table: pd.DataFrame) -> pd.DataFrame:
    """Float columns as their shortest exact text (``str`` of each value, vectorised by pandas).

    The text reads back to the same float and always has a '.' or an exponent, so float columns stay
    float when read back (starfile's default '%.6f' would round small values to 0).
    """
    return table.assign(**{column: table[column].astype(str)
                           for column in table.columns if table[column].dtype.kind == "f"})


# -- the formats ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParticleFormat:
    """A particle file format: which files it opens, and how a subset of a set opened from it is written.

    Attributes:
        kind: the :attr:`ParticleSet.kind` of the sets it opens.
        suffixes: file name endings (lower case) it opens.
        open: ``open(path) -> ParticleSet``.
        output_suffixes: the files a subset is written as, in the order :func:`write_particles` returns them.
        write: ``write(particles, keep, files, extra_columns, images, stack_name)``: writes the subset ``keep``
            to ``files`` (by suffix); see :func:`write_subset`.
        writes_images: whether a subset carries its own images (False: it points at the original stacks).
    """

    kind: str
    suffixes: tuple[str, ...]
    open: Callable[[Path], ParticleSet]
    output_suffixes: tuple[str, ...]
    write: Callable
    writes_images: bool = True


#: The particle formats, by kind. Adding a format is one entry (its opener and its writer).
FORMATS: dict[str, ParticleFormat] = {particle_format.kind: particle_format for particle_format in (
    ParticleFormat("stack", (".mrcs", ".mrc"), _open_stack, (".mrcs", ".star"), _write_star_subset),
    ParticleFormat("star", (".star",), _open_star, (".mrcs", ".star"), _write_star_subset),
    ParticleFormat("cs", (".cs",), _open_cs, (".cs",), _write_cs_subset, writes_images=False),
)}
#: Every file name ending that :func:`open_particles` opens.
PARTICLE_SUFFIXES: tuple[str, ...] = tuple(suffix for each in FORMATS.values() for suffix in each.suffixes)

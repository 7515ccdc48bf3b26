"""Particle sets as napari image layers: a lazy 3-D array over a ParticleSet, and the npe2 reader.

A stack of N particle images of box x box pixels is shown as a 3-D image layer of shape (N, box, box)
whose data is a :class:`ParticleStack`: only the images napari asks for (one slice at a time) are read
from the memory-mapped stacks, so stacks larger than RAM open instantly. A ParticleStack can also show a
subset of a set (the kept and rejected particles of a sort) without copying images.

An image layer that holds an ordinary array (NumPy, dask, ...) becomes a particle set through
:class:`~napari_ppcasort.core.particles.ArrayParticleSet`, so that sorting and exporting treat every source
the same way.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np

from .core.particles import PARTICLE_SUFFIXES, ParticleFileError, ParticleSet, open_particles

__all__ = ["ParticleStack", "get_reader", "read_particles", "PARTICLE_SUFFIXES"]

#: Images sampled (evenly spaced) to set a new layer's contrast limits.
CONTRAST_SAMPLE = 32


class ParticleStack:
    """A read-only (n, box, box) float32 array of particle images, read from a ParticleSet on demand.

    napari only needs ``shape``, ``dtype``, ``ndim`` and ``__getitem__``; indexing the first axis with an
    integer, a slice, an integer array or a boolean mask reads just those images.

    Args:
        particles: the set the images come from.
        indices: (n,) particle indices of ``particles`` shown, in this order (default: all, in order).

    Attributes:
        particles: the ParticleSet.
        indices: (n,) int64 particle indices; position i of the stack is particle ``indices[i]``.
    """

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, particles: ParticleSet, indices=None):
        self.particles = particles
        if indices is None:
            indices = np.arange(particles.n_particles, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {self.indices.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.indices.size, self.particles.box_size, self.particles.box_size)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_whole_set(self) -> bool:
        """True when the stack shows every particle of its set in file order."""
        return self.indices.size == self.particles.n_particles and bool(
            np.array_equal(self.indices, np.arange(self.particles.n_particles)))

    def __len__(self) -> int:
        return self.indices.size

    def subset(self, positions) -> ParticleStack:
        """The stack of the images at ``positions`` (integer array or boolean mask over this stack)."""
        return ParticleStack(self.particles, self.indices[positions])

    def __getitem__(self, key):
        key = _expand_ellipsis(key if isinstance(key, tuple) else (key,))
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            position = operator.index(first)
            if not -len(self) <= position < len(self):
                raise IndexError(f"index {position} out of range for a stack of {len(self)} images")
            image = self.particles.read(self.indices[[position]])[0]
            return image[rest] if rest else image
        images = self.particles.read(self.indices[first])
        return images[(slice(None),) + rest] if rest else images

    def __array__(self, dtype=None, copy=None):
        images = self.particles.read(self.indices)
        return images if dtype is None else images.astype(dtype)

    def __repr__(self) -> str:
        return f"ParticleStack({self.particles!r}, n={len(self)})"


def _expand_ellipsis(key: tuple) -> tuple:
    if not any(part is Ellipsis for part in key):
        return key
    at = next(i for i, part in enumerate(key) if part is Ellipsis)
    filler = (slice(None),) * (3 - (len(key) - 1))
    return key[:at] + filler + key[at + 1:]


def stack_layer_kwargs(stack: ParticleStack, name: str, metadata: dict | None = None) -> dict:
    """Image-layer keyword arguments for a particle stack: name, metadata, robust contrast limits, and the axes:
    "particle", "y", "x", with y and x in angstrom (scale = the pixel size) when the set records its pixel size."""
    n_sample = min(len(stack), CONTRAST_SAMPLE)
    sample = stack[np.linspace(0, len(stack) - 1, n_sample).round().astype(np.int64)] if len(stack) else None
    kwargs = {"name": name, "metadata": dict(metadata or {}), "axis_labels": ("particle", "y", "x")}
    pixel_size = stack.particles.pixel_size
    if pixel_size:
        kwargs["scale"] = (1.0, float(pixel_size), float(pixel_size))
        kwargs["units"] = ("pixel", "angstrom", "angstrom")
    if sample is not None:
        low, high = np.percentile(sample, [0.5, 99.5])
        if high > low:
            kwargs["contrast_limits"] = (float(low), float(high))
    return kwargs


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list] | None:
    """npe2 reader hook: the reader for particle stacks and particle sets, or None for other files, so that napari
    tries other readers: an ``.mrc`` that is a volume or a single image (a micrograph) is not a particle stack."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(Path(p).suffix.lower() not in PARTICLE_SUFFIXES for p in paths):
        return None
    if any(Path(p).suffix.lower() == ".mrc" and not is_particle_stack(p) for p in paths):
        return None
    return read_particles


def is_particle_stack(path) -> bool:
    """Whether the MRC file at ``path`` holds several square 2-D images as a particle stack does (from its header):
    False for a volume (space group 1 or more with as many sections as pixels across), a single image, an image
    stack of non-square images. True when the header cannot be read, so that the particle reader says what is
    wrong with the file."""
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            header = mrc.header
            nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
            space_group = int(header.ispg)
    except (OSError, ValueError):
        return True
    volume = space_group != 0 and nz == nx == ny
    return nz > 1 and nx == ny and not volume


def read_particles(path: str | list[str]) -> list[tuple]:
    """Open each particle set lazily as a 3-D image layer (n_particles, box, box).

    Layer metadata: ``path`` (str), ``kind`` ('stack', 'star' or 'cs'), ``pixel_size`` (Angstrom or None).

    Raises:
        ParticleFileError: a file is unreadable, or its image stacks are missing (metadata-only files).
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for one_path in paths:
        particles = open_particles(one_path)
        if particles.missing_stacks:
            missing = particles.missing_stacks
            raise ParticleFileError(
                f"{one_path}: {len(missing)} of its {len(particles.stack_paths)} image stacks are missing "
                f"(first: {missing[0]}); napari needs the images")
        stack = ParticleStack(particles)
        metadata = {"path": str(one_path), "kind": particles.kind, "pixel_size": particles.pixel_size}
        layers.append((stack, stack_layer_kwargs(stack, Path(one_path).stem, metadata), "image"))
    return layers

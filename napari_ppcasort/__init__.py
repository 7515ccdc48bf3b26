"""napari-ppcasort: unsupervised particle sorting for cryo-EM (mixture of PPCA with online sorting).

The Python API (see the README's "From Python")::

    from napari_ppcasort import open_particles, SortSettings, sort_particles, iter_sort

    with open_particles("particles.star") as particles:
        result = sort_particles(particles, SortSettings(n_rounds=3))
        result.export("sorted")          # kept/rejected sets, scores.csv, report.png, parameters.json

The names are imported on first use, so ``import napari_ppcasort`` stays cheap (no napari, Qt or matplotlib).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> module that defines it.
_EXPORTS = {
    "open_particles": "napari_ppcasort.core.particles",
    "ParticleSet": "napari_ppcasort.core.particles",
    "ArrayParticleSet": "napari_ppcasort.core.particles",
    "write_particles": "napari_ppcasort.core.particles",
    "SortSettings": "napari_ppcasort.core.settings",
    "SETTINGS": "napari_ppcasort.core.settings",
    "read_settings_file": "napari_ppcasort.core.settings",
    "sort_particles": "napari_ppcasort.core.run",
    "iter_sort": "napari_ppcasort.core.run",
    "SortResult": "napari_ppcasort.core.run",
    "CoefficientsProgress": "napari_ppcasort.core.run",
    "SortStarted": "napari_ppcasort.core.run",
    "IterationDone": "napari_ppcasort.core.run",
    "RoundDone": "napari_ppcasort.core.run",
    "SortFinished": "napari_ppcasort.core.run",
    "MODELS": "napari_ppcasort.core.models",
    "BASES": "napari_ppcasort.core.bases",
    "FORMATS": "napari_ppcasort.core.particles",
    "PPCASortError": "napari_ppcasort.core.errors",
    "InputError": "napari_ppcasort.core.errors",
    "SettingsError": "napari_ppcasort.core.errors",
    "RunError": "napari_ppcasort.core.errors",
    "SortCancelled": "napari_ppcasort.core.errors",
    "NotFittedError": "napari_ppcasort.core.mixture",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_ppcasort' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

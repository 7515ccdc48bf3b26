"""The two kinds of errors a sort can end with, and how their messages name the settings.

* :class:`InputError` (a ``ValueError``): the input files, the settings or the output folder cannot be used
  as given. Raised before the expensive work wherever that can be known; the command line exits with
  status 2. :class:`~napari_ppcasort.core.particles.ParticleFileError` and :class:`SettingsError` are kinds
  of it.
* :class:`RunError` (a ``RuntimeError``): the computation or the writing failed (a numerical failure of
  the fit, not enough memory, a full disk); nothing partial is left. The command line exits with status 1.

Every message is one line that names the file, the folder or the setting to change. A message about a
setting names it through a placeholder (``"{alpha} must be ..."``) that each front end fills with its own
name for it: the field name in Python (``alpha``), the option on the command line (``--alpha``), the
label in the napari widget (``alpha (%)``); see :meth:`PPCASortError.describe`.
"""

from __future__ import annotations

import string
from typing import Callable

__all__ = [
    "PPCASortError",
    "InputError",
    "SettingsError",
    "OutputExistsError",
    "OutputBusyError",
    "RunError",
    "ComputeError",
    "OutputWriteError",
    "SortCancelled",
    "quote",
    "literal",
]

#: How a front end names a setting: (field name, form) -> text. ``form`` is "" for the setting itself and
#: "off" for the way to switch a yes/no setting off.
Naming = Callable[[str, str], str]


def python_name(field: str, form: str) -> str:
    """The Python naming: the field name (``normalize``; switched off: ``normalize=False``; ``force=True``)."""
    if field == "force":
        return "force=True"
    return f"{field}=False" if form == "off" else field


def quote(value) -> str:
    """``repr(value)`` made safe to put in a message template (braces doubled)."""
    return literal(repr(value))


def literal(value) -> str:
    """``str(value)`` (a path, another message) made safe to put in a message template (braces doubled)."""
    return str(value).replace("{", "{{").replace("}", "}}")


class _Names(dict):
    """format_map mapping that turns ``{field}`` / ``{field:off}`` into a front end's name of the setting."""

    def __init__(self, naming: Naming):
        super().__init__()
        self.naming = naming

    def __missing__(self, field: str) -> "_Name":
        return _Name(field, self.naming)


class _Name:
    def __init__(self, field: str, naming: Naming):
        self.field, self.naming = field, naming

    def __format__(self, form: str) -> str:
        return self.naming(self.field, form)


class PPCASortError(Exception):
    """Base of the errors of napari-ppcasort. ``str(error)`` names settings by their Python field names.

    Args:
        template: the one-line message; ``{field}`` stands for the name of a setting (``{field:off}`` for
            the way to switch a yes/no setting off), every other brace doubled (see :func:`quote`).
    """

    #: False for errors whose message is plain text (no placeholders; braces are literal).
    uses_placeholders = True

    def __init__(self, template: str):
        super().__init__(template)
        self.template = template

    def describe(self, naming: Naming = python_name) -> str:
        """The message with every setting named by ``naming`` (e.g. the command line's ``--n-subspaces``)."""
        if not self.uses_placeholders:
            return self.template.replace("\n", " ")
        try:
            return string.Formatter().vformat(self.template, (), _Names(naming)).replace("\n", " ")
        except (ValueError, IndexError, KeyError):  # a template that was not meant as one
            return self.template.replace("\n", " ")

    def __str__(self) -> str:
        return self.describe()


class InputError(PPCASortError, ValueError):
    """The input, the settings or the output folder cannot be used as given (command line: exit status 2)."""


class SettingsError(InputError):
    """A setting of a sort has a wrong type or value, or does not fit the data or the other settings."""


class OutputExistsError(InputError, FileExistsError):
    """The output folder already holds results; pass force=True (``--force``) to replace them."""


class OutputBusyError(InputError):
    """Another run is writing into the same output folder."""


class RunError(PPCASortError, RuntimeError):
    """The sort failed while computing or writing (command line: exit status 1); nothing partial is left."""


class ComputeError(RunError):
    """The computation failed: a numerical failure of the fit, or not enough memory."""


class OutputWriteError(RunError, OSError):
    """An output could not be written (full disk, lost permissions, I/O error); the message names it."""


class SortCancelled(PPCASortError):
    """The sort was cancelled (``cancel`` was set, Ctrl-C, or SIGTERM); nothing was written."""

"""Every setting of a sort, declared once: type, bounds or choices, default, help, command-line option, widget label.

:class:`SortSettings` is a frozen dataclass whose fields are declared with :func:`setting`; the declaration
validates the dataclass (wrong types and values are :class:`~napari_ppcasort.core.errors.SettingsError`\\ s
naming the setting), the JSON of a ``parameters.json`` (:func:`read_settings_file`), the command line's
options (generated from :data:`SETTINGS`) and the napari widget's labels and limits. Adding a setting is
one field here (and its use where the sort reads it).

    settings = SortSettings(n_subspaces=2, alpha=0.1)
    settings = SortSettings.from_dict({"n_rounds": None, "target_kept_fraction": 0.8})
    settings = read_settings_file("earlier/parameters.json")
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .bases import BASES
from .errors import SettingsError, literal, quote
from .mixture import NOISE_MODELS
from .models import MODELS
from .sorting import COMBINATIONS

__all__ = ["Setting", "SETTINGS", "SortSettings", "ClusterSettings", "CLUSTER_SETTINGS", "setting", "read_settings_file",
           "cli_name"]


@dataclass(frozen=True)
class Setting:
    """The declaration of one setting (see :func:`setting`); ``SETTINGS[name]`` for each field of SortSettings.

    Attributes:
        name: field name.
        type: bool, int, float or str.
        optional: None is allowed (``none`` on the command line, ``null`` in JSON); ``none_means`` says what it does.
        default: the product default.
        help: what the setting is (the command line's help and the widget's tooltip).
        label: the widget's label.
        minimum, maximum: bounds of a number (None: unbounded); ``open_minimum``/``open_maximum``: the bound
            itself is excluded.
        choices: the allowed texts of a str setting: a tuple, or a registry (a dict) whose keys are the choices at
            the time of the check (so that a model registered in MODELS is a valid ``model`` at once).
        model_specific: read only by the models whose ``ModelSpec.settings`` list it; must stay at its
            default with the other models.
        unit_scale: the widget shows the value times this (alpha and the kept fraction in %).
    """

    name: str
    type: type
    optional: bool
    default: object
    help: str
    label: str
    none_means: str = ""
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False
    choices: tuple[str, ...] | dict | None = None
    model_specific: bool = False
    unit_scale: float = 1.0

    @property
    def option(self) -> str:
        """The command-line option: ``--n-subspaces`` for ``n_subspaces``."""
        return "--" + self.name.replace("_", "-")

    @property
    def allowed(self) -> tuple[str, ...] | None:
        """The choices of a str setting now (None: any text)."""
        return None if self.choices is None else tuple(self.choices)

    def bounds_text(self) -> str:
        """The allowed values in words, e.g. 'a number strictly between 0 and 1'."""
        kind = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}[self.type]
        if self.choices is not None:
            kind = "one of " + ", ".join(map(repr, self.allowed))
        low, high = (None if bound is None else f"{bound:g}" if isinstance(bound, float) else str(bound)
                     for bound in (self.minimum, self.maximum))
        if low is not None and high is not None:
            strict = self.open_minimum and self.open_maximum
            kind += f" {'strictly ' if strict else ''}between {low} and {high}"
        elif low is not None:
            kind += f" {'above' if self.open_minimum else 'of at least'} {low}"
        elif high is not None:
            kind += f" {'below' if self.open_maximum else 'of at most'} {high}"
        return kind + (" or none" if self.optional else "")

    def check(self, value):
        """``value`` as this setting's type (numpy scalars become Python ones), or a SettingsError naming it."""
        if value is None:
            if self.optional:
                return None
            raise self._error(value)
        if self.type is bool:
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise self._error(value)
        if self.type is str:
            if isinstance(value, str) and (self.choices is None or value in self.allowed):
                return value
            raise self._error(value)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self._error(value)
        if self.type is int:
            if not isinstance(value, (int, np.integer)):
                raise self._error(value)
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise self._error(value)
        too_low = self.minimum is not None and (value <= self.minimum if self.open_minimum else value < self.minimum)
        too_high = self.maximum is not None and (value >= self.maximum if self.open_maximum else value > self.maximum)
        if too_low or too_high:
            raise self._error(value)
        return value

    def _error(self, value) -> SettingsError:
        return SettingsError(f"{{{self.name}}} must be {self.bounds_text()}, got {_shown(value)}")


def _shown(value) -> str:
    """A value as a message shows it, saying what kind of value it is when that is the problem."""
    if isinstance(value, str):
        return "the text " + quote(value)
    if isinstance(value, (bool, np.bool_)):
        return f"{bool(value)} (a yes/no value)"
    if value is None:
        return "none"
    if isinstance(value, (list, dict, tuple)):
        return f"a {'list' if isinstance(value, (list, tuple)) else 'JSON object'} ({quote(value)})"
    return quote(value)


def setting(default, *, help: str, label: str, none_means: str = "", minimum=None, maximum=None,
            open_minimum: bool = False, open_maximum: bool = False, choices=None, model_specific: bool = False,
            unit_scale: float = 1.0):
    """Declare a field of SortSettings: its default, bounds or choices, help text and widget label.

    The type (and whether None is allowed) comes from the field's annotation.
    """
    declaration = dict(default=default, help=help, label=label, none_means=none_means, minimum=minimum,
                       maximum=maximum, open_minimum=open_minimum, open_maximum=open_maximum,
                       choices=choices if choices is None or isinstance(choices, dict) else tuple(choices),
                       model_specific=model_specific,
                       unit_scale=unit_scale)
    return field(default=default, metadata={"setting": declaration})


@dataclass(frozen=True)
class SortSettings:
    """Every parameter of a sort, with the defaults of the product (validated on creation).

    The README's table says when to change each; ``SETTINGS[name].help`` says what each is.
    """

    model: str = setting(
        "contamination", choices=MODELS, label="model",
        help="the model and its junk score: " + "; ".join(f"'{name}': {spec.summary}" for name, spec in MODELS.items()))
    n_subspaces: int = setting(
        3, minimum=1, label="subspaces M",
        help="M, the number of subspaces (views or conformations the particles spread over)")
    total_dimension: int = setting(
        60, minimum=1, label="total dimension",
        help="M * K, the summed dimension of the subspaces (the paper's K_total); each subspace gets "
             "total_dimension // n_subspaces dimensions")
    alpha: float = setting(
        0.1, minimum=0, maximum=1, open_minimum=True, open_maximum=True, label="alpha (%)", unit_scale=100,
        help="fraction of the remaining images removed at each pruning round (with stop 'junk-left': at most this "
             "fraction)")
    iterations_per_round: int = setting(
        6, minimum=1, label="EM iterations per round", help="P, EM iterations between prunings")
    stop: str = setting(
        "junk-left", choices=("junk-left", "schedule"), label="stop",
        help="when pruning stops: 'junk-left' (the default) prunes while the model finds junk (with the "
             "contamination model images whose junk probability is above 0.99, and once none is left those above 1/2; "
             "with the others robust outliers of each round's scores, see outlier_threshold), at most alpha of the "
             "rest per round; 'schedule' removes alpha of "
             "the rest every round, the paper's fixed budget, for n_rounds rounds or down to target_kept_fraction")
    n_rounds: int | None = setting(
        None, minimum=1, label="rounds", none_means="no limit (stop 'junk-left'); until target_kept_fraction "
                                                    "(stop 'schedule')",
        help="number of pruning rounds: the count with stop 'schedule', at most this many with 'junk-left' (none: "
             "no limit)")
    target_kept_fraction: float | None = setting(
        None, minimum=0, maximum=1, open_minimum=True, open_maximum=True, label="keep (%)", unit_scale=100,
        none_means="no limit",
        help="stop when this fraction of the stack is left: the target with stop 'schedule', a lower limit with "
             "'junk-left' (none: no limit)")
    basis: str = setting(
        "pswf", choices=BASES, label="basis",
        help="; ".join(f"'{name}': {spec.summary}" for name, spec in BASES.items()))
    n_coefficients: int | None = setting(
        300, minimum=1, label="basis size L", none_means="estimated from the noise (PCA) or up to Nyquist (PSWF)",
        help="number of basis coefficients L (PSWF: the band limit is lowered until that many functions remain, a "
             "low-pass basis; none: PCA estimates it from the noise level with the Marchenko-Pastur edge, PSWF "
             "keeps every function up to Nyquist)")
    box_size: int | None = setting(
        64, minimum=8, label="crop to box (px)", none_means="never crop",
        help="Fourier-crop larger images to this box (pixels) before anything else; smaller images are kept as they "
             "are (none: never crop)")
    mask_radius: float | None = setting(
        None, minimum=0, open_minimum=True, label="mask radius (px)", none_means="estimated from the images",
        help="radius of the particle circle in pixels of the (cropped) box: the basis sees what is inside, "
             "normalisation the background outside (none: estimated from the images, where their signal ends)")
    normalize: bool = setting(
        True, label="normalize", help="normalise each image on the background outside the circle (mean 0, std 1)")
    whiten: bool = setting(
        True, label="whiten noise",
        help="whiten the noise with the power spectrum estimated from the stack, and scale each image to noise of "
             "variance 1 measured at its high spatial frequencies")
    ctf_correction: str = setting(
        "flip", choices=("flip", "none"), label="CTF correction",
        help="'flip': flip the phases where each particle's CTF is negative, from the defocus in the particle file "
             "(files without CTF values are left as they are); 'none': leave the images as they are")
    combine: str = setting(
        "sum", choices=COMBINATIONS, model_specific=True, label="combine",
        help="how the sorting factor combines subspaces: 'sum' (the paper), 'min', 'responsibility' (model 'paper' "
             "only)")
    center: bool = setting(
        False, model_specific=True, label="center", help="score y - mu_m instead of y (model 'paper' only)")
    noise: str = setting(
        "shared", choices=NOISE_MODELS, label="noise",
        help="'shared' noise variance across subspaces (the paper) or 'per_component'")
    random_state: int = setting(
        0, minimum=0, maximum=2**32 - 1, label="random seed",
        help="seed of every random choice (sampling, initialisation)")
    outlier_threshold: float = setting(
        2.5, minimum=0, open_minimum=True, label="outlier threshold",
        help="stop 'junk-left' with a model without a junk probability (steerable, paper): a round removes only "
             "images whose score is a robust outlier of that round's scores (robust z-score, median/MAD, of the "
             "score, or of its logarithm when every score is positive as sorting factors are, above this)")
    score_threshold: float | None = setting(
        None, label="score threshold", none_means="the particles the sort kept",
        help="after the sort, keep the particles whose final junk score is at most this and reject the others "
             "(a cut moved after the sort, as the widget's cut; none: keep the particles the sort kept)")

    def __post_init__(self):
        for declaration in SETTINGS.values():
            object.__setattr__(self, declaration.name, declaration.check(getattr(self, declaration.name)))
        self._check_combination()

    def _check_combination(self) -> None:
        """The rules that involve several settings (each field is valid on its own here)."""
        if self.total_dimension < self.n_subspaces:
            raise SettingsError(f"{{total_dimension}} ({self.total_dimension}) must be at least {{n_subspaces}} "
                                f"({self.n_subspaces}): every subspace needs at least one dimension")
        if self.n_coefficients is not None and self.n_coefficients <= self.total_dimension:
            raise SettingsError(f"{{n_coefficients}} ({self.n_coefficients}) must exceed {{total_dimension}} "
                                f"({self.total_dimension}): the subspaces live in the space of the coefficients")
        model = MODELS[self.model]
        if model.steerable_basis and not BASES[self.basis].steerable:
            steerable = " or ".join(repr(name) for name, spec in BASES.items() if spec.steerable)
            others = " or ".join(repr(name) for name, spec in MODELS.items() if not spec.steerable_basis)
            raise SettingsError(f"the {self.model} model needs the steerable basis {steerable}, not {self.basis!r}: "
                                f"set {{basis}} to {steerable}, or {{model}} to {others} for the {self.basis} basis")
        for name, declaration in SETTINGS.items():
            if declaration.model_specific and name not in model.settings and getattr(self, name) != declaration.default:
                users = " or ".join(repr(other) for other, spec in MODELS.items() if name in spec.settings)
                raise SettingsError(f"{{{name}}} applies to model {users} only; with the {self.model} model leave it "
                                    f"at its default ({quote(declaration.default)})")
        if self.stop == "schedule" and self.n_rounds is None and self.target_kept_fraction is None:
            raise SettingsError("{stop} 'schedule' needs {n_rounds} or {target_kept_fraction}, so that the sort knows "
                                "when to stop")

    @property
    def subspace_dimension(self) -> int:
        """K, the dimension of each subspace."""
        return self.total_dimension // self.n_subspaces

    def to_dict(self) -> dict:
        """Every setting by name (JSON-ready)."""
        return asdict(self)

    def used_settings(self) -> dict:
        """The settings that shape this sort: all but the model-specific ones its model does not read."""
        reads = MODELS[self.model].settings
        return {name: value for name, value in self.to_dict().items()
                if not SETTINGS[name].model_specific or name in reads}

    def replace(self, **changes) -> "SortSettings":
        """A copy with some settings changed (validated like a new one)."""
        _refuse_unknown(changes)
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict) -> "SortSettings":
        """Settings from a mapping of setting names to values; the defaults for the others."""
        if not isinstance(values, dict):
            raise SettingsError(f"settings must be a mapping of setting names to values, got {_shown(values)}")
        _refuse_unknown(values)
        return cls(**values)


def _refuse_unknown(values: dict) -> None:
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise SettingsError(f"unknown setting{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(quote(name) for name in unknown)}; the settings are "
                            f"{', '.join(SETTINGS)}")


@dataclass(frozen=True)
class ClusterSettings:
    """Where and in what pieces a sort runs: in this process (the default), on a Dask cluster of worker processes
    on this machine, or on a running Dask scheduler's workers; and how many particles each chunk of the EM (each
    Dask task) holds. They do not change the result (up to the summation order of the EM's sums), so they are
    not part of SortSettings nor of a parameters.json."""

    dask_workers: int | None = setting(
        None, minimum=1, label="Dask workers", none_means="sort in this process",
        help="sort on a Dask cluster of this many worker processes on this machine (one thread each): the chunks of "
             "the stack are read, expanded and kept by the workers (needs the dask extra)")
    dask_scheduler: str | None = setting(
        None, label="Dask scheduler", none_means="sort in this process (or --dask-workers)",
        help="sort on the workers of the running Dask scheduler at this address (tcp://host:8786, as 'dask scheduler' "
             "prints it, or the file its --scheduler-file wrote; or a dask-jobqueue cluster's): they must see the "
             "particle files at the same paths (needs the dask extra)")
    chunk_size: int | None = setting(
        None, minimum=1, label="chunk size", none_means="about 64 MB of float64 coefficients (28,053 particles at "
                                                        "the default 299 coefficients)",
        help="particles per chunk: the E-step and the scores work on one chunk at a time, and on Dask each chunk is "
             "one task (read, expanded and kept by one worker); the kept set does not depend on it beyond the "
             "summation order of the EM's sums. Smaller chunks use less memory per worker and spread the work over "
             "more workers (a few chunks per worker), larger ones mean fewer tasks for the scheduler")

    def __post_init__(self):
        for declaration in CLUSTER_SETTINGS.values():
            object.__setattr__(self, declaration.name, declaration.check(getattr(self, declaration.name)))
        if self.dask_workers is not None and self.dask_scheduler is not None:
            raise SettingsError("give {dask_workers} (a cluster on this machine) or {dask_scheduler} (a running "
                                "scheduler), not both")

    @property
    def distributed(self) -> bool:
        """True when the sort runs on Dask."""
        return self.dask_workers is not None or self.dask_scheduler is not None


def _declarations(cls=SortSettings) -> dict[str, Setting]:
    hints = typing.get_type_hints(cls)
    declarations = {}
    for each in fields(cls):
        hint = hints[each.name]
        optional = typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType"))
        value_type = next(arg for arg in typing.get_args(hint) if arg is not type(None)) if optional else hint
        declarations[each.name] = Setting(name=each.name, type=value_type, optional=optional,
                                          **each.metadata["setting"])
    return declarations


#: The declaration of every setting, by name, in the order of SortSettings' fields.
SETTINGS: dict[str, Setting] = _declarations()
#: The declaration of every setting of where a sort runs (:class:`ClusterSettings`), by name.
CLUSTER_SETTINGS: dict[str, Setting] = _declarations(ClusterSettings)


def cli_name(name: str, form: str = "") -> str:
    """How the command line names a setting: ``--n-subspaces``; a yes/no setting switched off: ``--no-normalize``."""
    declaration = SETTINGS.get(name) or CLUSTER_SETTINGS.get(name)
    option = declaration.option if declaration is not None else "--" + name.replace("_", "-")
    return "--no-" + option[2:] if form == "off" else option


def _from_before_stop(values: dict) -> dict:
    """The settings of a file written before the ``stop`` setting existed, as they ran then: a complete record
    (it has ``model``) without ``stop`` stopped by its schedule unless ``outlier_threshold`` was set."""
    if "stop" in values or "model" not in values or "outlier_threshold" not in values:
        return values
    values = dict(values)
    if values["outlier_threshold"] is None:
        del values["outlier_threshold"]
        values["stop"] = "schedule"
    else:
        values["stop"] = "junk-left"
    return values


def read_settings_file(path) -> dict:
    """The settings stored in a ``parameters.json`` (its "settings" entry) or in a JSON object of settings.

    Every value is checked against its declaration; returns {name: value} for the settings the file gives.

    Raises:
        SettingsError naming the file: missing, unreadable, not UTF-8 JSON, not an object, an unknown setting,
        or a value of the wrong type or out of bounds (naming the setting as the file does).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{literal(path)}: no such settings file") from None
    except IsADirectoryError:
        raise SettingsError(f"{literal(path)}: is a folder, not a settings file (a parameters.json)") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{literal(path)}: not a JSON settings file (not UTF-8 text)") from None
    except OSError as error:
        raise SettingsError(f"{literal(path)}: cannot read the settings file ({literal(error.strerror)})") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{literal(path)}: not a JSON file ({literal(error)})") from None
    values = content.get("settings", content) if isinstance(content, dict) else None
    if not isinstance(values, dict):
        raise SettingsError(f"{literal(path)}: expected a parameters.json of ppcasort or a JSON object of settings")
    values = _from_before_stop(values)
    checked = {}
    try:
        _refuse_unknown(values)
        for name, value in values.items():
            checked[name] = SETTINGS[name].check(value)
    except SettingsError as error:
        message = error.describe(lambda name, form: f'"{name}"' + (" false" if form == "off" else ""))
        raise SettingsError(f"{literal(path)}: {literal(message)}") from None
    return checked


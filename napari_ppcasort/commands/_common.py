"""What the commands share: the sort options generated from the settings schema, the output options, the
progress shown on stderr, and a sort run with that progress.

The settings schema and the engine are imported by the functions that use them, not with this module, so that
``ppcasort --help`` (and any command's parser that does not need them) starts without the models' imports."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import InputError, SettingsError, literal

if TYPE_CHECKING:
    from ..core.settings import ClusterSettings, Setting, SortSettings

BAR_WIDTH = 16


class UsageError(InputError):
    """A command line the parser accepted but that cannot be run as given."""


# -- sort parameters: one option per setting ----------------------------------------------------------------


def _optional(convert, name: str):
    """An argparse type for a setting that may be None: 'none' gives None, anything else ``convert(text)``."""

    def parse(text: str):
        if text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name} or 'none', got {text!r}") from None

    return parse


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a text"}


def add_settings_options(parser: argparse.ArgumentParser, defaults: SortSettings) -> None:
    """One option per setting of the schema, showing ``defaults``; ``--settings`` to start from a file."""
    group = parser.add_argument_group(
        "sort parameters", "one per setting; a value 'none' means the behaviour the description gives for none")
    from ..core.settings import SETTINGS

    for name, declaration in SETTINGS.items():
        _add_option(group, declaration, getattr(defaults, name))
    group.add_argument("--settings", type=Path, metavar="JSON",
                       help="start from the settings of an earlier run: its parameters.json (written by "
                            "'ppcasort sort' or the napari widget's Export); options given here override them")


def _add_option(group, declaration: Setting, default) -> None:
    """The option of one declared setting (``--n-subspaces INT``, ``--normalize/--no-normalize``)."""
    text = f"{declaration.help} [default: {'none' if default is None else default}]".replace("%", "%%")
    if declaration.type is bool:
        group.add_argument(declaration.option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=text)
        return
    convert = declaration.type
    value_type = _optional(convert, _TYPE_NAMES[convert]) if declaration.optional else convert
    metavar = convert.__name__.upper() + ("|none" if declaration.optional else "")
    choices = declaration.allowed
    group.add_argument(declaration.option, type=value_type, choices=choices, default=argparse.SUPPRESS,
                       metavar="{" + ",".join(choices) + "}" if choices else metavar, help=text)


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """One option per setting of where the sort runs (:class:`ClusterSettings`: ``--dask-workers``, ...)."""
    group = parser.add_argument_group(
        "where to sort", "in this process by default; on Dask with the dask extra (pip install "
                         "\"napari-ppcasort[dask]\"); in chunks of any size: the results are the same")
    from ..core.settings import CLUSTER_SETTINGS, ClusterSettings

    defaults = ClusterSettings()
    for name, declaration in CLUSTER_SETTINGS.items():
        _add_option(group, declaration, getattr(defaults, name))


def cluster_settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    """The ClusterSettings of the command line (validated); a SettingsError at once when Dask is asked for but not
    installed."""
    from ..core.settings import CLUSTER_SETTINGS, ClusterSettings

    from ..core.distributed import require_dask

    cluster = ClusterSettings(**{name: getattr(args, name) for name in CLUSTER_SETTINGS if hasattr(args, name)})
    require_dask(cluster)
    return cluster


def settings_from_args(args: argparse.Namespace, defaults: SortSettings) -> SortSettings:
    """``defaults``, then the ``--settings`` file, then the options given on the command line (validated)."""
    from ..core.settings import SETTINGS, SortSettings, read_settings_file

    values = defaults.to_dict()
    if args.settings is not None:
        values.update(read_settings_file(args.settings))
    values.update({name: getattr(args, name) for name in SETTINGS if hasattr(args, name)})
    try:
        return SortSettings.from_dict(values)
    except SettingsError as error:
        if args.settings is None:
            raise
        # the combination of the file's settings and the options: say where the values came from
        raise SettingsError(f"{error.template} (with the settings of {literal(args.settings)})") from None


# -- output options -------------------------------------------------------------------------------------


def add_output_options(parser: argparse.ArgumentParser, what: str, default: Path | None = None,
                       force_help: str = "replace the results of an earlier run in OUTDIR, as a whole (input files "
                                         "are never overwritten)") -> None:
    if default is None:
        parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                            help=f"folder to write {what} in (created if missing)")
    else:
        parser.add_argument("-o", "--output", type=Path, default=default, metavar="OUTDIR",
                            help=f"folder to write {what} in (created if missing) [default: {default}]")
    parser.add_argument("--force", action="store_true", help=force_help)


# -- progress -------------------------------------------------------------------------------------------------


class Progress:
    """Progress of a sort on a stream (stderr): bars redrawn in place on a terminal, a line per step when
    ``verbose`` and not live, nothing otherwise (a pipe or a log file gets no bar)."""

    def __init__(self, stream, *, live: bool, verbose: bool, iterations_per_round: int = 1):
        self.stream = stream
        self.live = live
        self.verbose = verbose
        self.iterations_per_round = iterations_per_round
        self.n_rounds = 0
        self._started = time.monotonic()
        self._line_open = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        # a sort that stops in the middle of a bar (error, Ctrl-C) leaves the cursor on a fresh line
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def show(self, event, basis_name: str) -> None:
        """Show one event of iter_sort."""
        from ..core.run import CoefficientsProgress, IterationDone, RoundDone, SortStarted

        if isinstance(event, CoefficientsProgress):
            if self.live:
                self._draw("coefficients", event.done, event.total, f"{event.done}/{event.total} images")
        elif isinstance(event, SortStarted):
            seconds = time.monotonic() - self._started
            if self.live:
                self._draw("coefficients", 1, 1, f"{event.n_particles} images x {event.n_coefficients} "
                           f"{basis_name}, {seconds:.1f} s", final=True)
            elif self.verbose:
                self._line(f"coefficients: {event.n_particles} images, {event.n_coefficients} {basis_name} "
                           f"coefficients each, {seconds:.1f} s")
            self.n_rounds = event.n_rounds
            self._started = time.monotonic()
        elif isinstance(event, IterationDone):
            if self.live:
                per_round = self.iterations_per_round
                step = event.iteration - (event.round - 1) * per_round
                self._draw(f"round {event.round}/{self.n_rounds}", step, per_round,
                           f"EM {step}/{per_round}, log-lik {event.log_likelihood:.6g}")
        elif isinstance(event, RoundDone):
            result, seconds = event.result, time.monotonic() - self._started
            if self.live:
                self._draw(f"round {result.round}/{self.n_rounds}", 1, 1,
                           f"kept {result.kept.size}/{result.n_total} ({result.kept_fraction:.1%}), log-lik "
                           f"{result.log_likelihood[-1]:.6g}, {seconds:.1f} s", final=True)
            elif self.verbose:
                self._line(f"round {result.round}/{self.n_rounds}: kept {result.kept.size} of {result.n_total} "
                           f"({result.kept_fraction:.1%}), cut {result.cut:.4g}, log-likelihood "
                           f"{result.log_likelihood[-1]:.6g}, {seconds:.1f} s")
            self._started = time.monotonic()

    def _draw(self, label: str, done: int, total: int, text: str, final: bool = False) -> None:
        filled = BAR_WIDTH * done // max(total, 1)
        line = f"{label} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {text}"
        width = shutil.get_terminal_size().columns
        self.stream.write("\r" + line[: width - 1] + "\x1b[K" + ("\n" if final else ""))
        self.stream.flush()
        self._line_open = not final

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def sort_with_progress(particles, settings: SortSettings, progress: Progress, client=None,
                       chunk_size: int | None = None):
    """Run iter_sort (on the Dask ``client``'s workers if given, in chunks of ``chunk_size`` particles), showing its
    events; returns the SortResult."""
    from ..core.run import SortFinished, iter_sort  # the engine: imported when a command runs, not to parse it

    progress.iterations_per_round = settings.iterations_per_round
    if progress.live:
        progress._draw("coefficients", 0, particles.n_particles, "preparing the basis")
    for event in iter_sort(particles, settings, client=client, chunk_size=chunk_size):
        if isinstance(event, SortFinished):
            return event.result
        progress.show(event, settings.basis.upper())
    raise AssertionError("iter_sort ended without a result")  # it does only when cancelled


def cli_name(name: str, form: str = "") -> str:
    """How the command line names a setting (see :func:`napari_ppcasort.core.settings.cli_name`)."""
    from ..core.settings import cli_name as settings_cli_name

    return settings_cli_name(name, form)


def rounds_text(n: int) -> str:
    return f"{n} pruning round" + ("" if n == 1 else "s")


def file_names(written: dict) -> str:
    return ", ".join(path.name for paths in written.values() for path in paths)


__all__ = ["UsageError", "add_settings_options", "settings_from_args", "add_cluster_options",
           "cluster_settings_from_args", "add_output_options", "Progress",
           "sort_with_progress", "rounds_text", "file_names", "cli_name"]

"""The ``ppcasort`` command line: sort particle images headless, simulate a stack, run the demo, open the GUI.

    ppcasort sort particles.star -o sorted/ [--n-subspaces 3 --alpha 0.05 ...]
    ppcasort simulate -o simulated/ [--n-particles 2400 --n-outliers 300 --n-noise 300 --snr 0.3 ...]
    ppcasort demo [-o ppcasort-demo]
    ppcasort gui [particles.star]

Exit status: 0 on success, 2 for a usage or input error (one line on stderr), 1 for anything else.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np

from . import __version__
from .core.particles import ParticleFileError, open_particles
from .core.pipeline import (
    BASES,
    MODELS,
    OutputExistsError,
    SortSettings,
    existing_outputs,
    export_results,
    make_sorter,
    prepare_coefficients,
    subspace_images,
)
from .core.preprocess import BadImageError
from .core.simulate import LABEL_NAMES, NOISE, OUTLIER, PARTICLE, load_volume, simulate_particles, write_simulated
from .core.sorting import COMBINATIONS, OnlineSorter, SortRound

__all__ = ["main", "REPORT_NAME", "DEMO_STACK", "DEMO_SETTINGS"]

#: The report figure every sort writes next to its other outputs.
REPORT_NAME = "report.png"
#: Components of each subspace shown in the report.
N_COMPONENTS_SHOWN = 4
#: The demo's simulated stack (also the defaults of ``ppcasort simulate``): 20 % junk, 32 px, SNR 0.3.
DEMO_STACK = {"n_particles": 2400, "n_outliers": 300, "n_noise": 300, "box_size": 32, "snr": 0.3, "random_state": 0}
#: Where the demo's settings differ from SortSettings (nowhere: the demo shows the defaults).
DEMO_SETTINGS: dict = {}
DEMO_OUTPUT = "ppcasort-demo"
DEMO_NAME = "simulated"
#: Choices of the text-valued settings.
SETTING_CHOICES = {"model": MODELS, "basis": BASES, "combine": COMBINATIONS}
#: The widget as napari.yaml names it.
PLUGIN_NAME, WIDGET_NAME = "napari-ppcasort", "Sort particles"
BAR_WIDTH = 16

# Errors that are the user's to fix (bad input file, bad parameter, existing output): one line, exit 2.
USER_ERRORS = (ValueError, OSError)


class UsageError(Exception):
    """A command line the parser accepted but that cannot be run as given."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), pointing at --help."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- sort parameters: one option per SortSettings field ----------------------------------------------------


def _settings_descriptions() -> dict[str, str]:
    """Each SortSettings field's description, read from the class docstring ("name : text" paragraphs)."""
    descriptions: dict[str, str] = {}
    name = None
    for line in inspect.getdoc(SortSettings).splitlines():
        start = re.match(r"^(\w+) : (.*)$", line)
        if start:
            name = start.group(1)
            descriptions[name] = start.group(2).strip()
        elif name and line.startswith(" ") and line.strip():
            descriptions[name] += " " + line.strip()
        else:
            name = None
    return descriptions


def _option(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _optional(convert):
    """An argparse type for a setting that may be None: 'none' gives None, anything else ``convert(text)``."""

    def parse(text: str):
        if text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {convert.__name__} or 'none', got {text!r}") from None

    return parse


def _add_settings_options(parser: argparse.ArgumentParser, defaults: SortSettings) -> None:
    """One option per SortSettings field, showing ``defaults``; an option given sets its field (see _settings)."""
    group = parser.add_argument_group(
        "sort parameters", "one per setting; a value 'none' means the behaviour the description gives for None")
    descriptions = _settings_descriptions()
    hints = typing.get_type_hints(SortSettings)
    for field in fields(SortSettings):
        default = getattr(defaults, field.name)
        text = f"{descriptions[field.name]} [default: {'none' if default is None else default}]".replace("%", "%%")
        hint = hints[field.name]
        if hint is bool:
            group.add_argument(_option(field.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
            continue
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (convert,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            value_type, metavar = _optional(convert), f"{convert.__name__.upper()}|none"
        else:
            value_type, metavar = hint, hint.__name__.upper()
        choices = SETTING_CHOICES.get(field.name)
        group.add_argument(_option(field.name), type=value_type, choices=choices, default=argparse.SUPPRESS,
                           metavar="{" + ",".join(choices) + "}" if choices else metavar, help=text)
    group.add_argument("--settings", type=Path, metavar="JSON",
                       help="start from the settings of an earlier run: its parameters.json (written by "
                            "'ppcasort sort' or the napari widget's Export); options given here override them")


def _settings(args: argparse.Namespace, defaults: SortSettings) -> SortSettings:
    """``defaults``, then the ``--settings`` file, then the options given on the command line."""
    values = defaults.to_dict()
    if args.settings is not None:
        values.update(_read_settings_file(args.settings))
    values.update({f.name: getattr(args, f.name) for f in fields(SortSettings) if hasattr(args, f.name)})
    return SortSettings.from_dict(values)


def _read_settings_file(path: Path) -> dict:
    """The settings in a parameters.json (its "settings" entry) or in a JSON object of settings."""
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from None
    settings = content.get("settings", content) if isinstance(content, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a parameters.json of ppcasort or a JSON object of settings")
    return settings


# -- progress -------------------------------------------------------------------------------------------------


class _Progress:
    """Progress of a sort on a stream (stderr): bars redrawn in place on a terminal, a line per step when
    ``verbose`` and not live, nothing otherwise (a pipe or a log file gets no bar)."""

    def __init__(self, stream, *, live: bool, verbose: bool):
        self.stream = stream
        self.live = live
        self.verbose = verbose
        self._started = time.monotonic()
        self._line_open = False

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        # a sort that stops in the middle of a bar (error, Ctrl-C) leaves the cursor on a fresh line
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def coefficients_started(self, n_images: int) -> None:
        self._started = time.monotonic()
        if self.live:
            self._draw("coefficients", 0, n_images, "preparing the basis")

    def coefficients(self, done: int, total: int) -> None:
        if self.live:
            self._draw("coefficients", done, total, f"{done}/{total} images")

    def coefficients_done(self, coefficients: np.ndarray, basis_name: str) -> None:
        seconds = time.monotonic() - self._started
        if self.live:
            self._draw("coefficients", 1, 1, f"{coefficients.shape[0]} images x {coefficients.shape[1]} "
                       f"{basis_name}, {seconds:.1f} s", final=True)
        elif self.verbose:
            self._line(f"coefficients: {coefficients.shape[0]} images, {coefficients.shape[1]} {basis_name} "
                       f"coefficients each, {seconds:.1f} s")

    def round_started(self) -> None:
        self._started = time.monotonic()

    def iteration(self, round_number: int, n_rounds: int, iteration: int, per_round: int,
                  log_likelihood: float) -> None:
        if self.live:
            self._draw(f"round {round_number}/{n_rounds}", iteration, per_round,
                       f"EM {iteration}/{per_round}, log-lik {log_likelihood:.6g}")

    def round_done(self, result: SortRound, n_rounds: int) -> None:
        seconds = time.monotonic() - self._started
        if self.live:
            self._draw(f"round {result.round}/{n_rounds}", 1, 1,
                       f"kept {result.kept.size}/{result.n_total} ({result.kept_fraction:.1%}), log-lik "
                       f"{result.log_likelihood[-1]:.6g}, {seconds:.1f} s", final=True)
        elif self.verbose:
            self._line(f"round {result.round}/{n_rounds}: kept {result.kept.size} of {result.n_total} "
                       f"({result.kept_fraction:.1%}), cut {result.cut:.4g}, log-likelihood "
                       f"{result.log_likelihood[-1]:.6g}, {seconds:.1f} s")

    def _draw(self, label: str, done: int, total: int, text: str, final: bool = False) -> None:
        filled = BAR_WIDTH * done // max(total, 1)
        line = f"{label} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {text}"
        width = shutil.get_terminal_size().columns
        self.stream.write("\r" + line[: width - 1] + "\x1b[K" + ("\n" if final else ""))
        self.stream.flush()
        self._line_open = not final

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _progress(args: argparse.Namespace) -> _Progress:
    return _Progress(sys.stderr, live=sys.stderr.isatty(), verbose=args.verbose)


# -- the sort ---------------------------------------------------------------------------------------------


def _sort_rounds(sorter: OnlineSorter, coefficients: np.ndarray, progress: _Progress) -> SortRound:
    """Run the online sort one EM iteration at a time (for the progress bars); return the last round."""
    sorter.start(coefficients)
    n_rounds = len(sorter.schedule)
    result = None
    while not sorter.finished:
        round_number = 1 if result is None else result.round + 1
        progress.round_started()
        for iteration in range(1, sorter.iterations_per_round + 1):
            log_likelihood = sorter.em_step()
            progress.iteration(round_number, n_rounds, iteration, sorter.iterations_per_round, log_likelihood)
        result = sorter.prune()
        progress.round_done(result, n_rounds)
    return result


def _sort_and_write(particles, settings: SortSettings, out_dir: Path, *, force: bool, progress: _Progress,
                    title: str) -> tuple[SortRound, np.ndarray, dict[str, list[Path]]]:
    """Sort ``particles``, write every output in ``out_dir``; return (last round, kept mask, written paths)."""
    from .core.report import write_report  # matplotlib: only when there is a report to draw

    progress.coefficients_started(particles.n_particles)
    try:
        prepared = prepare_coefficients(particles, settings, progress=progress.coefficients)
    except BadImageError as error:
        raise ParticleFileError(f"{particles.path}: {error}") from None
    progress.coefficients_done(prepared.coefficients, settings.basis.upper())
    final = _sort_rounds(make_sorter(settings, prepared.basis), prepared.coefficients, progress)
    kept_mask = final.removal_round == 0
    written = export_results(particles, final, kept_mask, out_dir, settings, force=force)
    means, components = subspace_images(prepared.basis, final.parameters, N_COMPONENTS_SHOWN)
    written["report"] = [write_report(out_dir / REPORT_NAME, final, kept_mask, means, components, title=title,
                                      settings=settings)]
    return final, kept_mask, written


def _refuse_file_as_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder")


def _check_output_folder(out_dir: Path, force: bool, other_names: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output folder that is a file or already holds results (unless force)."""
    _refuse_file_as_folder(out_dir)
    if force or not out_dir.is_dir():
        return
    existing = [path.name for path in existing_outputs(out_dir)]
    existing += [name for name in (REPORT_NAME,) + other_names if (out_dir / name).exists()]
    if existing:
        raise OutputExistsError(f"{out_dir} already holds results ({', '.join(sorted(set(existing)))}); choose "
                                "another folder or use --force to replace them")


def _open_for_sorting(path: Path):
    particles = open_particles(path)
    if particles.missing_stacks:
        particles.close()
        raise ParticleFileError(f"{path}: {len(particles.missing_stacks)} of its image stacks are missing "
                                f"(first: {particles.missing_stacks[0]})")
    return particles


def _rounds(n: int) -> str:
    return f"{n} pruning round" + ("" if n == 1 else "s")


def _file_names(written: dict[str, list[Path]]) -> str:
    return ", ".join(path.name for paths in written.values() for path in paths)


def _run_sort(args: argparse.Namespace) -> int:
    settings = _settings(args, SortSettings())
    _check_output_folder(args.output, args.force)
    with _open_for_sorting(args.input) as particles, _progress(args) as progress:
        final, kept_mask, written = _sort_and_write(particles, settings, args.output, force=args.force,
                                                    progress=progress, title=str(args.input))
    n_kept = int(kept_mask.sum())
    print(f"kept {n_kept} of {final.n_total} particles ({n_kept / final.n_total:.1%}) after "
          f"{_rounds(final.round)}; wrote {_file_names(written)} to {args.output}")
    return 0


# -- simulate and demo --------------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace):
    volume = None if args.volume is None else load_volume(args.volume, size=args.box)
    return simulate_particles(
        n_particles=args.n_particles, n_outliers=args.n_outliers, n_noise=args.n_noise, box_size=args.box,
        volume=volume, snr=args.snr, max_shift=args.max_shift,
        defocus_um=None if args.defocus is None else tuple(args.defocus), pixel_size=args.pixel_size,
        random_state=args.seed)


def _write_simulated(stack, out_dir: Path, name: str, force: bool) -> dict[str, Path]:
    try:
        return write_simulated(stack, out_dir, name=name, overwrite=force)
    except FileExistsError:
        raise OutputExistsError(f"{out_dir} already holds a simulated stack named {name!r}; choose another folder "
                                "or use --force to replace it") from None


def _run_simulate(args: argparse.Namespace) -> int:
    _refuse_file_as_folder(args.output)
    stack = _simulate(args)
    paths = _write_simulated(stack, args.output, args.name, args.force)
    counts = ", ".join(f"{np.count_nonzero(stack.labels == code)} {LABEL_NAMES[code]}" for code in sorted(LABEL_NAMES))
    print(f"wrote {stack.images.shape[0]} images of {args.box} px ({counts}; noise variance "
          f"{stack.noise_variance:.4g}) to {paths['star']}, {paths['stack'].name} and {paths['labels'].name}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    settings = _settings(args, SortSettings(**DEMO_SETTINGS))
    demo_files = tuple(f"{DEMO_NAME}{suffix}" for suffix in (".mrcs", ".star", "_labels.csv"))
    try:
        _check_output_folder(args.output, args.force, demo_files)
    except OutputExistsError:
        raise OutputExistsError(f"{args.output} already holds a demo run; use --force to replace it, or -o to "
                                "choose another folder") from None
    stack = simulate_particles(**DEMO_STACK)
    paths = _write_simulated(stack, args.output, DEMO_NAME, args.force)
    with _open_for_sorting(paths["star"]) as particles, _progress(args) as progress:
        final, kept_mask, written = _sort_and_write(particles, settings, args.output, force=args.force,
                                                    progress=progress, title=f"demo: {paths['star']}")
    labels = stack.labels
    kept_labels = labels[kept_mask]
    n_kept = kept_labels.size
    print(f"kept {n_kept} of {labels.size} images ({n_kept / labels.size:.1%}) after {_rounds(final.round)} "
          f"in {time.monotonic() - started:.1f} s")
    print(f"purity of the kept set: {np.mean(kept_labels == PARTICLE):.1%} particles "
          f"(raw stack: {np.mean(labels == PARTICLE):.1%})")
    print(f"junk left in the kept set: {np.count_nonzero(kept_labels == OUTLIER)} of "
          f"{np.count_nonzero(labels == OUTLIER)} outliers, {np.count_nonzero(kept_labels == NOISE)} of "
          f"{np.count_nonzero(labels == NOISE)} noise images")
    print(f"results in {args.output}: {paths['star'].name} (the simulated stack, true labels in "
          f"{paths['labels'].name}), {_file_names(written)}")
    return 0


# -- gui --------------------------------------------------------------------------------------------------


def _run_gui(args: argparse.Namespace) -> int:
    if args.input is not None:
        _open_for_sorting(args.input).close()
    if sys.platform.startswith("linux") and not any(
            os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")):
        raise UsageError("no display to open napari on (DISPLAY is not set); over SSH, sort with 'ppcasort sort' "
                         "instead")
    import napari

    viewer = napari.Viewer(title="ppcasort")
    if args.input is not None:
        viewer.open(str(args.input), plugin=PLUGIN_NAME)
    viewer.window.add_plugin_dock_widget(PLUGIN_NAME, WIDGET_NAME)
    napari.run()
    return 0


# -- the parser -------------------------------------------------------------------------------------------


def _add_output_options(parser: argparse.ArgumentParser, what: str, default: Path | None = None,
                        force_help: str = "replace the results of an earlier run in OUTDIR (input files are never "
                                          "overwritten)") -> None:
    if default is None:
        parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                            help=f"folder to write {what} in (created if missing)")
    else:
        parser.add_argument("-o", "--output", type=Path, default=default, metavar="OUTDIR",
                            help=f"folder to write {what} in (created if missing) [default: {default}]")
    parser.add_argument("--force", action="store_true", help=force_help)


def _add_simulation_options(parser: argparse.ArgumentParser) -> None:
    engine = inspect.signature(simulate_particles).parameters
    stack = parser.add_argument_group("simulated stack")
    stack.add_argument("--n-particles", type=int, metavar="N", default=DEMO_STACK["n_particles"],
                       help="projections of the volume [default: %(default)s]")
    stack.add_argument("--n-outliers", type=int, metavar="N", default=DEMO_STACK["n_outliers"],
                       help="outliers: crops of a photograph, energy-matched to the particles [default: %(default)s]")
    stack.add_argument("--n-noise", type=int, metavar="N", default=DEMO_STACK["n_noise"],
                       help="pure-noise images [default: %(default)s]")
    stack.add_argument("--snr", type=float, metavar="SNR", default=DEMO_STACK["snr"],
                       help="signal-to-noise ratio: mean particle power / noise variance (inf: no noise) "
                            "[default: %(default)s]")
    stack.add_argument("--box", type=int, metavar="PX", default=DEMO_STACK["box_size"],
                       help="image side in pixels; a --volume is resampled to it [default: %(default)s]")
    stack.add_argument("--volume", type=Path, metavar="MRC",
                       help="3-D density map (cubic MRC) to project [default: the built-in asymmetric phantom]")
    stack.add_argument("--max-shift", type=float, metavar="PX", default=engine["max_shift"].default,
                       help="particles are shifted by up to this many pixels in x and y [default: %(default)s]")
    stack.add_argument("--defocus", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="apply a CTF with a defocus drawn in [LOW, HIGH] micrometres [default: no CTF]")
    stack.add_argument("--pixel-size", type=float, metavar="ANGSTROM", default=engine["pixel_size"].default,
                       help="pixel size in angstrom [default: %(default)s]")
    stack.add_argument("--seed", type=int, metavar="SEED", default=DEMO_STACK["random_state"],
                       help="seed of every random choice [default: %(default)s]")
    stack.add_argument("--name", metavar="NAME", default=inspect.signature(write_simulated).parameters["name"].default,
                       help="base name of the files: NAME.mrcs, NAME.star, NAME_labels.csv [default: %(default)s]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ppcasort", description="Remove junk particle images (ice, carbon, contamination, empty "
                     "boxes) from cryo-EM particle stacks with a mixture of probabilistic PCA and online sorting.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sort = commands.add_parser(
        "sort", help="sort a particle set (.mrcs, .mrc, .star, .cs) and write the kept and rejected sets",
        description="Sort a particle set and write kept.star/.mrcs (or kept.cs), rejected.star/.mrcs (or "
                    "rejected.cs), scores.csv, parameters.json and report.png in OUTDIR.")
    sort.add_argument("input", type=Path, metavar="INPUT", help="particle file: .mrcs/.mrc stack, RELION .star or "
                      "cryoSPARC .cs")
    _add_output_options(sort, "the results")
    sort.add_argument("-v", "--verbose", action="store_true",
                      help="a line per pruning round on stderr even when it is not a terminal")
    _add_settings_options(sort, SortSettings())
    sort.set_defaults(run=_run_sort)

    simulate = commands.add_parser(
        "simulate", help="write a simulated particle stack with known junk (labels included)",
        description="Write NAME.mrcs, NAME.star (true labels in the ppcasortTrueLabel column: 0 particle, "
                    "1 outlier, 2 noise) and NAME_labels.csv in OUTDIR.")
    _add_output_options(simulate, "the stack", force_help="replace an earlier stack of the same NAME in OUTDIR")
    _add_simulation_options(simulate)
    simulate.set_defaults(run=_run_simulate)

    demo = commands.add_parser(
        "demo", help="sort a built-in simulated stack and report how pure the kept set is",
        description=f"Simulate {sum(DEMO_STACK[k] for k in ('n_particles', 'n_outliers', 'n_noise'))} images "
                    f"({DEMO_STACK['n_particles']} particles, {DEMO_STACK['n_outliers']} outliers, "
                    f"{DEMO_STACK['n_noise']} noise; {DEMO_STACK['box_size']} px, SNR {DEMO_STACK['snr']}), sort "
                    "them as 'ppcasort sort' does and compare the kept set with the truth.")
    _add_output_options(demo, "the simulated stack and the results", default=Path(DEMO_OUTPUT))
    demo.add_argument("-v", "--verbose", action="store_true",
                      help="a line per pruning round on stderr even when it is not a terminal")
    _add_settings_options(demo, SortSettings(**DEMO_SETTINGS))
    demo.set_defaults(run=_run_demo)

    gui = commands.add_parser("gui", help="open napari with the sorting widget (and INPUT loaded)",
                              description="Open napari with the sorting widget docked and INPUT, if given, loaded.")
    gui.add_argument("input", type=Path, nargs="?", metavar="INPUT", help="particle file to open")
    gui.set_defaults(run=_run_gui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, *USER_ERRORS) as error:
        message = str(error).replace("\n", " ") or type(error).__name__
        print(f"ppcasort {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ppcasort {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The results of a sort as files: kept and rejected sets, scores.csv, report.png and parameters.json.

They are written as one output set (:class:`~napari_ppcasort.core.outputs.OutputSet`): all of them appear
together or none does. ``parameters.json`` is written last and is the set's manifest: its "files" entry
lists every file of the set, so that a later ``--force`` run removes exactly them (no stale ``kept.star``
beside a new ``kept.cs``).

Per-particle outputs are the entries of :data:`COLUMNS`: each is a column of ``scores.csv`` and, when it has
a STAR label, of the kept and rejected STAR files. Adding one (e.g. a junk probability) is one entry.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError, literal
from .models import junk_probability
from .outputs import OutputSet
from .particles import FORMATS, _image_path_name, input_files, open_particles, subset_paths, write_subset
from .selection import OVERRIDES_KEY, Overrides, base_mask, kept_mask as selected_mask, read_overrides_file
from .settings import SortSettings, read_settings_file

__all__ = [
    "Column",
    "COLUMNS",
    "KEPT",
    "REJECTED",
    "SCORES_NAME",
    "PARAMETERS_NAME",
    "REPORT_NAME",
    "existing_results",
    "result_names",
    "estimated_bytes",
    "open_results_folder",
    "write_results",
    "particle_columns",
    "RecordedResult",
    "read_results",
]

KEPT, REJECTED = "kept", "rejected"
SCORES_NAME = "scores.csv"
PARAMETERS_NAME = "parameters.json"
REPORT_NAME = "report.png"
#: Components of each subspace shown in the report.
N_COMPONENTS_SHOWN = 4


@dataclass(frozen=True)
class Column:
    """A per-particle output of a sort.

    Attributes:
        name: its column in scores.csv.
        values: ``values(result, kept_mask) -> (N,) or None``, from the result (its ``final`` SortRound and its
            ``settings``) and the (N,) bool kept mask; None when the column does not apply to the result's model.
        text: how one value is written in scores.csv.
        star_label: its column in the kept and rejected STAR files (None: scores.csv only).
    """

    name: str
    values: Callable
    text: Callable[[object], str]
    star_label: str | None = None


#: The per-particle outputs, in the order of their columns (after ``index`` and ``image_name``).
COLUMNS: tuple[Column, ...] = (
    Column("score", lambda result, kept: result.final.final_scores, lambda value: repr(float(value)), "ppcasortScore"),
    Column("junk_probability", lambda result, kept: junk_probability(result.settings, result.final.final_scores),
           lambda value: f"{float(value):.6g}", "ppcasortJunkProbability"),
    Column("removal_round", lambda result, kept: result.final.removal_round, lambda value: str(int(value)),
           "ppcasortRound"),
    Column("kept", lambda result, kept: kept, lambda value: str(int(value))),
)


def known_result_names() -> list[str]:
    """Every file name a sort of any format writes."""
    suffixes = sorted({suffix for each in FORMATS.values() for suffix in each.output_suffixes})
    return [f"{name}{suffix}" for name in (KEPT, REJECTED) for suffix in suffixes] + \
        [SCORES_NAME, REPORT_NAME, PARAMETERS_NAME]


def result_names(particles) -> list[str]:
    """Every file name a sort of ``particles`` may write."""
    return [path.name for name in (KEPT, REJECTED) for path in subset_paths(particles, ".", name).values()] + \
        [SCORES_NAME, REPORT_NAME, PARAMETERS_NAME]


def existing_results(folder) -> list[str]:
    """The names of the files of the results already in ``folder``: those its manifest lists, and every file
    named as a sort's output (results of older versions have no manifest)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = {name for name in known_result_names() if (folder / name).is_file() or (folder / name).is_symlink()}
    try:
        listed = json.loads((folder / PARAMETERS_NAME).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    if isinstance(listed, list):
        names |= {name for name in listed if isinstance(name, str) and Path(name).name == name
                  and not name.startswith(".") and ((folder / name).is_file() or (folder / name).is_symlink())}
    return sorted(names)


def estimated_bytes(particles) -> int:
    """About how many bytes the results of a sort of ``particles`` take (for the free-space check)."""
    n = particles.n_particles
    if FORMATS[particles.kind].writes_images:
        subsets = n * particles.box_size**2 * 4 + 2 * 1024
        try:
            metadata = Path(particles.path).stat().st_size if particles.kind == "star" else 0
        except OSError:
            metadata = 0
        subsets += int(1.5 * metadata) + 120 * n  # STAR text: the input's rows plus the new columns
    else:
        subsets = particles.records.nbytes + 2 * 256
    scores = 80 * n + sum(len(str(name)) for name in _image_names(particles) or ())
    report = 3 * 2**20
    return int(subsets + scores + report)


def open_results_folder(folder, particles, *, force: bool = False, inputs=()) -> OutputSet:
    """The OutputSet for the results of a sort of ``particles`` in ``folder`` (enter it to lock and check):
    the previous results are refused unless ``force``, and neither they nor the new files may be an input
    (the particle files, or the extra ``inputs`` such as a settings file)."""
    return OutputSet(folder, previous=existing_results, planned=result_names(particles), force=force,
                     inputs=[*input_files(particles), *inputs], needed_bytes=estimated_bytes(particles),
                     what="results")


def particle_columns(result, kept_mask) -> dict[str, np.ndarray]:
    """The per-particle outputs of ``result`` (a SortResult or a RecordedResult) by column name (:data:`COLUMNS`,
    those that apply to its model), each (N,), for the (N,) bool ``kept_mask``; a RecordedResult gives the values
    it read from scores.csv."""
    recorded = getattr(result, "recorded_columns", {})
    columns = {}
    for column in COLUMNS:
        values = recorded[column.name] if column.name in recorded and column.name != "kept" else \
            column.values(result, kept_mask)
        if values is not None:
            columns[column.name] = np.asarray(values)
    return columns


def write_results(output: OutputSet, result, kept_mask=None, *, report: bool = True, title: str | None = None,
                  n_components_shown: int = N_COMPONENTS_SHOWN, input_path=None) -> dict[str, list[Path]]:
    """Stage every file of the results of ``result`` (a SortResult, or a RecordedResult re-cut) in ``output``,
    the manifest last.

    kept_mask : (N,) bool, the particles to keep (default: ``result.kept_mask``, its cut and overrides). What
        differs from the cut (``result.base_mask()``) is recorded as manual overrides in parameters.json, so that
        ``ppcasort sort --settings parameters.json`` gives the same kept set.
    input_path : the input as parameters.json records it (default: the particle set's path).
    Returns where the files will be once ``output`` is committed: {"kept": [...], "rejected": [...],
    "scores": [path], "report": [path], "parameters": [path]} (an empty set has an empty list).
    """
    written: dict[str, list[Path]] = {KEPT: [], REJECTED: [], "scores": [], "parameters": [], "report": []}
    particles, final = result.particles, result.final
    kept_mask = result.kept_mask if kept_mask is None else np.asarray(kept_mask, dtype=bool)
    if kept_mask.shape != (final.n_total,):
        raise ValueError(f"kept_mask must have one entry per particle ({final.n_total}), got shape {kept_mask.shape}")
    columns = particle_columns(result, kept_mask)
    extra = {column.star_label: columns[column.name] for column in COLUMNS if column.star_label and column.name in columns}
    for name, mask in ((KEPT, kept_mask), (REJECTED, ~kept_mask)):
        if not mask.any():
            continue
        finals = subset_paths(particles, output.folder, name)
        staged = {suffix: output.path(path.name) for suffix, path in finals.items()}
        _staged_write(output, lambda: write_subset(particles, np.flatnonzero(mask), staged, extra_columns=extra,
                                                   stack_name=_stack_name(finals)))
        written[name] = list(finals.values())
    _staged_write(output, lambda: _write_scores(output.path(SCORES_NAME), columns, _image_names(particles)))
    written["scores"] = [output.final_path(SCORES_NAME)]
    if report and kept_mask.any():
        figure = result.report(kept_mask=kept_mask, title=title, n_components_shown=n_components_shown)
        path = output.path(REPORT_NAME)
        _staged_write(output, lambda: _save_png(figure, path))
        written["report"] = [output.final_path(REPORT_NAME)]
    parameters = {
        "input": _input_text(particles, input_path),
        "n_particles": int(final.n_total),
        "n_kept": int(kept_mask.sum()),
        "settings": result.settings.to_dict(),
        OVERRIDES_KEY: Overrides.between(kept_mask, result.base_mask()).to_dict(),
        "rounds": int(final.round),
        "em_iterations": int(final.n_iterations),
        "final_log_likelihood": float(final.log_likelihood[-1]) if final.log_likelihood.size else None,
        "estimated": result.estimated,
        "files": [*output.names, PARAMETERS_NAME],
    }
    path = output.path(PARAMETERS_NAME)
    _staged_write(output, lambda: _write_json(path, parameters))
    written["parameters"] = [output.final_path(PARAMETERS_NAME)]
    return written


def _input_text(particles, input_path) -> str | None:
    if input_path is not None:
        return str(Path(input_path).resolve())
    if not input_files(particles):  # an array: no file
        return None
    return str(Path(particles.path).resolve())


def _staged_write(output: OutputSet, write: Callable[[], None]) -> None:
    try:
        write()
    except OSError as error:
        raise output.write_error(error) from error


def _stack_name(finals: dict[str, Path]) -> str | None:
    return _image_path_name(finals[".mrcs"], None) if ".mrcs" in finals else None


def _image_names(particles) -> list[str] | None:
    table = getattr(particles, "table", None)
    if table is not None and "rlnImageName" in table.columns:
        return [str(v) for v in table["rlnImageName"]]
    return None


def _write_scores(path: Path, columns: dict[str, np.ndarray], names: list[str] | None) -> None:
    written = [column for column in COLUMNS if column.name in columns]
    values = [columns[column.name] for column in written]
    with open(path, "x", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "image_name", *(column.name for column in written)])
        for i in range(values[0].size):
            writer.writerow([i, names[i] if names else "",
                             *(column.text(column_values[i]) for column, column_values in zip(written, values))])


def _save_png(figure, path: Path) -> None:
    from .report import REPORT_DPI

    with open(path, "xb") as stream:
        figure.savefig(stream, format="png", dpi=REPORT_DPI)


def _write_json(path: Path, content: dict) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)


# -- reading exported results back (ppcasort select) ---------------------------------------------------------


@dataclass
class _RecordedFinal:
    """The parts of the last SortRound that parameters.json and scores.csv keep."""

    final_scores: np.ndarray
    removal_round: np.ndarray
    round: int
    n_iterations: int
    log_likelihood: np.ndarray

    @property
    def n_total(self) -> int:
        return self.final_scores.size


@dataclass
class RecordedResult:
    """The results of a sort as exported (parameters.json and scores.csv) with their particle set: a result that
    can be cut again and written (:func:`write_results`, without a report: the model is not kept).

    Attributes:
        particles: the particle set, opened from the path parameters.json records.
        settings: the settings of the sort (with the cut of the export).
        final: the final scores (N,), removal rounds (N,), rounds, EM iterations and last log-likelihood.
        overrides: the manual overrides of the export.
        recorded_columns: every column of scores.csv by name, (N,) each.
        estimated: what the sort measured from the data, as parameters.json records it (empty for older files).
    """

    particles: object
    settings: SortSettings
    final: _RecordedFinal
    overrides: Overrides
    recorded_columns: dict
    estimated: dict

    @property
    def scores(self) -> np.ndarray:
        return self.final.final_scores

    @property
    def sort_kept_mask(self) -> np.ndarray:
        return self.final.removal_round == 0

    def base_mask(self, score_threshold: float | None = None) -> np.ndarray:
        threshold = self.settings.score_threshold if score_threshold is None else score_threshold
        return base_mask(self.scores, self.sort_kept_mask, threshold)

    @property
    def kept_mask(self) -> np.ndarray:
        return selected_mask(self.scores, self.sort_kept_mask, self.settings.score_threshold, self.overrides)


def read_results(folder) -> RecordedResult:
    """The results exported into ``folder`` (its parameters.json and scores.csv), with the particle set opened.

    InputError naming the file: no results there, a result of an array (no input file to open), a scores.csv
    that does not match parameters.json or the particle set.
    """
    folder = Path(folder)
    parameters_path, scores_path = folder / PARAMETERS_NAME, folder / SCORES_NAME
    for path in (parameters_path, scores_path):
        if not path.is_file():
            raise InputError(f"{literal(folder)}: holds no results of a sort ({literal(path.name)} is missing)")
    try:
        recorded = json.loads(parameters_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{literal(parameters_path)}: cannot be read ({literal(error)})") from None
    settings = SortSettings.from_dict(read_settings_file(parameters_path))
    source = recorded.get("input") if isinstance(recorded, dict) else None
    if not isinstance(source, str):
        raise InputError(f"{literal(parameters_path)}: records no input file (the sort was of images in memory); "
                         "its kept and rejected sets hold the images")
    import pandas as pd

    table = pd.read_csv(scores_path)
    missing = [name for name in ("index", "score", "removal_round") if name not in table.columns]
    if missing:
        raise InputError(f"{literal(scores_path)}: has no column {literal(missing[0])}")
    particles = open_particles(source)
    n = particles.n_particles
    if len(table) != n or not np.array_equal(table["index"].to_numpy(), np.arange(n)):
        particles.close()
        raise InputError(f"{literal(scores_path)}: has {len(table)} rows for the {n} particles of {literal(source)}")
    final = _RecordedFinal(final_scores=table["score"].to_numpy(np.float64),
                           removal_round=table["removal_round"].to_numpy(np.int64),
                           round=int(recorded.get("rounds", 0)), n_iterations=int(recorded.get("em_iterations", 0)),
                           log_likelihood=np.array([recorded["final_log_likelihood"]], dtype=np.float64)
                           if recorded.get("final_log_likelihood") is not None else np.empty(0))
    columns = {name: table[name].to_numpy() for name in table.columns if name not in ("index", "image_name")}
    estimated = recorded.get("estimated")
    return RecordedResult(particles=particles, settings=settings, final=final,
                          overrides=read_overrides_file(parameters_path, n), recorded_columns=columns,
                          estimated=dict(estimated) if isinstance(estimated, dict) else {})

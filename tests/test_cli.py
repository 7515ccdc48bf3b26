"""The ``ppcasort`` command line, run as a subprocess the way a user runs it."""

import csv
import json
import os
import pty
import re
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import matplotlib.image
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from napari_ppcasort import __version__
from napari_ppcasort.cli import main
from napari_ppcasort.core.particles import open_particles
from napari_ppcasort.core.pipeline import SortSettings
from napari_ppcasort.core.simulate import NOISE, OUTLIER, PARTICLE

from fixture_paths import EMPIAR, VOLUME
from fixture_paths import TOY as TOY_FOLDER

TOY = TOY_FOLDER / "toy_projections.star"
# Small settings so a sort of the 1000 toy images (30 px, noise-free: nothing to normalise) takes seconds.
# Counts below follow from alpha and the rounds, given explicitly so that changing the product defaults does not
# change them.
TOY_SETTINGS = ["--model", "paper", "--stop", "schedule", "--no-normalize", "--basis", "pca", "--n-coefficients", "40", "--total-dimension", "12", "--alpha", "0.05",
                "--n-rounds", "2", "--iterations-per-round", "2"]
TINY_SETTINGS = ["--stop", "schedule", "--n-subspaces", "1", "--total-dimension", "2", "--n-coefficients", "4", "--alpha", "0.05",
                 "--n-rounds", "2"]
COMMAND = [sys.executable, "-m", "napari_ppcasort.cli"]


def run(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def assert_png(path, min_side=500):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side
    assert image[..., :3].std() > 0.05  # not a blank page


# -- sort ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_sort(tmp_path_factory):
    """One sort of the toy projections; (output folder, completed process)."""
    out = tmp_path_factory.mktemp("toy") / "sorted"
    return out, run("sort", TOY, "-o", out, *TOY_SETTINGS)


def test_sort_writes_readable_kept_and_rejected_sets_scores_parameters_and_report(toy_sort):
    out, result = toy_sort
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # quiet in a pipe
    assert re.fullmatch(rf"kept 902 of 1000 particles \(90\.2%\) after 2 pruning rounds; wrote .*report\.png "
                        rf"to {re.escape(str(out))}\n", result.stdout)

    with open(out / "scores.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["index"]) for row in rows] == list(range(1000))
    kept_rows = [int(row["index"]) for row in rows if row["kept"] == "1"]
    assert len(kept_rows) == 902
    assert all((row["removal_round"] == "0") == (row["kept"] == "1") for row in rows)

    with open_particles(TOY) as source, open_particles(out / "kept.star") as kept, \
            open_particles(out / "rejected.star") as rejected:
        assert (kept.n_particles, rejected.n_particles) == (902, 98)
        assert kept.box_size == rejected.box_size == 30
        np.testing.assert_array_equal(kept.read(np.arange(902)), source.read(kept_rows))
        scores = np.array([float(row["score"]) for row in rows])
        np.testing.assert_allclose(kept.table["ppcasortScore"].to_numpy(float), scores[kept_rows])
        assert rejected.table["ppcasortRound"].isin([1, 2]).all()

    parameters = json.loads((out / "parameters.json").read_text())
    expected = SortSettings(model="paper", stop="schedule", normalize=False, basis="pca", n_coefficients=40, total_dimension=12, alpha=0.05, n_rounds=2,
                            iterations_per_round=2)
    assert parameters["settings"] == expected.to_dict()
    assert (parameters["n_particles"], parameters["n_kept"], parameters["rounds"]) == (1000, 902, 2)
    assert parameters["estimated"]["sorted_box_px"] == 30 and 0 < parameters["estimated"]["mask_radius_px"] <= 14.5
    assert_png(out / "report.png")


def kept_and_scores(out: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pd.read_csv(out / "scores.csv")
    return table["kept"].to_numpy(bool), table["score"].to_numpy(float)


def test_the_chunk_size_changes_the_kept_set_only_up_to_summation_order(toy_sort, tmp_path, capsys, monkeypatch):
    """--chunk-size 97 (11 chunks of the 1000 toy images; the default is one chunk) reaches the sort and keeps the
    same particles up to summation order (Jaccard >= 0.999), with the same scores to rounding; it is no setting of
    parameters.json."""
    from napari_ppcasort.core import run as run_module

    asked = []
    iter_sort = run_module.iter_sort

    def recording(*args, **kwargs):
        asked.append(kwargs.get("chunk_size"))
        return iter_sort(*args, **kwargs)

    monkeypatch.setattr(run_module, "iter_sort", recording)
    out = tmp_path / "chunked"
    assert main(["sort", str(TOY), "-o", str(out), *TOY_SETTINGS, "--chunk-size", "97"]) == 0, capsys.readouterr().err
    assert asked == [97]
    kept, scores = kept_and_scores(out)
    kept_default, scores_default = kept_and_scores(toy_sort[0])
    assert np.count_nonzero(kept & kept_default) / np.count_nonzero(kept | kept_default) >= 0.999
    np.testing.assert_allclose(scores, scores_default, rtol=1e-6, atol=1e-9)
    assert "chunk_size" not in json.loads((out / "parameters.json").read_text())["settings"]


def test_existing_results_are_refused_then_replaced_with_force_and_settings_file(toy_sort):
    out, first = toy_sort
    assert first.returncode == 0, first.stderr
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    refused = run("sort", TOY, "-o", out, *TOY_SETTINGS)
    assert_one_line_error(refused, r"already holds results \(.*kept\.star.*\).*--force")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before

    # the settings file of a run is an input: a --force run into its folder would replace it, and is refused
    refused = run("sort", TOY, "-o", out, "--settings", out / "parameters.json", "--force")
    assert_one_line_error(refused, r"parameters\.json: refusing to overwrite an input file of this run")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before

    # with --force, on a terminal: a bar per round; the settings of the earlier run, one of them changed
    settings_file = out.parent / "earlier.json"
    settings_file.write_bytes(before["parameters.json"])
    stderr, stdout, returncode = run_on_terminal("sort", TOY, "-o", out, "--settings", settings_file,
                                                 "--n-rounds", "1", "--force")
    assert returncode == 0, stderr
    assert "kept 950 of 1000 particles (95.0%) after 1 pruning round;" in stdout
    assert "\r" in stderr and re.search(r"coefficients \[#+\] 1000 images x 40 PCA", stderr)
    assert re.search(r"round 1/1 \[#{16}\] kept 950/1000 \(95\.0%\)", stderr)
    settings = json.loads((out / "parameters.json").read_text())["settings"]
    assert settings == {**json.loads(before["parameters.json"])["settings"], "n_rounds": 1}
    with open_particles(out / "kept.star") as kept:
        assert kept.n_particles == 950


def run_on_terminal(*args) -> tuple[str, str, int]:
    """Run the CLI with stderr on a pseudo-terminal; return (stderr, stdout, exit code)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([*COMMAND, *map(str, args)], stderr=terminal, stdout=subprocess.PIPE, text=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed (Linux raises EIO)
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    stdout = process.stdout.read()
    process.stdout.close()
    return b"".join(chunks).decode(), stdout, process.wait(timeout=300)


def test_cryosparc_sort_writes_cs_subsets_and_a_line_per_round_when_verbose(tmp_path):
    result = run("sort", EMPIAR / "empiar_10076_7.cs", "-o", tmp_path, *TINY_SETTINGS, "--box-size", "32", "-v")
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^round (\d)/2: kept (\d) of 7", result.stderr, re.MULTILINE) == [("1", "6"), ("2", "5")]
    assert "\r" not in result.stderr
    kept = np.load(tmp_path / "kept.cs")
    rejected = np.load(tmp_path / "rejected.cs")
    original = np.load(EMPIAR / "empiar_10076_7.cs")
    assert kept.dtype.names[:len(original.dtype.names)] == original.dtype.names and (kept.size, rejected.size) == (5, 2)
    assert {"ppcasort/score", "ppcasort/round"} <= set(kept.dtype.names)
    assert (rejected["ppcasort/round"] > 0).all() and (kept["ppcasort/round"] == 0).all()
    assert sorted(kept["uid"].tolist() + rejected["uid"].tolist()) == sorted(original["uid"].tolist())
    assert_png(tmp_path / "report.png")


def test_inputs_in_the_output_folder_are_never_overwritten_even_with_force(tmp_path):
    # a particle set named like an output, in the output folder
    starfile.write(starfile.read(TOY, always_dict=True), tmp_path / "kept.star")
    (tmp_path / "toy_projections.mrcs").symlink_to(TOY.with_suffix(".mrcs"))
    star_before = (tmp_path / "kept.star").read_bytes()
    assert_one_line_error(run("sort", tmp_path / "kept.star", "-o", tmp_path, *TOY_SETTINGS), r"--force")
    result = run("sort", tmp_path / "kept.star", "-o", tmp_path, *TOY_SETTINGS, "--n-rounds", "1", "--force")
    assert_one_line_error(result, r"kept\.(star|mrcs): refusing to overwrite an input file")
    assert (tmp_path / "kept.star").read_bytes() == star_before


# -- bad input: exit 2 and one line --------------------------------------------------------------------------


def write_stack(path, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # header statistics of NaN pixels
        with mrcfile.new(path, data=images, overwrite=True) as mrc:
            mrc.set_image_stack()
    return path


def write_star(path, image_names, optics=None):
    blocks = {"particles": pd.DataFrame({"rlnImageName": image_names, "rlnOpticsGroup": 1})}
    if optics is not None:
        blocks = {"optics": pd.DataFrame(optics), **blocks}
    starfile.write(blocks, path)
    return path


BAD_INPUT_CASES = [
    "missing file", "unknown type", "not an MRC", "truncated MRC", "volume", "STAR, stack missing",
    "STAR, stack missing, box known", "index out of range", "NaN pixels", "constant background", "alpha 1.5",
    "alpha not a number", "no stopping rule", "unknown basis", "dimension above the basis", "too few images",
    "output is a file", "settings file missing", "settings file not JSON", "no input", "no command",
    "volume is a stack", "no particles"]


def bad_inputs(folder: Path) -> dict[str, tuple[list, str]]:
    """Name -> (command line arguments, pattern of the one-line message)."""
    text = folder / "text.mrcs"
    text.write_text("data_particles\nloop_\n_rlnImageName #1\n" * 100)
    truncated = write_stack(folder / "cut.mrcs", np.zeros((5, 16, 16), dtype=np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    lost = write_star(folder / "lost.star", ["1@gone.mrcs", "2@gone.mrcs"])
    lost_with_box = write_star(folder / "lost31.star", ["1@gone.mrcs", "2@gone.mrcs"],
                               {"rlnOpticsGroup": [1], "rlnImageSize": [64], "rlnImagePixelSize": [1.5]})
    stack = EMPIAR / "empiar_10076_7.mrc"
    out_of_range = write_star(folder / "range.star", [f"7@{stack}", f"8@{stack}"])
    images = np.random.default_rng(0).normal(size=(30, 16, 16)).astype(np.float32)
    images[12, 3, 4] = np.nan
    nan_stack = write_stack(folder / "nan.mrcs", images)
    # pure noise: PCA finds no component above the noise, far fewer than the total dimension
    noise_stack = write_stack(folder / "noise.mrcs", np.random.default_rng(1).normal(size=(300, 24, 24)).astype(
        np.float32))
    (folder / "notes.txt").write_text("hello")
    (folder / "a_file").write_text("")
    out = folder / "out"
    return {
        "missing file": (["sort", folder / "nope.star", "-o", out], r"nope\.star: no such file"),
        "unknown type": (["sort", folder / "notes.txt", "-o", out], r"notes\.txt: unknown file type"),
        "not an MRC": (["sort", text, "-o", out], r"text\.mrcs: not .*MRC"),
        "truncated MRC": (["sort", truncated, "-o", out], r"cut\.mrcs: truncated MRC file"),
        "volume": (["sort", VOLUME, "-o", out], r"clean70SRibosome_vol_65p\.mrc: is a 3-D volume"),
        "STAR, stack missing": (["sort", lost, "-o", out], r"gone\.mrcs not found"),
        "STAR, stack missing, box known": (["sort", lost_with_box, "-o", out],
                                           r"lost31\.star: 1 of its image stacks are missing \(first: .*gone\.mrcs"),
        "index out of range": (["sort", out_of_range, "-o", out], r"range\.star: particle 1 asks for image 8"),
        "NaN pixels": (["sort", nan_stack, "-o", out, *TINY_SETTINGS], r"nan\.mrcs: image 13 .*contains NaN"),
        "constant background": (["sort", TOY, "-o", out, "--n-coefficients", "40", "--total-dimension", "12"],
                                r"toy_projections\.star: particle 0: its background .* is constant, so it cannot be "
                                r"normalised; for noise-free images \(a simulation\) whose background is constant, sort "
                                r"without background normalisation \(--no-normalize\)$"),
        "alpha 1.5": (["sort", TOY, "-o", out, "--alpha", "1.5"],
                      r"--alpha must be a number strictly between 0 and 1, got 1\.5$"),
        "alpha not a number": (["sort", TOY, "-o", out, "--alpha", "half"],
                               r"^ppcasort sort: error: argument --alpha: invalid float value: 'half'"),
        "no stopping rule": (["sort", TOY, "-o", out, "--stop", "schedule", "--n-rounds", "none"],
                             r"--stop 'schedule' needs --n-rounds or --target-kept-fraction, so that the sort knows "
                             r"when to stop"),
        "unknown basis": (["sort", TOY, "-o", out, "--basis", "fourier"], r"argument --basis: invalid choice"),
        "chunk size 0": (["sort", TOY, "-o", out, "--chunk-size", "0"],
                         r"--chunk-size must be a whole number of at least 1 or none, got 0$"),
        "dimension above the basis": (["sort", noise_stack, "-o", out, "--model", "paper", "--basis", "pca",
                                       "--n-coefficients", "none"],
                                      r"noise\.mrcs: the PCA basis gives \d coefficients, not more than the total "
                                      r"dimension 60: lower --total-dimension or ask for more coefficients "
                                      r"\(--n-coefficients\)"),
        "too few images": (["sort", EMPIAR / "empiar_10076_7.mrc", "-o", out, "--n-subspaces", "2",
                            "--total-dimension", "4", "--n-coefficients", "5", "--box-size", "32"],
                           r"7 images are too few to sort with 2 subspaces of dimension 2"),
        "output is a file": (["sort", TOY, "-o", folder / "a_file"], r"a_file: exists and is not a folder"),
        "settings file missing": (["sort", TOY, "-o", out, "--settings", folder / "none.json"], r"none\.json"),
        "settings file not JSON": (["sort", TOY, "-o", out, "--settings", folder / "notes.txt"],
                                   r"notes\.txt: not a JSON file"),
        "no input": (["sort", "-o", out], r"required: INPUT"),
        "no command": ([], r"required: COMMAND"),
        "volume is a stack": (["simulate", "-o", out, "--volume", EMPIAR / "empiar_10076_7.mrc"],
                              r"empiar_10076_7\.mrc: expected a cubic 3-D volume"),
        "no particles": (["simulate", "-o", out, "--n-particles", "0"], r"n_particles must be at least 1"),
    }


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    # In-process (main() is what the console script runs) to spare a Python start-up per case; the exit code
    # and the stderr of a real process are checked by the subprocess tests above and below.
    arguments, pattern = bad_inputs(tmp_path)[case]
    try:
        code = main([str(argument) for argument in arguments])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(arguments, code, captured.out, captured.err), pattern)
    assert captured.out == ""


def test_an_unexpected_error_is_not_dressed_as_an_input_error(tmp_path, monkeypatch):
    # the console script lets it through: a traceback and exit status 1
    def broken(settings, basis):
        raise RuntimeError("a bug")

    monkeypatch.setattr("napari_ppcasort.core.run.make_sorter", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sort", str(TOY), "-o", str(tmp_path), *TOY_SETTINGS])


# -- simulate, demo, gui, help ----------------------------------------------------------------------------------


def test_simulate_writes_a_labelled_stack_from_a_volume_and_refuses_to_overwrite_it(tmp_path):
    arguments = ["simulate", "-o", tmp_path, "--n-particles", "40", "--n-outliers", "5", "--n-noise", "3",
                 "--box", "16", "--volume", VOLUME, "--defocus", "1", "2", "--seed", "3"]
    result = run(*arguments)
    assert result.returncode == 0, result.stderr
    assert "wrote 48 images of 16 px (40 particle, 5 outlier, 3 noise" in result.stdout
    with open_particles(tmp_path / "simulated.star") as particles:
        assert (particles.n_particles, particles.box_size) == (48, 16)
        labels = particles.table["ppcasortTrueLabel"].to_numpy()
        defocus = particles.table["rlnDefocusU"].to_numpy(float)
    assert np.bincount(labels, minlength=3)[[PARTICLE, OUTLIER, NOISE]].tolist() == [40, 5, 3]
    assert ((defocus >= 1e4) & (defocus <= 2e4)).all()
    assert pd.read_csv(tmp_path / "simulated_labels.csv")["label"].tolist() == labels.tolist()
    stack_before = (tmp_path / "simulated.mrcs").read_bytes()
    assert_one_line_error(run(*arguments[:-1], "4"), r"already holds a simulated stack named 'simulated'.*--force")
    assert (tmp_path / "simulated.mrcs").read_bytes() == stack_before


def test_demo_keeps_a_purer_set_than_the_raw_stack_and_refuses_to_rerun_without_force(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "-o", out)
    assert result.returncode == 0, result.stderr
    kept, total = map(int, re.search(r"^kept (\d+) of (\d+) images", result.stdout, re.MULTILINE).groups())
    purity, raw = map(float, re.search(r"^purity of the kept set: ([\d.]+)% particles \(raw stack: ([\d.]+)%\)",
                                       result.stdout, re.MULTILINE).groups())
    assert total == 3000 and raw == 80.0 and 0.5 * total < kept < total
    # the default model finds how much junk there is: it keeps nearly all 2400 particles and nothing else (the
    # steerable model's 5 fixed rounds kept 99.0% particles, the paper's model 95.8%)
    assert purity >= 99.5 and kept * purity / 100 >= 0.97 * 2400
    left = re.search(r"^junk left in the kept set: (\d+) of 300 outliers, (\d+) of 300 noise images", result.stdout,
                     re.MULTILINE)
    assert abs(int(left[1]) + int(left[2]) - kept * (1 - purity / 100)) < 2  # purity is printed to 0.1 %
    with open_particles(out / "kept.star") as particles:
        assert particles.n_particles == kept
        # the exported scores are the default model's junk log-odds: below 0 (a junk probability under 1/2)
        assert (particles.table["ppcasortScore"].to_numpy(float) < 0).all()
    parameters = json.loads((out / "parameters.json").read_text())
    assert parameters["settings"]["model"] == "contamination"
    # the mask the sort estimated is on record, inside the 32-px box, and in angstrom (the demo's stack, not cropped,
    # has the pixel size of its STAR file)
    estimated = parameters["estimated"]
    assert estimated["sorted_box_px"] == 32 and 4 < estimated["mask_radius_px"] <= 15.5
    assert estimated["mask_radius_angstrom"] == pytest.approx(estimated["mask_radius_px"] * particles.pixel_size,
                                                              abs=0.01)
    assert_png(out / "report.png")

    again = run("demo", "-o", out)
    assert_one_line_error(again, r"already holds a demo run \(.*simulated\.star.*\); .*--force")


def test_gui_refuses_without_a_display_and_checks_its_input_first(tmp_path, monkeypatch, capsys):
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    assert_one_line_error(run("gui", env=environment), r"no display .*ppcasort sort")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    assert main(["gui", str(tmp_path / "nope.mrcs")]) == 2
    assert re.fullmatch(r"ppcasort gui: error: .*nope\.mrcs: no such file\n", capsys.readouterr().err)
    with pytest.raises(SystemExit) as help_exit:
        main(["gui", "--help"])
    assert help_exit.value.code == 0 and "INPUT" in capsys.readouterr().out


def test_help_lists_every_setting_with_its_default_and_version():
    result = run("sort", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    defaults = SortSettings()
    for field in fields(SortSettings):
        option = "--" + field.name.replace("_", "-")
        assert option in text
        default = getattr(defaults, field.name)
        # each option's help ends with its default, taken from SortSettings
        shown = "none" if default is None else str(default)
        assert re.search(re.escape(option) + r"[^\[]*\[default: " + re.escape(shown) + r"\]", text), field.name
    version = run("--version")
    assert version.stdout.strip() == f"ppcasort {__version__}"


_IMPORTED_BY_HELP = """
import contextlib, io, sys
from napari_ppcasort.cli import main

HEAVY = ("napari", "qtpy", "PyQt5", "PyQt6", "matplotlib", "dask", "distributed", "pandas", "scipy.stats",
         "napari_ppcasort.core.models", "napari_ppcasort.core.run")

def imported():
    return sorted(name for name in HEAVY if name in sys.modules)

print(imported())
for argv in (["--help"], ["sort", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):
        main(argv)
    assert "usage: ppcasort" in shown.getvalue()
    print(imported())
"""


def test_the_command_line_imports_no_gui_dask_or_engine_until_a_command_needs_it():
    """Importing the CLI imports neither napari, Qt, matplotlib nor Dask (nor pandas, scipy.stats or the models);
    ``ppcasort --help`` does not either; ``ppcasort sort --help`` needs the settings' models, not the rest."""
    result = subprocess.run([sys.executable, "-c", _IMPORTED_BY_HELP], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    on_import, on_help, on_sort_help = result.stdout.splitlines()
    assert on_import == on_help == "[]"
    assert on_sort_help == "['napari_ppcasort.core.models']"

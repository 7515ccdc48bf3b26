"""The public Python API: iter_sort and sort_particles, SortResult and its export, the registries, the mixtures'
estimator contract, and the messages of the failures the issue lists."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import napari_ppcasort
from napari_ppcasort import (ArrayParticleSet, CoefficientsProgress, IterationDone, RoundDone,
                             SettingsError, SortCancelled, SortFinished, SortResult, SortSettings, SortStarted,
                             iter_sort, open_particles, sort_particles)
from napari_ppcasort.cli import main
from napari_ppcasort.core import particles as particle_io
from napari_ppcasort.core import results as result_files
from napari_ppcasort.core.bases import PSWFBasis
from napari_ppcasort.core.errors import ComputeError, OutputExistsError
from napari_ppcasort.core.mixture import NotFittedError
from napari_ppcasort.core.models import MODELS, ModelSpec, score_label
from napari_ppcasort.core.mppca import MixturePPCA
from napari_ppcasort.core.simulate import simulate_particles, write_simulated
from napari_ppcasort.core.sorting import SortingFactorScore
from napari_ppcasort.core.steerable import SteerableMixturePPCA

from fixture_paths import EMPIAR, VOLUME

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_coefficients=60, total_dimension=12, n_rounds=2, iterations_per_round=2)


@pytest.fixture(scope="module")
def stack():
    return simulate_particles(500, n_outliers=60, n_noise=60, box_size=24, snr=0.5, random_state=4)


@pytest.fixture(scope="module")
def result(stack) -> SortResult:
    return sort_particles(ArrayParticleSet(stack.images, "simulated"), SortSettings(**SMALL))


# -- the API -----------------------------------------------------------------------------------------------------


def test_the_package_exports_the_api_without_importing_napari_qt_or_matplotlib():
    code = ("import sys, napari_ppcasort, napari_ppcasort.cli; "
            "from napari_ppcasort import open_particles, SortSettings, sort_particles, iter_sort; "
            "print(sorted(m for m in ('napari', 'qtpy', 'PyQt5', 'matplotlib', 'vispy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
    assert {"open_particles", "SortSettings", "sort_particles", "iter_sort", "SortResult"} <= set(dir(napari_ppcasort))
    with pytest.raises(AttributeError, match="no attribute 'sort'"):
        napari_ppcasort.sort


def test_iter_sort_yields_progress_iterations_rounds_and_the_result(stack):
    particles = ArrayParticleSet(stack.images)
    events = list(iter_sort(particles, SortSettings(**SMALL)))
    kinds = [type(event) for event in events]
    started = kinds.index(SortStarted)
    assert set(kinds[:started]) == {CoefficientsProgress} and events[started - 1].done == 620
    assert kinds[started + 1:] == ([IterationDone] * 2 + [RoundDone]) * 2 + [SortFinished]
    final = events[-1].result
    assert final.final is events[-2].result and final.settings == SortSettings(**SMALL)
    # sort_particles runs the same loop: the same scores for the same settings
    again = sort_particles(particles, SortSettings(**SMALL))
    np.testing.assert_array_equal(again.scores, final.scores)
    np.testing.assert_array_equal(again.kept_mask, final.removal_round == 0)


def test_sort_particles_takes_a_file_an_array_or_a_set_and_setting_changes(tmp_path, stack):
    write_simulated(stack, tmp_path, name="particles")
    from_file = sort_particles(tmp_path / "particles.star", **SMALL)
    from_array = sort_particles(stack.images, SortSettings(**SMALL))
    np.testing.assert_allclose(from_file.scores, from_array.scores, rtol=1e-5, atol=1e-6)
    assert from_file.particles.path == tmp_path / "particles.star" and from_file.settings.n_rounds == 2
    with pytest.raises(SettingsError, match="unknown setting 'rounds'"):
        sort_particles(stack.images, rounds=2)
    with pytest.raises(TypeError, match="expected a particle file, a ParticleSet or an"):
        sort_particles(42)


def test_cancel_stops_between_chunks_and_em_iterations(stack):
    particles = ArrayParticleSet(stack.images)
    cancel = threading.Event()
    seen = []
    for event in iter_sort(particles, SortSettings(**SMALL), cancel=cancel):
        seen.append(event)
        if isinstance(event, IterationDone):
            cancel.set()
    assert isinstance(seen[-1], IterationDone) and seen[-1].iteration == 1  # no other iteration after the cancel
    calls = []
    with pytest.raises(SortCancelled):
        sort_particles(particles, SortSettings(**SMALL), cancel=lambda: len(calls) > 0, progress=calls.append)
    assert [type(event) for event in calls] == [CoefficientsProgress]


def test_sort_result_exports_all_or_nothing_and_reports(tmp_path, result):
    written = result.export(tmp_path / "out")
    assert [path.name for path in written["kept"]] == ["kept.mrcs", "kept.star"]
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["kept.mrcs", "kept.star", "parameters.json", "rejected.mrcs", "rejected.star", "report.png",
                     "scores.csv"]
    manifest = json.loads((tmp_path / "out" / "parameters.json").read_text())
    assert sorted(manifest["files"]) == names and manifest["input"] is None  # an array has no file
    with pytest.raises(OutputExistsError, match=r"out already holds results \(kept\.mrcs, .*force=True"):
        result.export(tmp_path / "out")
    # everything kept, with force: the previous set goes as a whole, no stale rejected set is left
    result.export(tmp_path / "out", kept_mask=np.ones(result.final.n_total, bool), force=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["kept.mrcs", "kept.star", "parameters.json", "report.png",
                                                    "scores.csv"]
    figure = result.report()
    assert figure.axes and result.report(tmp_path / "report.png") == tmp_path / "report.png"
    means, components = result.subspace_images(2)
    assert means.shape == (3, 24, 24) and components.shape == (3, 2, 24, 24)


def test_file_modes_follow_the_umask(tmp_path):
    out = tmp_path / "out"
    arguments = ["sort", str(EMPIAR / "empiar_10076_7.mrc"), "-o", str(out), "--n-subspaces", "1",
                 "--total-dimension", "2", "--n-coefficients", "4", "--box-size", "32", "--n-rounds", "1"]
    result = subprocess.run([sys.executable, "-m", "napari_ppcasort.cli", *arguments], capture_output=True, text=True,
                            timeout=120, preexec_fn=lambda: os.umask(0o002))
    assert result.returncode == 0, result.stderr
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert len(modes) == 7 and set(modes.values()) == {0o664}, modes


def test_writing_a_stack_needs_one_chunk_of_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(particle_io, "CHUNK_BYTES", 2**20)
    images = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.float32, shape=(4096, 64, 64))
    images[:] = 1.5  # 64 MiB on disk
    images.flush()
    source = ArrayParticleSet(np.load(tmp_path / "images.npy", mmap_mode="r"))
    tracemalloc.start()
    try:
        particle_io.write_particles(source, np.arange(4096), tmp_path, "copy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB to write a 64 MiB stack"
    assert (tmp_path / "copy.mrcs").stat().st_size == 1024 + 64 * 2**20


# -- registries: one entry each ----------------------------------------------------------------------------------


def test_a_model_registered_in_one_entry_is_a_setting_choice_and_sorts(monkeypatch, stack):
    def nearest(settings, basis):
        return (MixturePPCA(settings.n_subspaces, settings.subspace_dimension, random_state=settings.random_state),
                SortingFactorScore("min"))

    monkeypatch.setitem(MODELS, "nearest", ModelSpec("nearest", "distance to the nearest subspace", nearest,
                                                     "junk score (nearest sorting factor)"))
    settings = SortSettings(model="nearest", basis="pca", **SMALL)
    assert score_label(settings) == "junk score (nearest sorting factor)"
    sorted_by_it = sort_particles(stack.images, settings)
    assert sorted_by_it.scorer == SortingFactorScore("min") and (sorted_by_it.scores > 0).all()
    with pytest.raises(SettingsError, match="combine applies to model 'paper' only; with the nearest model"):
        SortSettings(model="nearest", combine="min")


def test_the_junk_probability_is_written_beside_the_score_for_the_default_model_only(tmp_path, result, stack):
    result.export(tmp_path / "out")
    header = (tmp_path / "out" / "scores.csv").read_text().splitlines()[0]
    assert header == "index,image_name,score,junk_probability,removal_round,kept"
    with open_particles(tmp_path / "out" / "kept.star") as kept:
        probability = kept.table["ppcasortJunkProbability"].to_numpy(float)
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-result.scores[result.kept_mask])), rtol=1e-5)
    paper = sort_particles(stack.images, SortSettings(model="paper", basis="pca", stop="schedule", **SMALL))
    paper.export(tmp_path / "paper")
    assert "junk_probability" not in (tmp_path / "paper" / "scores.csv").read_text().splitlines()[0]


def test_an_output_column_registered_in_one_entry_is_written_to_scores_and_star(tmp_path, monkeypatch, result):
    column = result_files.Column("score_rank", lambda result, kept: np.argsort(np.argsort(result.scores)),
                                 lambda value: str(int(value)), "ppcasortScoreRank")
    monkeypatch.setattr(result_files, "COLUMNS", (*result_files.COLUMNS, column))
    result.export(tmp_path / "out")
    header = (tmp_path / "out" / "scores.csv").read_text().splitlines()[0]
    assert header.endswith(",kept,score_rank")
    with open_particles(tmp_path / "out" / "kept.star") as kept:
        np.testing.assert_array_equal(kept.table["ppcasortScoreRank"].to_numpy(int),
                                      np.argsort(np.argsort(result.scores))[result.kept_mask])


# -- the mixtures as scikit-learn estimators ---------------------------------------------------------------------


@pytest.mark.parametrize("make, n_features", [
    (lambda: MixturePPCA(2, 3), 10),
    (lambda: SteerableMixturePPCA([0, 1, 1, 2, 2, 0], [0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1], 2, 2), 6)])
def test_an_unfitted_mixture_says_so_and_a_fitted_one_predicts(make, n_features):
    model = make()
    data = np.random.default_rng(0).normal(size=(400, n_features))
    for use in (model.score_samples, model.predict_proba, model.predict, model.score, model.step):
        with pytest.raises(NotFittedError, match=rf"this {type(model).__name__} is not fitted yet: call fit\(data\)"):
            use(data)
    with pytest.raises(NotFittedError, match="before reading means_"):
        model.means_
    assert not hasattr(model, "weights_") and isinstance(NotFittedError("x"), (ValueError, AttributeError))
    model.fit(data)
    assert isinstance(model.converged_, bool) and model.n_iter_ >= 1
    labels = model.predict(data)
    assert labels.shape == (400,) and set(labels) <= {0, 1}
    np.testing.assert_array_equal(labels, model.predict_proba(data).argmax(axis=1))


# -- the messages of the issue -------------------------------------------------------------------------------------


def run_cli(capsys, *arguments):
    try:
        code = main([str(argument) for argument in arguments])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    return code, captured.err.strip()


def test_a_numerical_failure_of_the_fit_is_a_compute_error_exit_1(tmp_path, capsys, monkeypatch):
    def failing(self, data):
        raise np.linalg.LinAlgError("Matrix is not positive definite")

    monkeypatch.setattr(MixturePPCA, "step", failing)
    code, error = run_cli(capsys, "sort", EMPIAR / "empiar_10076_7.mrc", "-o", tmp_path / "out", "--model", "paper",
                          "--n-subspaces", "1", "--total-dimension", "2", "--n-coefficients", "4", "--box-size", "32")
    assert code == 1
    assert error == ("ppcasort sort: error: the fit failed numerically (Matrix is not positive definite); try another "
                     "--random-state, fewer --n-subspaces or a smaller --total-dimension")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ComputeError, match="try another random_state"):
        sort_particles(EMPIAR / "empiar_10076_7.mrc", model="paper", n_subspaces=1, total_dimension=2,
                       n_coefficients=4, box_size=32)


def test_running_out_of_memory_is_a_compute_error_exit_1(tmp_path, capsys, monkeypatch):
    def failing(self, data):
        raise MemoryError()

    monkeypatch.setattr(MixturePPCA, "initialize", failing)
    code, error = run_cli(capsys, "sort", EMPIAR / "empiar_10076_7.mrc", "-o", tmp_path / "out", "--model", "paper",
                          "--n-subspaces", "1", "--total-dimension", "2", "--n-coefficients", "4", "--box-size", "32")
    assert code == 1
    assert error == ("ppcasort sort: error: not enough memory to sort 7 images of 320 px (MemoryError); lower "
                     "--box-size or --n-coefficients, or sort fewer particles at a time")


def test_blank_images_are_an_input_error_not_nan_probabilities(tmp_path, capsys):
    import mrcfile

    with mrcfile.new(tmp_path / "zeros.mrcs", data=np.zeros((100, 24, 24), np.float32)) as mrc:
        mrc.set_image_stack()
    code, error = run_cli(capsys, "sort", tmp_path / "zeros.mrcs", "-o", tmp_path / "out", "--no-normalize",
                          "--n-coefficients", "60", "--total-dimension", "12")
    assert code == 2
    assert error.endswith("zeros.mrcs: all 100 images are blank (0) inside the mask circle after preprocessing: "
                          "there is nothing to sort")


def test_too_few_images_names_the_options_and_the_file_before_the_basis(tmp_path, capsys, monkeypatch):
    def not_reached(*args, **kwargs):
        raise AssertionError("the basis was computed")

    monkeypatch.setattr("napari_ppcasort.core.run.coefficient_steps", not_reached)
    code, error = run_cli(capsys, "sort", EMPIAR / "empiar_10076_7.mrc", "-o", tmp_path / "out", "--n-subspaces", "2",
                          "--total-dimension", "4", "--n-coefficients", "5")
    assert code == 2
    assert re.fullmatch(r"ppcasort sort: error: .*empiar_10076_7\.mrc: 7 images are too few to sort with 2 subspaces "
                        r"of dimension 2 \(at least 8 are needed\): lower --n-subspaces or --total-dimension", error)
    code, error = run_cli(capsys, "sort", EMPIAR / "empiar_10076_7.mrc", "-o", tmp_path / "out", "--n-subspaces", "1",
                          "--total-dimension", "2", "--n-coefficients", "4", "--n-rounds", "none",
                          "--target-kept-fraction", "0.99")
    assert code == 2 and error.endswith("--target-kept-fraction 0.99 keeps all 7 images: there is nothing to remove; lower "
                                        "--target-kept-fraction")
    code, error = run_cli(capsys, "sort", EMPIAR / "empiar_10076_7.mrc", "-o", tmp_path / "out", "--box-size", "8",
                          "--n-coefficients", "none")
    assert code == 2 and error.endswith("--total-dimension 60 does not fit the 29 pixels inside the mask circle of its "
                                        "8 px images; lower it (or raise --box-size)")


def test_a_band_limit_far_above_nyquist_is_refused_at_once():
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"band limit must be positive and at most 2 x Nyquist \(pi x radius = 21\.99 "
                                         r"for a radius of 7 px\), got 1e\+06"):
        PSWFBasis(16, bandlimit=1e6)
    assert time.monotonic() - started < 1


def test_simulate_never_overwrites_its_volume(tmp_path, capsys):
    volume = tmp_path / "sim.mrcs"
    volume.write_bytes(VOLUME.read_bytes())
    before = volume.read_bytes()
    code, error = run_cli(capsys, "simulate", "-o", tmp_path, "--name", "sim", "--volume", volume, "--n-particles",
                          "10", "--n-outliers", "0", "--n-noise", "0", "--box", "16", "--force")
    assert code == 2 and error.endswith(f"{volume}: refusing to overwrite an input file of this run; choose another "
                                        "output folder")
    assert volume.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["sim.mrcs"]


def test_the_readme_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    stack = simulate_particles(700, n_outliers=100, n_noise=100, box_size=32, snr=0.3, random_state=1)
    write_simulated(stack, tmp_path, name="particles")
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *args, **kwargs: printed.append(" ".join(map(str, args)))})
    assert sorted(os.listdir(tmp_path / "sorted")) == ["kept.mrcs", "kept.star", "parameters.json", "rejected.mrcs",
                                                       "rejected.star", "report.png", "scores.csv"]
    assert printed and re.fullmatch(r"kept \d+ of 900", printed[0])


def test_the_napari_reader_opens_the_registered_formats():
    manifest = (ROOT / "napari_ppcasort" / "napari.yaml").read_text()
    patterns = re.search(r"filename_patterns: \[(.*)\]", manifest).group(1)
    assert sorted(pattern.strip(' "') for pattern in patterns.split(",")) == sorted(
        f"*{suffix}" for suffix in particle_io.PARTICLE_SUFFIXES)

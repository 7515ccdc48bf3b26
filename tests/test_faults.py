"""Faults while a sort writes its results, as a user meets them, each in a subprocess: a full disk, SIGKILL and
SIGTERM at every writing stage, a --force rerun that must fail, two runs into one folder, a .cs run over a STAR
run. After each, the output folder holds exactly the complete previous set or the complete new set (after the
next run into it, which recovers what a SIGKILL interrupted), and the inputs are byte for byte unchanged.

The stage of a fault is reached through tests/fault_runner.py, which runs the command line with a pause (or a
failure) at that stage; a full disk is a small tmpfs when the tests run as root, else a writer failing with
ENOSPC at that stage.
"""

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_ppcasort.core.outputs import JOURNAL_NAME, LOCK_NAME
from napari_ppcasort.core.particles import open_particles, write_particles

from fixture_paths import EMPIAR, TOY

RUNNER = Path(__file__).with_name("fault_runner.py")
COMMAND = [sys.executable, "-m", "napari_ppcasort.cli"]
# small and fast: the toy projections are noise-free (no normalisation), 2 EM iterations per round
SETTINGS = ["--model", "paper", "--stop", "schedule", "--no-normalize", "--basis", "pca", "--n-coefficients", "40", "--total-dimension",
            "12", "--iterations-per-round", "2"]
OLD_ROUNDS, NEW_ROUNDS = 1, 2
# every writing stage; a commit replacing a 7-file set by another is 14 renames (7 old files aside, then 7 new ones
# in): after the first, and when the old set is aside and three new files are in
STAGES = ["stack", "star", "scores", "report", "manifest", "commit-1", "commit-10"]
TIMEOUT = 180


# -- helpers ---------------------------------------------------------------------------------------------------


def sort_args(particles, out, rounds, *extra):
    return ["sort", str(particles), "-o", str(out), *SETTINGS, "--n-rounds", str(rounds), *extra]


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


_started: list[subprocess.Popen] = []


def kill_started() -> None:
    """End the runs a failed test left paused (before a tmpfs they use is unmounted)."""
    for process in _started:
        if process.poll() is None:
            process.kill()
            process.communicate()
    _started.clear()


@pytest.fixture(autouse=True)
def no_run_left():
    yield
    kill_started()


def start(args, tmp_path, stage, action="pause", chunk_bytes=None, free_bytes=None
          ) -> tuple[subprocess.Popen, Path, Path]:
    """Start the command line with a fault at ``stage``; returns (process, ready file, go file)."""
    ready, go = tmp_path / f"ready-{time.monotonic_ns()}", tmp_path / f"go-{time.monotonic_ns()}"
    environment = {**os.environ, "FAULT_STAGE": stage, "FAULT_ACTION": action, "FAULT_READY": str(ready),
                   "FAULT_GO": str(go)}
    if chunk_bytes is not None:
        environment["FAULT_CHUNK_BYTES"] = str(chunk_bytes)
    if free_bytes is not None:
        environment["FAULT_FREE_BYTES"] = str(free_bytes)
    process = subprocess.Popen([sys.executable, str(RUNNER), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment)
    _started.append(process)
    return process, ready, go


def wait_ready(process, ready: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before its fault: "
                                 f"{process.stderr.read()}")
        assert time.monotonic() < deadline, "the run did not reach its fault in time"
        time.sleep(0.02)


def finish(process) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return stdout, stderr


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry of ``folder``, hidden ones too: file name -> bytes (a folder: '<folder>')."""
    return {entry.name: "<folder>" if entry.is_dir() else entry.read_bytes() for entry in sorted(folder.iterdir())}


def visible(entries: dict) -> dict:
    return {name: content for name, content in entries.items() if not name.startswith(".")}


def digests(paths) -> dict[str, str]:
    return {str(path): hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths}


def assert_complete_set(folder: Path, rounds: int, n_particles: int) -> None:
    """``folder`` holds exactly one complete result set, of a run with ``rounds`` rounds, and nothing else."""
    names = sorted(entry.name for entry in folder.iterdir())
    assert not [name for name in names if name.startswith(".")], names
    manifest = json.loads((folder / "parameters.json").read_text())
    assert sorted(manifest["files"]) == names
    assert manifest["settings"]["n_rounds"] == rounds and manifest["n_particles"] == n_particles
    n_kept = manifest["n_kept"]
    with open(folder / "scores.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == n_particles and sum(row["kept"] == "1" for row in rows) == n_kept
    assert {int(row["removal_round"]) for row in rows} == set(range(rounds + 1))
    suffix = ".cs" if (folder / "kept.cs").exists() else ".star"
    with open_particles(folder / f"kept{suffix}") as kept, open_particles(folder / f"rejected{suffix}") as rejected:
        assert (kept.n_particles, rejected.n_particles) == (n_kept, n_particles - n_kept)
        if suffix == ".star":
            assert kept.read(np.arange(n_kept)).shape[0] == n_kept
            assert (folder / "kept.mrcs").stat().st_size == 1024 + n_kept * kept.box_size**2 * 4
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_one_line(stderr: str, pattern: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert re.search(pattern, lines[0]), lines[0]


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    """334 of the toy projections as a STAR file and stack of their own (inputs whose bytes are checked)."""
    folder = tmp_path_factory.mktemp("input")
    with open_particles(TOY / "toy_projections.star") as toy:
        write_particles(toy, np.arange(0, 1000, 3), folder, "particles")
    return folder / "particles.star"


@pytest.fixture(scope="module")
def n_particles(particles) -> int:
    with open_particles(particles) as opened:
        return opened.n_particles


@pytest.fixture(scope="module")
def previous_set(tmp_path_factory, particles, n_particles) -> Path:
    """The results of an earlier run (1 round), to be replaced with --force."""
    folder = tmp_path_factory.mktemp("previous") / "results"
    result = run(sort_args(particles, folder, OLD_ROUNDS))
    assert result.returncode == 0, result.stderr
    assert_complete_set(folder, OLD_ROUNDS, n_particles)
    return folder


@pytest.fixture
def results(tmp_path, previous_set) -> Path:
    """A copy of the previous set, to run into."""
    folder = tmp_path / "results"
    shutil.copytree(previous_set, folder)
    return folder


def inputs_of(particles: Path) -> list[Path]:
    return [particles, particles.with_suffix(".mrcs")]


# -- SIGKILL and SIGTERM at every stage --------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_any_stage_leaves_the_previous_or_the_new_set_once_the_next_run_recovers(
        tmp_path, particles, n_particles, results, stage):
    before, inputs = snapshot(results), digests(inputs_of(particles))
    process, ready, _ = start(sort_args(particles, results, NEW_ROUNDS, "--force"), tmp_path, stage)
    wait_ready(process, ready)
    process.kill()
    finish(process)
    assert process.returncode == -signal.SIGKILL
    committing = stage.startswith("commit")
    if not committing:
        assert visible(snapshot(results)) == visible(before)  # untouched; a hidden staging folder may remain
    # the next run into the folder recovers first (rolls an interrupted commit forward, removes what a dead run
    # staged), then refuses to replace the results without --force
    refused = run(sort_args(particles, results, NEW_ROUNDS))
    assert refused.returncode == 2
    assert_one_line(refused.stderr, r"already holds results .*--force")
    if committing:
        assert_complete_set(results, NEW_ROUNDS, n_particles)
    else:
        assert snapshot(results) == before
    assert digests(inputs_of(particles)) == inputs


@pytest.mark.parametrize("stage", ["compute", *STAGES])
def test_sigterm_at_any_stage_ends_like_ctrl_c_with_no_partial_set(tmp_path, particles, n_particles, results, stage):
    before, inputs = snapshot(results), digests(inputs_of(particles))
    process, ready, go = start(sort_args(particles, results, NEW_ROUNDS, "--force"), tmp_path, stage)
    wait_ready(process, ready)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    go.touch()  # a commit defers the signal until it is complete
    _, stderr = finish(process)
    assert process.returncode == 143
    assert_one_line(stderr, r"^ppcasort sort: terminated \(SIGTERM\); no partial output was left$")
    if stage.startswith("commit"):
        assert_complete_set(results, NEW_ROUNDS, n_particles)
    else:
        assert snapshot(results) == before  # nothing left behind, not even hidden
    assert digests(inputs_of(particles)) == inputs


def test_a_commit_killed_half_way_is_rolled_forward_by_the_next_run(tmp_path, particles, n_particles, results):
    process, ready, _ = start(sort_args(particles, results, NEW_ROUNDS, "--force"), tmp_path, "commit-9")
    wait_ready(process, ready)
    process.kill()
    finish(process)
    # half-way: the old set is aside, two new files are in place; the journal says how to finish
    journal = json.loads((results / JOURNAL_NAME).read_text())
    assert sorted(journal["old"]) == sorted(journal["new"]) == sorted(json.loads(
        (tmp_path / "results" / journal["trash"] / "parameters.json").read_text())["files"])
    assert len([name for name in visible(snapshot(results))]) == 2
    # a --force run recovers, then replaces that set as a whole
    again = run(sort_args(particles, results, OLD_ROUNDS, "--force"))
    assert again.returncode == 0, again.stderr
    assert_complete_set(results, OLD_ROUNDS, n_particles)


# -- a full disk -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int):
    """A tmpfs of ``megabytes`` at ``folder`` when running as root (yields True), else nothing (yields False)."""
    folder.mkdir()
    if os.geteuid() != 0:
        yield False
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)], check=True)
    try:
        yield True
    finally:
        kill_started()
        subprocess.run(["umount", str(folder)], check=True)


def fill(disk: Path) -> Path:
    """Fill the file system of ``disk`` up with a file; returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as stream:
        with contextlib.suppress(OSError):
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
    with contextlib.suppress(OSError):
        with open(filler, "ab") as stream:
            while True:
                stream.write(b"\0")
                stream.flush()
    return filler


# in the middle of a stack (where a memory-mapped writer died of SIGBUS), of a small file, and at the commit's journal
@pytest.mark.parametrize("stage", ["stack", "scores", "manifest"])
def test_a_full_disk_while_writing_is_a_clear_error_and_leaves_the_previous_set(
        tmp_path, particles, n_particles, previous_set, stage):
    inputs = digests(inputs_of(particles))
    with small_disk(tmp_path / "disk", 16) as real:
        results = tmp_path / "disk" / "results"
        shutil.copytree(previous_set, results)
        before = snapshot(results)
        # several chunks per stack, so that the disk fills in the middle of one
        process, ready, go = start(sort_args(particles, results, NEW_ROUNDS, "--force"), tmp_path, stage,
                                   action="pause" if real else "enospc", chunk_bytes=100_000)
        if real:
            wait_ready(process, ready)
            filler = fill(tmp_path / "disk")
            go.touch()
        _, stderr = finish(process)
        assert process.returncode == 1
        assert_one_line(stderr, r"^ppcasort sort: error: .*results(/[\w.]+)?: cannot be written \(no space left on "
                                r"the device\); nothing was left behind$")
        assert ".ppcasort" not in stderr and ".part" not in stderr
        assert snapshot(results) == before
        if real:
            filler.unlink()
        # the space is back: the same run succeeds, with nothing of the failed one in the way
        again = run(sort_args(particles, results, NEW_ROUNDS, "--force"))
        assert again.returncode == 0, again.stderr
        assert_complete_set(results, NEW_ROUNDS, n_particles)
    assert digests(inputs_of(particles)) == inputs


def test_too_little_free_space_is_refused_before_the_computation(tmp_path, particles, previous_set):
    with small_disk(tmp_path / "disk", 6) as real:
        results = tmp_path / "disk" / "results"
        shutil.copytree(previous_set, results)
        before = snapshot(results)
        process, _, _ = start(sort_args(particles, results, NEW_ROUNDS, "--force"), tmp_path, "compute",
                              action="forbid", free_bytes=None if real else 4 * 2**20)
        _, stderr = finish(process)
        assert process.returncode == 2
        assert_one_line(stderr, r"results: not enough free space for the results: about [\d.]+ MB needed, "
                                r"[\d.]+ MB free$")
        assert snapshot(results) == before


def test_an_unwritable_output_is_refused_before_the_computation(tmp_path, particles):
    with small_disk(tmp_path / "disk", 1) as real:
        if real:
            subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "disk")], check=True)
        else:
            (tmp_path / "disk").chmod(0o555)
        process, _, _ = start(sort_args(particles, tmp_path / "disk" / "results", 1), tmp_path, "compute",
                              action="forbid")
        _, stderr = finish(process)
        assert process.returncode == 2
        assert_one_line(stderr, r"disk/results: cannot create the output folder \((Read-only file system|"
                                r"Permission denied)\)$")
        assert list((tmp_path / "disk").iterdir()) == []


# -- reruns, formats, two runs at once --------------------------------------------------------------------------


def test_a_force_rerun_on_its_own_output_is_refused_before_any_change(tmp_path, results, n_particles):
    before = snapshot(results)
    process, _, _ = start(sort_args(results / "rejected.star", results, 1, "--force"), tmp_path, "compute",
                          action="forbid")
    _, stderr = finish(process)
    assert process.returncode == 2
    assert_one_line(stderr, r"results/rejected\.(star|mrcs): refusing to overwrite an input file of this run; choose "
                            r"another output folder$")
    assert snapshot(results) == before


def test_a_cs_run_over_a_star_run_replaces_the_whole_set(tmp_path):
    results = tmp_path / "results"
    tiny = ["--stop", "schedule", "--n-subspaces", "1", "--total-dimension", "2", "--n-coefficients", "4", "--box-size",
            "32"]
    first = run(["sort", str(EMPIAR / "empiar_10076_7.mrc"), "-o", str(results), *tiny, "--n-rounds", "2"])
    assert first.returncode == 0, first.stderr
    assert {"kept.star", "kept.mrcs", "rejected.star", "rejected.mrcs"} <= set(os.listdir(results))
    second = run(["sort", str(EMPIAR / "empiar_10076_7.cs"), "-o", str(results), *tiny, "--n-rounds", "2",
                  "--force"])
    assert second.returncode == 0, second.stderr
    assert sorted(os.listdir(results)) == ["kept.cs", "parameters.json", "rejected.cs", "report.png", "scores.csv"]
    assert_complete_set(results, 2, 7)


def test_a_second_run_into_a_busy_folder_is_refused_at_once(tmp_path, particles, n_particles, results):
    first, ready, go = start(sort_args(particles, results, NEW_ROUNDS, "--force"), tmp_path, "compute")
    wait_ready(first, ready)
    second = run(sort_args(particles, results, OLD_ROUNDS, "--force"))
    assert second.returncode == 2
    assert_one_line(second.stderr, rf"results: another ppcasort run \(process {first.pid}\) is writing its results "
                                   r"in this folder; wait for it to end, or choose another folder$")
    go.touch()
    _, stderr = finish(first)
    assert first.returncode == 0, stderr
    assert_complete_set(results, NEW_ROUNDS, n_particles)
    assert not (results / LOCK_NAME).exists()


def test_two_runs_started_together_never_mix_their_sets(tmp_path, particles, n_particles, results):
    for trial in range(2):
        runs = [subprocess.Popen([*COMMAND, *sort_args(particles, results, rounds, "--force")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rounds in (OLD_ROUNDS, NEW_ROUNDS)]
        outcomes = [(process.wait(timeout=TIMEOUT), process.stderr.read()) for process in runs]
        for process in runs:
            process.stdout.close()
            process.stderr.close()
        assert all(status == 0 or (status == 2 and "another ppcasort run" in stderr) for status, stderr in outcomes), \
            outcomes
        assert any(status == 0 for status, _ in outcomes)
        rounds = json.loads((results / "parameters.json").read_text())["settings"]["n_rounds"]
        if [status for status, _ in outcomes].count(0) == 1:  # the one that ran is the one in the folder
            assert rounds == (OLD_ROUNDS, NEW_ROUNDS)[[status for status, _ in outcomes].index(0)]
        assert_complete_set(results, rounds, n_particles)

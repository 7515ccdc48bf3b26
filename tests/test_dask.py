"""Sorting on Dask (issue 15): a LocalCluster of worker processes, a scheduler started with the ``dask`` commands,
a worker killed mid-run, cancelling, and the errors of a missing scheduler or a missing Dask.

Small sizes (1,900 images of 32 px, 80 coefficients, chunks of 200 images: ten chunks, two levels of the
summation tree), so that each test takes seconds. With the same chunk size the Dask sort computes exactly what
the local sort computes (the same functions on the same chunks, summed in the same tree).
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import dask
import distributed  # in the [test] extra: a missing Dask fails these tests rather than skipping them

from napari_ppcasort import (ArrayParticleSet, IterationDone, RoundDone, SortFinished, SortSettings, iter_sort,
                             open_particles, sort_particles)
from napari_ppcasort.cli import main
from napari_ppcasort.core.ctf import ctf_parameters
from napari_ppcasort.core.distributed import DaskChunks, chunk_preprocessor, dask_client
from napari_ppcasort.core.pipeline import coefficient_steps, fit_preprocessor, make_preprocessor, make_sorter
from napari_ppcasort.core.simulate import simulate_particles, write_simulated

SETTINGS = SortSettings(n_coefficients=80, total_dimension=12)
CHUNK = 200
SMALL_OPTIONS = ["--n-coefficients", "80", "--total-dimension", "12"]


@pytest.fixture(scope="module")
def star(tmp_path_factory) -> Path:
    """A STAR file of 1,900 images (1,500 particles with a CTF, 200 outliers, 200 noise boxes)."""
    stack = simulate_particles(1500, n_outliers=200, n_noise=200, box_size=32, snr=0.3, defocus_um=(1.0, 2.5),
                               random_state=4)
    return write_simulated(stack, tmp_path_factory.mktemp("stack"))["star"]


@pytest.fixture(scope="module")
def local(star):
    """The single-process sorts: with the Dask tests' chunk size, and with the default one."""
    with open_particles(star) as particles:
        return {"chunked": sort_particles(particles, SETTINGS, chunk_size=CHUNK),
                "default": sort_particles(particles, SETTINGS)}


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=2) as client:  # what --dask-workers 2 starts
        yield client


def drain(steps):
    """The value a generator of progress returns."""
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b) / np.count_nonzero(a | b))


def test_a_local_cluster_sort_keeps_what_the_single_process_sort_keeps(star, local, client):
    with open_particles(star) as particles:
        assert ctf_parameters(particles) is not None  # the chunks' tasks phase-flip with their own particles' CTF
        events = list(iter_sort(particles, SETTINGS, client=client, chunk_size=CHUNK, with_classes=True))
    result = events[-1].result
    assert isinstance(result.coefficients, DaskChunks) and result.coefficients.n_chunks == 10
    # the same chunks summed in the same tree: the same numbers
    np.testing.assert_array_equal(result.kept_mask, local["chunked"].kept_mask)
    np.testing.assert_allclose(result.scores, local["chunked"].scores, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.final.log_likelihood, local["chunked"].final.log_likelihood, rtol=1e-12)
    # another chunking differs only in the summation order
    assert jaccard(result.kept_mask, local["default"].kept_mask) >= 0.999
    np.testing.assert_allclose(result.scores, local["default"].scores, rtol=1e-6, atol=1e-6)
    assert 1480 <= result.n_kept < 1900  # about the 1,500 particles (a tiny class of a few may count as junk)
    # the class views of every round (what the widget shows) come from the workers, and equal the local ones
    last_round = [event for event in events if isinstance(event, RoundDone)][-1]
    here = local["chunked"].class_views()
    for there in (last_round.classes, result.class_views()):
        np.testing.assert_array_equal(there.assignment, here.assignment)
        np.testing.assert_array_equal(there.counts, here.counts)
        np.testing.assert_allclose(there.averages, here.averages, rtol=1e-6, atol=1e-6 * np.abs(here.averages).max())
        assert there.kinds == here.kinds and there.counts.sum() == 1900


def test_an_em_iteration_sends_the_parameters_and_receives_one_merged_estep(star, client):
    with open_particles(star) as particles:
        prepared = drain(coefficient_steps(particles, SETTINGS, client=client, chunk_size=CHUNK))
    chunks = prepared.coefficients
    model = make_sorter(SETTINGS, prepared.basis).model
    model.initialize(chunks)
    parameters = len(pickle.dumps((model.expectation_state(),), protocol=pickle.HIGHEST_PROTOCOL))
    before = replace(chunks.traffic)
    model.step(chunks)
    received, sent = chunks.traffic.received - before.received, chunks.traffic.sent - before.sent
    # the parameters (one task), one task per chunk, and the summation tree (10 -> 2 -> 1)
    assert chunks.traffic.tasks - before.tasks == 1 + 10 + 3
    # out: the parameters once (every row is kept: no mask); in: one EStep (the model's sums), not the coefficients
    assert sent == parameters
    one_estep = len(pickle.dumps(model.expectation(chunks.take(np.arange(300))), protocol=pickle.HIGHEST_PROTOCOL))
    assert abs(received - one_estep) < 64
    assert received < 1900 * 80 * 4 / 4
    chunks.release()


def test_an_array_is_sent_to_the_workers_chunk_by_chunk(client):
    stack = simulate_particles(600, n_outliers=80, n_noise=80, box_size=24, snr=0.5, random_state=5)
    settings = SortSettings(n_coefficients=60, total_dimension=12, n_rounds=2, iterations_per_round=2)
    here = sort_particles(ArrayParticleSet(stack.images, "simulated"), settings, chunk_size=150)
    there = sort_particles(ArrayParticleSet(stack.images, "simulated"), settings, client=client, chunk_size=150)
    np.testing.assert_array_equal(there.kept_mask, here.kept_mask)
    np.testing.assert_allclose(there.scores, here.scores, rtol=1e-9, atol=1e-9)


def test_a_chunk_preprocessor_holds_the_ctf_of_its_particles_only(star):
    with open_particles(star) as particles:
        preprocessor = fit_preprocessor(make_preprocessor(particles, SETTINGS), particles, SETTINGS)
        images = particles.read(np.arange(400, 600))
    chunk = chunk_preprocessor(preprocessor, 400, 600)
    assert chunk.ctf.defocus_u_um.shape == (200,)
    np.testing.assert_array_equal(chunk(images, np.arange(200)), preprocessor(images, np.arange(400, 600)))


def test_cancelling_a_sort_on_dask_releases_its_tasks(star, client):
    stop = threading.Event()
    with open_particles(star) as particles:
        for event in iter_sort(particles, SETTINGS, client=client, chunk_size=CHUNK, cancel=stop):
            assert not isinstance(event, SortFinished)
            if isinstance(event, IterationDone):
                stop.set()
    deadline = time.monotonic() + 10
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0


def test_a_worker_killed_mid_run_is_replaced_and_the_kept_set_is_the_same(star, local):
    with dask_client(workers=2) as client:
        killed = None
        with open_particles(star) as particles:
            for event in iter_sort(particles, SETTINGS, client=client, chunk_size=CHUNK):
                if isinstance(event, IterationDone) and event.round == 2 and killed is None:
                    pids = client.run(os.getpid)  # {worker address: pid}
                    holders = client.has_what()
                    address = max(pids, key=lambda worker: len(holders.get(worker, ())))  # the one with most chunks
                    assert holders[address]
                    killed = pids[address]
                    os.kill(killed, signal.SIGKILL)
                if isinstance(event, SortFinished):
                    result = event.result
        assert killed is not None
        client.wait_for_workers(2, timeout=30)
        assert killed not in client.run(os.getpid).values()  # the nanny started a new worker process
    np.testing.assert_array_equal(result.kept_mask, local["chunked"].kept_mask)
    np.testing.assert_allclose(result.scores, local["chunked"].scores, rtol=1e-9, atol=1e-9)


# -- the command line ----------------------------------------------------------------------------------------------


def test_a_scheduler_and_workers_started_with_the_dask_commands(star, local, tmp_path, capsys):
    command = Path(sys.executable).parent / "dask"
    scheduler_file = tmp_path / "scheduler.json"
    started = []
    try:
        started.append(subprocess.Popen([command, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                         "--scheduler-file", scheduler_file, "--idle-timeout", "300"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        started.append(subprocess.Popen([command, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                         "--no-dashboard", "--death-timeout", "60"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with dask_client(scheduler=address) as client:  # by its address
            client.wait_for_workers(2, timeout=60)
        # by the file the scheduler wrote (what a batch job shares with its workers)
        status = main(["sort", str(star), "-o", str(tmp_path / "sorted"), *SMALL_OPTIONS, "--dask-scheduler",
                       str(scheduler_file)])
    finally:
        for process in reversed(started):
            process.terminate()
        for process in reversed(started):
            process.wait(timeout=60)
    output = capsys.readouterr()
    assert status == 0, output.err
    assert "kept" in output.out
    scores = np.loadtxt(tmp_path / "sorted" / "scores.csv", delimiter=",", skiprows=1, usecols=(2, 5))
    # the command line uses the default chunk size: one chunk here, as the default local sort
    np.testing.assert_array_equal(scores[:, 1].astype(bool), local["default"].kept_mask)
    np.testing.assert_allclose(scores[:, 0], local["default"].scores, rtol=1e-6, atol=1e-6)


def test_ctrl_c_during_a_sort_on_local_workers_stops_everything_and_writes_nothing(star, tmp_path):
    """Ctrl-C on a terminal signals the whole process group: the workers ignore it, ppcasort ends the sort, closes the
    cluster and says so in one line (exit 130); no output, and no process of the group is left."""
    command = [sys.executable, "-m", "napari_ppcasort.cli", "sort", str(star), "-o", str(tmp_path / "out"),
               *SMALL_OPTIONS, "--stop", "schedule", "--n-rounds", "40", "--alpha", "0.01", "--dask-workers", "2",
               "-v"]
    # as from a terminal: SIGINT at its default (a test run in the background, as CI may do, inherits it ignored,
    # and Python then keeps ignoring it)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Ctrl-C once the EM runs on the workers (the first round is reported; 39 rounds are left, seconds of work on
    # an idle machine: before, the signal could land while the cluster started, when it is ignored)
    lines = [process.stderr.readline() for _ in range(2)]
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    first = lines[0]
    assert first.startswith("coefficients:") and lines[1].startswith("round 1/40"), "".join(lines) + err
    assert process.returncode == 130, err
    assert err.splitlines() == ["ppcasort sort: interrupted; no partial output was left"], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    deadline = time.monotonic() + 10
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(process.pid) == []


def group_members(group: int) -> list[str]:
    """The processes of a process group (ps lines)."""
    lines = subprocess.run(["ps", "-eo", "pid,pgid,stat,cmd"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [line for line in lines if line.split()[1] == str(group) and not line.split()[2].startswith("Z")]


def test_an_unreachable_scheduler_is_one_line_naming_the_option(star, tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        status = main(["sort", str(star), "-o", str(tmp_path / "out"), *SMALL_OPTIONS,
                       "--dask-scheduler", f"tcp://127.0.0.1:{port}"])
    error = capsys.readouterr().err
    assert status == 2
    assert len(error.splitlines()) == 1, error
    assert "--dask-scheduler" in error and f"tcp://127.0.0.1:{port}" in error and "dask scheduler" in error
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_a_missing_scheduler_file_is_one_line_naming_the_option(star, tmp_path, capsys):
    status = main(["sort", str(star), "-o", str(tmp_path / "out"), "--dask-scheduler", str(tmp_path / "sched.json")])
    error = capsys.readouterr().err
    assert status == 2 and len(error.splitlines()) == 1
    assert f"--dask-scheduler {tmp_path / 'sched.json'}: no such scheduler file" in error


@pytest.mark.parametrize("option", [["--dask-workers", "2"], ["--dask-scheduler", "tcp://127.0.0.1:8786"]])
def test_without_dask_the_options_say_how_to_install_it(star, tmp_path, capsys, monkeypatch, option):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails, as without the extra
    status = main(["sort", str(star), "-o", str(tmp_path / "out"), *SMALL_OPTIONS, *option])
    error = capsys.readouterr().err
    assert status == 2
    assert len(error.splitlines()) == 1, error
    assert option[0] in error and 'pip install "napari-ppcasort[dask]"' in error
    assert not (tmp_path / "out").exists()


def test_the_dask_options_are_checked_like_the_settings(star, tmp_path, capsys):
    assert main(["sort", str(star), "-o", str(tmp_path / "out"), "--dask-workers", "0"]) == 2
    assert "--dask-workers must be a whole number of at least 1" in capsys.readouterr().err
    assert main(["sort", str(star), "-o", str(tmp_path / "out"), "--dask-workers", "2", "--dask-scheduler",
                 "tcp://127.0.0.1:8786"]) == 2
    assert "give --dask-workers (a cluster on this machine) or --dask-scheduler" in capsys.readouterr().err


def test_a_dask_client_of_local_workers_and_none(star):
    with dask_client() as nothing:
        assert nothing is None

"""Output sets in-process: the lock, the recovery of a commit cut short after any of its renames, the clean-up of
what dead runs left, the deferral of signals during a commit, and the one atomic-write helper."""

import json
import os
import signal
import subprocess
import sys

import pytest

from napari_ppcasort.core import outputs
from napari_ppcasort.core.errors import InputError, OutputBusyError, OutputExistsError, OutputWriteError
from napari_ppcasort.core.outputs import JOURNAL_NAME, LOCK_NAME, OutputSet, atomic_files, atomic_write, recover

OLD = {"a.txt": b"old a", "b.txt": b"old b", "stale.txt": b"old only"}
NEW = {"a.txt": b"new a", "b.txt": b"new b", "c.txt": b"new only"}


def previous(folder):
    return sorted(name for name in ("a.txt", "b.txt", "c.txt", "stale.txt") if (folder / name).exists())


def contents(folder):
    """Every entry of ``folder``: name -> bytes (a folder: '<folder>')."""
    return {path.name: "<folder>" if path.is_dir() else path.read_bytes() for path in sorted(folder.iterdir())}


def make_old(folder):
    folder.mkdir(exist_ok=True)
    (folder / "theirs.txt").write_bytes(b"not ours")
    for name, data in OLD.items():
        (folder / name).write_bytes(data)


def stage_new(output):
    for name, data in NEW.items():
        output.path(name).write_bytes(data)


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the process's clean-up runs (a BaseException the code does not catch)."""


def test_a_commit_replaces_the_previous_set_as_a_whole_and_leaves_other_files(tmp_path):
    make_old(tmp_path / "out")
    with OutputSet(tmp_path / "out", previous=previous, force=True) as output:
        stage_new(output)
        assert output.staging.parent == tmp_path / "out" and output.staging.name.startswith(".ppcasort-staging-")
        assert contents(tmp_path / "out").keys() >= OLD.keys()  # nothing changes before the commit
        output.commit()
    assert contents(tmp_path / "out") == {**NEW, "theirs.txt": b"not ours"}


@pytest.mark.parametrize("renames", range(0, 6))
def test_a_commit_killed_after_any_rename_is_rolled_forward_by_recover(tmp_path, monkeypatch, renames):
    # 3 old files aside and 3 new ones in: 6 renames; killed after `renames` of them
    make_old(tmp_path / "out")
    real_replace, done = os.replace, []

    def replace(source, target):
        if len(done) == renames and outputs.JOURNAL_NAME not in str(target):
            raise Killed()
        real_replace(source, target)
        if outputs.JOURNAL_NAME not in str(target):
            done.append(target)

    output = OutputSet(tmp_path / "out", previous=previous, force=True).__enter__()
    stage_new(output)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        output.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    os.close(output._lock_descriptor)  # the process is gone: its lock with it
    assert (tmp_path / "out" / JOURNAL_NAME).exists()
    recover(tmp_path / "out")
    assert contents(tmp_path / "out") == {**NEW, "theirs.txt": b"not ours", LOCK_NAME: f"{os.getpid()}\n".encode()}


def test_failures_before_the_commit_leave_the_previous_set_and_nothing_else(tmp_path):
    make_old(tmp_path / "out")
    before = contents(tmp_path / "out")
    with pytest.raises(RuntimeError, match="while staging"):
        with OutputSet(tmp_path / "out", previous=previous, force=True) as output:
            stage_new(output)
            raise RuntimeError("while staging")
    assert contents(tmp_path / "out") == before
    # a folder the set created is removed again when it stays empty
    with pytest.raises(RuntimeError):
        with OutputSet(tmp_path / "new" / "deeper", previous=previous) as output:
            output.path("a.txt").write_bytes(b"x")
            raise RuntimeError("while staging")
    assert not (tmp_path / "new").exists()


def test_refusals_come_before_any_change(tmp_path):
    make_old(tmp_path / "out")
    before = contents(tmp_path / "out")
    with pytest.raises(OutputExistsError, match=r"out already holds results \(a\.txt, b\.txt, stale\.txt\); choose "
                                                r"another folder, or replace them with force=True"):
        OutputSet(tmp_path / "out", previous=previous).__enter__()
    with pytest.raises(InputError, match=r"out/stale\.txt: refusing to overwrite an input file of this run"):
        OutputSet(tmp_path / "out", previous=previous, force=True, inputs=[tmp_path / "out" / "stale.txt"]).__enter__()
    (tmp_path / "link.txt").symlink_to(tmp_path / "out" / "c.txt")
    with pytest.raises(InputError, match=r"out/c\.txt: refusing to overwrite an input file of this run; choose"):
        OutputSet(tmp_path / "out", previous=previous, force=True, planned=["c.txt"],
                  inputs=[tmp_path / "link.txt"]).__enter__()
    with pytest.raises(InputError, match=r"not enough free space for the results: about [\d.]+ TB needed"):
        OutputSet(tmp_path / "out", previous=previous, force=True, needed_bytes=10**18).__enter__()
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"file: exists and is not a folder"):
        OutputSet(tmp_path / "file", previous=previous).__enter__()
    assert contents(tmp_path / "out") == before


def test_the_lock_refuses_a_second_set_and_goes_with_the_first(tmp_path):
    with OutputSet(tmp_path, previous=previous) as first:
        with pytest.raises(OutputBusyError, match=rf"another ppcasort run \(process {os.getpid()}\) is writing"):
            OutputSet(tmp_path, previous=previous).__enter__()
        first.path("a.txt").write_bytes(b"a")
        first.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_recover_removes_what_dead_runs_left_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / ".ppcasort-staging-1-abcd").mkdir()
    (tmp_path / ".ppcasort-staging-1-abcd" / "kept.mrcs").write_bytes(b"partial")
    (tmp_path / ".ppcasort-trash-0123").mkdir()
    (tmp_path / f".kept.star.{dead_pid}.0123456789ab.part").write_bytes(b"orphan")
    (tmp_path / f".kept.star.{os.getpid()}.0123456789ab.part").write_bytes(b"a live writer's")
    (tmp_path / ".hidden-notes").write_bytes(b"theirs")
    recover(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".hidden-notes", f".kept.star.{os.getpid()}.0123456789ab.part"]


def test_a_signal_during_the_commit_waits_until_the_set_is_in_place(tmp_path, monkeypatch):
    make_old(tmp_path / "out")
    seen = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *args: seen.append(contents(tmp_path / "out")))
    real_replace, sent = os.replace, []

    def replace(source, target):
        real_replace(source, target)
        if not sent and "trash" in str(target):  # the first old file is aside
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []  # not handled yet

    try:
        with OutputSet(tmp_path / "out", previous=previous, force=True) as output:
            stage_new(output)
            monkeypatch.setattr(os, "replace", replace)
            output.commit()
            monkeypatch.setattr(os, "replace", real_replace)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    assert len(seen) == 1
    assert {name: data for name, data in seen[0].items() if name in NEW} == NEW and "stale.txt" not in seen[0]


def test_atomic_files_rename_together_or_leave_nothing(tmp_path):
    with atomic_files(tmp_path / "a", tmp_path / "b") as (a, b):
        a.write_text("A")
        b.write_text("B")
        assert sorted(os.listdir(tmp_path)) == sorted([a.name, b.name])
    assert contents(tmp_path) == {"a": b"A", "b": b"B"}
    with pytest.raises(ValueError):
        with atomic_files(tmp_path / "a", tmp_path / "c") as (a, c):
            a.write_text("changed")
            raise ValueError("half-way")
    assert contents(tmp_path) == {"a": b"A", "b": b"B"}
    path = atomic_write(tmp_path / "d.json", lambda handle: json.dump({"x": 1}, handle))
    assert json.loads(path.read_text()) == {"x": 1} and (path.stat().st_mode & 0o777) == 0o666 & ~_umask()
    with pytest.raises(OutputWriteError, match=r"nowhere/e\.json: cannot be written \(No such file or directory\)"):
        atomic_write(tmp_path / "nowhere" / "e.json", lambda handle: handle.write("{}"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

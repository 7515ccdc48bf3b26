"""Run the ppcasort command line with a fault at one stage of its work (for test_faults.py).

    python fault_runner.py sort INPUT -o OUT ...        # the arguments of ppcasort

Environment:
    FAULT_FREE_BYTES   free space the output's file system reports (default: the real one).
    FAULT_CHUNK_BYTES  bytes of images per chunk of the stack writer (default: the product's).
    FAULT_STAGE   where: compute (first EM iteration), stack (after the first chunk of a stack), star (before a
                  STAR file), scores, report, manifest (after writing each), commit-K (after the K-th rename of
                  the commit).
    FAULT_ACTION  pause (default): create FAULT_READY and wait until FAULT_GO exists (for ever without it: to be
                  killed); enospc: fail there as a full disk does; forbid: the stage must not be reached (a
                  check that should have refused the run earlier did not).
"""

import errno
import os
import sys
import time
from pathlib import Path

from napari_ppcasort import cli
from napari_ppcasort.core import outputs, particles, results, sorting

STAGE = os.environ.get("FAULT_STAGE")
ACTION = os.environ.get("FAULT_ACTION", "pause")
READY = os.environ.get("FAULT_READY")
GO = os.environ.get("FAULT_GO")


def reached(stage: str, path=None) -> None:
    if stage != STAGE:
        return
    if ACTION == "forbid":
        raise AssertionError(f"the run reached the stage {stage}")
    if ACTION == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))
    Path(READY).write_text(stage)
    while GO is None or not os.path.exists(GO):
        time.sleep(0.02)


original_step = sorting.OnlineSorter.em_step


def em_step(self):
    reached("compute")
    return original_step(self)


original_stack = particles.write_mrc_stack


def write_mrc_stack(path, n_images, box, chunks, voxel_size=None):
    def paused():
        for block in chunks:
            yield block
            reached("stack", path)  # the chunk is written when the next one is asked for
    return original_stack(path, n_images, box, paused(), voxel_size)


def after(module, name, stage, path_argument=0):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        reached(stage, args[path_argument])
        return result

    setattr(module, name, wrapped)


def before(module, name, stage, path_argument):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        reached(stage, args[path_argument])
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


original_roll_forward = outputs._roll_forward
original_replace = os.replace
renames = []


def roll_forward(folder, journal):
    def replace(source, target):
        original_replace(source, target)
        renames.append(target)
        reached(f"commit-{len(renames)}")

    os.replace = replace
    try:
        return original_roll_forward(folder, journal)
    finally:
        os.replace = original_replace


if os.environ.get("FAULT_FREE_BYTES"):  # a file system with this much free space (where no small one can be made)
    real_usage = outputs.shutil.disk_usage
    outputs.shutil.disk_usage = lambda path: real_usage(path)._replace(free=int(os.environ["FAULT_FREE_BYTES"]))
if os.environ.get("FAULT_CHUNK_BYTES"):  # several chunks per stack, to stop in the middle of one
    particles.CHUNK_BYTES = int(os.environ["FAULT_CHUNK_BYTES"])
sorting.OnlineSorter.em_step = em_step
particles.write_mrc_stack = write_mrc_stack
before(particles, "_write_star", "star", 4)
after(results, "_write_scores", "scores")
after(results, "_save_png", "report", 1)
after(results, "_write_json", "manifest")
outputs._roll_forward = roll_forward

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))

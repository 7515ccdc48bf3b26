"""One process against a Dask LocalCluster of 1 and 2 worker processes, on N 64-px images read from disk.

Writes (once) an N-image .mrcs stack in FOLDER: a simulated pool of 12,000 images (10,000 particles, 1,000
outliers, 1,000 noise boxes at SNR 1/10, 64 px) repeated in turn, each pass turned by a quarter turn (or
transposed) so that no two images are the same for N <= 96,000 (beyond that the passes repeat). Then, for each
configuration, a fresh subprocess sorts it with the default settings but a fixed schedule (``--stop schedule
--n-rounds 2``: 12 EM iterations, the same work whatever the data) and prints:

* wall time of the whole sort, of the expansion (start to SortStarted) and the median EM iteration;
* bytes the client sent and received per EM iteration (one more EM iteration after the sort, on the kept set);
* peak RSS (VmHWM) of the client process (which also runs the scheduler of a LocalCluster) and of each worker.

    python benchmarks/bench_scale.py --n 240000                  # local, 1 and 2 workers
    python benchmarks/bench_scale.py --n 60000 --configs local 2   # some of them
    python benchmarks/bench_scale.py --rss --n 1000000           # peak memory of a whole sort, export included

With ``--rss`` it instead runs what ``ppcasort sort STACK -o OUT --stop schedule --n-rounds 2`` runs (the sort in
one process, then the export of the kept and rejected stacks, scores.csv, report.png and parameters.json into a
fresh folder, removed afterwards) in a fresh subprocess, and prints the peak resident set of each phase
(preparation: imports done, the noise sample, radius, basis and the first chunk; expansion; EM: the model, its
initialisation, the EM iterations and the scores; export), read from the kernel's high-water mark, which is reset
at each phase, and the process's peak against the size of its (N, L) float32 coefficients.

With ``--floor`` it instead sorts the stack with the default settings (the default sort: ``--stop junk-left``), in
one process, ``--repeats`` times, each in a fresh subprocess, and prints the sort's wall time (no output written) and
its parts (start: preparation, expansion and initialisation, up to SortStarted; the EM iterations; the scoring and
pruning of the rounds) against a floor measured in the same process (the issue 15 target: within 2.5x):
reading the stack, one float32 expansion product (N x P) @ (P x L) (P pixels in the mask circle), and for each EM
iteration of the sort one float64 product (n x L) @ (L x MK) of the coefficients it ran on with all subspace axes.
The floor is timed before and after the sort, and the mean of the two taken (the machine may be shared).

    python benchmarks/bench_scale.py --floor --n 60000           # the default sort against its floor

Nothing is asserted: the figures are printed (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

POOL = dict(n_particles=10000, n_outliers=1000, n_noise=1000, box_size=64, snr=0.1, random_state=0)
SETTINGS = dict(stop="schedule", n_rounds=2)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM, MiB; not getrusage's ru_maxrss, which on Linux keeps the peak of
    the process image a fork and exec came from)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def write_stack(path: Path, n: int) -> None:
    """An n-image stack from the simulated pool (see the module docstring), written chunk by chunk."""
    import mrcfile

    from napari_ppcasort.core.simulate import simulate_particles

    pool = simulate_particles(**POOL).images.astype(np.float32)
    size = pool.shape[0]
    partial = path.with_suffix(".part")
    with mrcfile.new_mmap(partial, shape=(n, 64, 64), mrc_mode=2, overwrite=True) as mrc:
        for start in range(0, n, size):
            rounds = start // size
            block = np.rot90(pool, k=rounds % 4, axes=(1, 2))
            if (rounds // 4) % 2:
                block = block.transpose(0, 2, 1)
            mrc.data[start:start + size] = block[: n - start]
    partial.rename(path)


def measure(stack: Path, config: str) -> dict:
    """Sort ``stack`` in this process (``config`` 'local') or on a LocalCluster of int(config) workers."""
    from napari_ppcasort import IterationDone, SortFinished, SortSettings, SortStarted, iter_sort, open_particles
    from napari_ppcasort.core.distributed import dask_client

    settings = SortSettings(**SETTINGS)
    workers = None if config == "local" else int(config)
    out = {"config": config}
    with dask_client(workers=workers) as client, open_particles(stack) as particles:
        started = time.perf_counter()
        iterations = []
        for event in iter_sort(particles, settings, client=client):
            if isinstance(event, SortStarted):
                out["expansion_s"] = time.perf_counter() - started
            elif isinstance(event, IterationDone):
                iterations.append(event.finished - event.started)
            elif isinstance(event, SortFinished):
                result = event.result
        out["wall_s"] = time.perf_counter() - started
        out["iteration_s"] = float(np.median(iterations))
        out["n_iterations"] = len(iterations)
        out["n_kept"] = result.n_kept
        if client is not None:
            chunks = result.coefficients.keep(np.flatnonzero(result.sort_kept_mask))
            before = (chunks.traffic.sent, chunks.traffic.received)
            result.model.step(chunks)
            out["sent_per_iteration"] = chunks.traffic.sent - before[0]
            out["received_per_iteration"] = chunks.traffic.received - before[1]
            out["n_chunks"] = chunks.n_chunks
            out["worker_peak_rss_mib"] = sorted(client.run(peak_rss_mib).values())
    out["client_peak_rss_mib"] = peak_rss_mib()
    return out


class PhasePeaks:
    """The peak resident set (MiB) of each phase of this process: at each change of phase the kernel's high-water
    mark (VmHWM) is read, which is the peak since the last change, and reset to the current RSS (writing 5 to
    /proc/self/clear_refs), so that every phase gets its own exact peak, however short the spike."""

    def __init__(self):
        self.phase = "start"
        self.peaks: dict[str, float] = {}

    def enter(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), _status_mib("VmHWM"))
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        self.phase = phase

    @property
    def overall(self) -> float:
        return max(self.peaks.values())


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_rss(stack: Path, folder: Path) -> dict:
    """Sort ``stack`` in this process as ``ppcasort sort`` does (SETTINGS), export into ``folder``; peak RSS per phase."""
    import shutil

    from napari_ppcasort import CoefficientsProgress, IterationDone, SortFinished, SortSettings, iter_sort, open_particles

    out = {}
    phases = PhasePeaks()
    with open_particles(stack) as particles:
        out["n"] = particles.n_particles
        started = time.perf_counter()
        phases.enter("preparation")  # noise sample, radius, basis and the first chunk of the expansion
        for event in iter_sort(particles, SortSettings(**SETTINGS)):
            if isinstance(event, CoefficientsProgress) and phases.phase == "preparation":
                out["preparation_s"] = time.perf_counter() - started
                phases.enter("expansion")
            elif isinstance(event, IterationDone) and phases.phase == "expansion":
                out["expansion_s"] = time.perf_counter() - started - out["preparation_s"]
                phases.enter("EM")  # from the end of the first EM iteration: the model, initialisation, EM, scores
            elif isinstance(event, SortFinished):
                result = event.result
        out["sort_s"] = time.perf_counter() - started
        out["coefficients_mib"] = result.coefficients.nbytes / 2**20
        out["coefficients_dtype"] = str(result.coefficients.dtype)
        out["n_kept"] = result.n_kept
        phases.enter("export")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            result.export(folder)
            out["export_s"] = time.perf_counter() - started - out["sort_s"]
            out["written_gib"] = sum(path.stat().st_size for path in folder.iterdir()) / 2**30
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        phases.enter("end")
    out["phase_peak_rss_mib"] = {phase: peak for phase, peak in phases.peaks.items()}
    out["peak_rss_mib"] = phases.overall
    return out


def _product_time(rows: int, left: np.ndarray, right: np.ndarray) -> float:
    """Seconds of the product of ``rows`` rows shaped as ``left`` (its rows taken again and again) with ``right``."""
    started = time.perf_counter()
    for start in range(0, rows, left.shape[0]):
        left[: min(left.shape[0], rows - start)] @ right
    return time.perf_counter() - started


def floor_time(particles, basis, n_dims: int, n_components: int, iteration_rows: list[int]) -> dict:
    """The floor of a sort of ``particles`` (seconds): reading every image, one expansion product, and one product of
    the coefficients with all subspace axes for each EM iteration (on ``iteration_rows`` rows each)."""
    started = time.perf_counter()
    for _ in particles.iter_chunks():
        pass
    read_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((8192, basis.matrix.shape[0]), dtype=np.float32)
    expansion_s = _product_time(particles.n_particles, pixels, basis.matrix)
    coefficients = rng.standard_normal((8192, basis.n_coefficients))
    axes = rng.standard_normal((basis.n_coefficients, n_components * n_dims))
    em_s = sum(_product_time(rows, coefficients, axes) for rows in iteration_rows)
    return {"read_s": read_s, "expansion_s": expansion_s, "em_gemms_s": em_s, "floor_s": read_s + expansion_s + em_s}


def measure_floor(stack: Path) -> dict:
    """The default sort of ``stack`` in this process against its floor (see the module docstring)."""
    from napari_ppcasort import (IterationDone, RoundDone, SortFinished, SortSettings, SortStarted, iter_sort,
                                 open_particles)

    settings = SortSettings()
    with open_particles(stack) as particles:
        iteration_rows, iteration_s, scores_s = [], [], 0.0
        started = time.perf_counter()
        for event in iter_sort(particles, settings):
            if isinstance(event, SortStarted):
                start_s = time.perf_counter() - started  # the preparation, the expansion and the initialisation
            elif isinstance(event, IterationDone):
                iteration_rows.append(event.n_kept)
                iteration_s.append(event.finished - event.started)
                last_iteration = event.finished
            elif isinstance(event, RoundDone):
                scores_s += time.monotonic() - last_iteration  # scoring the round's images, and the pruning
            elif isinstance(event, SortFinished):
                result = event.result
        wall_s = time.perf_counter() - started
        floors = [floor_time(particles, result.basis, settings.subspace_dimension, settings.n_subspaces,
                             iteration_rows) for _ in range(2)]
    floor = {key: float(np.mean([f[key] for f in floors])) for key in floors[0]}
    return {"n": particles.n_particles, "wall_s": wall_s, "start_s": start_s, **floor, "ratio": wall_s / floor["floor_s"],
            "n_iterations": len(iteration_rows), "n_kept": result.n_kept, "em_s": float(np.sum(iteration_s)),
            "scores_s": scores_s}


def main_floor(stack: Path, repeats: int) -> None:
    print(f"{'wall (s)':>8} {'start (s)':>9} {'EM (s)':>6} {'scores (s)':>10} {'floor (s)':>9} {'read':>6} {'expand':>6} "
          f"{'EM GEMMs':>8} {'ratio':>6} {'iters':>5} {'kept':>7}")
    ratios = []
    for _ in range(repeats):
        line = subprocess.run([sys.executable, __file__, "--floor-one", str(stack)], check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        ratios.append(r["ratio"])
        print(f"{r['wall_s']:>8.1f} {r['start_s']:>9.1f} {r['em_s']:>6.1f} {r['scores_s']:>10.2f} {r['floor_s']:>9.2f} {r['read_s']:>6.2f} {r['expansion_s']:>6.2f} "
              f"{r['em_gemms_s']:>8.2f} {r['ratio']:>6.2f} {r['n_iterations']:>5} {r['n_kept']:>7}", flush=True)
    print(f"median ratio of the default sort of {r['n']:,} images to its floor: {np.median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=240000, help="images in the stack [240000]")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ppcasort-bench-scale"),
                        help="where the stack is written (once) [/tmp/ppcasort-bench-scale]")
    parser.add_argument("--configs", nargs="+", default=["local", "1", "2"],
                        help="'local' and/or numbers of workers [local 1 2]")
    parser.add_argument("--rss", action="store_true",
                        help="measure the peak memory of a whole sort and its export in one process instead")
    parser.add_argument("--floor", action="store_true",
                        help="the default sort in one process against its floor instead (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="sorts with --floor, each in a fresh process [3]")
    parser.add_argument("--one", nargs=2, metavar=("STACK", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--floor-one", metavar="STACK", help=argparse.SUPPRESS)
    parser.add_argument("--rss-one", nargs=2, metavar=("STACK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Path(args.one[0]), args.one[1])))
        return
    if args.floor_one:
        print(json.dumps(measure_floor(Path(args.floor_one))))
        return
    if args.rss_one:
        print(json.dumps(measure_rss(Path(args.rss_one[0]), Path(args.rss_one[1]))))
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    stack = args.folder / f"scale_{args.n}.mrcs"
    if not stack.exists():
        started = time.perf_counter()
        write_stack(stack, args.n)
        print(f"wrote {stack} ({stack.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s",
              flush=True)
    if args.floor:
        main_floor(stack, args.repeats)
        return
    if args.rss:
        line = subprocess.run([sys.executable, __file__, "--rss-one", str(stack), str(args.folder / "rss-out")],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        print(f"{r['n']:,} images of 64 px ({stack.stat().st_size / 2**30:.2f} GiB): sort {r['sort_s']:.0f} s "
              f"(preparation {r['preparation_s']:.0f} s, expansion {r['expansion_s']:.0f} s), export "
              f"{r['export_s']:.0f} s ({r['written_gib']:.2f} GiB written); kept {r['n_kept']:,}")
        print("peak RSS by phase (MiB): " + ", ".join(f"{phase} {peak:.0f}"
                                                     for phase, peak in r["phase_peak_rss_mib"].items()))
        print(f"peak RSS of the process: {r['peak_rss_mib']:.0f} MiB ({r['peak_rss_mib'] / 1024:.2f} GiB); "
              f"coefficients {r['coefficients_dtype']} {r['coefficients_mib']:.0f} MiB", flush=True)
        return
    print(f"{'config':>7} {'wall (s)':>8} {'expand (s)':>10} {'EM iter (s)':>11} {'iters':>5} {'kept':>7} "
          f"{'sent/iter (kB)':>14} {'recv/iter (kB)':>14} {'client peak (MiB)':>17} {'worker peaks (MiB)':>18}")
    for config in args.configs:
        line = subprocess.run([sys.executable, __file__, "--one", str(stack), config], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        sent = f"{r['sent_per_iteration'] / 1e3:.0f}" if "sent_per_iteration" in r else "-"
        received = f"{r['received_per_iteration'] / 1e3:.0f}" if "received_per_iteration" in r else "-"
        workers = ", ".join(f"{peak:.0f}" for peak in r.get("worker_peak_rss_mib", [])) or "-"
        print(f"{r['config']:>7} {r['wall_s']:>8.1f} {r['expansion_s']:>10.1f} {r['iteration_s']:>11.2f} "
              f"{r['n_iterations']:>5} {r['n_kept']:>7} {sent:>14} {received:>14} {r['client_peak_rss_mib']:>17.0f} "
              f"{workers:>18}", flush=True)


if __name__ == "__main__":
    main()

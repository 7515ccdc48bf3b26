"""How long does the napari UI freeze while the widget sorts 10,000 images?

A QTimer firing every 5 ms on the main thread records timestamps; the largest gap between two ticks is
the longest time the Qt event loop could not run (target: under 100 ms). The run goes through the real
widget in a real viewer: coefficients, EM in the worker thread, one layer + histogram update per
pruning round, then the review layers. The phase of the longest gaps (the progress bar's text right after
them) tells what blocked.

Run: python3 benchmarks/bench_ui_latency.py [--images 10000] [--box 64] [--crop 32] [--rounds 10]
(needs a display; without one it re-runs itself under xvfb-run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

TICK_MS = 5
TARGET_MS = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--box", type=int, default=64, help="simulated box size (px)")
    parser.add_argument("--crop", type=int, default=32, help="box the widget Fourier-crops to (px)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=4, help="EM iterations per round")
    args = parser.parse_args()

    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        os.execvp("xvfb-run", ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv])

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_ppcasort._reader import ParticleStack
    from napari_ppcasort.core.particles import ArrayParticleSet
    from napari_ppcasort._widget import SortWidget
    from napari_ppcasort.core.simulate import simulate_particles

    n_junk = args.images // 10
    started = time.perf_counter()
    simulated = simulate_particles(args.images - 2 * n_junk, n_outliers=n_junk, n_noise=n_junk, box_size=args.box,
                                   snr=0.3, random_state=0)
    print(f"simulated {args.images} images of {args.box} px in {time.perf_counter() - started:.1f} s")
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")

    viewer = napari.Viewer(show=True)
    viewer.add_image(ParticleStack(ArrayParticleSet(simulated.images, "benchmark stack")), name="benchmark stack")
    widget = SortWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Sort particles")
    widget.crop.value = args.crop
    widget.n_coefficients.value = 100
    widget.total_dimension.value = 30
    widget.n_subspaces.value = 3
    widget.iterations.value = args.iterations
    widget.n_rounds.value = args.rounds

    app = QApplication.instance()
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    for _ in range(100):  # let the window settle before measuring
        app.processEvents()
        time.sleep(0.01)
    for run_number in (1, 2):
        measure_run(app, widget, ticks, run_number)
    timer.stop()
    viewer.close()


def measure_run(app, widget, ticks: list[float], run_number: int) -> None:
    """Run one sort and print the largest event-loop gaps of its phases."""
    marks: dict[str, float] = {}
    outcome: list[str] = []
    widget.round_updated.connect(lambda event: marks.__setitem__("last round", time.perf_counter()))
    widget.run_finished.connect(outcome.append)
    first_tick = len(ticks)
    marks["click"] = time.perf_counter()
    widget.run()
    marks["worker started"] = time.perf_counter()
    while not outcome:
        app.processEvents()
        time.sleep(0.001)
    for _ in range(100):  # the review layers are painted after the run
        app.processEvents()
        time.sleep(0.002)
    marks["end"] = time.perf_counter()
    widget.round_updated.disconnect()
    widget.run_finished.disconnect()

    times = np.array(ticks[first_tick:])
    gaps_ms = np.diff(times) * 1e3
    starts, ends = times[:-1], times[1:]
    sorting = (starts >= marks["worker started"]) & (ends < marks["last round"])
    review = ends >= marks["last round"]  # from the gap that shows the last round and sets up the review
    label = "first run (creates the layers)" if run_number == 1 else "second run (layers exist)"
    print(f"\n{label}: {outcome[0]}, {widget.n_round_updates} round updates so far, "
          f"{marks['last round'] - marks['click']:.1f} s from Run to the last round")
    print(f"  set-up at Run (main thread, before the worker starts): "
          f"{(marks['worker started'] - marks['click']) * 1e3:.0f} ms")
    print(f"  largest gap while sorting: {gaps_ms[sorting].max():.0f} ms (target < {TARGET_MS:.0f} ms); "
          f"median {np.median(gaps_ms[sorting]):.1f} ms, 99th percentile {np.percentile(gaps_ms[sorting], 99):.0f} ms, "
          f"{int((gaps_ms[sorting] > TARGET_MS).sum())} gaps above {TARGET_MS:.0f} ms")
    print(f"  largest gap from the last round on (last round, review layers, final histogram): "
          f"{gaps_ms[review].max():.0f} ms")
    print("  longest gaps while sorting (start, seconds after Run):")
    for index in np.argsort(np.where(sorting, gaps_ms, 0))[::-1][:5]:
        print(f"    {gaps_ms[index]:7.1f} ms at {starts[index] - marks['click']:6.2f} s")


if __name__ == "__main__":
    main()

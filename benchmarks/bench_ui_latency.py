"""How long does the napari UI freeze while the widget sorts 10,000 images?

A QTimer firing every 5 ms on the main thread records timestamps; the largest gap between two ticks is
the longest time the Qt event loop could not run (target: under 100 ms). The run goes through the real
widget in a real viewer: coefficients, EM in the worker thread, one class view + histogram update per
pruning round, then the result shown (histogram, classes, gallery). Then the review, as a user does it:
the cut moved with the slider and dragged on the histogram, the gallery scrolled page by page in each of
its views, tiles clicked across the cut, a class rejected and kept. Each phase prints its largest gap,
median and 99th percentile.

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
    form = widget.form
    form.crop.value = args.crop
    form.n_coefficients.value = 100
    form.total_dimension.value = 30
    form.n_subspaces.value = 3
    form.iterations.value = args.iterations
    form.n_rounds.value = args.rounds

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
    measure_review(app, widget, ticks)
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
    for _ in range(100):  # the result is painted after the run
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
    label = "first run" if run_number == 1 else "second run"
    print(f"\n{label}: {outcome[0]}, {widget.n_round_updates} round updates so far, "
          f"{marks['last round'] - marks['click']:.1f} s from Run to the last round")
    print(f"  set-up at Run (main thread, before the worker starts): "
          f"{(marks['worker started'] - marks['click']) * 1e3:.0f} ms")
    print(f"  while sorting: {gap_line(gaps_ms[sorting])}")
    print(f"  from the last round on (last round, result shown in every view): {gap_line(gaps_ms[review])}")
    print("  longest gaps while sorting (start, seconds after Run):")
    for index in np.argsort(np.where(sorting, gaps_ms, 0))[::-1][:5]:
        print(f"    {gaps_ms[index]:7.1f} ms at {starts[index] - marks['click']:6.2f} s")


def gap_line(gaps_ms: np.ndarray) -> str:
    return (f"largest gap {gaps_ms.max():.0f} ms (target < {TARGET_MS:.0f} ms), median {np.median(gaps_ms):.1f} ms, "
            f"99th percentile {np.percentile(gaps_ms, 99):.0f} ms, {int((gaps_ms > TARGET_MS).sum())} gaps above "
            f"{TARGET_MS:.0f} ms")


def measure_review(app, widget, ticks: list[float]) -> None:
    """Review the result as a user does, letting the event loop run between the actions, and print the gaps."""
    from napari_ppcasort._gallery import BEST_FIRST, NEAR_CUT, WORST_FIRST

    def settle(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)

    first_tick = len(ticks)
    started = time.perf_counter()
    actions: list[tuple[float, str]] = []  # (time, what was done then), to name the action behind a gap

    def act(what: str) -> None:
        actions.append((time.perf_counter(), what))

    n = widget.curation.n_particles
    act("Particles tab")
    widget.tabs.setCurrentIndex(2)
    settle(0.5)
    for keep in np.linspace(0.5 * n, 0.95 * n, 20).astype(int):  # the slider, step by step
        act("slider")
        widget.review.panel.threshold.value = int(keep)
        settle(0.05)
    scores = np.sort(widget.scores)
    for score in np.linspace(scores[n // 2], scores[int(0.9 * n)], 30):  # the cut dragged on the histogram
        act("cut dragged")
        widget.histogram.cut_dragged.emit(float(score))
        settle(0.03)
    widget.histogram.cut_dropped.emit(float(scores[int(0.8 * n)]))
    for mode in (NEAR_CUT, BEST_FIRST, WORST_FIRST):  # each view, scrolled page by page
        act(f"gallery view {mode!r}")
        widget.gallery.mode.setCurrentText(mode)
        settle(0.2)
        bar = widget.gallery.view.verticalScrollBar()
        for value in np.linspace(0, bar.maximum(), 15).astype(int):
            act(f"gallery scrolled ({mode})")
            bar.setValue(int(value))
            settle(0.1)
    act(f"gallery view {NEAR_CUT!r}")
    widget.gallery.mode.setCurrentText(NEAR_CUT)
    settle(0.3)
    for row in range(5):  # tiles clicked across the cut
        act("tile clicked")
        widget.gallery.particle_clicked.emit(int(widget.gallery.order[row]))
        settle(0.1)
    act("Classes tab")
    widget.tabs.setCurrentIndex(1)
    settle(0.3)
    decision = widget.class_view.decisions[0]
    for button, what in ((decision.reject_button, "reject all"), (decision.keep_button, "keep all"),
                         (decision.keep_button, "by score")):
        act(f"class decision {what!r}")
        button.click()
        settle(0.2)
    times = np.array(ticks[first_tick:])
    gaps_ms = np.diff(times) * 1e3
    print(f"\nreview ({time.perf_counter() - started:.1f} s: slider, dragged cut, gallery scrolled in 3 views, "
          f"5 clicks, class decisions): {gap_line(gaps_ms)}")
    action_times = np.array([moment for moment, _ in actions])
    print("  longest gaps while reviewing (the action before each):")
    for index in np.argsort(gaps_ms)[::-1][:5]:
        before = max(int(np.searchsorted(action_times, times[index], side="right")) - 1, 0)
        print(f"    {gaps_ms[index]:7.1f} ms after {actions[before][1]}")


if __name__ == "__main__":
    main()

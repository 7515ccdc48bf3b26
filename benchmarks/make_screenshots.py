"""Screenshots of the napari window with the sorting widget, on a realistic picked stack (ice, carbon, aggregates,
empty boxes, off-centre picks: core.micrograph.simulate_picked_stack), opened in napari through the plugin's reader.

    screenshots/sort_during_run.png       the class view while the sort runs (round 3)
    screenshots/gallery_near_cut.png      the gallery around the cut after the run (true classes on the tiles)
    screenshots/classes.png               the class view after the run (aligned averages, counts, decisions), from
                                          the last particle class down through the junk components
    screenshots/histogram_dragged_cut.png the cut dragged on the histogram (mouse events on the plot)

Run from the repository root: xvfb-run -a -s "-screen 0 1600x1000x24" python3 benchmarks/make_screenshots.py
[--images 3000]. Qt 6 is used when PyQt6 is installed (with PyQt5 napari shows a deprecation notice over the
canvas; it is closed before each screenshot).
"""
import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("PyQt6") is not None:
    os.environ.setdefault("QT_API", "pyqt6")

import napari
import numpy as np
from qtpy.QtCore import QPoint, Qt, QTimer
from qtpy.QtWidgets import QApplication, QScrollArea, QWidget

from napari_ppcasort.core.micrograph import simulate_picked_stack
from napari_ppcasort.core.simulate import write_simulated

OUT = Path("screenshots")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ppcasort-screenshots-"))
    stack = simulate_picked_stack(args.images, random_state=1)
    star = write_simulated(stack, folder, "picked")["star"]

    viewer = napari.Viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    app = QApplication.instance()

    def settle(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.01)

    def dismiss_notifications():  # napari's notices (the PyQt5 deprecation) stay over the canvas under Xvfb
        for notice in window.findChildren(QWidget):
            if type(notice).__name__ == "NapariQtNotification" and notice.isVisible():
                notice.close()

    def screenshot(name):
        dismiss_notifications()
        app.processEvents()
        return viewer.screenshot(str(OUT / name), canvas_only=False)

    viewer.open(str(star), plugin="napari-ppcasort")
    viewer.scale_bar.visible = True
    dock, widget = viewer.window.add_plugin_dock_widget("napari-ppcasort", "Sort particles")
    window.resizeDocks([dock], [800], Qt.Orientation.Horizontal)
    settle(1.0)
    dismiss_notifications()
    viewer.reset_view()  # the particle fills the canvas left by the dock

    shots = {}

    def grab_mid_run(event):
        if event.result.round == 3 and "during" not in shots:
            QTimer.singleShot(300, lambda: shots.setdefault(
                "during", screenshot("sort_during_run.png")))

    widget.round_updated.connect(grab_mid_run)
    done = []
    widget.run_finished.connect(done.append)
    widget.run()
    while not done:
        app.processEvents()
        time.sleep(0.01)
    print("run:", done, widget.status.text())

    widget.tabs.setCurrentIndex(2)
    settle(3.0)  # thumbnails load
    screenshot("gallery_near_cut.png")

    # the class rows (particle classes, then the junk components: outlier twins, noise, background) need more
    # height than the tab has beside the histogram: hide it for this screenshot, and scroll to the last particle
    # class so that it and the junk components below it are in view
    widget.tabs.setCurrentIndex(1)
    widget.histogram.hide()
    settle(1.0)
    class_view = widget.class_view
    kinds = list(class_view.classes.kinds)
    last_particle = max((m for m, kind in enumerate(kinds) if kind == "particle"), default=0)
    rows = class_view.info[last_particle].parentWidget()
    class_view.findChild(QScrollArea).verticalScrollBar().setValue(
        max(rows.layout().cellRect(last_particle, 0).top() - rows.layout().verticalSpacing(), 0))
    settle(0.5)
    screenshot("classes.png")
    widget.histogram.show()
    settle(1.0)

    # drag the cut on the histogram, with the mouse, to keep fewer particles
    histogram = widget.histogram
    scores = np.sort(widget.scores)

    y = int(histogram.plot_rect().center().y())

    def pixel(score):
        return QPoint(int(round(histogram.pixel_of(score))), y)

    from qtpy.QtTest import QTest  # mouse events as a user makes them

    no_key = Qt.KeyboardModifier.NoModifier
    QTest.mousePress(histogram, Qt.MouseButton.LeftButton, no_key, pixel(widget.score_threshold))
    target = float(scores[int(0.6 * scores.size)])
    for score in np.linspace(widget.score_threshold, target, 10):
        QTest.mouseMove(histogram, pixel(score))
        settle(0.05)
    QTest.mouseRelease(histogram, Qt.MouseButton.LeftButton, no_key, pixel(target))
    widget.tabs.setCurrentIndex(2)
    settle(3.0)
    screenshot("histogram_dragged_cut.png")
    print("dragged:", widget.review.panel.counts.value)
    viewer.close()


if __name__ == "__main__":
    main()

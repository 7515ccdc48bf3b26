"""Screenshots of the napari window with the sorting widget docked, on the plugin's sample data.

Run from the repository root: xvfb-run -a -s "-screen 0 1600x1000x24" python3 benchmarks/make_screenshots.py
(PyQt6 is chosen so that napari shows no PyQt5 deprecation notice over the canvas.)
"""
import os
os.environ.setdefault("QT_API", "pyqt6")
import time
from pathlib import Path

import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

OUT = Path("screenshots")

viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(1600, 1000)
app = QApplication.instance()


def settle(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


viewer.open_sample("napari-ppcasort", "simulated-particles")
_, widget = viewer.window.add_plugin_dock_widget("napari-ppcasort", "Sort particles")
widget.n_rounds.value = 6
widget.iterations.value = 6
settle(1.0)

shots = {}
def grab_mid_run(event):
    if event.result.round == 3 and "during" not in shots:
        QTimer.singleShot(150, lambda: shots.setdefault("during", viewer.screenshot(str(OUT / "sort_during_run.png"), canvas_only=False)))
widget.round_updated.connect(grab_mid_run)
done = []
widget.run_finished.connect(done.append)
widget.run()
while not done:
    app.processEvents()
    time.sleep(0.01)
settle(1.5)
viewer.screenshot(str(OUT / "sort_after_run.png"), canvas_only=False)
widget.threshold.value = 1550
viewer.dims.set_current_step(0, 3)
settle(1.0)
viewer.screenshot(str(OUT / "sort_threshold_moved.png"), canvas_only=False)
print(done, widget.counts.value)
viewer.close()

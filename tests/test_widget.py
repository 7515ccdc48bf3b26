"""Tests of the sorting dock widget in a real napari viewer (pytest-qt, napari's make_napari_viewer, Xvfb)."""

import json
import threading
import time

import mrcfile
import numpy as np
import pandas as pd
import pytest
from qtpy.QtCore import QPoint, Qt

from napari_ppcasort import _review, _widget
from napari_ppcasort._classes import KEEP_ALL
from napari_ppcasort._gallery import BEST_FIRST, NEAR_CUT, NEAR_CUT_TILES, WORST_FIRST
from napari_ppcasort._histogram import KEPT_COLOUR, REJECTED_COLOUR, axis_label
from napari_ppcasort._sample_data import SAMPLE_NAME, make_sample_data
from napari_ppcasort._settings_form import FILE_SOURCE, STOP_AUTOMATIC
from napari_ppcasort._widget import SortWidget
from napari_ppcasort._worker import IterationDone, RoundDone, RunFailed, run_sort
from napari_ppcasort.cli import main
from napari_ppcasort.core.classes import ClassViews
from napari_ppcasort.core.micrograph import simulate_picked_stack
from napari_ppcasort.core.models import score_label
from napari_ppcasort.core.particles import open_particles
from napari_ppcasort.core.settings import SETTINGS, SortSettings
from napari_ppcasort.core.simulate import write_simulated

RUN_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def sample_layer():
    """The plugin's sample data (simulated once per module; the lazy stack is shared by the tests)."""
    [layer_data] = make_sample_data()
    return layer_data


@pytest.fixture
def errors(monkeypatch):
    """The messages the widget shows with napari's show_error."""
    shown = []
    monkeypatch.setattr(_widget, "show_error", shown.append)
    monkeypatch.setattr(_review, "show_error", shown.append)
    return shown


def write_stack(path, sample_layer, n=600):
    """Write the first n sample images as an MRC stack at path."""
    with mrcfile.new(path, data=np.asarray(sample_layer[0][:n])) as mrc:
        mrc.set_image_stack()
    return path


def dock(viewer) -> SortWidget:
    widget = SortWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Sort particles")
    return widget


def quick_settings(widget, rounds=3, iterations=2):
    """Small, fast settings: 3 subspaces of dimension 4 in 40 basis coefficients."""
    form = widget.form
    form.n_coefficients.value = 40
    form.n_subspaces.value = 3
    form.total_dimension.value = 12
    form.alpha.value = 5.0
    form.iterations.value = iterations
    form.stop.value = "number of rounds"
    form.n_rounds.value = rounds


@pytest.fixture
def sample_widget(make_napari_viewer, sample_layer):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data, **kwargs)
    widget = dock(viewer)
    quick_settings(widget)
    return viewer, widget


def run_to_end(qtbot, widget, outcome="done"):
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        assert widget.run() is not None
    assert finished.args == [outcome]


def wait_for_iterations(qtbot, worker, count):
    """Collect the worker's IterationDone events; return the list once ``count`` have arrived."""
    ticks = []
    worker.yielded.connect(lambda event: ticks.append(event) if isinstance(event, IterationDone) else None)
    qtbot.waitUntil(lambda: len(ticks) >= count, timeout=RUN_TIMEOUT_MS)
    return ticks


def screen_state(widget):
    """Everything the review shows, to compare before and after a run that did not succeed."""
    return (widget.histogram.scores.copy(), widget.histogram.kept.copy(), widget.histogram.title,
            widget.review.panel.counts.value, widget.gallery.order.copy(), widget.gallery.frames().copy(),
            widget.review.panel.threshold.enabled)


def assert_same_screen(before, after):
    for one, other in zip(before, after):
        if isinstance(one, np.ndarray):
            np.testing.assert_array_equal(one, other)
        else:
            assert one == other


# -- the form ----------------------------------------------------------------------------------------------------


def test_widget_docks_through_the_manifest_with_limits_from_the_data(make_napari_viewer, sample_layer):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data, **kwargs)
    viewer.add_image(np.zeros((5, 5)), name="flat image")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ppcasort", "Sort particles")
    assert isinstance(widget, SortWidget)
    form = widget.form
    names = [name for name, _ in form._source_choices()]
    assert names == [SAMPLE_NAME, "particle file (below)"]  # 2-D layers cannot be sorted
    assert form.source.value is viewer.layers[SAMPLE_NAME]
    assert form.crop.max == 32 and form.crop.value == 32
    disk_pixels = 709  # pixels within radius 15 of the centre of a 32 px box
    assert form.n_coefficients.max == disk_pixels - 1 and form.mask_radius.max == 15.5
    form.n_coefficients.value = 50
    assert form.total_dimension.max == 49
    form.crop.value = 16  # 16 px box, radius 7: 149 disk pixels
    assert form.n_coefficients.max == 148 and form.total_dimension.max == 49 and form.mask_radius.max == 7.5
    form.n_coefficients.value = 20
    assert form.total_dimension.max == 19 and form.total_dimension.value <= 19
    form.crop.value = 32
    form.mask_radius.value = 10.0  # a smaller circle holds fewer pixels: L and M K follow
    assert form.n_coefficients.max == int((np.hypot(*np.mgrid[-16:16, -16:16]) <= 10).sum()) - 1
    pixel_size = data.particles.pixel_size
    assert form.mask_angstrom.value.startswith(f"{10 * pixel_size:.0f} \u00c5")
    # no layers of the widget's own, no grid: the canvas stays the user's
    assert [layer.name for layer in viewer.layers] == [SAMPLE_NAME, "flat image"]


def test_every_control_has_a_tooltip_and_labels_from_the_settings_schema(make_napari_viewer, sample_layer):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data, **kwargs)
    widget = dock(viewer)
    form = widget.form
    for control in form:
        assert control.tooltip, control.label
    for button in (widget.run_button, widget.cancel_button, widget.gallery.mode):
        assert button.toolTip()
    for control in widget.review.panel:
        assert control.tooltip
    controls = {"model": form.model, "basis": form.basis, "n_subspaces": form.n_subspaces,
                "total_dimension": form.total_dimension, "alpha": form.alpha, "iterations_per_round": form.iterations,
                "n_rounds": form.n_rounds, "target_kept_fraction": form.target,
                "outlier_threshold": form.outlier_threshold, "random_state": form.seed, "box_size": form.crop,
                "n_coefficients": form.n_coefficients, "mask_radius": form.mask_radius, "normalize": form.normalize,
                "noise": form.noise, "combine": form.combine, "center": form.center}
    for name, control in controls.items():
        declaration = SETTINGS[name]
        assert control.label == declaration.label and control.tooltip == declaration.help
        if declaration.allowed is not None:
            assert list(control.choices) == list(declaration.allowed)
            continue
        if declaration.type is bool:
            continue
        # every value a control can take is valid for its setting (0 stands for none: "auto")
        for shown in (control.min, control.max):
            value = shown / declaration.unit_scale
            if not (name in ("n_coefficients", "mask_radius") and value == 0):
                declaration.check(int(value) if declaration.type is int else float(value))
    form.normalize.value = False
    form.noise.value = "per_component"
    form.mask_radius.value = 12.0
    settings = form.settings()
    assert (settings.normalize, settings.noise, settings.mask_radius) == (False, "per_component", 12.0)
    form.model.value = "paper"
    assert not form.combine.native.isHidden() and not form.center.native.isHidden()
    form.model.value = "steerable"
    assert form.combine.native.isHidden() and form.basis.value == "pswf" and not form.basis.enabled


def test_settings_are_checked_before_run_with_the_widgets_labels(make_napari_viewer, sample_layer, errors):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data[:7], name="seven images")
    widget = dock(viewer)
    form = widget.form
    form.n_coefficients.value = 40
    # the form offers only what 7 images can be sorted with: M (K + 1) + 2 <= 7
    assert form.n_subspaces.max == 2 and form.total_dimension.max == 7 - form.n_subspaces.value - 2
    form.n_subspaces.value = 2
    form.total_dimension.value = form.total_dimension.max
    form.stop.value = "kept fraction"
    form.target.value = 99.0  # keeps all 7: refused before Run, by the engine's own check
    assert widget.run() is None and not widget.running
    message = errors[-1]
    assert message == ('<napari layer seven images>.mrcs: "keep (%)" 0.99 keeps all 7 images: there is nothing to remove; '
                       'lower "keep (%)"')
    assert widget.status.text() == f"Not started: {message}"
    form.target.value = 50.0  # the suggestion works
    form.checked()


# -- a run, round by round ----------------------------------------------------------------------------------------


def test_run_on_sample_updates_classes_and_histogram_once_per_round(qtbot, sample_widget):
    viewer, widget = sample_widget
    rounds = []

    def record(event):  # the state the user sees when the round is announced
        rounds.append((event, widget.histogram.scores.copy(), widget.histogram.kept.copy(), widget.histogram.cut,
                       [label.text() for label in widget.class_view.info], widget.form.native.isEnabled(),
                       widget.histogram.log_likelihood.copy()))

    widget.round_updated.connect(record)
    run_to_end(qtbot, widget)
    widget.round_updated.disconnect(record)  # the connection would keep the viewer alive

    assert widget.n_round_updates == 3 == len(rounds)
    assert [event.result.round for event, *_ in rounds] == [1, 2, 3]
    for event, scores, kept, cut, info, form_enabled, trace in rounds:
        np.testing.assert_array_equal(scores, event.result.scores)
        np.testing.assert_array_equal(kept, event.result.scores <= event.result.cut)
        assert cut == event.result.cut
        classes = event.classes
        assert classes.counts.sum() == 2000 and len(info) == classes.n_components > 3
        assert classes.kinds[:3] == ("particle",) * 3 and "noise" in classes.kinds
        for m, text in enumerate(info):
            assert text.startswith(f"class {m + 1}: {classes.kinds[m]}\n{classes.counts[m]} particles")
        assert not form_enabled  # parameters locked during the run
        np.testing.assert_array_equal(trace, event.result.log_likelihood)
    assert [layer.name for layer in viewer.layers] == [SAMPLE_NAME]  # nothing added to the canvas
    canvas = getattr(viewer, "canvas", None)
    assert not (canvas.grid if hasattr(canvas, "grid") else viewer.grid).enabled

    result = widget.result
    assert widget.form.native.isEnabled() and widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    np.testing.assert_array_equal(widget.scores, result.scores)
    assert widget.score_threshold == result.final.cut == widget.histogram.automatic_cut
    np.testing.assert_array_equal(widget.kept_mask, result.scores <= result.final.cut)
    np.testing.assert_array_equal(widget.histogram.scores, result.scores)
    assert widget.histogram.counts.sum() == 2000
    assert widget.histogram.kept_counts.sum() == widget.kept_mask.sum()
    assert widget.histogram.counts_text == f"{widget.kept_mask.sum()} kept | {2000 - widget.kept_mask.sum()} rejected"
    assert widget.histogram.x_label == axis_label(score_label(widget.form.settings()))
    assert "junk-like \u2192" in widget.histogram.x_label
    np.testing.assert_array_equal(widget.histogram.prunings, [2, 4, 6])
    assert widget.classes_shown.counts.sum() == 2000 and widget.class_view.decisions[0].isEnabled()
    assert "round 3/3" in widget.status.text() or widget.status.text().startswith("Done: kept")


def test_gallery_order_is_the_score_order_and_frames_are_the_kept_mask(qtbot, sample_widget):
    viewer, widget = sample_widget
    run_to_end(qtbot, widget)
    scores, gallery = widget.scores, widget.gallery
    gallery.mode.setCurrentText(BEST_FIRST)
    assert gallery.model.rowCount() == 2000
    np.testing.assert_array_equal(gallery.order, np.argsort(scores, kind="stable"))
    assert np.all(np.diff(scores[gallery.order]) >= 0)
    np.testing.assert_array_equal(gallery.frames(), widget.kept_mask[gallery.order])
    gallery.mode.setCurrentText(WORST_FIRST)
    np.testing.assert_array_equal(gallery.order, np.argsort(scores, kind="stable")[::-1])
    gallery.mode.setCurrentText(NEAR_CUT)
    n_kept = int(widget.kept_mask.sum())
    np.testing.assert_array_equal(gallery.order, np.argsort(scores, kind="stable")[n_kept - NEAR_CUT_TILES:
                                                                                     n_kept + NEAR_CUT_TILES])
    frames = gallery.frames()
    assert frames[:NEAR_CUT_TILES].all() and not frames[NEAR_CUT_TILES:].any()  # both sides of the cut
    # the true class of simulated data is on the tile, the score in its tooltip
    first = int(gallery.order[0])
    assert gallery.model.caption(first).endswith(("particle", "outlier", "noise"))
    assert f"score {scores[first]:.5g}" in gallery.model.tooltip(first)
    # thumbnails are made off the main thread, on demand
    qtbot.waitUntil(lambda: gallery.loader.thumbnail(first) is not None, timeout=10_000)
    assert gallery.loader.thumbnail(first).width() == 72


def test_dragging_the_cut_and_moving_the_slider_agree(qtbot, sample_widget):
    viewer, widget = sample_widget
    run_to_end(qtbot, widget)
    histogram, slider, scores = widget.histogram, widget.review.panel.threshold, widget.scores
    widget.tabs.setCurrentIndex(2)
    target = float(np.quantile(scores, 0.3))
    y = int(histogram.plot_rect().center().y())

    def pixel(score):
        return QPoint(int(round(histogram.pixel_of(score))), y)

    qtbot.mousePress(histogram, Qt.MouseButton.LeftButton, pos=pixel(float(np.median(scores))))
    qtbot.mouseMove(histogram, pixel(target))
    qtbot.mouseRelease(histogram, Qt.MouseButton.LeftButton, pos=pixel(target))
    dropped = histogram.score_at(pixel(target).x())
    expected = int(np.searchsorted(np.sort(scores), dropped, side="right"))
    assert abs(expected - int((scores <= target).sum())) <= 30  # a pixel is a few images wide
    assert slider.value == expected
    assert widget.score_threshold == np.sort(scores)[expected - 1] == histogram.cut
    np.testing.assert_array_equal(widget.kept_mask, scores <= widget.score_threshold)
    assert widget.review.panel.counts.value.startswith(f"{expected} kept (score <= ")
    assert widget.review.panel.counts.value.endswith(f", {2000 - expected} rejected")
    # and the other way round: the slider moves the line on the plot
    for keep in (1, 1234, 2000):
        slider.value = keep
        assert histogram.cut == np.sort(scores)[keep - 1] == widget.score_threshold
        assert histogram.kept_counts.sum() == keep
        assert widget.gallery.frames().sum() == widget.kept_mask[widget.gallery.order].sum()
    # the bars are painted in two colours: a bin of kept particles blue, one of rejected particles orange
    slider.value = 1000
    image = histogram.grab().toImage()
    ratio = image.devicePixelRatio()
    bottom = histogram.plot_rect().bottom() - 2
    for colour, mask in ((KEPT_COLOUR, histogram.kept_counts == histogram.counts),
                         (REJECTED_COLOUR, histogram.kept_counts == 0)):
        full = np.flatnonzero(mask & (histogram.counts > 0.2 * histogram.counts.max()))
        middle = 0.5 * (histogram.edges[full[0]] + histogram.edges[full[0] + 1])
        pixel_colour = image.pixelColor(int(histogram.pixel_of(middle) * ratio), int(bottom * ratio))
        assert pixel_colour.name() == colour


def test_a_click_on_a_tile_moves_the_particle_and_the_export_keeps_it(qtbot, sample_widget, tmp_path, errors):
    viewer, widget = sample_widget
    run_to_end(qtbot, widget)
    widget.tabs.setCurrentIndex(2)
    gallery = widget.gallery
    gallery.mode.setCurrentText(NEAR_CUT)
    before = widget.kept_mask.copy()
    row = NEAR_CUT_TILES - 1  # the last kept tile before the cut
    gallery.view.scrollTo(gallery.model.index(row))
    rectangle = gallery.view.visualRect(gallery.model.index(row))
    particle = int(gallery.order[row])
    qtbot.mouseClick(gallery.view.viewport(), Qt.MouseButton.LeftButton, pos=rectangle.center())
    after = widget.kept_mask
    assert before[particle] and not after[particle]
    assert np.flatnonzero(before != after).tolist() == [particle]
    assert gallery.model.manual[particle] and not gallery.model.kept[particle]
    assert viewer.dims.current_step[0] == particle  # the clicked particle in the canvas
    with qtbot.waitSignal(widget.exported, timeout=RUN_TIMEOUT_MS) as exported:
        widget.export(tmp_path / "out")
    written = exported.args[0]
    assert written["report"] == [tmp_path / "out" / "report.png"] and (tmp_path / "out" / "report.png").stat().st_size
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    np.testing.assert_array_equal(scores["kept"].to_numpy(bool), after)
    parameters = json.loads((tmp_path / "out" / "parameters.json").read_text())
    assert parameters["overrides"] == {"kept": [], "rejected": [particle]}
    assert parameters["settings"]["score_threshold"] == widget.score_threshold
    back = open_particles(tmp_path / "out" / "rejected.star")
    assert particle in np.flatnonzero(~after)[:back.n_particles]
    assert errors == []
    # a second export into the same folder is refused, with a message for a GUI user, and changes nothing
    old = (tmp_path / "out" / "kept.mrcs").read_bytes()
    worker = widget.export(tmp_path / "out")
    qtbot.waitUntil(lambda: bool(errors), timeout=RUN_TIMEOUT_MS)
    assert "already holds results" in errors[0] and "--force" not in errors[0] and '"Replace"' in errors[0]
    qtbot.waitUntil(lambda: not worker.is_running)
    assert (tmp_path / "out" / "kept.mrcs").read_bytes() == old
    # undo: the cut alone decides again
    widget.review.panel.undo.changed.emit(True)
    np.testing.assert_array_equal(widget.kept_mask, before)


def test_a_class_decision_moves_exactly_its_members(qtbot, sample_widget):
    viewer, widget = sample_widget
    run_to_end(qtbot, widget)
    widget.tabs.setCurrentIndex(1)
    classes = widget.classes_shown
    widget.review.panel.threshold.value = 1500
    before = widget.kept_mask.copy()
    component = int(np.argmax([(before & (classes.assignment == m)).sum() for m in range(3)]))
    members = classes.assignment == component
    decision = widget.class_view.decisions[component]
    qtbot.mouseClick(decision.reject_button, Qt.MouseButton.LeftButton)  # one click rejects the class
    after = widget.kept_mask
    np.testing.assert_array_equal(before != after, before & members)
    assert not after[members].any()
    assert f"{0} kept" in widget.class_view.info[component].text()
    qtbot.mouseClick(decision.keep_button, Qt.MouseButton.LeftButton)
    assert decision.decision == KEEP_ALL and not decision.reject_button.isChecked()
    np.testing.assert_array_equal(widget.kept_mask, before | members)
    np.testing.assert_array_equal(widget.gallery.model.manual, widget.kept_mask != (widget.scores <=
                                                                                      widget.score_threshold))
    qtbot.mouseClick(decision.keep_button, Qt.MouseButton.LeftButton)  # a second click: the cut decides again
    assert decision.decision == "by score"
    np.testing.assert_array_equal(widget.kept_mask, before)


def test_class_view_lists_every_component_with_its_kind(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    widget = dock(viewer)
    classes = ClassViews(assignment=np.array([0, 1, 2, 2, 3]), kinds=("particle", "particle", "noise", "background"),
                         counts=np.array([1, 1, 2, 1]), weights=np.array([0.3, 0.3, 0.2, 0.2]),
                         mean_scores=np.array([-2.0, -1.0, 3.0, 4.0]), averages=np.random.rand(4, 16, 16),
                         aligned=True)
    widget.class_view.show_classes(classes, np.random.rand(4, 2, 16, 16), box=16, pixel_size=2.0,
                                   decisions_enabled=True)
    texts = [label.text() for label in widget.class_view.info]
    assert [text.split("\n")[0] for text in texts] == ["class 1: particle", "class 2: particle", "class 3: noise",
                                                      "class 4: background"]
    assert "2 particles (40.0%), weight 0.20" in texts[2]
    assert "32 \u00c5" in widget.class_view.header.text()


def test_the_junk_probability_shows_in_tooltips_and_on_the_histogram(qtbot, sample_widget):
    viewer, widget = sample_widget  # the default model: its score is the log-odds of junk
    run_to_end(qtbot, widget)
    particle = int(np.argmax(widget.scores))
    expected = 1 / (1 + np.exp(-widget.scores[particle]))
    assert f"junk probability {expected:.3f}" in widget.gallery.model.tooltip(particle)
    ticks = dict((p, score) for score, p in widget.histogram.probability_ticks)
    assert ticks[0.5] == pytest.approx(0.0, abs=0.5)  # the log-odds 0 is probability 0.5 on the top axis
    assert ticks[0.9] == pytest.approx(np.log(9), abs=0.5)


# -- state: the source, cancel, errors ----------------------------------------------------------------------------


def test_an_opened_star_becomes_the_source_and_the_cli_reproduces_the_export(qtbot, make_napari_viewer, tmp_path):
    stack = simulate_picked_stack(300, random_state=5)  # ice, carbon, aggregates, empty boxes, off-centre picks
    star = write_simulated(stack, tmp_path / "data", "picked")["star"]
    viewer = make_napari_viewer()
    widget = dock(viewer)
    viewer.open(str(star), plugin="napari-ppcasort")
    assert widget.form.source.value is viewer.layers["picked"]  # opened: Run sorts it
    layer = viewer.layers["picked"]
    assert layer.scale[1] == pytest.approx(stack.pixel_size)
    quick_settings(widget)
    run_to_end(qtbot, widget)
    assert "true class" in widget.gallery.model.tooltip(0)  # the simulated labels of the STAR file
    widget.review.panel.threshold.value = 200
    widget.gallery.particle_clicked.emit(int(np.argmax(widget.scores)))  # the worst particle kept by hand
    kept = widget.kept_mask.copy()
    assert kept.sum() == 201
    with qtbot.waitSignal(widget.exported, timeout=RUN_TIMEOUT_MS):
        widget.export(tmp_path / "widget")
    assert main(["sort", str(star), "-o", str(tmp_path / "cluster"), "--settings",
                 str(tmp_path / "widget" / "parameters.json")]) == 0
    again = pd.read_csv(tmp_path / "cluster" / "scores.csv")
    np.testing.assert_array_equal(again["kept"].to_numpy(bool), kept)
    np.testing.assert_array_equal(again["score"], widget.scores)


def test_cancel_brings_back_the_previous_result_whole(qtbot, sample_widget):
    _, widget = sample_widget
    run_to_end(qtbot, widget)
    first = widget.result
    widget.review.panel.threshold.value = 1600
    before = screen_state(widget)
    quick_settings(widget, rounds=200, iterations=5)
    worker = widget.run()
    assert not widget.form.native.isEnabled() and not widget.review.panel.threshold.enabled
    ticks = wait_for_iterations(qtbot, worker, 3)
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        cancelled_at = time.monotonic()
        widget.cancel()
    assert finished.args == ["cancelled"]
    assert len([tick for tick in ticks if tick.finished > cancelled_at]) <= 1  # within one EM iteration
    assert widget.result is first
    assert_same_screen(before, screen_state(widget))
    assert widget.status.text() == "Cancelled. The previous result is shown."
    assert widget.form.native.isEnabled() and widget.run_button.isEnabled()


def test_cancel_and_failure_without_a_previous_result_leave_nothing_on_screen(qtbot, make_napari_viewer, sample_layer,
                                                                             tmp_path, errors):
    viewer = make_napari_viewer()
    widget = dock(viewer)
    widget.form.source.value = FILE_SOURCE
    assert widget.run() is None
    assert errors[-1].startswith("choose a particle file")

    broken = tmp_path / "broken.mrcs"
    broken.write_bytes(b"\x00" * 100)
    widget.form.file.value = broken
    assert widget.run() is None and "broken.mrcs" in errors[-1]

    widget.form.file.value = write_stack(tmp_path / "good.mrcs", sample_layer)
    form = widget.form
    form.model.value = "paper"
    form.basis.value = "pca"
    form.n_coefficients.value = 0  # automatic: PCA finds fewer coefficients than the dimension asked
    form.total_dimension.value = 100
    run_to_end(qtbot, widget, "failed")
    assert "total dimension 100" in errors[-1]
    assert errors[-1].endswith('lower "total dimension" or ask for more coefficients ("basis size L")')
    assert errors[-1].startswith(f"{tmp_path / 'good.mrcs'}: the PCA basis gives")
    assert widget.status.text().startswith("Failed:")
    assert widget.result is None and widget.kept_mask is None
    assert widget.review.panel.counts.value == "-" and widget.histogram.scores.size == 0
    assert widget.histogram.title == "no sort yet" and widget.gallery.model.rowCount() == 0
    assert not widget.review.panel.threshold.enabled and not widget.review.panel.export_button.enabled


def test_a_failed_run_brings_back_the_previous_result(qtbot, make_napari_viewer, sample_layer, tmp_path, errors):
    viewer = make_napari_viewer()
    widget = dock(viewer)
    widget.form.source.value = FILE_SOURCE
    widget.form.file.value = write_stack(tmp_path / "good.mrcs", sample_layer)
    quick_settings(widget, rounds=2)
    run_to_end(qtbot, widget)
    before = screen_state(widget)
    widget.form.model.value = "paper"
    widget.form.basis.value = "pca"
    widget.form.n_coefficients.value = 0
    widget.form.total_dimension.value = 100
    run_to_end(qtbot, widget, "failed")
    assert_same_screen(before, screen_state(widget))
    assert widget.status.text().endswith("The previous result is shown.")


def test_new_run_cancels_the_running_one(qtbot, sample_widget):
    _, widget = sample_widget
    quick_settings(widget, rounds=200, iterations=50)
    first = widget.run()
    wait_for_iterations(qtbot, first, 2)
    quick_settings(widget, rounds=2, iterations=2)
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        second = widget.run()
    assert finished.args == ["done"]
    assert second is not first
    qtbot.waitUntil(lambda: not first.is_running, timeout=RUN_TIMEOUT_MS)
    assert widget.n_round_updates == 2  # only the second run's rounds were shown


def test_closing_the_viewer_stops_the_sort(qtbot, make_napari_viewer, sample_layer):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data, **kwargs)
    widget = dock(viewer)
    quick_settings(widget, rounds=200, iterations=5)
    worker = widget.run()
    ticks = wait_for_iterations(qtbot, worker, 2)
    closed_at = time.monotonic()
    viewer.close()
    assert not worker.is_running  # close waited for the worker thread to stop
    assert sum(tick.finished > closed_at for tick in ticks) <= 1


# -- other sources and models ----------------------------------------------------------------------------------


def test_file_source_never_overwrites_its_input(qtbot, make_napari_viewer, sample_layer, tmp_path, errors):
    viewer = make_napari_viewer()
    widget = dock(viewer)
    stack = write_stack(tmp_path / "kept.mrcs", sample_layer)  # an input named like an output, in the export folder
    widget.form.source.value = FILE_SOURCE
    widget.form.file.value = stack
    assert widget.form.crop.max == 32
    quick_settings(widget, rounds=2)
    run_to_end(qtbot, widget)
    assert widget.result.particles.path == stack  # read lazily from the file
    before = stack.read_bytes()
    worker = widget.export(tmp_path)
    qtbot.waitUntil(lambda: bool(errors), timeout=RUN_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not worker.is_running)
    assert str(tmp_path) in errors[0]
    assert stack.read_bytes() == before


def test_in_memory_layer_sorts_and_exports(qtbot, make_napari_viewer, sample_layer, tmp_path):
    viewer = make_napari_viewer()
    images = np.asarray(sample_layer[0][:600])
    viewer.add_image(images, name="plain array")
    widget = dock(viewer)
    assert widget.form.source.value is viewer.layers["plain array"]
    quick_settings(widget, rounds=2)
    run_to_end(qtbot, widget)
    with qtbot.waitSignal(widget.exported, timeout=RUN_TIMEOUT_MS):
        widget.export(tmp_path)
    kept = widget.kept_mask
    back = open_particles(tmp_path / "kept.star")
    np.testing.assert_array_equal(back.read(np.arange(back.n_particles)), images[kept])


def test_paper_model_runs_with_its_sorting_factor_on_a_log_axis(qtbot, sample_widget):
    viewer, widget = sample_widget
    widget.form.model.value = "paper"
    assert widget.form.basis.enabled
    widget.form.basis.value = "pca"
    assert widget.form.settings().model == "paper" and widget.form.settings().basis == "pca"
    run_to_end(qtbot, widget)
    final = widget.result.final
    np.testing.assert_array_equal(widget.histogram.scores, final.final_scores)
    assert (final.final_scores > 0).all() and widget.histogram.logarithmic
    assert widget.histogram.x_label == axis_label("junk score (sorting factor)")
    assert not widget.classes_shown.aligned and "not aligned" in widget.class_view.header.text()


def test_the_default_stop_prunes_while_the_model_finds_junk_and_cuts_at_probability_one_half(qtbot, sample_widget):
    viewer, widget = sample_widget
    widget.form.stop.value = STOP_AUTOMATIC
    form = widget.form
    shown = {name: not getattr(form, name).native.isHidden() for name in ('n_rounds', 'target', 'outlier_threshold')}
    # the default model has a junk probability: no threshold to set
    assert shown == {'n_rounds': False, 'target': False, 'outlier_threshold': False}
    settings = form.settings()
    assert (settings.stop, settings.n_rounds, settings.target_kept_fraction) == ("junk-left", None, None)
    run_to_end(qtbot, widget)
    final = widget.result.final
    assert final.done and widget.n_round_updates == final.round >= 2 and final.removed.size > 0
    kept = final.removal_round == 0
    assert (final.final_scores[kept] <= 0).all() and (final.final_scores[~kept] > 0).all()
    assert widget.progress.format() == f"done: {final.round} rounds"
    form.model.value = "steerable"  # a score without a probability: the robust outlier rule, with its threshold
    assert not form.outlier_threshold.native.isHidden()


# -- the worker, without a window ------------------------------------------------------------------------------


def test_run_sort_yields_one_event_per_iteration_and_round(sample_layer):
    particles = sample_layer[0].particles
    settings = SortSettings(n_subspaces=2, total_dimension=8, n_coefficients=30, n_rounds=2, iterations_per_round=3)
    events = list(run_sort(particles, settings, threading.Event(), n_components_shown=3, with_classes=True))
    kinds = [type(event).__name__ for event in events]
    first_sort = kinds.index("SortStarted")
    assert set(kinds[:first_sort]) == {"CoefficientsProgress"}
    assert kinds[first_sort + 1:] == (["IterationDone"] * 3 + ["RoundDone"]) * 2 + ["SortFinished"]
    ticks = [event for event in events if isinstance(event, IterationDone)]
    assert [tick.iteration for tick in ticks] == [1, 2, 3, 4, 5, 6]
    rounds = [event for event in events if isinstance(event, RoundDone)]
    assert rounds[0].means.shape == (2, 32, 32) and rounds[0].components.shape == (2, 3, 32, 32)
    classes = rounds[1].classes
    assert classes.kinds[:2] == ("particle", "particle") and classes.counts.sum() == 2000
    assert classes.averages.shape == (classes.n_components, 32, 32)


def test_run_sort_reports_bad_input_and_stops_when_cancelled(sample_layer):
    particles = sample_layer[0].particles
    too_big = SortSettings(model="paper", n_subspaces=2, total_dimension=40, basis="pca", n_coefficients=None,
                           n_rounds=2)
    events = list(run_sort(particles, too_big, threading.Event()))
    assert isinstance(events[-1], RunFailed) and "total dimension 40" in events[-1].message
    cancel = threading.Event()
    cancel.set()
    assert list(run_sort(particles, SortSettings(n_coefficients=40, total_dimension=12), cancel)) == []


def test_the_qt_binding_is_the_one_the_environment_asks_for(qtbot):
    import os

    import qtpy

    # CI runs these tests twice: PyQt5 (the README's environment) and PyQt6 (QT_API=pyqt6)
    assert qtpy.API_NAME.lower() == os.environ.get("QT_API", "pyqt5").lower()


def test_the_gallery_shows_100000_particles_reading_only_those_on_screen(qtbot):
    from napari_ppcasort._gallery import ParticleGallery

    class CountingParticles:
        """100,000 particles of 16 px that record what is read."""

        n_particles, box_size, pixel_size = 100_000, 16, None

        def __init__(self):
            self.read_count = 0

        def read(self, indices):
            self.read_count += len(indices)
            return np.random.default_rng(len(indices)).normal(size=(len(indices), 16, 16)).astype(np.float32)

    particles = CountingParticles()
    gallery = ParticleGallery()
    qtbot.addWidget(gallery)
    gallery.resize(700, 500)
    gallery.show()
    scores = np.random.default_rng(0).normal(size=particles.n_particles)
    kept = scores <= 1.0
    gallery.mode.setCurrentText(BEST_FIRST)
    gallery.show_particles(particles, scores, kept, np.zeros_like(kept))
    assert gallery.model.rowCount() == 100_000
    np.testing.assert_array_equal(gallery.order, np.argsort(scores, kind="stable"))
    bar = gallery.view.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0, timeout=10_000)
    bar.setValue(bar.maximum() // 2)  # jump to the middle of the stack
    last = int(gallery.order[-1])
    qtbot.waitUntil(lambda: particles.read_count > 0, timeout=10_000)
    qtbot.wait(300)
    assert particles.read_count < 2_000  # only the tiles that were on screen
    assert gallery.loader.thumbnail(last) is None  # never on screen: not read (now asked for)
    gallery.close_loader()


# -- on a Dask scheduler --------------------------------------------------------------------------------------------


def test_a_sort_on_a_dask_scheduler_shows_its_classes_and_keeps_what_a_sort_here_keeps(qtbot, sample_widget,
                                                                                      tmp_path):
    import distributed

    from napari_ppcasort import sort_particles
    from napari_ppcasort.core.distributed import DaskChunks

    viewer, widget = sample_widget
    assert widget.form.dask_scheduler.tooltip.startswith("empty: sort in napari's process")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        widget.form.dask_scheduler.value = cluster.scheduler_address
        run_to_end(qtbot, widget)
    result = widget.result
    assert isinstance(result.coefficients, DaskChunks)  # the coefficients were on the worker
    here = sort_particles(widget._run_particles, widget.form.settings())
    kept, kept_here = widget.kept_mask, here.kept_mask
    assert np.count_nonzero(kept & kept_here) / np.count_nonzero(kept | kept_here) >= 0.999
    # the class views of the last round came from the worker: those of the sort here
    classes, classes_here = widget.classes_shown, here.class_views()
    assert classes.counts.sum() == 2000 and classes.kinds == classes_here.kinds
    np.testing.assert_array_equal(classes.counts, classes_here.counts)
    np.testing.assert_allclose(classes.averages, classes_here.averages, atol=1e-5 * np.abs(classes_here.averages).max())
    assert widget.class_view.decisions[0].isEnabled() and widget.status.text().startswith("Done: kept")
    # the export needs nothing from the workers (the cluster is gone): the kept set, in the input's format
    with qtbot.waitSignal(widget.exported, timeout=RUN_TIMEOUT_MS):
        widget.export(tmp_path)
    with open_particles(tmp_path / "kept.star") as back:
        assert back.n_particles == np.count_nonzero(kept)


def test_an_unreachable_scheduler_or_no_dask_is_a_message_naming_the_field(qtbot, sample_widget, errors, monkeypatch):
    import socket
    import sys

    import dask

    viewer, widget = sample_widget
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    widget.form.dask_scheduler.value = address
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        run_to_end(qtbot, widget, outcome="failed")
    status = widget.status.text()
    assert status.startswith(f'Failed: cannot reach the Dask scheduler at {address} given by "Dask scheduler"')
    assert widget.result is None and widget.form.native.isEnabled()
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails, as without the extra
    assert widget.run() is None and not widget.running
    assert errors[-1] == ('"Dask scheduler" needs Dask (dask and distributed), which is not installed: '
                          'pip install "napari-ppcasort[dask]"')
    widget.form.dask_scheduler.value = "  "  # empty: in this process, Dask or not
    assert widget.form.scheduler() is None

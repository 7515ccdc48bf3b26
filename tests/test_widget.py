"""Tests of the sorting dock widget in a real napari viewer (pytest-qt, napari's make_napari_viewer, Xvfb)."""

import threading
import time

import mrcfile
import numpy as np
import pandas as pd
import pytest

from napari_ppcasort import _widget
from napari_ppcasort._sample_data import SAMPLE_NAME, make_sample_data
from napari_ppcasort._widget import (
    COMPONENTS_LAYER,
    FILE_SOURCE,
    KEPT_LAYER,
    MEANS_LAYER,
    N_COMPONENTS_SHOWN,
    REJECTED_LAYER,
    STOP_AUTOMATIC,
    SortWidget,
    display_tiles,
    montage,
)
from napari_ppcasort._worker import IterationDone, RoundDone, RunFailed, run_sort
from napari_ppcasort.core.mixture import MixtureParameters
from napari_ppcasort.core.models import score_label
from napari_ppcasort.core.settings import SETTINGS, SortSettings
from napari_ppcasort.core.particles import open_particles

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
    widget.n_coefficients.value = 40
    widget.n_subspaces.value = 3
    widget.total_dimension.value = 12
    widget.alpha.value = 5.0
    widget.iterations.value = iterations
    widget.stop.value = "number of rounds"
    widget.n_rounds.value = rounds


@pytest.fixture
def sample_widget(make_napari_viewer, sample_layer):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data, **kwargs)
    widget = dock(viewer)
    quick_settings(widget)
    return viewer, widget


def run_to_end(qtbot, widget):
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        assert widget.run() is not None
    assert finished.args == ["done"]


def wait_for_iterations(qtbot, worker, count):
    """Collect the worker's IterationDone events; return the list once ``count`` have arrived."""
    ticks = []
    worker.yielded.connect(lambda event: ticks.append(event) if isinstance(event, IterationDone) else None)
    qtbot.waitUntil(lambda: len(ticks) >= count, timeout=RUN_TIMEOUT_MS)
    return ticks


def test_widget_docks_through_the_manifest_with_limits_from_the_data(make_napari_viewer, sample_layer):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data, **kwargs)
    viewer.add_image(np.zeros((5, 5)), name="flat image")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ppcasort", "Sort particles")
    assert isinstance(widget, SortWidget)
    names = [name for name, _ in widget._source_choices()]
    assert names == [SAMPLE_NAME, "particle file (below)"]  # 2-D layers cannot be sorted
    assert widget.source.value is viewer.layers[SAMPLE_NAME]
    assert widget.crop.max == 32 and widget.crop.value == 32
    disk_pixels = 709  # pixels within radius 15 of the centre of a 32 px box
    assert widget.n_coefficients.max == disk_pixels - 1
    widget.n_coefficients.value = 50
    assert widget.total_dimension.max == 49
    widget.crop.value = 16  # 16 px box, radius 7: 149 disk pixels
    assert widget.n_coefficients.max == 148 and widget.total_dimension.max == 49
    widget.n_coefficients.value = 20
    assert widget.total_dimension.max == 19 and widget.total_dimension.value <= 19


def test_run_on_sample_updates_once_per_round(qtbot, sample_widget):
    viewer, widget = sample_widget
    rounds = []

    def record(event):  # the state the user sees when the round is announced
        means = viewer.layers[MEANS_LAYER].data.copy()
        components = viewer.layers[COMPONENTS_LAYER].data.copy()
        rounds.append((event, widget.histogram.scores.copy(), widget.histogram.cut, means, components))

    widget.round_updated.connect(record)
    run_to_end(qtbot, widget)
    widget.round_updated.disconnect(record)  # the connection would keep the viewer alive

    assert widget.n_round_updates == 3 == len(rounds)
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9 keeps the grid there
    assert (canvas.grid if hasattr(canvas, "grid") else viewer.grid).enabled  # one cell per layer
    assert [event.result.round for event, *_ in rounds] == [1, 2, 3]
    assert [event.result.done for event, *_ in rounds] == [False, False, True]
    box, m, n = 32, 3, N_COMPONENTS_SHOWN
    for event, scores, cut, means, components in rounds:
        assert event.means.shape == (m, box, box)
        assert event.components.shape == (m, n, box, box)
        assert means.shape == (box, m * box) and components.shape == (n * box, m * box)
        np.testing.assert_array_equal(means, montage(display_tiles(event.means[np.newaxis])))
        np.testing.assert_array_equal(
            components, montage(display_tiles(event.components.transpose(1, 0, 2, 3), symmetric=True)))
        np.testing.assert_array_equal(scores, event.result.scores)
        assert cut == event.result.cut
        assert widget.histogram.counts.sum() > 0
    last = rounds[-1][0].result
    # after the run the histogram shows the final scores of every image, cut at the engine's cut
    np.testing.assert_array_equal(widget.histogram.scores, last.final_scores)
    assert widget.histogram.counts.sum() == 2000
    # the default model scores by signed evidence (SD): a linear axis named after that score
    assert widget.model.value == "steerable" and widget.basis.value == "pswf" and not widget.basis.enabled
    assert widget.histogram.axes.get_xlabel() == score_label(widget.settings())
    assert not widget.histogram.logarithmic and last.final_scores.min() < 0
    assert widget.score_threshold == pytest.approx(last.cut)
    np.testing.assert_array_equal(widget.kept_mask, last.removal_round == 0)
    np.testing.assert_array_equal(viewer.layers[KEPT_LAYER].data.indices, last.kept)
    np.testing.assert_array_equal(viewer.layers[REJECTED_LAYER].data.indices, np.sort(last.removed))
    assert "round 3/3" in widget.status.text() and f"kept {last.kept.size}" in widget.status.text()
    assert widget.progress.value() == 3 and widget.progress.maximum() == 3
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_cancel_stops_within_one_em_iteration(qtbot, sample_widget):
    _, widget = sample_widget
    quick_settings(widget, rounds=200, iterations=5)
    worker = widget.run()
    ticks = wait_for_iterations(qtbot, worker, 3)
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        cancelled_at = time.monotonic()
        widget.cancel()
    assert finished.args == ["cancelled"]
    finished_after_cancel = [tick for tick in ticks if tick.finished > cancelled_at]
    assert len(finished_after_cancel) <= 1
    assert widget.n_round_updates < 200
    assert widget.status.text() == "Cancelled."
    assert widget.run_button.enabled and not widget.threshold.enabled


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


def test_threshold_slider_moves_the_cut_and_the_counts(qtbot, sample_widget):
    viewer, widget = sample_widget
    run_to_end(qtbot, widget)
    final_scores = widget._final.final_scores
    for keep in (1, 500, 1234, 1999, 2000):
        widget.threshold.value = keep
        threshold = np.sort(final_scores)[keep - 1]
        kept = final_scores <= threshold
        assert widget.score_threshold == threshold == widget.histogram.cut
        np.testing.assert_array_equal(widget.kept_mask, kept)
        assert widget.counts.value.startswith(f"{kept.sum()} kept, {2000 - kept.sum()} rejected")
        np.testing.assert_array_equal(viewer.layers[KEPT_LAYER].data.indices, np.flatnonzero(kept))
        if keep < 2000:
            np.testing.assert_array_equal(viewer.layers[REJECTED_LAYER].data.indices, np.flatnonzero(~kept))
            assert viewer.layers[REJECTED_LAYER].data[0].shape == (32, 32)
    assert REJECTED_LAYER not in viewer.layers  # nothing rejected: no layer


def test_export_writes_sets_that_read_back(qtbot, sample_widget, tmp_path, errors):
    viewer, widget = sample_widget
    run_to_end(qtbot, widget)
    widget.threshold.value = 1700
    kept = widget.kept_mask
    source = viewer.layers[SAMPLE_NAME].data
    with qtbot.waitSignal(widget.exported, timeout=RUN_TIMEOUT_MS) as exported:
        widget.export(tmp_path / "out")
    written = exported.args[0]
    assert [p.name for p in written["kept"]] == ["kept.mrcs", "kept.star"]
    for name, mask in (("kept", kept), ("rejected", ~kept)):
        back = open_particles(tmp_path / "out" / f"{name}.star")
        indices = np.flatnonzero(mask)
        assert back.n_particles == indices.size
        np.testing.assert_array_equal(back.read(np.arange(indices.size)), source[indices])
        np.testing.assert_array_equal(back.table["ppcasortTrueLabel"], source.particles.table["ppcasortTrueLabel"][indices])
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    np.testing.assert_array_equal(scores["kept"].to_numpy(bool), kept)
    assert f"to {tmp_path / 'out'}" in widget.status.text()
    assert errors == []

    # a second export to the same folder is refused, with a message, and changes nothing
    before = (tmp_path / "out" / "kept.mrcs").read_bytes()
    worker = widget.export(tmp_path / "out")
    qtbot.waitUntil(lambda: bool(errors), timeout=RUN_TIMEOUT_MS)
    assert "already holds results" in errors[0]
    qtbot.waitUntil(lambda: not worker.is_running)
    assert (tmp_path / "out" / "kept.mrcs").read_bytes() == before


def test_file_source_never_overwrites_its_input(qtbot, make_napari_viewer, sample_layer, tmp_path, errors):
    viewer = make_napari_viewer()
    widget = dock(viewer)
    stack = write_stack(tmp_path / "kept.mrcs", sample_layer)  # an input named like an output, in the export folder
    widget.source.value = FILE_SOURCE
    widget.file.value = stack
    assert widget.crop.max == 32
    quick_settings(widget, rounds=2)
    run_to_end(qtbot, widget)
    assert widget.viewer.layers[KEPT_LAYER].data.particles.path == stack  # read lazily from the file
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
    quick_settings(widget, rounds=2)
    run_to_end(qtbot, widget)
    with qtbot.waitSignal(widget.exported, timeout=RUN_TIMEOUT_MS):
        widget.export(tmp_path)
    kept = widget.kept_mask
    back = open_particles(tmp_path / "kept.star")
    np.testing.assert_array_equal(back.read(np.arange(back.n_particles)), images[kept])


def test_paper_model_runs_with_its_sorting_factor_on_a_log_axis(qtbot, sample_widget):
    viewer, widget = sample_widget
    widget.model.value = "paper"
    assert widget.basis.enabled
    widget.basis.value = "pca"
    assert widget.settings().model == "paper" and widget.settings().basis == "pca"
    run_to_end(qtbot, widget)
    final = widget._final
    assert isinstance(final.parameters, MixtureParameters) and not hasattr(final.parameters, "axes")
    np.testing.assert_array_equal(widget.histogram.scores, final.final_scores)
    assert (final.final_scores > 0).all() and widget.histogram.logarithmic
    assert widget.histogram.axes.get_xlabel() == "junk score (sorting factor)"
    widget.model.value = "steerable"  # back to the steerable model: its basis again
    assert widget.basis.value == "pswf" and not widget.basis.enabled


def test_automatic_mode_stops_after_a_round_without_outliers(qtbot, sample_widget):
    viewer, widget = sample_widget
    widget.stop.value = STOP_AUTOMATIC
    shown = {name: not getattr(widget, name).native.isHidden() for name in ('n_rounds', 'target', 'outlier_threshold')}
    assert shown == {'n_rounds': False, 'target': False, 'outlier_threshold': True}
    settings = widget.settings()
    assert (settings.outlier_threshold, settings.n_rounds, settings.target_kept_fraction) == (2.5, None, None)
    run_to_end(qtbot, widget)
    final = widget._final
    assert final.done and widget.n_round_updates == final.round >= 2
    assert final.removed_this_round.size == 0 and final.removed.size > 0  # the last round found no outlier
    assert widget.progress.value() == final.round and f"round {final.round} |" in widget.status.text()
    np.testing.assert_array_equal(widget.kept_mask, final.removal_round == 0)


def test_bad_input_and_parameters_are_notifications(qtbot, make_napari_viewer, sample_layer, tmp_path, errors):
    viewer = make_napari_viewer()
    widget = dock(viewer)
    widget.source.value = FILE_SOURCE
    assert widget.run() is None
    assert errors[-1].startswith("choose a particle file")

    broken = tmp_path / "broken.mrcs"
    broken.write_bytes(b"\x00" * 100)
    widget.file.value = broken
    assert "broken.mrcs" in errors[-1]

    widget.file.value = write_stack(tmp_path / "good.mrcs", sample_layer)
    widget.model.value = "paper"
    widget.basis.value = "pca"
    widget.n_coefficients.value = 0  # automatic: PCA finds fewer coefficients than the dimension asked
    widget.total_dimension.value = 100
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        widget.run()
    assert finished.args == ["failed"]
    assert "total dimension 100" in errors[-1]
    # the settings named as the widget labels them, the file named
    assert errors[-1].endswith('lower "total dimension" or ask for more coefficients ("basis size L")')
    assert errors[-1].startswith(f"{tmp_path / 'good.mrcs'}: the PCA basis gives")
    assert widget.status.text().startswith("Failed:")
    assert widget.n_round_updates == 0


def test_widget_labels_and_limits_come_from_the_settings_schema(make_napari_viewer, sample_layer):
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layer
    viewer.add_image(data, **kwargs)
    widget = dock(viewer)
    controls = {"model": widget.model, "basis": widget.basis, "n_subspaces": widget.n_subspaces,
                "total_dimension": widget.total_dimension, "alpha": widget.alpha,
                "iterations_per_round": widget.iterations, "n_rounds": widget.n_rounds,
                "target_kept_fraction": widget.target, "outlier_threshold": widget.outlier_threshold,
                "random_state": widget.seed, "box_size": widget.crop, "n_coefficients": widget.n_coefficients}
    for name, control in controls.items():
        declaration = SETTINGS[name]
        assert control.label == declaration.label and control.tooltip == declaration.help
        if declaration.allowed is not None:
            assert list(control.choices) == list(declaration.allowed)
            continue
        # every value a control can take is valid for its setting (0 coefficients stands for none: "auto")
        for shown in (control.min, control.max):
            value = shown / declaration.unit_scale
            if not (name == "n_coefficients" and value == 0):
                declaration.check(int(value) if declaration.type is int else float(value))


def test_display_tiles_maps_each_tile_to_unit_range():
    tiles = np.stack([np.stack([np.full((2, 2), 5.0), np.array([[1.0, 3.0], [2.0, 5.0]])])])
    shown = display_tiles(tiles)
    np.testing.assert_array_equal(shown[0, 0], 0.5)  # constant tile
    np.testing.assert_allclose(shown[0, 1], [[0, 0.5], [0.25, 1]])
    signed = display_tiles(np.array([[[[-2.0, 1.0], [0.0, 2.0]]]]), symmetric=True)
    np.testing.assert_allclose(signed[0, 0], [[0, 0.75], [0.5, 1]])
    assert shown.dtype == np.float32


def test_montage_tiles_rows_and_columns():
    tiles = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    image = montage(tiles)
    assert image.shape == (4, 6)
    np.testing.assert_array_equal(image[2:4, 4:6], tiles[1, 2])
    np.testing.assert_array_equal(image[0:2, 2:4], tiles[0, 1])


def test_run_sort_yields_one_event_per_iteration_and_round(sample_layer):
    particles = sample_layer[0].particles
    settings = SortSettings(n_subspaces=2, total_dimension=8, n_coefficients=30, n_rounds=2, iterations_per_round=3)
    events = list(run_sort(particles, settings, threading.Event(), n_components_shown=3))
    kinds = [type(event).__name__ for event in events]
    first_sort = kinds.index("SortStarted")
    assert set(kinds[:first_sort]) == {"CoefficientsProgress"}
    assert kinds[first_sort + 1:] == (["IterationDone"] * 3 + ["RoundDone"]) * 2 + ["SortFinished"]
    assert events[first_sort - 1].done == events[first_sort - 1].total == 2000
    ticks = [event for event in events if isinstance(event, IterationDone)]
    assert [tick.iteration for tick in ticks] == [1, 2, 3, 4, 5, 6]
    assert [tick.round for tick in ticks] == [1, 1, 1, 2, 2, 2]
    rounds = [event for event in events if isinstance(event, RoundDone)]
    assert [r.result.done for r in rounds] == [False, True]
    assert rounds[0].means.shape == (2, 32, 32) and rounds[0].components.shape == (2, 3, 32, 32)
    assert ticks[3].n_kept == rounds[0].result.kept.size


def test_run_sort_reports_bad_input_and_stops_when_cancelled(sample_layer):
    particles = sample_layer[0].particles
    too_big = SortSettings(model="paper", n_subspaces=2, total_dimension=40, basis="pca", n_coefficients=None, n_rounds=2)
    events = list(run_sort(particles, too_big, threading.Event()))
    assert isinstance(events[-1], RunFailed) and "total dimension 40" in events[-1].message
    cancel = threading.Event()
    cancel.set()
    assert list(run_sort(particles, SortSettings(n_coefficients=40, total_dimension=12), cancel)) == []

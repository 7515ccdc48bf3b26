"""The one-page report of a sort (core.report): its panels, its numbers, and a valid PNG written headless."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from napari_ppcasort.core.models import score_label
from napari_ppcasort.core.pipeline import SortSettings, make_sorter, prepare_coefficients, subspace_images
from napari_ppcasort.core.particles import ArrayParticleSet
from napari_ppcasort.core.report import (
    MAX_SUBSPACES_SHOWN,
    PAGE_SIZE,
    REPORT_DPI,
    pruning_iterations,
    score_bin_edges,
    report_figure,
    write_report,
)
from napari_ppcasort.core.simulate import simulate_particles

SETTINGS = SortSettings(model="steerable", stop="schedule", n_subspaces=2, total_dimension=6, n_coefficients=20, n_rounds=3,
                        iterations_per_round=2)
N_SHOWN = 3


@pytest.fixture(scope="module")
def sort():
    """(last SortRound, means (M, 16, 16), components (M, 3, 16, 16)) of a small simulated sort."""
    stack = simulate_particles(240, n_outliers=30, n_noise=30, box_size=16, snr=1.0, random_state=1)
    prepared = prepare_coefficients(ArrayParticleSet(stack.images), SETTINGS)
    *_, final = make_sorter(SETTINGS, prepared.basis).rounds(prepared.coefficients)
    means, components = subspace_images(prepared.basis, final.parameters, N_SHOWN)
    return final, means, components


def axes_titled(figure, title):
    (axes,) = [axes for axes in figure.axes if axes.get_title().startswith(title)]
    return axes


def test_histogram_counts_kept_and_rejected_and_draws_the_cut_at_the_largest_kept_score(sort):
    final, means, components = sort
    kept = final.removal_round == 0
    figure = report_figure(final, kept, means, components, title="toy", settings=SETTINGS)
    histogram = axes_titled(figure, "scores of all images")
    labels = [text.get_text() for text in histogram.get_legend().get_texts()]
    assert labels[:2] == [f"kept ({kept.sum()})", f"rejected ({(~kept).sum()})"]
    (cut_line,) = histogram.get_lines()
    assert cut_line.get_xdata()[0] == pytest.approx(final.cut)  # the sort's own cut
    bar_heights = sum(patch.get_height() for patch in histogram.patches)
    assert bar_heights == final.n_total  # every image counted once (stacked bars)
    assert figure.get_suptitle() == "toy"
    # the steerable model's signed evidence: a linear axis named after it; the summary lists what was used
    assert histogram.get_xlabel() == "final " + score_label(SETTINGS) and histogram.get_xscale() == "linear"
    summary = "\n".join(text.get_text() for axes in figure.axes for text in axes.texts)
    assert "model = steerable" in summary and "n_subspaces = 2" in summary and "combine" not in summary


def test_a_cut_chosen_by_the_user_moves_the_line_and_the_counts(sort):
    final, means, components = sort
    kept = final.final_scores <= np.quantile(final.final_scores, 0.5)
    histogram = axes_titled(report_figure(final, kept, means, components), "scores of all images")
    assert histogram.get_lines()[0].get_xdata()[0] == pytest.approx(final.final_scores[kept].max())
    assert histogram.get_legend().get_texts()[0].get_text() == f"kept ({kept.sum()})"


def test_trace_shows_every_em_iteration_and_marks_every_pruning(sort):
    final, means, components = sort
    assert pruning_iterations(final).tolist() == [2, 4, 6]
    trace = axes_titled(report_figure(final, final.removal_round == 0, means, components), "EM over 3 pruning rounds")
    curve, *prunings = trace.get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), np.arange(1, 7))
    np.testing.assert_allclose(curve.get_ydata(), final.log_likelihood)
    assert [line.get_xdata()[0] for line in prunings] == [2.5, 4.5, 6.5]


def test_subspace_montage_has_a_row_per_subspace_mean_then_components(sort):
    final, means, components = sort
    figure = report_figure(final, final.removal_round == 0, means, components)
    (montage_axes,) = [axes for axes in figure.axes if axes.images]
    montage = montage_axes.images[0].get_array()
    box, gap = 16, 1
    assert montage.shape == (2 * (box + gap) - gap, (1 + N_SHOWN) * (box + gap) - gap)
    assert [t.get_text() for t in montage_axes.get_xticklabels()] == ["mean", "component 1", "component 2",
                                                                      "component 3"]
    weights = final.parameters.weights
    assert [t.get_text() for t in montage_axes.get_yticklabels()] == [
        f"subspace {m + 1}\nweight {weights[m]:.2f}" for m in range(2)]
    # each component tile is scaled with zero at mid-grey: its largest |value| reaches 0 or 1
    tile = montage[:box, box + gap:2 * box + gap]
    assert np.isclose(tile.min(), 0) or np.isclose(tile.max(), 1)
    assert 0 <= np.nanmin(montage) and np.nanmax(montage) <= 1


def test_only_the_heaviest_subspaces_are_shown_when_there_are_many(sort):
    final, means, components = sort
    n_subspaces = MAX_SUBSPACES_SHOWN + 2
    weights = np.arange(1, n_subspaces + 1, dtype=float)[::-1] / sum(range(1, n_subspaces + 1))
    parameters = dataclasses.replace(final.parameters, weights=weights)
    many = dataclasses.replace(final, parameters=parameters)
    rng = np.random.default_rng(0)
    figure = report_figure(many, final.removal_round == 0, rng.normal(size=(n_subspaces, 16, 16)),
                           rng.normal(size=(n_subspaces, 2, 16, 16)))
    (montage_axes,) = [axes for axes in figure.axes if axes.images]
    shown = [t.get_text().split("\n")[0] for t in montage_axes.get_yticklabels()]
    assert shown == [f"subspace {m}" for m in range(1, MAX_SUBSPACES_SHOWN + 1)]
    assert "2 lighter subspaces not shown" in figure.subfigs[1].get_suptitle()


def test_bad_arguments_are_refused_with_a_clear_message(sort):
    final, means, components = sort
    kept = final.removal_round == 0
    with pytest.raises(ValueError, match=r"kept_mask must have one entry per image \(300\)"):
        report_figure(final, kept[:10], means, components)
    with pytest.raises(ValueError, match="keeps no image"):
        report_figure(final, np.zeros_like(kept), means, components)
    with pytest.raises(ValueError, match=r"means must be \(M=2, box, box\)"):
        report_figure(final, kept, means[:1], components)
    with pytest.raises(ValueError, match=r"components must be \(M=2, n, 16, 16\)"):
        report_figure(final, kept, means, components[..., :8])


def test_write_report_gives_an_a4_png_and_leaves_no_temporary_file(sort, tmp_path):
    final, means, components = sort
    path = write_report(tmp_path / "report.png", final, final.removal_round == 0, means, components,
                        title="simulated", settings=SETTINGS)
    assert path == tmp_path / "report.png" and list(tmp_path.iterdir()) == [path]
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert abs(height - PAGE_SIZE[1] * REPORT_DPI) <= 1 and abs(width - PAGE_SIZE[0] * REPORT_DPI) <= 1
    assert image[..., :3].std() > 0.05


def test_report_renders_headless_without_pyplot_or_qt(tmp_path):
    # a fresh interpreter with no display: the report must neither need one nor load a GUI toolkit
    code = f"""
import sys, numpy as np
from napari_ppcasort.core.pipeline import SortSettings, make_sorter
from napari_ppcasort.core.report import write_report
settings = SortSettings(model='paper', n_subspaces=1, total_dimension=2, n_rounds=1, iterations_per_round=1)
data = np.random.default_rng(0).normal(size=(50, 6))
final = next(make_sorter(settings, None).rounds(data))
write_report({str(tmp_path / 'r.png')!r}, final, final.removal_round == 0, np.ones((1, 8, 8)), np.ones((1, 1, 8, 8)))
loaded = [name for name in sys.modules if name.split('.')[0] in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy')
          or name == 'matplotlib.pyplot']
assert not loaded, loaded
"""
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(tmp_path / "r.png").stat().st_size > 10_000


def test_score_bins_are_logarithmic_only_for_positive_scores_spanning_decades():
    edges, logarithmic = score_bin_edges(np.array([0.01, 0.5, 3.0, np.nan]), n_bins=4)
    assert logarithmic and edges[0] == 0.01 and edges[-1] == pytest.approx(3.0)
    np.testing.assert_allclose(np.diff(np.log(edges)), np.log(300) / 4)
    edges, logarithmic = score_bin_edges(np.array([-12.0, -8.0, 0.5, 4.0]), n_bins=4)
    assert not logarithmic and edges.tolist() == [-12.0, -8.0, -4.0, 0.0, 4.0]
    edges, logarithmic = score_bin_edges(np.array([2.0, 2.0]), n_bins=2)  # one value: a bin around it
    assert not logarithmic and edges[0] < 2.0 < edges[-1]


def test_bin_edges_stay_within_the_models_limits():
    # junk log-odds of ice and carbon reach thousands: the bins span the range worth reading, the rest is clipped
    scores = np.r_[np.linspace(-50.0, 5.0, 900), np.geomspace(50.0, 16000.0, 100)]
    edges, logarithmic = score_bin_edges(scores, 60, include=(0.0,), limits=(-40.0, 40.0))
    assert not logarithmic and (edges[0], edges[-1]) == (-40.0, 40.0)
    edges, _ = score_bin_edges(scores[:900], 60, limits=(-40.0, 40.0))
    assert (edges[0], edges[-1]) == (-40.0, 5.0)  # a narrower range is kept as it is
    assert score_bin_edges(scores, 60)[0][-1] == 16000.0  # no limits: every score

"""The kept set after a sort (cut + manual overrides), its record in parameters.json and its reproduction on the
command line (``sort --settings``, ``select``); class views with in-plane aligned averages. No Qt."""

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest

from napari_ppcasort.cli import main
from napari_ppcasort.core.bases import PSWFBasis
from napari_ppcasort.core.classes import aligned_average, component_kinds
from napari_ppcasort.core.errors import SettingsError
from napari_ppcasort.core.micrograph import simulate_picked_stack, write_simulated
from napari_ppcasort.core.run import sort_particles
from napari_ppcasort.core.selection import Overrides, kept_mask, read_overrides_file
from napari_ppcasort.core.settings import SortSettings

QUICK = SortSettings(n_coefficients=40, total_dimension=12, n_rounds=3, iterations_per_round=2)
QUICK_OPTIONS = ["--n-coefficients", "40", "--total-dimension", "12", "--n-rounds", "3", "--iterations-per-round", "2"]


@pytest.fixture(scope="module")
def picked(tmp_path_factory):
    """A realistic picked stack (ice, carbon, aggregates, empty boxes), written as .mrcs/.star, and its sort."""
    folder = tmp_path_factory.mktemp("picked")
    stack = simulate_picked_stack(400, random_state=3)
    star = write_simulated(stack, folder, "picked")["star"]
    return star, stack, sort_particles(star, QUICK)


def test_overrides_between_two_masks_turn_one_into_the_other():
    base = np.array([True, True, False, False, True])
    wanted = np.array([True, False, True, False, True])
    overrides = Overrides.between(wanted, base)
    assert overrides == Overrides(kept=(2,), rejected=(1,))
    np.testing.assert_array_equal(overrides.apply(base), wanted)
    np.testing.assert_array_equal(kept_mask(np.array([0.0, 1, 2, 3, 4]), base, 2.0, overrides),
                                  [True, False, True, False, False])
    with pytest.raises(SettingsError, match="particle 3 cannot be both"):
        Overrides(kept=(3,), rejected=(3, 4))
    with pytest.raises(IndexError, match="particle 9"):
        Overrides(kept=(9,)).apply(base)


def test_aligned_average_undoes_in_plane_rotations():
    basis = PSWFBasis(32, max_coefficients=120)
    image = np.zeros((32, 32))
    image[10:14, 8:24] = 1.0
    image[14:22, 18:22] = 1.0  # an asymmetric L: its rotational average is a blurred ring
    coefficients = basis.expand(image[np.newaxis])[0]
    angles = np.random.default_rng(0).uniform(0, 2 * np.pi, 25)
    rotated = np.stack([basis.rotate(coefficients[np.newaxis], angle)[0] for angle in angles])
    average = aligned_average(rotated, basis)
    error = np.linalg.norm(average - rotated[0]) / np.linalg.norm(rotated[0])
    unaligned = np.linalg.norm(rotated.mean(axis=0) - rotated[0]) / np.linalg.norm(rotated[0])
    assert error < 0.02 and unaligned > 0.5  # aligned to the first image (1 degree steps); the plain mean is a ring


def test_component_kinds_come_from_the_parameters_when_the_model_gives_them():
    class Parameters:
        component_kinds = ("particle", "particle", "noise", "background")

    assert component_kinds(object(), 3) == ("particle",) * 3
    assert component_kinds(Parameters(), 4) == Parameters.component_kinds
    with pytest.raises(ValueError, match="3 components"):
        component_kinds(Parameters(), 3)


def test_class_views_partition_the_particles_by_responsibility(picked):
    _, stack, result = picked
    views = result.class_views()
    expected = np.argmax(result.model.predict_proba(result.coefficients), axis=1)
    np.testing.assert_array_equal(views.assignment, expected)
    parameters = result.final.parameters
    assert views.counts.sum() == 400 and views.aligned
    assert views.kinds == parameters.component_kinds and views.kinds[:3] == ("particle",) * 3
    assert {"noise", "background"} <= set(views.kinds)
    np.testing.assert_allclose(views.weights, parameters.component_weights)
    assert views.weights.sum() == pytest.approx(1.0)
    for component in range(views.n_components):
        members = views.members(component)
        assert members.size == views.counts[component]
        if members.size:
            assert views.mean_scores[component] == pytest.approx(result.scores[members].mean())
    assert views.averages.shape == (views.n_components, 64, 64) and views.averages.dtype == np.float32


def test_a_cut_and_overrides_are_exported_and_reproduced_by_sort_with_settings(picked, tmp_path, capsys):
    star, _, result = picked
    threshold = float(np.quantile(result.scores, 0.6))
    wanted = result.scores <= threshold
    wanted[np.argmin(result.scores)] = False  # the best particle rejected by hand
    wanted[np.argmax(result.scores)] = True  # the worst kept by hand
    chosen = result.with_selection(threshold, wanted)
    np.testing.assert_array_equal(chosen.kept_mask, wanted)
    chosen.export(tmp_path / "widget")
    parameters = json.loads((tmp_path / "widget" / "parameters.json").read_text())
    assert parameters["settings"]["score_threshold"] == threshold
    assert parameters["overrides"] == {"kept": [int(np.argmax(result.scores))],
                                       "rejected": [int(np.argmin(result.scores))]}
    assert parameters["n_kept"] == wanted.sum()
    scores = pd.read_csv(tmp_path / "widget" / "scores.csv")
    np.testing.assert_array_equal(scores["kept"].to_numpy(bool), wanted)

    assert main(["sort", str(star), "-o", str(tmp_path / "cluster"), "--settings",
                 str(tmp_path / "widget" / "parameters.json")]) == 0
    again = pd.read_csv(tmp_path / "cluster" / "scores.csv")
    np.testing.assert_array_equal(again["kept"].to_numpy(bool), wanted)
    assert f"kept {wanted.sum()} of 400" in capsys.readouterr().out
    assert json.loads((tmp_path / "cluster" / "parameters.json").read_text())["overrides"] == parameters["overrides"]


def test_overrides_for_another_set_are_refused_naming_the_file(picked, tmp_path):
    star, _, result = picked
    result.with_selection(None, ~result.sort_kept_mask).export(tmp_path / "a")
    path = tmp_path / "a" / "parameters.json"
    assert read_overrides_file(path, 400)
    with pytest.raises(SettingsError, match=r"parameters.json: its manual overrides are for a set of 400 particles, "
                                            r"this one has 300"):
        read_overrides_file(path, 300)


def test_select_recuts_without_sorting_by_count_or_threshold(picked, tmp_path, capsys):
    star, _, result = picked
    result.export(tmp_path / "sorted")
    assert main(["select", str(tmp_path / "sorted"), "--keep", "250", "-o", str(tmp_path / "best250")]) == 0
    scores = pd.read_csv(tmp_path / "best250" / "scores.csv")
    expected = result.scores <= np.sort(result.scores)[249]
    np.testing.assert_array_equal(scores["kept"].to_numpy(bool), expected)
    np.testing.assert_array_equal(scores["score"], result.scores)
    with mrcfile.open(tmp_path / "best250" / "kept.mrcs") as kept:
        assert kept.data.shape[0] == 250
    assert "kept 250 of 400" in capsys.readouterr().out
    assert not (tmp_path / "best250" / "report.png").exists()
    threshold = float(np.median(result.scores))
    assert main(["select", str(tmp_path / "sorted"), "--score-threshold", repr(threshold), "-o",
                 str(tmp_path / "median")]) == 0
    recorded = json.loads((tmp_path / "median" / "parameters.json").read_text())
    assert recorded["settings"]["score_threshold"] == threshold
    assert recorded["n_kept"] == int((result.scores <= threshold).sum())
    # what the sort measured stays on record through a re-cut
    assert recorded["estimated"] == json.loads((tmp_path / "sorted" / "parameters.json").read_text())["estimated"]
    assert recorded["estimated"]["mask_radius_px"] == pytest.approx(result.preprocessor.radius, abs=1e-3)
    assert main(["select", str(tmp_path / "median"), "--keep", "0", "-o", str(tmp_path / "none")]) == 2
    assert main(["select", str(tmp_path / "nothing"), "--keep", "3", "-o", str(tmp_path / "x")]) == 2
    assert "holds no results of a sort" in capsys.readouterr().err

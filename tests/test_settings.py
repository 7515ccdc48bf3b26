"""The settings schema: every setting's type, bounds and choices, checked in Python, in JSON files and on the
command line, with messages that name the setting the way each front end does."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from napari_ppcasort._worker import widget_name
from napari_ppcasort.cli import main
from napari_ppcasort.core.errors import SettingsError
from napari_ppcasort.core.settings import SETTINGS, SortSettings, cli_name, read_settings_file

from fixture_paths import TOY

TOY_STAR = TOY / "toy_projections.star"


# -- the dataclass ---------------------------------------------------------------------------------------------


WRONG_VALUES = [
    # (setting, value, message after the setting's name)
    ("target_kept_fraction", "0.5", "must be a number strictly between 0 and 1 or none, got the text '0.5'"),
    ("random_state", "abc", "must be a whole number between 0 and 4294967295, got the text 'abc'"),
    ("random_state", -1, "must be a whole number between 0 and 4294967295, got -1"),
    ("n_coefficients", 100.5, "must be a whole number of at least 1 or none, got 100.5"),
    ("n_coefficients", 100.0, "must be a whole number of at least 1 or none, got 100.0"),
    ("normalize", "false", "must be true or false, got the text 'false'"),
    ("normalize", 0, "must be true or false, got 0"),
    ("n_rounds", True, "must be a whole number of at least 1 or none, got True (a yes/no value)"),
    ("n_rounds", 0, "must be a whole number of at least 1 or none, got 0"),
    ("box_size", -1, "must be a whole number of at least 8 or none, got -1"),
    ("mask_radius", math.nan, "must be a number above 0 or none, got nan"),
    ("mask_radius", math.inf, "must be a number above 0 or none, got inf"),
    ("alpha", 0, "must be a number strictly between 0 and 1, got 0.0"),
    ("alpha", 1, "must be a number strictly between 0 and 1, got 1.0"),
    ("alpha", None, "must be a number strictly between 0 and 1, got none"),
    ("outlier_threshold", -2.5, "must be a number above 0, got -2.5"),
    ("stop", "never", "must be one of 'junk-left', 'schedule', got the text 'never'"),
    ("ctf_correction", "wiener", "must be one of 'flip', 'none', got the text 'wiener'"),
    ("model", "fancy", "must be one of 'contamination', 'steerable', 'paper', got the text 'fancy'"),
    ("noise", "Shared", "must be one of 'shared', 'per_component', got the text 'Shared'"),
    ("n_subspaces", [3], "must be a whole number of at least 1, got a list ([3])"),
    ("iterations_per_round", 2.0, "must be a whole number of at least 1, got 2.0"),
]


@pytest.mark.parametrize("name, value, message", WRONG_VALUES)
def test_a_wrong_value_is_a_settings_error_naming_the_setting(name, value, message):
    with pytest.raises(SettingsError) as raised:
        SortSettings(**{name: value})
    assert str(raised.value) == f"{name} {message}"
    assert raised.value.describe(cli_name) == f"{SETTINGS[name].option} {message}"
    assert raised.value.describe(widget_name) == f'"{SETTINGS[name].label}" {message}'


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_setting_refuses_a_value_of_another_type(name):
    wrong = {bool: "yes", int: "3", float: "0.5", str: 3}[SETTINGS[name].type]
    with pytest.raises(SettingsError, match=rf"^{name} must be .*, got (the text '(yes|3|0\.5)'|3)$"):
        SortSettings(**{name: wrong})


def test_numpy_scalars_become_python_values_and_the_defaults_are_valid():
    settings = SortSettings(n_subspaces=np.int64(2), alpha=np.float32(0.25), normalize=np.bool_(False))
    assert (type(settings.n_subspaces), type(settings.alpha), type(settings.normalize)) == (int, float, bool)
    assert settings.alpha == 0.25
    assert SortSettings().to_dict() == {name: declaration.default for name, declaration in SETTINGS.items()}
    with pytest.raises(Exception):  # frozen: a change goes through replace(), which validates
        settings.alpha = 2.0
    with pytest.raises(SettingsError, match="alpha must be"):
        settings.replace(alpha=2.0)


COMBINATION_ERRORS = [
    (dict(total_dimension=2), "total_dimension (2) must be at least n_subspaces (3)"),
    (dict(n_coefficients=60), "n_coefficients (60) must exceed total_dimension (60)"),
    (dict(basis="pca"), "the contamination model needs the steerable basis 'pswf', not 'pca': set basis to 'pswf', or "
                        "model to 'paper' for the pca basis"),
    (dict(combine="min"), "combine applies to model 'paper' only; with the contamination model leave it at its default "
                          "('sum')"),
    (dict(center=True), "center applies to model 'paper' only"),
    (dict(stop="schedule"), "stop 'schedule' needs n_rounds or target_kept_fraction, so that the sort knows when to "
                            "stop"),
]


@pytest.mark.parametrize("changes, message", COMBINATION_ERRORS)
def test_settings_that_do_not_go_together_are_refused(changes, message):
    with pytest.raises(SettingsError) as raised:
        SortSettings(**changes)
    assert str(raised.value).startswith(message)


def test_from_dict_refuses_unknown_settings_and_non_mappings():
    with pytest.raises(SettingsError, match=r"^unknown setting 'n_component'; the settings are model, n_subspaces, "):
        SortSettings.from_dict({"n_component": 3})
    with pytest.raises(SettingsError, match=r"settings must be a mapping .*got a list"):
        SortSettings.from_dict([("alpha", 0.1)])
    assert SortSettings.from_dict({"n_rounds": None, "target_kept_fraction": 0.8}).n_rounds is None


def test_used_settings_leave_out_what_the_model_does_not_read():
    assert "combine" not in SortSettings().used_settings() and "center" not in SortSettings().used_settings()
    assert SortSettings(model="paper").used_settings()["combine"] == "sum"


# -- JSON settings files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value, message", [
    ("target_kept_fraction", "0.5", r'"target_kept_fraction" must be a number strictly between 0 and 1 or none, got '
                                    r"the text '0\.5'"),
    ("random_state", "abc", r'"random_state" must be a whole number between 0 and 4294967295, got the text \'abc\''),
    ("n_coefficients", 100.5, r'"n_coefficients" must be a whole number of at least 1 or none, got 100\.5'),
    ("normalize", "false", r'"normalize" must be true or false, got the text \'false\''),
    ("alpha", [0.1], r'"alpha" must be a number strictly between 0 and 1, got a list \(\[0\.1\]\)'),
    ("n_component", 3, r"unknown setting 'n_component'; the settings are model, "),
])
def test_a_settings_file_with_a_wrong_value_is_refused_naming_the_file_and_the_setting(
        tmp_path, capsys, name, value, message):
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"settings": {"alpha": 0.1, name: value}}))
    with pytest.raises(SettingsError, match=re.escape(str(path)) + ": " + message):
        read_settings_file(path)
    # on the command line: exit 2, one line, before the input is read
    assert main(["sort", str(tmp_path / "missing.star"), "-o", str(tmp_path / "out"), "--settings", str(path)]) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and re.search(re.escape(str(path)) + ": " + message, error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff binary", "not a JSON settings file (not UTF-8 text)"),
    (b"{not json", "not a JSON file (Expecting property name"),
    (b"[1, 2]", "expected a parameters.json of ppcasort or a JSON object of settings"),
])
def test_a_settings_file_that_is_not_settings_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "settings.json"
    path.write_bytes(content)
    with pytest.raises(SettingsError) as raised:
        read_settings_file(path)
    assert str(raised.value).startswith(f"{path}: {message}")
    with pytest.raises(SettingsError, match="no such settings file"):
        read_settings_file(tmp_path / "nowhere.json")
    with pytest.raises(SettingsError, match="is a folder, not a settings file"):
        read_settings_file(tmp_path)


def test_a_settings_file_round_trips_and_command_line_options_override_it(tmp_path):
    settings = SortSettings(model="paper", basis="pca", combine="min", n_rounds=None, target_kept_fraction=0.7)
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"settings": settings.to_dict()}))
    assert SortSettings.from_dict(read_settings_file(path)) == settings


# -- the command line -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (["--random-state", "-1"], r"--random-state must be a whole number between 0 and 4294967295, got -1$"),
    (["--mask-radius", "nan"], r"--mask-radius must be a number above 0 or none, got nan$"),
    (["--box-size", "4"], r"--box-size must be a whole number of at least 8 or none, got 4$"),
    (["--total-dimension", "2"], r"--total-dimension \(2\) must be at least --n-subspaces \(3\)"),
    (["--combine", "min"], r"--combine applies to model 'paper' only"),
    (["--random-state", "abc"], r"argument --random-state: invalid int value: 'abc'"),
    (["--n-rounds", "many"], r"argument --n-rounds: expected a whole number or 'none', got 'many'"),
])
def test_a_wrong_option_is_one_line_naming_the_option(tmp_path, capsys, arguments, message):
    try:
        code = main(["sort", str(TOY_STAR), "-o", str(tmp_path / "out"), *arguments])
    except SystemExit as exit:
        code = exit.code
    error = capsys.readouterr().err
    assert code == 2 and len(error.splitlines()) == 1, error
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_the_options_and_their_help_come_from_the_schema():
    result = subprocess.run([sys.executable, "-m", "napari_ppcasort.cli", "sort", "--help"], capture_output=True,
                            text=True, timeout=60)
    text = " ".join(result.stdout.split()).replace("- ", "-")  # argparse may wrap a line after a hyphen
    for name, declaration in SETTINGS.items():
        assert f"{declaration.option} " in text or f"{declaration.option}," in text
        assert " ".join(declaration.help.split()).replace("- ", "-") in text, name
        if declaration.allowed:
            assert "{" + ",".join(declaration.allowed) + "}" in text
    assert "--normalize, --no-normalize" in text


def test_a_parameters_file_from_before_the_stop_setting_runs_as_it_did(tmp_path):
    old = {"model": "steerable", "n_rounds": 5, "alpha": 0.05, "outlier_threshold": None}
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"settings": old}))
    settings = SortSettings.from_dict(read_settings_file(path))
    assert (settings.model, settings.stop, settings.n_rounds, settings.alpha) == ("steerable", "schedule", 5, 0.05)
    path.write_text(json.dumps({"settings": {**old, "outlier_threshold": 3.0, "n_rounds": None}}))
    settings = SortSettings.from_dict(read_settings_file(path))
    assert (settings.stop, settings.outlier_threshold, settings.n_rounds) == ("junk-left", 3.0, None)
    # a file of today that gives the threshold as null is an error, not a migration
    path.write_text(json.dumps({"settings": {**old, "stop": "junk-left"}}))
    with pytest.raises(SettingsError, match='"outlier_threshold" must be a number above 0'):
        read_settings_file(path)

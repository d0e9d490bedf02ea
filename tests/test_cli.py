"""The ``lindiff`` command: sub-commands, JSON output and argument errors."""

import json
import subprocess
import sys

import pytest

import lindiff
from lindiff.cli import main


def test_info_json_lists_versions_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lindiff"] == lindiff.__version__
    assert info["packages"]["torch"]
    assert info["methods"] == lindiff.methods()
    assert "unet" in info["families"]
    assert info["linear_attention_backend"] in ("triton", "reference")


def test_methods_lists_every_registered_method_with_its_options(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in lindiff.methods():
        assert out.count(f"{name}:") == 1
    assert "mid_dim=None" in out
    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["linfusion"]["eps"] == 1e-4


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "lindiff.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"lindiff {lindiff.__version__}"

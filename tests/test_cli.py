"""The ``lindiff`` command: sub-commands, JSON output and argument errors."""

import json
import logging
import subprocess
import sys

import pytest

import lindiff
from lindiff.cli import main, quiet_third_party


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


def test_commands_hide_only_the_torchvision_notes_of_transformers():
    # Without torchvision (as on the CI machines) transformers warns about image processors that
    # diffusers imports; the command hides exactly those records.
    done = subprocess.run(
        [sys.executable, "-m", "lindiff.cli", "info"], capture_output=True, text=True, check=True
    )
    assert "requires torchvision" not in done.stderr
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter, however often it runs
    noisy = logging.getLogger("transformers.utils.import_utils")
    assert len(noisy.filters) == 1

    def passes(logger: logging.Logger, message: str) -> bool:
        return bool(
            logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, (), None))
        )

    note = "`CLIPImageProcessor` requires torchvision (not installed); falling back"
    assert not passes(noisy, note)
    assert passes(noisy, "some other transformers warning")
    assert passes(logging.getLogger("lindiff.pipelines"), note)

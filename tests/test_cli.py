"""The ``lindiff`` command: sub-commands, JSON output and argument errors."""

import json
import logging
import re
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


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("{tmp}", [], r"give exactly one data source: prompts .* or image_folder"),
        (
            "{tmp}",
            ["--prompts", "{tmp}/missing.txt"],
            r"prompts='.*missing.txt': no such file \(expected one prompt per line\)",
        ),
        (
            "{tmp}",
            ["--prompts", "{tmp}/prompts.txt", "--method", "nope"],
            r"unknown method 'nope'; available: ",
        ),
        ("{tmp}/missing", ["--prompts", "{tmp}/prompts.txt"], r"model='.*missing': no such folder"),
    ],
    ids=["no-data-source", "missing-prompts-file", "unknown-method", "missing-model-folder"],
)
def test_distill_user_errors_are_one_line_and_exit_2(tmp_path, capsys, model, args, message):
    """Like render's: the options are checked before the model loads (any existing folder will do)."""
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    argv = ["distill", model, "--output-dir", "{tmp}/run", *args]
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lindiff distill: error: ") and err.count("\n") == 1, err
    assert re.search(message, err) and "Traceback" not in err


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("{tmp}", [], r"model='.*' is a folder without model_index.json"),
        ("{shapes}", ["--resolution", "100"], r"resolution=100 is not a multiple of 8 px"),
        (
            "{shapes}",
            ["--component", "controlnet"],
            r"component='controlnet' is not a denoiser of .*auto, unet",
        ),
        ("{shapes}", ["--method", "sana"], r"method 'sana' supports only the model families"),
    ],
    ids=["not-a-pipeline", "resolution", "component", "method-for-another-family"],
)
def test_distill_setup_errors_are_one_line_and_exit_2(tmp_path, capsys, model, args, message):
    """Mistakes found once the pipeline is loaded, before any sample is generated."""
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    shapes = str(lindiff.assets.path("tiny-shapes"))
    argv = ["distill", model, "--output-dir", "{tmp}/run", "--prompts", "{tmp}/prompts.txt", *args]
    assert main([arg.format(tmp=tmp_path, shapes=shapes) for arg in argv]) == 2
    err = capsys.readouterr().err  # diffusers' loading progress bars come first
    last = err.splitlines()[-1]
    assert last.startswith("lindiff distill: error: ") and re.search(message, last), err
    assert "Traceback" not in err and not (tmp_path / "run" / "cache").exists()

"""Two-phase (LoLCATs-style) distillation on the tiny SD pipeline: what each phase trains, the merged
export, a signal in phase 2 and the resumed run, configuration errors."""

import copy
import json
import signal
from pathlib import Path

import pytest
import tiny_models
import torch
from accelerate_state import fresh_accelerate, fresh_accelerate_on_one_thread  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file

import lindiff
from lindiff.cli import main
from lindiff.distill import DistillConfig, distill
from lindiff.distill.phases import phase_configs
from lindiff.state import PROJECTIONS

PROMPTS = ["a red circle", "a blue square", "a green tree", "a yellow cat"]


def make_config(folder, **overrides) -> DistillConfig:
    """4 attention-transfer steps, then 4 recovery steps of rank-4 LoRA on the output loss."""
    options = {
        "model": tiny_models.sd_pipeline(),
        "output_dir": folder / "run",
        "prompts": PROMPTS,
        "cache_dir": folder.parent / "cache",
        "resolution": 32,
        "generation_steps": 2,
        "batch_size": 2,
        "max_steps": 4,
        "recovery_steps": 4,
        "lora_rank": 4,
        "learning_rate": 5e-3,
        "diffusion_weight": 0.0,  # a random tiny teacher's noise prediction is no target worth learning
        "checkpoint_every": 100,
        "validation_every": 0,
        "log_with": "none",
    }
    options.update(overrides)
    return DistillConfig(**options)


class Recorder:
    """A callback keeping each phase's distiller and the steps it reported, by phase folder name."""

    def __init__(self, stop_at: tuple[str, int] | None = None) -> None:
        self.distillers, self.steps, self.stop_at = {}, {}, stop_at

    def __call__(self, distiller, step, metrics) -> None:
        phase = distiller.config.output_dir.name
        self.distillers[phase] = distiller
        self.steps.setdefault(phase, []).append(step)
        if (phase, step) == self.stop_at:
            signal.raise_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted two-phase run: its result, recorder and folder."""
    folder = tmp_path_factory.mktemp("phases") / "reference"
    recorder = Recorder()
    with fresh_accelerate_on_one_thread():
        result = distill(make_config(folder), callbacks=[recorder])
    return result, recorder, folder


def unet_tensors(path) -> dict[str, torch.Tensor]:
    return {key.removeprefix("unet."): value for key, value in load_file(path).items()}


def is_projection(name: str) -> bool:
    return any(f".{projection}." in name for projection in PROJECTIONS)


def test_phase_one_trains_the_new_layers_on_attention_transfer(reference):
    result, recorder, folder = reference
    assert recorder.steps == {"phase1": [1, 2, 3, 4], "phase2": [1, 2, 3, 4]}
    assert result.step == 8 and not result.interrupted
    assert result.weights == folder / "run" / "final" / "lindiff.safetensors"
    phase1 = recorder.distillers["phase1"]
    assert phase1.trainable and all(".lindiff." in name for name in phase1.trainable)
    assert phase1.weights.attention > 0 and phase1.weights.diffusion == phase1.weights.output == 0
    teacher = dict(phase1.teacher.named_parameters())
    student = dict(phase1.unwrapped_student().named_parameters())
    inherited = [name for name in student if ".lindiff." not in name]
    assert any(is_projection(name) and ".attn1." in name for name in inherited)
    assert inherited == list(teacher) and all(torch.equal(student[k], teacher[k]) for k in inherited)
    exported = unet_tensors(folder / "run" / "phase1" / "final" / "lindiff.safetensors")
    assert exported and all(".lindiff." in key for key in exported)
    assert all(torch.equal(student[key], value) for key, value in exported.items())


def test_phase_two_trains_lora_alone_and_the_merged_export_reproduces_it(reference):
    result, recorder, folder = reference
    phase2 = recorder.distillers["phase2"]
    assert phase2.config.trainable == "lora_only" and phase2.config.max_steps == 4
    assert phase2.trainable and all(".lora_" in name for name in phase2.trainable)
    assert phase2.weights.attention == 0 and phase2.weights.output > 0
    student = phase2.unwrapped_student().eval()
    params = dict(student.named_parameters())
    phase1 = unet_tensors(folder / "run" / "phase1" / "final" / "lindiff.safetensors")
    assert all(torch.equal(params[key], value) for key, value in phase1.items())
    final = unet_tensors(result.weights)
    assert all(torch.equal(final[key], value) for key, value in phase1.items())
    teacher = dict(phase2.teacher.named_parameters())
    merged = {key: value for key, value in final.items() if is_projection(key)}
    assert merged and any(not torch.equal(value, teacher[key]) for key, value in merged.items())

    exported = lindiff.linearize(copy.deepcopy(phase2.teacher), weights=result.weights).eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 7, tiny_models.TEXT_DIM, generator=generator)
    with torch.no_grad():
        trained = student(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
        loaded = exported(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    difference = (trained - loaded).abs().max().item()
    print(f"merged export vs trained LoRA student: max abs difference {difference:.2e}")
    assert difference < 1e-5 and trained.abs().max() > 0.1


@pytest.mark.parametrize(
    ("phase", "resumed_steps"),
    [("phase1", {"phase1": [3, 4], "phase2": [1, 2, 3, 4]}), ("phase2", {"phase2": [3, 4]})],
)
def test_a_signal_stops_the_phase_and_resume_finishes_like_the_uninterrupted_run(
    reference, phase, resumed_steps
):
    result, _, folder = reference
    run = folder.parent / f"stopped-in-{phase}"
    stopped = distill(make_config(run), callbacks=[Recorder(stop_at=(phase, 2))])
    assert stopped.interrupted and stopped.weights is None and stopped.output_dir == run / "run"
    assert stopped.step == (2 if phase == "phase1" else 6) and not (run / "run" / "final").exists()
    assert sorted(p.name for p in (run / "run" / phase / "checkpoints").iterdir()) == ["step-00000002"]

    resumer = Recorder()
    resumed = distill(make_config(run, resume=True), callbacks=[resumer])
    assert resumer.steps == resumed_steps  # a finished phase 1 is not trained again
    assert resumed.step == 8 and resumed.weights == run / "run" / "final" / "lindiff.safetensors"
    expected, found = unet_tensors(result.weights), unet_tensors(resumed.weights)
    assert expected.keys() == found.keys() and all(torch.equal(found[k], v) for k, v in expected.items())


def test_resume_refuses_a_phase_one_finished_under_other_options(tmp_path):
    transfer, recovery = phase_configs(make_config(tmp_path))
    assert recovery.recovery_steps == 0 and recovery.cache_dir == transfer.cache_dir
    Path(recovery.weights).parent.mkdir(parents=True)
    Path(recovery.weights).write_bytes(b"")
    (transfer.output_dir / "config.json").write_text(json.dumps(transfer.to_dict(), default=str))
    with pytest.raises(ValueError, match=r"phase1: its phase 1 finished under other options: max_steps=5 \("):
        distill(make_config(tmp_path, resume=True, max_steps=5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"recovery_steps": -1}, r"recovery_steps must be an integer >= 0, got -1"),
        ({"recovery_learning_rate": 0}, r"recovery_learning_rate must be None or a number > 0, got 0"),
        ({"trainable": "attention"}, r"trainable must be 'new', got trainable='attention'"),
        ({"attention_weight": 0}, r"attention_weight must be > 0, got 0"),
        ({"output_weight": 0}, r"diffusion_weight or output_weight must be > 0, got 0.0 and 0"),
    ],
)
def test_config_errors_name_the_option(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **options)


def test_cli_has_the_recovery_flags(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "--recovery-steps" in out and "--recovery-learning-rate" in out and "lora_only" in out

"""lindiff.distill on tiny models: training, export, kill-and-resume, two processes, data, CLI, errors."""

import copy
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tiny_dit_models
import tiny_models
import torch
from accelerate_state import fresh_accelerate  # noqa: F401 (autouse fixture)
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import lindiff
from lindiff.cli import main
from lindiff.distill import DistillConfig, Distiller, distill
from lindiff.distill.data import DataOrder
from lindiff.distill.losses import LossWeights, distillation_losses
from lindiff.distill.objective import DiffusionObjective, upsample_latents
from lindiff.distill.sources import encode_images, load_image
from lindiff.distill.student import trainable_state

PROMPTS = ["a red circle", "a blue square", "a green tree", "a yellow cat"]


def make_config(tmp_path, **overrides) -> DistillConfig:
    """A run on the tiny SD pipeline: 32 px images (16x16 latents), 4 teacher samples, no validation."""
    options = {
        "model": tiny_models.sd_pipeline(),
        "output_dir": tmp_path / "run",
        "prompts": PROMPTS,
        "cache_dir": tmp_path / "cache",
        "resolution": 32,
        "generation_steps": 2,
        "batch_size": 2,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "diffusion_weight": 0.0,  # a random tiny teacher's noise prediction is no target worth learning
        "checkpoint_every": 100,
        "validation_every": 0,
        "log_with": "none",
    }
    options.update(overrides)
    return DistillConfig(**options)


def student_state(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainable_state(distiller.unwrapped_student()).items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def metric_steps(output_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def teacher_gap(distiller: Distiller, model: torch.nn.Module) -> float:
    """MSE between ``model`` and the teacher on noised cached samples at fixed timesteps."""
    batch = torch.utils.data.default_collate([distiller.dataset[i] for i in range(len(distiller.dataset))])
    latents, cond = distiller._batch_to_device(batch)
    noisy = distiller.objective(latents, torch.Generator().manual_seed(123))
    call = distiller.adapter.predict
    with torch.no_grad():
        teacher = call(distiller.teacher, noisy.noisy, noisy.timesteps, cond)
        return torch.nn.functional.mse_loss(call(model, noisy.noisy, noisy.timesteps, cond), teacher).item()


def test_distillation_halves_attention_loss_and_exports_loadable_weights(tmp_path):
    attention = []
    distiller = Distiller(
        make_config(tmp_path, max_steps=30, validation_every=30),
        callbacks=[lambda d, step, metrics: attention.append(metrics["attention"])],
    )
    teacher = copy.deepcopy(distiller.teacher)
    result = distiller.train()

    assert len(attention) == 30 and attention[-1] < 0.5 * attention[0]
    assert result.step == 30 and not result.interrupted
    assert result.weights == tmp_path / "run" / "final" / "lindiff.safetensors"
    assert metric_steps(tmp_path / "run") == list(range(1, 31))
    with Image.open(tmp_path / "run" / "validation" / "step-00000030.png") as grid:
        assert grid.size == (2 * 32, 2 * 32)  # teacher row, student row; one column per prompt

    untrained = lindiff.linearize(copy.deepcopy(teacher))
    trained = lindiff.load_weights(lindiff.linearize(copy.deepcopy(teacher)), result.weights)
    assert_same_state(
        trainable_state(distiller.unwrapped_student()),
        {k: v for k, v in trained.state_dict().items() if k in distiller.trainable},
    )
    assert teacher_gap(distiller, trained) < 0.8 * teacher_gap(distiller, untrained)
    assert not any(m._forward_hooks for m in distiller.teacher.modules())  # capture hooks are gone

    again = Distiller(make_config(tmp_path / "again", weights=result.weights))
    assert_same_state(student_state(again), student_state(distiller))


@pytest.mark.parametrize(
    "options",
    [
        {"gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "lr_warmup_steps": 2},
        {"trainable": "lora", "lora_rank": 4, "gradient_checkpointing": True},
    ],
    ids=["new-accumulation-cosine", "lora-checkpointing"],
)
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, options):
    common = {"max_steps": 8, "checkpoint_every": 3, **options}
    reference = Distiller(make_config(tmp_path / "a", **common))
    reference.train()

    def crash(distiller, step, metrics):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        Distiller(make_config(tmp_path / "b", **common), callbacks=[crash]).train()
    assert metric_steps(tmp_path / "b" / "run") == [1, 2, 3, 4, 5]
    resumed = Distiller(make_config(tmp_path / "b", resume=True, **common))
    result = resumed.train()

    assert result.step == 8
    assert_same_state(student_state(resumed), student_state(reference))
    assert metric_steps(tmp_path / "b" / "run") == list(range(1, 9))
    assert (tmp_path / "b" / "run" / "final" / "lindiff.safetensors").is_file()


def test_signal_saves_a_checkpoint_at_the_step_boundary_and_resume_matches(tmp_path):
    common = {"max_steps": 6, "checkpoint_every": 2}
    reference = Distiller(make_config(tmp_path / "a", **common))
    reference.train()

    def interrupt(distiller, step, metrics):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    stopped = Distiller(make_config(tmp_path / "b", **common), callbacks=[interrupt]).train()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert stopped.interrupted and stopped.step == 3 and stopped.weights is None
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000003"]

    with pytest.raises(ValueError, match=r"already holds checkpoints .*resume=True"):
        Distiller(make_config(tmp_path / "b", **common)).train()
    with pytest.raises(ValueError, match=r"cannot resume .*trainable='attention' \(checkpoint: 'new'\)"):
        Distiller(make_config(tmp_path / "b", resume=True, trainable="attention", **common)).train()
    resumed = Distiller(make_config(tmp_path / "b", resume=True, **common))
    assert resumed.train().step == 6
    assert_same_state(student_state(resumed), student_state(reference))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_one_consistent_checkpoint(tmp_path):
    """Two CPU processes (gloo DDP) through the real launcher (fork-based ones hang in OpenMP)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    command += [str(Path(__file__).with_name("distill_worker.py")), str(tmp_path)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ACCELERATE_USE_CPU": "yes", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert_same_state(rank0, rank1)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    files = sorted(p.name for p in (checkpoints / "step-00000004").iterdir())
    assert files == [
        "custom_checkpoint_0.pkl",
        "optimizer.bin",
        "progress.json",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "trainable.safetensors",
    ]
    assert_same_state(load_file(checkpoints / "step-00000004" / "trainable.safetensors"), rank0)
    assert json.loads((checkpoints / "step-00000004" / "progress.json").read_text())["num_processes"] == 2
    final = load_file(tmp_path / "run" / "final" / "lindiff.safetensors")
    assert all(torch.equal(final["unet." + k], v) for k, v in rank0.items())


def test_bf16_mixed_precision_keeps_trainable_parameters_in_float32(tmp_path):
    distiller = Distiller(
        make_config(
            tmp_path, mixed_precision="bf16", trainable="lora", lora_rank=4, max_steps=2, validation_every=2
        )
    )
    result = distiller.train()
    kinds = {(p.dtype, p.requires_grad) for p in distiller.unwrapped_student().parameters()}
    assert kinds == {(torch.float32, True), (torch.bfloat16, False)}
    assert distiller.teacher.dtype == torch.bfloat16
    assert result.weights.is_file() and (tmp_path / "run" / "validation" / "step-00000002.png").is_file()


def test_generated_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    calls = []
    original = StableDiffusionPipeline.__call__

    @functools.wraps(original)  # the trainer reads the pipeline's defaults from its signature
    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("prompt"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    first = Distiller(make_config(tmp_path, generation_batch_size=3))
    assert calls == [PROMPTS[:3], PROMPTS[3:]]
    assert len(first.dataset) == 4 and first.dataset.folder.parent == tmp_path / "cache"
    sample = first.dataset[0]
    assert sample["latents"].shape == (4, 16, 16) and sample["prompt_embeds"].shape == (
        77,
        tiny_models.TEXT_DIM,
    )

    calls.clear()
    again = Distiller(make_config(tmp_path, output_dir=tmp_path / "other"))
    assert calls == [] and again.dataset.folder == first.dataset.folder
    other = Distiller(make_config(tmp_path, prompts=PROMPTS[:2], samples_per_prompt=2))
    assert len(calls) == 1 and other.dataset.folder != first.dataset.folder and len(other.dataset) == 4


def make_images(folder, sizes, captions="txt"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, (width, height) in enumerate(sizes):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
        if captions == "txt":
            (folder / f"img{i}.txt").write_text(f"caption {i}\n")
        else:
            entries.append(json.dumps({"file_name": name, "text": f"caption {i}"}))
    if entries:
        (folder / "metadata.jsonl").write_text("\n".join(entries) + "\n")


@pytest.mark.parametrize("captions", ["txt", "metadata.jsonl"])
def test_image_folder_is_encoded_once_and_trains(tmp_path, captions):
    make_images(tmp_path / "images", [(40, 36), (36, 48), (32, 32)], captions)
    distiller = Distiller(make_config(tmp_path, prompts=None, image_folder=tmp_path / "images", max_steps=2))
    assert len(distiller.dataset) == 3 and distiller.dataset.index["skipped"] == []
    pixels, micro = load_image(tmp_path / "images" / "img1.png", 32)
    assert micro == (48, 36, 5, 0, 32, 32)  # original (h, w), crop (top, left) in the 32x43 resize, size
    with torch.no_grad():
        expected = encode_images(distiller.pipe.vae, pixels[None])[0]
    torch.testing.assert_close(distiller.dataset[1]["latents"], expected)
    assert distiller.train().step == 2


def test_broken_images_are_skipped_and_counted(tmp_path, caplog):
    make_images(tmp_path / "images", [(32, 32), (40, 40), (36, 32)])
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really an image")
    (tmp_path / "images" / "broken.txt").write_text("a broken file")
    distiller = Distiller(make_config(tmp_path, prompts=None, image_folder=tmp_path / "images"))
    assert len(distiller.dataset) == 3
    assert distiller.dataset.index["skipped"] == ["broken.png"]
    assert "skipped 1 of 4 images that could not be decoded: broken.png" in caplog.text


def test_missing_captions_are_listed(tmp_path):
    make_images(tmp_path / "images", [(32, 32)] * 7)
    for i in range(1, 7):
        (tmp_path / "images" / f"img{i}.txt").unlink()
    with pytest.raises(
        ValueError, match=r"6 of 7 images .* have no caption .*img1.png, .*img5.png, ... \(1 more\)"
    ):
        Distiller(make_config(tmp_path, prompts=None, image_folder=tmp_path / "images"))


def test_sdxl_conditioning_reaches_the_cache_and_the_denoiser(tmp_path):
    distiller = Distiller(make_config(tmp_path, model=tiny_models.sdxl_pipeline(), max_steps=2))
    sample = distiller.dataset[0]
    assert sample["pooled_prompt_embeds"].shape == (tiny_models.TEXT_DIM,)
    assert sample["add_time_ids"].tolist() == [32, 32, 0, 0, 32, 32]
    assert distiller.train().step == 2


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_latent_scales_take_turns_and_scale_the_size_conditions(tmp_path, model):
    pipe = tiny_models.sdxl_pipeline() if model == "sdxl" else tiny_models.sd_pipeline()
    distiller = Distiller(make_config(tmp_path, model=pipe, latent_scales=[1, 2], max_steps=3))
    seen = []

    def record(module, args, kwargs):
        sizes = kwargs.get("added_cond_kwargs") or {}
        time_ids = sizes.get("time_ids")
        seen.append((tuple(args[0].shape[-2:]), None if time_ids is None else time_ids[0].tolist()))

    distiller.teacher.register_forward_pre_hook(record, with_kwargs=True)
    assert distiller.train().step == 3
    assert [shape for shape, _ in seen] == [(16, 16), (32, 32), (16, 16)]
    if model == "sdxl":
        assert [ids for _, ids in seen] == [
            [32, 32, 0, 0, 32, 32],
            [64, 64, 0, 0, 64, 64],
            [32, 32, 0, 0, 32, 32],
        ]


def test_upsample_latents_keeps_frames_and_values_of_flat_latents():
    flat = torch.full((1, 4, 3, 5, 6), 0.7)
    assert torch.allclose(upsample_latents(flat, 2), torch.full((1, 4, 3, 10, 12), 0.7))
    image = torch.randn(2, 4, 8, 8)
    assert upsample_latents(image, 1) is image
    assert upsample_latents(image, 3).shape == (2, 4, 24, 24)
    with pytest.raises(ValueError, match=r"latents must be \(B, C, H, W\)"):
        upsample_latents(torch.zeros(4, 8, 8), 2)


def test_out_of_memory_is_explained(tmp_path, monkeypatch):
    def oom(self, batch, micro_step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Distiller, "losses", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"batch_size=2.*gradient_checkpointing=True.*Tried to"):
        distill(make_config(tmp_path))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "nope"}, "unknown method 'nope'; available: .*linfusion"),
        ({"method_options": {"radius": 3}}, "unknown option.*radius"),
        ({"trainable": "all"}, "trainable='all' is not one of new, attention, lora"),
        ({"timestep_sampling": "cosine"}, "timestep_sampling='cosine' is not one of uniform, logit_normal"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8' is not one of no, fp16, bf16"),
        ({"image_folder": "."}, "exactly one data source"),
        ({"prompts": None}, "exactly one data source"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"latent_scales": [1, 0]}, r"latent_scales must be a non-empty list of integers >= 1, got \[1, 0\]"),
        ({"latent_scales": []}, "latent_scales must be a non-empty list"),
        ({"diffusion_weight": 0, "output_weight": 0, "attention_weight": 0}, "all loss weights are 0"),
    ],
)
def test_config_errors_name_the_option(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **options)


def test_unsupported_denoiser_and_empty_trainable_set(tmp_path):
    not_a_pipeline = types.SimpleNamespace(unet=torch.nn.Linear(2, 2), scheduler=DDIMScheduler())
    with pytest.raises(TypeError, match=r"Linear is not a supported denoiser; supported families: .*unet"):
        Distiller(make_config(tmp_path, model=not_a_pipeline))
    with pytest.raises(ValueError, match=r"selects no parameters .*trainable='attention' or 'lora'"):
        Distiller(make_config(tmp_path, method_options={"mid_dim": 0}))


def test_a_multi_process_launch_that_accelerate_would_run_alone_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"launched as 2 processes.*cpu=True"):
        Distiller(make_config(tmp_path))


def test_objective_targets_follow_the_scheduler():
    latents = torch.randn(3, 4, 8, 8)

    def sample(scheduler, sampling="uniform"):
        objective = DiffusionObjective(scheduler, sampling)
        noisy = objective(latents, torch.Generator().manual_seed(0))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        return noisy, noise

    noisy, noise = sample(DDIMScheduler())
    assert torch.equal(noisy.target, noise) and noisy.timesteps.dtype == torch.long
    noisy, noise = sample(DDIMScheduler(prediction_type="v_prediction"), "logit_normal")
    torch.testing.assert_close(noisy.target, DDPMScheduler().get_velocity(latents, noise, noisy.timesteps))
    noisy, noise = sample(FlowMatchEulerDiscreteScheduler())
    sigma = (noisy.timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy.target, noise - latents)
    torch.testing.assert_close(noisy.noisy, (1 - sigma) * latents + sigma * noise)
    fractions = DiffusionObjective(DDIMScheduler(), "logit_normal", 1.0, 0.5).sample_fractions(
        1000, torch.Generator().manual_seed(0)
    )
    assert fractions.min() > 0 and fractions.max() < 1 and 0.65 < fractions.mean() < 0.78
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        DiffusionObjective(DDIMScheduler(prediction_type="flow"), "uniform")


def test_variance_term_uses_the_second_half_of_the_channels():
    teacher, target = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    student = teacher.clone()
    student[:, 4:] += 1.0
    terms = distillation_losses(student, teacher, target, LossWeights(1, 0.5, 0, 0.5), predicts_variance=True)
    assert terms["output"] == 0 and terms["variance"] == pytest.approx(1.0)
    torch.testing.assert_close(terms["diffusion"], torch.nn.functional.mse_loss(teacher[:, :4], target))
    assert terms["loss"] == pytest.approx(terms["diffusion"].item() + 0.5)


def test_data_order_is_a_pure_function_of_the_step():
    size, batch = 5, 2
    ranks = [DataOrder(size, batch, 2, rank, seed=7) for rank in range(2)]
    stream = [i for step in range(5) for order in ranks for i in order.indices(step)]
    for epoch in range(4):
        assert sorted(stream[epoch * size : (epoch + 1) * size]) == list(range(size))
    resumed = DataOrder(size, batch, 2, 1, seed=7).batches(3)
    assert [next(resumed) for _ in range(2)] == [ranks[1].indices(3), ranks[1].indices(4)]


def test_cli_help_and_a_tiny_run_from_a_saved_pipeline(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    assert exit_info.value.code == 0
    assert "--resume" in capsys.readouterr().out

    tiny_models.sd_pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    argv = ["distill", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "run")]
    argv += ["--prompts", str(tmp_path / "prompts.txt"), "--resolution", "32", "--generation-steps", "2"]
    argv += [
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--method-option",
        "mid_dim=8",
        "--max-grad-norm",
        "none",
        "--latent-scales",
        "1",
        "2",
    ]
    argv += [
        "--validation-every",
        "3",
        "--validation-steps",
        "2",
        "--validation-prompts",
        "a cat",
        "--log-with",
        "none",
    ]
    assert main(argv) == 0
    assert "distilled weights:" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method_options"] == {"mid_dim": 8} and config["max_grad_norm"] is None
    assert config["latent_scales"] == [1, 2]
    assert json.loads((tmp_path / "run" / "final" / "lindiff.json").read_text())["options"]["mid_dim"] == 8
    assert (tmp_path / "run" / "validation" / "step-00000003.png").is_file()


@pytest.mark.parametrize(
    ("method", "options", "trainable"),
    [
        ("clear", {"radius": 2}, "attention"),
        ("clear", {"radius": 2, "down_factor": 2}, "new"),
        ("lit", {}, "new"),
    ],
)
def test_a_diffusion_transformer_distils_with_clear_and_lit(tmp_path, method, options, trainable):
    """SD3 (joint attention): the same trainer, and its export loads into a fresh conversion."""
    config = make_config(
        tmp_path,
        model=tiny_dit_models.sd3_pipeline(),
        method=method,
        method_options=options,
        trainable=trainable,
        max_steps=3,
    )
    distiller = Distiller(config)
    before = student_state(distiller)
    result = distiller.train()
    after = student_state(distiller)
    assert result.step == 3 and any(not torch.equal(before[k], after[k]) for k in before)

    fresh = lindiff.linearize(tiny_dit_models.sd3_pipeline(), method=method, weights=result.weights.parent)
    loaded = dict(fresh.transformer.named_parameters())
    for name, value in after.items():
        assert torch.equal(loaded[name].detach(), value), name

"""lindiff.distill on every family it converts: PixArt, SANA, FLUX (CLEAR's recipe), UNet ControlNets.

Each run trains 30 steps on a tiny model built in code and checks that the attention-transfer loss
halves and that the exported weights, loaded into a fresh linearized model, give the trained
student's outputs.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_dit_models
import tiny_models
import torch
from accelerate_state import fresh_accelerate  # noqa: F401 (autouse fixture)
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image

import lindiff
from lindiff.adapters.base import CONTROL
from lindiff.cli import build_parser
from lindiff.distill import DistillConfig, Distiller
from lindiff.distill.sources import edge_map

PROMPTS = ["a red circle", "a blue square", "a green house", "a cat"]


def make_config(tmp_path, model, **overrides) -> DistillConfig:
    """A run of 30 steps at 32 px, each on all 4 teacher samples (so the loss is not dominated by
    which samples and noise levels a step draws), attention and output losses, no validation."""
    options = {
        "model": model,
        "output_dir": tmp_path / "run",
        "prompts": PROMPTS,
        "cache_dir": tmp_path / "cache",
        "resolution": 32,
        "generation_steps": 2,
        "batch_size": 4,
        "max_steps": 30,
        "learning_rate": 5e-3,
        "diffusion_weight": 0.0,  # a random tiny teacher's prediction is no target worth learning
        "checkpoint_every": 100,
        "validation_every": 0,
        "log_with": "none",
    }
    options.update(overrides)
    return DistillConfig(**options)


def predictions(distiller: Distiller, model: torch.nn.Module) -> torch.Tensor:
    """The pipeline's prediction with ``model`` in the trained role, on two noised cached samples."""
    batch = torch.utils.data.default_collate([distiller.dataset[i] for i in range(2)])
    latents, cond = distiller._batch_to_device(batch)
    noisy = distiller.objective(latents, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return distiller._predict(model, noisy.noisy, noisy.timesteps, cond)


def flux_with_guidance() -> FluxPipeline:
    """The tiny FLUX pipeline with a guidance-distilled transformer (``guidance_embeds=True``)."""
    pipe = tiny_dit_models.flux_pipeline()
    config = {**pipe.transformer.config, "guidance_embeds": True}
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_config(config)
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    return tiny_dit_models._quiet(FluxPipeline(**{**components, "transformer": transformer}))


# (pipeline factory, role that trains, config overrides); FLUX runs CLEAR's own recipe. Seeds 0-3
# end at 0.17-0.24 (PixArt), 0.16-0.26 (SANA), 0.15-0.16 (FLUX) and 0.23-0.25 (ControlNet) of the
# first step's attention loss.
FAMILIES: dict[str, tuple[Callable[[], Any], str, dict[str, Any]]] = {
    "pixart": (tiny_dit_models.pixart_pipeline, "transformer", {"resolution": 16, "learning_rate": 2e-2}),
    "sana": (tiny_dit_models.sana_pipeline, "transformer", {"learning_rate": 2e-2}),
    "flux-clear": (
        tiny_dit_models.flux_pipeline,
        "transformer",
        {
            "method": "clear",
            "method_options": {"radius": 2, "down_factor": 2},
            "trainable": "attention",
            "learning_rate": 2e-3,
            "export_format": "clear",
        },
    ),
    "unet-controlnet": (
        tiny_models.sd_controlnet_pipeline,
        "controlnet",
        {"component": "controlnet", "learning_rate": 1e-2},
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_distils_and_its_export_reloads(tmp_path, family):
    factory, role, overrides = FAMILIES[family]
    attention = []
    distiller = Distiller(
        make_config(tmp_path, factory(), **overrides),
        callbacks=[lambda d, step, metrics: attention.append(metrics["attention"])],
    )
    result = distiller.train()

    assert len(attention) == 30 and attention[-1] < 0.5 * attention[0], attention
    trained = predictions(distiller, distiller.unwrapped_student())
    config = distiller.config
    fresh = getattr(factory(), role)
    lindiff.linearize(fresh, method=config.method, **config.method_options)
    lindiff.load_weights(fresh, result.weights)
    torch.testing.assert_close(predictions(distiller, fresh), trained)

    card = (result.weights.parent / "README.md").read_text()
    assert "## Training" in card and "final_losses" in card and config.trainable in card
    if config.export_format == "clear":  # CLEAR's layout, beside lindiff's, loads the same student
        clear_file = result.weights.parent / "clear_local_2_down_2.safetensors"
        released = lindiff.linearize(getattr(factory(), role), method="clear", weights=clear_file)
        torch.testing.assert_close(predictions(distiller, released), trained)


def test_pixart_samples_at_the_requested_size_without_resolution_binning(tmp_path):
    # With binning on, PixArt's pipeline maps sizes to its aspect-ratio table and rejects a model
    # whose sample size has no table (as this tiny one); the teacher samples at exactly 16 px.
    distiller = Distiller(
        make_config(tmp_path, tiny_dit_models.pixart_pipeline(), resolution=16, max_steps=1)
    )
    assert [distiller.dataset[i]["latents"].shape for i in range(4)] == [(4, 8, 8)] * 4


def test_flux_guidance_embedding_gets_the_sampling_guidance_scale(tmp_path):
    distiller = Distiller(
        make_config(tmp_path, flux_with_guidance(), guidance_scale=3.0, max_steps=2, batch_size=2)
    )
    assert distiller.dataset[0]["latents"].shape == (4, 16, 16)  # unpacked from FLUX's tokens
    assert distiller.dataset[0]["guidance"].item() == 3.0
    seen = []
    distiller.teacher.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["guidance"].tolist()), with_kwargs=True
    )
    assert distiller.train().step == 2
    assert seen == [[3.0, 3.0], [3.0, 3.0]]


def make_images(folder, count: int, size: int = 32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption {i}\n")


@pytest.mark.parametrize("factory", [tiny_dit_models.sana_pipeline, tiny_dit_models.flux_pipeline])
def test_image_folder_data_trains_sana_and_flux(tmp_path, factory):
    make_images(tmp_path / "images", 2)
    config = make_config(tmp_path, factory(), prompts=None, image_folder=tmp_path / "images", max_steps=1)
    distiller = Distiller(config)
    assert distiller.dataset[0]["latents"].shape[-1] == 32 // distiller.pipe.vae_scale_factor
    assert distiller.train().step == 1


def test_controlnet_control_images_come_from_the_control_folder_or_the_preprocessor(tmp_path):
    make_images(tmp_path / "images", 2)
    controls = tmp_path / "controls"
    controls.mkdir()
    for i, value in enumerate((0, 255)):
        Image.new("RGB", (32, 32), (value, value, value)).save(controls / f"img{i}.jpg")
    common = {"prompts": None, "image_folder": tmp_path / "images", "component": "controlnet", "max_steps": 1}
    paired = Distiller(
        make_config(tmp_path / "a", tiny_models.sd_controlnet_pipeline(), control_folder=controls, **common)
    )
    assert [paired.dataset[i][CONTROL].float().mean().item() for i in range(2)] == [0.0, 1.0]

    derived = Distiller(make_config(tmp_path / "b", tiny_models.sd_controlnet_pipeline(), **common))
    with Image.open(tmp_path / "images" / "img1.png") as image:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    torch.testing.assert_close(derived.dataset[1][CONTROL].float(), edge_map(pixels)[0])

    (controls / "img1.jpg").unlink()
    with pytest.raises(ValueError, match=r"1 of 2 images have no control image .*: img1"):
        Distiller(
            make_config(
                tmp_path / "c", tiny_models.sd_controlnet_pipeline(), control_folder=controls, **common
            )
        )


def test_edge_map_marks_the_border_of_a_square():
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, 4:12, 4:12] = 1.0
    edges = edge_map(image)
    assert edges.shape == (1, 3, 16, 16) and set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[0, 0, 8, 4] == 1 and edges[0, 0, 8, 8] == 0 and edges[0, 0, 0, 0] == 0


def test_controlnet_validation_grid_uses_the_training_control_images(tmp_path):
    config = make_config(
        tmp_path,
        tiny_models.sd_controlnet_pipeline(),
        component="controlnet",
        max_steps=1,
        validation_every=1,
        validation_steps=2,
        validation_prompts=["a cat"],
    )
    distiller = Distiller(config)
    assert distiller.train().step == 1
    assert (tmp_path / "run" / "validation" / "step-00000001.png").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["component"] == "controlnet" and saved["control_preprocessor"] == "edges"


@pytest.mark.parametrize(
    ("model", "options", "error", "message"),
    [
        (
            tiny_models.sd_pipeline,
            {"component": "controlnet"},
            ValueError,
            r"component='controlnet' is not a",
        ),
        (
            tiny_dit_models.flux_controlnet_pipeline,
            {"component": "controlnet"},
            TypeError,
            r"does not support FluxControlNetModel ControlNets .*: unet",
        ),
        (
            tiny_models.sd_pipeline,
            {"method": "clear", "export_format": "clear"},
            ValueError,
            "holds a .flux. transformer only, got a .unet. unet",
        ),
        (
            tiny_dit_models.sana_pipeline,
            {"resolution": 48},
            ValueError,
            r"resolution=48 is not a multiple of 32",
        ),
    ],
)
def test_setup_errors_name_the_option(tmp_path, model, options, error, message):
    with pytest.raises(error, match=message):
        Distiller(make_config(tmp_path, model(), **options))


def test_clear_export_needs_the_clear_method(tmp_path):
    with pytest.raises(ValueError, match=r"export_format='clear' .* got method='linfusion'"):
        make_config(tmp_path, tiny_models.sd_pipeline(), export_format="clear")


def test_the_documented_clear_command_is_the_tested_configuration(tmp_path):
    docs = (Path(__file__).parents[1] / "docs" / "distillation.md").read_text()
    section = docs[docs.index("## CLEAR's recipe on FLUX") :]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:2] == ["lindiff", "distill"]
    args = vars(build_parser().parse_args(words[1:]))
    options = {k: v for k, v in args.items() if k not in ("command", "run")}
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    options.update(prompts=str(tmp_path / "prompts.txt"), method_options=dict(options["method_options"]))
    config = DistillConfig(**options)
    assert (config.method, config.trainable, config.export_format) == ("clear", "attention", "clear")
    assert config.method_options == {"radius": 16, "down_factor": 4, "train_tokens": 4608}
    tested = FAMILIES["flux-clear"][2]
    assert (tested["method"], tested["trainable"], tested["export_format"]) == ("clear", "attention", "clear")


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    config = make_config(tmp_path, str(tmp_path / "not-a-pipeline"))
    with pytest.raises(ValueError, match=r"not-a-pipeline' is a folder without model_index.json"):
        Distiller(config)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"control_preprocessor": "depth"}, r"control_preprocessor='depth' is not one of edges, image"),
        (
            {"control_folder": "."},
            r"control_folder is read when a ControlNet trains; set component='controlnet'",
        ),
        (
            {"control_folder": ".", "component": "controlnet"},
            r"control_folder pairs control images with the images of image_folder",
        ),
    ],
)
def test_control_option_errors_name_the_option(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, tiny_models.sd_controlnet_pipeline(), **options)

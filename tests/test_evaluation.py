"""lindiff.evaluation: metrics on hand-made specs, detection on ground truth, classifier I/O, bench smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import lindiff
import lindiff.assets
from lindiff.data import (
    SHAPE_COLOURS,
    SHAPES,
    ObjectGroup,
    SceneSpec,
    ShapeObject,
    condition_image,
    label_map,
    make_example,
    masks,
    render,
    to_tensor,
)
from lindiff.evaluation import (
    EVAL_SEEDS,
    ChainFidelity,
    DetectedObject,
    ShapeClassifier,
    chain_fidelity,
    connected_components,
    detect_from_logits,
    frechet_distance,
    mask_iou,
    position_correct,
    prompt_correct,
    prompt_scores,
)
from lindiff.evaluation.classifier import SILHOUETTE_MARGIN, crop_silhouettes

BENCH = Path(__file__).resolve().parents[1] / "bench"


def obj(colour: str, shape: str, x: float = 0.5, y: float = 0.5) -> DetectedObject:
    return DetectedObject(
        colour, shape, (x, y), (x - 0.1, y - 0.1, x + 0.1, y + 0.1), 0.04, np.zeros((4, 4), bool)
    )


def one_hot_logits(examples: list, size: int) -> torch.Tensor:
    """Ground-truth colours at ``size`` px as logits: 1 for the true class (0 background,
    ``1 + SHAPE_COLOURS.index(colour)``), 0 elsewhere."""
    colours = []
    for example in examples:
        classes = np.array([0] + [1 + SHAPE_COLOURS.index(obj.colour) for obj in example.scene.objects])
        colours.append(torch.from_numpy(classes[label_map(example.scene, size)]))
    return F.one_hot(torch.stack(colours), 1 + len(SHAPE_COLOURS)).permute(0, 3, 1, 2).float()


def true_shapes(examples: list) -> Callable[[np.ndarray], list[str]]:
    """Names masks ``(N, 128, 128)`` by the ground-truth object (of any example) of highest IoU."""
    truth = torch.cat([torch.from_numpy(masks(example.scene)) for example in examples]).flatten(1).float()
    names = [obj.shape for example in examples for obj in example.scene.objects]

    def name_shapes(found: np.ndarray) -> list[str]:
        found = torch.from_numpy(found).flatten(1).float()
        overlap = found @ truth.T
        iou = overlap / (found.sum(dim=1, keepdim=True) + truth.sum(dim=1) - overlap)
        return [names[index] for index in iou.argmax(dim=1).tolist()]

    return name_shapes


def test_prompt_correct_needs_exact_kinds_and_counts():
    spec = SceneSpec((ObjectGroup(2, "red", "circle"), ObjectGroup(1, "blue", "star")))
    right = [obj("red", "circle"), obj("blue", "star"), obj("red", "circle")]
    assert prompt_correct(spec, right)
    assert not prompt_correct(spec, right[:2])  # one red circle missing
    assert not prompt_correct(spec, [*right, obj("red", "circle")])  # an extra object of a named kind
    assert not prompt_correct(spec, [*right, obj("green", "square")])  # an unnamed object
    assert not prompt_correct(spec, [obj("red", "circle"), obj("blue", "square"), obj("red", "circle")])
    assert not prompt_correct(spec, [])


def test_position_correct():
    spec = SceneSpec((ObjectGroup(1, "red", "circle"), ObjectGroup(1, "blue", "star")), relation="left")
    left, right = obj("red", "circle", 0.2, 0.5), obj("blue", "star", 0.7, 0.55)
    assert position_correct(spec, [left, right]) is True
    assert position_correct(spec, [obj("red", "circle", 0.8, 0.5), right]) is False
    assert position_correct(spec, [left]) is False  # the reference is missing
    close = obj("red", "circle", 0.62, 0.55)  # 0.08 to the left: too close for 0.1
    assert position_correct(spec, [close, right]) is False
    assert position_correct(spec, [close, right], min_separation=0.05) is True
    assert position_correct(SceneSpec((ObjectGroup(1, "red", "circle"),)), [left]) is None
    scores = prompt_scores([spec, SceneSpec((ObjectGroup(1, "red", "circle"),))], [[left, right], [left]])
    assert scores["prompt_accuracy"] == 1.0 and scores["position_accuracy"] == 1.0
    assert scores["num_with_relation"] == 1
    with pytest.raises(ValueError, match="same length"):
        prompt_scores([spec], [])


def test_connected_components_are_8_connected_and_per_colour():
    classes = np.zeros((6, 7), dtype=np.int64)
    classes[0, 0] = classes[1, 1] = 1  # diagonal neighbours: one component
    classes[3:5, 3:5] = 2
    classes[3:5, 5] = 3  # touches class 2 but is another colour
    classes[5, 0:3] = 1  # class 1 again, not touching the first
    labels, count = connected_components(classes)
    assert count == 4
    assert labels[0, 0] == labels[1, 1] != labels[5, 0]
    assert len({labels[3, 3], labels[3, 5], labels[5, 0], labels[0, 0]}) == 4
    assert (labels[classes == 0] == 0).all()
    assert connected_components(np.zeros((3, 3), dtype=np.int64))[1] == 0


@pytest.mark.parametrize("logit_size", [128, 64])
def test_detection_of_ground_truth_is_perfect(logit_size):
    """One-hot ground truth through the classifier's code path: every prompt and relation is right."""
    examples = [make_example(EVAL_SEEDS + i) for i in range(40)]
    detections = detect_from_logits(
        one_hot_logits(examples, logit_size), SHAPE_COLOURS, true_shapes(examples)
    )
    scores = prompt_scores([example.spec for example in examples], detections)
    assert scores["prompt_accuracy"] == 1.0
    assert scores["num_with_relation"] > 0 and scores["position_accuracy"] == 1.0
    for example, objects in zip(examples[:10], detections[:10], strict=True):
        foreground = np.logical_or.reduce([o.mask for o in objects])
        iou = mask_iou(foreground, condition_image(example.scene, "mask"))
        assert iou == 1.0 if logit_size == 128 else iou > 0.85  # 64 px labels: ~1 px border error
        for true in example.scene.objects:
            nearest = min(
                objects, key=lambda o: np.hypot(o.center[0] - true.center[0], o.center[1] - true.center[1])
            )
            assert (nearest.colour, nearest.shape) == (true.colour, true.shape)
            if true.shape in ("circle", "square"):  # symmetric: the centroid is the centre
                assert np.allclose(nearest.center, true.center, atol=0.01)


def test_detection_drops_small_components_and_votes_colours():
    colour_logits = torch.zeros(1, 1 + len(SHAPE_COLOURS), 100, 100)
    colour_logits[:, 0] = 1.0
    colour_logits[0, 1, 10:30, 10:30] = 2.0  # 4% of the image
    colour_logits[0, 6, 10:30, 10:13] = 3.0  # an orange edge on the red square: still one red object
    colour_logits[0, 2, 60:65, 60:65] = 2.0  # 0.25%
    named = []

    def name_shapes(found: np.ndarray) -> list[str]:
        named.append(found.shape)
        return ["square"] * len(found)

    (objects,) = detect_from_logits(colour_logits, SHAPE_COLOURS, name_shapes, size=None)
    assert [(o.colour, o.shape) for o in objects] == [("red", "square")]
    assert named == [(1, 100, 100)]
    assert objects[0].area == pytest.approx(0.04)
    assert objects[0].box == pytest.approx((0.1, 0.1, 0.3, 0.3))
    assert objects[0].center == pytest.approx((0.2, 0.2))
    everything = detect_from_logits(colour_logits, SHAPE_COLOURS, name_shapes, size=None, min_area=0)
    assert len(everything[0]) == 2
    assert detect_from_logits(torch.zeros(2, 9, 8, 8), SHAPE_COLOURS, name_shapes) == [[], []]
    with pytest.raises(ValueError, match="colour_logits"):
        detect_from_logits(colour_logits[:, :3], SHAPE_COLOURS, name_shapes)


def test_silhouette_crops_centre_the_object():
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, 10:20, 30:50] = True  # a 20 x 10 bar, off-centre
    crops = crop_silhouettes(mask, 32)
    assert crops.shape == (2, 1, 32, 32) and crops[1].sum() == 0
    on = crops[0, 0] > 0.5
    rows, cols = on.any(dim=1).nonzero()[:, 0], on.any(dim=0).nonzero()[:, 0]
    assert abs((rows[0] + rows[-1]) / 2 - 15.5) <= 0.5 and abs((cols[0] + cols[-1]) / 2 - 15.5) <= 0.5
    assert cols[-1] - cols[0] + 1 == pytest.approx(32 / SILHOUETTE_MARGIN, abs=1.5)


def test_frechet_distance():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=generator)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.zeros(8)
    shift[0] = 2.0
    assert frechet_distance(a, a + shift) == pytest.approx(4.0, rel=1e-6)
    distances = [frechet_distance(a, a * scale) for scale in (1.0, 1.5, 2.0, 3.0)]
    assert distances == sorted(distances) and distances[-1] > 1.0
    assert frechet_distance(a.numpy(), torch.randn(50, 8, generator=generator).numpy()) > 0
    with pytest.raises(ValueError, match="features_a"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(a, a[:, :4])


def test_mask_iou():
    pred = np.zeros((8, 8), bool)
    pred[:4] = True
    condition = np.zeros((8, 8), bool)
    condition[2:6] = True
    assert mask_iou(pred, condition) == pytest.approx(16 / 48)
    assert mask_iou(pred, pred) == 1.0
    assert mask_iou(np.zeros((8, 8), bool), np.zeros((8, 8), bool)) == 1.0
    big = np.kron(condition, np.ones((2, 2), bool))  # the same mask at twice the size
    assert mask_iou(pred, big) == pytest.approx(16 / 48)
    example = make_example(EVAL_SEEDS)
    truth = np.asarray(condition_image(example.scene, "mask").convert("L")) > 127
    assert mask_iou(truth, condition_image(example.scene, "mask", size=256)) > 0.97
    with pytest.raises(ValueError, match="pred_mask"):
        mask_iou(np.zeros(8, bool), condition)


def test_classifier_outputs_save_load_round_trip(tmp_path):
    classifier = ShapeClassifier().eval()
    assert sum(p.numel() for p in classifier.parameters()) < 500_000
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    assert classifier(images).colour_logits.shape == (2, 1 + len(SHAPE_COLOURS), 128, 128)
    assert classifier.features(images).shape == (2, classifier.feature_dim)
    assert classifier(torch.rand(1, 3, 200, 200)).colour_logits.shape[-1] == 128  # any size is resized
    object_masks = torch.zeros(3, 128, 128, dtype=torch.bool)
    object_masks[:, 40:80, 50:70] = True
    assert classifier.shape_logits(object_masks).shape == (3, len(SHAPES))
    classifier.half().save_pretrained(tmp_path)
    loaded = ShapeClassifier.from_pretrained(tmp_path).float()
    classifier.float()
    assert loaded.colours == SHAPE_COLOURS and loaded.shapes == SHAPES
    torch.testing.assert_close(loaded(images).colour_logits, classifier(images).colour_logits)
    torch.testing.assert_close(loaded.shape_logits(object_masks), classifier.shape_logits(object_masks))
    with pytest.raises(ValueError, match="images"):
        classifier(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="masks"):
        classifier.shape_logits(object_masks[0])
    with pytest.raises(ValueError, match="crops"):
        classifier.shape_logits(torch.zeros(3, 1, 16, 16), crops=True)
    with pytest.raises(ValueError, match="widths"):
        ShapeClassifier(widths=(16, 20))


@pytest.fixture(scope="module")
def shipped_classifier() -> ShapeClassifier:
    return ShapeClassifier.from_pretrained(lindiff.assets.path("tiny-shapes-classifier")).eval()


def renders(scenes: list, size: int = 128) -> torch.Tensor:
    """``(B, 3, size, size)`` renders of ``scenes`` in ``[-1, 1]``."""
    return torch.stack([to_tensor(render(scene, size)) for scene in scenes])


def test_chain_fidelity_of_the_same_scenes_is_perfect(shipped_classifier):
    """A final image that is the native scene rendered 4x larger keeps every pixel class and object;
    PIL images give the tensors' result."""
    scenes = [make_example(EVAL_SEEDS + i).scene for i in range(4)]
    fidelity = chain_fidelity(shipped_classifier, renders(scenes), renders(scenes, 512))
    assert len(fidelity) == 4
    assert min(fidelity.pixel_agreement) > 0.99
    assert fidelity.extra_objects == fidelity.missing_objects == (0, 0, 0, 0)
    assert fidelity.same_objects == (True,) * 4
    summary = fidelity.summary()
    assert summary["no_extra_objects"] == summary["same_objects"] == 1.0 and summary["num_images"] == 4
    same = chain_fidelity(shipped_classifier, renders(scenes), renders(scenes))
    assert same.pixel_agreement == (1.0,) * 4
    from_pil = chain_fidelity(
        shipped_classifier, [render(scene) for scene in scenes], [render(scene, 512) for scene in scenes]
    )
    assert from_pil == fidelity


def test_chain_fidelity_counts_added_moved_and_recoloured_objects(shipped_classifier):
    """Objects added or recoloured on the way up count as extra (and missing); pixel agreement drops
    by about the share of pixels whose true class changed."""
    scene = make_example(EVAL_SEEDS + 1).scene  # a blue triangle left of centre on white
    assert [(obj.colour, obj.shape) for obj in scene.objects] == [("blue", "triangle")]
    (triangle,) = scene.objects
    added = replace(scene, objects=(triangle, ShapeObject("square", "red", (0.75, 0.3), 0.3)))
    moved = replace(scene, objects=(replace(triangle, center=(0.7, 0.4)),))
    recoloured = replace(scene, objects=(replace(triangle, colour="green"),))
    finals = [scene, added, moved, recoloured]
    fidelity = chain_fidelity(shipped_classifier, renders([scene] * 4), renders(finals, 256))
    assert fidelity.extra_objects == (0, 1, 0, 1)
    assert fidelity.missing_objects == (0, 0, 0, 1)
    assert fidelity.same_objects == (True, False, True, False)
    assert fidelity.summary()["no_extra_objects"] == 0.5

    def true_classes(scene) -> np.ndarray:
        classes = np.array([0] + [1 + SHAPE_COLOURS.index(obj.colour) for obj in scene.objects])
        return classes[label_map(scene, 128)]

    for final, agreement in zip(finals, fidelity.pixel_agreement, strict=True):
        expected = float((true_classes(scene) == true_classes(final)).mean())
        assert agreement == pytest.approx(expected, abs=0.015)
    assert max(fidelity.pixel_agreement[1:]) < 0.985 < fidelity.pixel_agreement[0]
    # The other way round, the square is missing from the final image.
    reverse = chain_fidelity(shipped_classifier, renders([added]), renders([scene], 256))
    assert (reverse.extra_objects, reverse.missing_objects) == ((0,), (1,))


def test_chain_fidelity_checks_its_inputs(shipped_classifier):
    native, final = torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 128, 128)
    with pytest.raises(ValueError, match="same number of images; got 2 and 3"):
        chain_fidelity(shipped_classifier, native, torch.zeros(3, 3, 128, 128))
    with pytest.raises(ValueError, match="at least as large as native"):
        chain_fidelity(shipped_classifier, final, native)
    with pytest.raises(ValueError, match="at least as large as native"):
        chain_fidelity(shipped_classifier, native, torch.zeros(2, 3, 128, 32))
    with pytest.raises(ValueError, match="native must be"):
        chain_fidelity(shipped_classifier, torch.zeros(2, 1, 64, 64), final)
    with pytest.raises(ValueError, match="final must be"):
        chain_fidelity(shipped_classifier, native, torch.zeros(2, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="final must be"):
        chain_fidelity(shipped_classifier, native, torch.zeros(0, 3, 128, 128))
    with pytest.raises(ValueError, match="batch_size"):
        chain_fidelity(shipped_classifier, native, final, batch_size=0)
    with pytest.raises(ValueError, match="one length"):
        ChainFidelity((1.0,), (0, 0), (0,))


def _load_bench_script(name: str, monkeypatch: pytest.MonkeyPatch):
    """Import ``bench/<name>.py`` as a module, with ``bench/`` on ``sys.path`` for its ``common`` import."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pipeline, its LinFusion weights, ControlNet, LoRA and an untrained classifier, saved."""
    root = tmp_path_factory.mktemp("quality")
    pipe = tiny_models.sd_pipeline()
    pipe.save_pretrained(root / "model")
    tiny_models.controlnet(pipe.unet).save_pretrained(root / "controlnet")
    lindiff.linearize(pipe)
    lindiff.save_weights(pipe, root / "weights")
    lindiff.restore(pipe)
    unet = tiny_models.unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    ShapeClassifier().save_pretrained(root / "classifier")
    return {name: root / name for name in ("model", "controlnet", "weights", "lora", "classifier")}


def test_quality_bench_runs_on_a_tiny_pipeline(bench_folders, tmp_path, monkeypatch):
    quality = _load_bench_script("quality", monkeypatch)
    out = tmp_path / "quality.json"
    argv = [f"--{name}={path}" for name, path in bench_folders.items()]
    argv += [
        "--quick",
        "--scales",
        "1",
        "2",
        "4",
        "--num-prompts",
        "3",
        "2",
        "2",
        "--num-control",
        "2",
        "0",
        "0",
    ]
    argv += ["--num-lora", "2", "--steps", "4", "--columns", "3", "--highres", "--out", str(out)]
    quality.main(argv)
    result = json.loads(out.read_text())
    assert {"config", "classifier_on_real", "generation", "controlnet", "lora", "targets"} <= set(result)
    chain_keys = {
        "chain_pixel_agreement",
        "chain_no_extra_objects",
        "chain_no_missing_objects",
        "chain_same_objects",
    }
    for variant in ("teacher", "student"):
        generation = result["generation"][variant]
        assert set(generation) == {"1x", "2x", "4x", "2x-highres", "4x-highres"}
        assert generation["2x-highres"]["size"] == 32
        assert {"prompt_accuracy", "position_accuracy", "frechet_distance"} <= set(generation["1x"])
        assert not chain_keys & set(generation["2x"])
        for key in ("2x-highres", "4x-highres"):
            assert chain_keys <= set(generation[key])
            assert all(0.0 <= generation[key][name] <= 1.0 for name in chain_keys)
            per_image = result["chain_fidelity"][variant][key]
            assert {name: len(values) for name, values in per_image.items()} == {
                "pixel_agreement": 2,
                "extra_objects": 2,
                "missing_objects": 2,
            }
            assert generation[key]["chain_pixel_agreement"] == pytest.approx(
                sum(per_image["pixel_agreement"]) / 2, abs=1e-5
            )
            assert generation[key]["chain_no_extra_objects"] == per_image["extra_objects"].count(0) / 2
        assert 0.0 <= result["controlnet"][variant]["1x"]["mask_iou"] <= 1.0
        assert "stripe_score_with_lora" in result["lora"][variant]
    assert result["config"]["sizes"] == {"1x": 16, "2x": 32, "4x": 64}
    assert result["config"]["highres"]["mode"] == "also"
    assert "student_not_worse_than_teacher_2x-highres" in result["targets"]
    for key, counts in result["paired"].items():
        assert (
            sum(counts[k] for k in ("both", "teacher_only", "student_only", "neither"))
            == (result["config"]["num_prompts"][key])
        )
    found = result["targets"]
    for key in ("2x-highres", "4x-highres", "8x-highres", "32x-highres"):
        chain = [
            found[f"student_chain_pixel_agreement_{key}_at_least_0.95"],
            found[f"student_chain_no_extra_objects_{key}_at_least_0.90"],
            found[f"student_chain_within_5_points_of_1x_{key}"],
        ]
        run = key in ("2x-highres", "4x-highres")
        assert all(target["run"] == run for target in chain)
        assert chain[0]["value"] == (
            result["generation"]["student"][key]["chain_pixel_agreement"] if run else None
        )
    for target in found.values():
        assert isinstance(target["met"], bool) if target.get("run", True) else target["met"] is None
    assert out.with_suffix(".png").is_file()


def test_quality_bench_runs_the_chain_alone(bench_folders, tmp_path, monkeypatch):
    """``--highres only --variants student`` renders above native through the chain alone: no direct
    generation there, no teacher, no pairs; the run's chain targets are met or not, the others not run.
    Scales past the default counts (32x: 4096 px for the shipped model) take the last default count."""
    quality = _load_bench_script("quality", monkeypatch)
    out = tmp_path / "quality.json"
    argv = [f"--{name}={path}" for name, path in bench_folders.items() if name != "controlnet"]
    argv += ["--controlnet", "none", "--lora", "none", "--num-lora", "0", "--scales", "1", "4", "8"]
    argv += ["--num-prompts", "2", "2", "2", "--steps", "10", "--columns", "2", "--highres", "only"]
    argv += ["--variants", "student", "--tile-vae", "auto", "--out", str(out)]
    result = quality.main(argv)
    assert set(result["generation"]) == {"student"}
    generation = result["generation"]["student"]
    assert set(generation) == {"1x", "4x-highres", "8x-highres"}
    assert generation["8x-highres"]["size"] == 128
    # the 4x chain (16 -> 64 px) is the first two stages of the 8x chain (16 -> 64 -> 128 px)
    assert generation["4x-highres"]["stage_of"] == "8x-highres" and "stage_of" not in generation["8x-highres"]
    assert len(result["chain_fidelity"]["student"]["8x-highres"]["extra_objects"]) == 2
    assert not out.with_suffix(".partial").exists()  # the batches go once the results are saved
    assert result["paired"] is None
    assert result["config"]["variants"] == ["student"]
    assert result["config"]["highres"] == {**result["config"]["highres"], "mode": "only", "tile_vae": "auto"}
    for key, run in (
        ("4x-highres", True),
        ("8x-highres", True),
        ("32x-highres", False),
    ):
        target = result["targets"][f"student_chain_within_5_points_of_1x_{key}"]
        assert target["run"] == run and isinstance(target["met"], bool) == run
    assert not any(key.startswith("teacher") for key in result["targets"])
    args = quality.parse_args(["--scales", "1", "2", "4", "8", "32", "--highres", "only"])
    assert args.num_prompts == [200, 50, 25, 25, 25] and args.num_control == [50, 10, 0, 0, 0]
    plan = quality.RunPlan.from_args(args, 128, control=True, lora=False)
    assert list(plan.runs) == ["1x", "2x-highres", "4x-highres", "8x-highres", "32x-highres"]
    assert plan.runs["32x-highres"] == (4096, True)
    assert plan.control_counts == {"1x": 50}


def test_quality_bench_resumes_an_interrupted_run(bench_folders, tmp_path, monkeypatch):
    """Ctrl-C keeps the rendered batches; the same command renders only the rest, and gives the
    scores of a run that was never stopped. Other settings are refused until --fresh."""
    quality = _load_bench_script("quality", monkeypatch)
    out = tmp_path / "quality.json"
    argv = [f"--{name}={path}" for name, path in bench_folders.items() if name != "controlnet"]
    argv += ["--controlnet", "none", "--lora", "none", "--num-lora", "0", "--scales", "1", "2"]
    argv += ["--num-prompts", "3", "3", "--batch-size", "1", "--steps", "4", "--highres", "only"]
    argv += ["--variants", "student", "--out", str(out)]
    reference = quality.main([*argv[:-1], str(tmp_path / "reference.json")])["generation"]["student"]
    calls, stop_at = [], [2]
    call = quality.HighResPipeline.__call__

    def interrupting(self, *args, **kwargs):
        """The chain's pipeline, Ctrl-C at its ``stop_at``-th call."""
        calls.append(kwargs["height"])
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return call(self, *args, **kwargs)

    with mock.patch.object(quality.HighResPipeline, "__call__", interrupting):
        with pytest.raises(SystemExit) as stopped:
            quality.main(argv)
        assert stopped.value.code == 130
        assert len(list(out.with_suffix(".partial").glob("*.pt"))) == 3 + 1  # 1x, then one chain batch
        calls.clear()
        stop_at[0] = None
        result = quality.main(argv)
        assert calls == [32, 32] and result["resumed_batches"] == 4
        for key in ("1x", "2x-highres"):
            for name in ("prompt_accuracy", "frechet_distance", "chain_pixel_agreement"):
                assert result["generation"]["student"][key].get(name) == reference[key].get(name)
        assert not out.with_suffix(".partial").exists()
        calls.clear()
        stop_at[0] = 1
        with pytest.raises(SystemExit):  # stopped again, in the chain
            quality.main(argv)
    with pytest.raises(SystemExit, match="other settings"):
        quality.main([*argv, "--steps", "3"])
    assert quality.main([*argv, "--steps", "3", "--fresh"])["resumed_batches"] == 0


def test_quality_bench_passes_the_chain_options(bench_folders, tmp_path, monkeypatch):
    """--stages, --strengths, --sdedit-guidance and --skip-residual reach HighResPipeline, and decide
    which chains are stages of another."""
    quality = _load_bench_script("quality", monkeypatch)
    argv = [f"--{name}={path}" for name, path in bench_folders.items() if name != "controlnet"]
    argv += ["--controlnet", "none", "--lora", "none", "--num-lora", "0", "--scales", "1", "2", "4"]
    argv += ["--num-prompts", "2", "2", "2", "--steps", "4", "--highres", "only", "--variants", "student"]
    options = ["--stages", "2", "--strengths", "0.5", "--sdedit-guidance", "3", "--skip-residual", "0.5"]
    seen = []
    call = quality.HighResPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(
            {name: kwargs.get(name) for name in ("height", "stages", "strength_schedule", "skip_residual")}
        )
        seen[-1]["sdedit_guidance_scale"] = kwargs.get("sdedit_guidance_scale")
        return call(self, *args, **kwargs)

    with mock.patch.object(quality.HighResPipeline, "__call__", spy):
        result = quality.main([*argv, *options, "--out", str(tmp_path / "options.json")])
    assert seen == [
        {
            "height": height,
            "stages": 2,
            "strength_schedule": [0.5],
            "skip_residual": 0.5,
            "sdedit_guidance_scale": 3.0,
        }
        for height in (32, 64)  # two stages each: neither chain is the start of the other
    ]
    assert result["config"]["highres"]["strength_schedule"] == [0.5]
    args = quality.parse_args(argv)
    assert quality.chain_options(args) == {}
    pipe = StableDiffusionPipeline.from_pretrained(bench_folders["model"])
    assert quality.chain_layout(pipe, 128, args) == ((16, 16, 1.0), (64, 64, 0.3), (128, 128, 0.2))


def test_quality_bench_sign_test(monkeypatch):
    quality = _load_bench_script("quality", monkeypatch)
    counts = quality.paired_counts([True] * 6 + [False] * 4, [False] * 6 + [True, False, False, False])
    assert counts == {"both": 0, "teacher_only": 6, "student_only": 1, "neither": 3, "sign_test_p": 16 / 128}
    assert quality.paired_counts([True, False], [True, False])["sign_test_p"] == 1.0


def test_latent_robustness_bench_on_the_shipped_vae(tmp_path, monkeypatch):
    """On 16 scenes every score lies within three binomial standard errors of the committed
    200-scene figure; clean renders score perfectly, and a latent blur loses more than the round trip."""
    bench = _load_bench_script("latent_robustness", monkeypatch)
    out = tmp_path / "robustness.json"
    result = bench.main(["--count", "16", "--batch-size", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    scores = result["prompt_accuracy"]
    committed = json.loads((BENCH / "results" / "latent_robustness-cpu.json").read_text())["prompt_accuracy"]
    assert (
        set(scores)
        == set(committed)
        == {"real", "round_trip", "noise_0.1", "noise_0.2", "noise_0.4", "blur_3x3"}
    )
    for key, expected in committed.items():
        band = 3 * math.sqrt(expected * (1 - expected) / 16) + 0.001  # scores are rounded to 3 places
        assert abs(scores[key] - expected) <= band, (key, scores[key], expected)
    assert scores["real"] == 1.0
    assert scores["blur_3x3"] < scores["round_trip"]
    assert result["latent_shape"] == [4, 16, 16] and result["num_scenes"] == 16
    with pytest.raises(SystemExit):
        bench.main(["--count", "0"])


def test_quality_bench_targets_compare_whole_points(monkeypatch):
    quality = _load_bench_script("quality", monkeypatch)
    generation = {
        "teacher": {"1x": {"prompt_accuracy": 0.73}, "2x": {"prompt_accuracy": 0.29}},
        "student": {"1x": {"prompt_accuracy": 0.70}, "2x": {"prompt_accuracy": 0.29}},
    }
    found = quality.targets(generation)
    assert found["student_within_3_points_of_teacher_1x"] == {"teacher_minus_student": 0.03, "met": True}
    assert found["student_not_worse_than_teacher_2x"]["met"]
    assert not found["teacher_prompt_accuracy_1x_at_least_0.80"]["met"]
    generation["student"]["1x"]["prompt_accuracy"] = 0.69
    assert not quality.targets(generation)["student_within_3_points_of_teacher_1x"]["met"]


def test_quality_bench_chain_targets(monkeypatch):
    """The student's chain targets: whole points against its 1x accuracy, thresholds inclusive,
    scales not run listed as not run, and the teacher's targets left out without a teacher."""
    quality = _load_bench_script("quality", monkeypatch)
    chain = {"chain_pixel_agreement": 0.95, "chain_no_extra_objects": 0.89}
    student = {"1x": {"prompt_accuracy": 0.70}, "4x-highres": {"prompt_accuracy": 0.65, **chain}}
    found = quality.targets({"student": student})
    assert not any("teacher" in key for key in found)
    assert found["student_chain_within_5_points_of_1x_4x-highres"] == {
        "native_minus_chain": 0.05,
        "met": True,
        "run": True,
    }
    assert found["student_chain_pixel_agreement_4x-highres_at_least_0.95"] == {
        "value": 0.95,
        "met": True,
        "run": True,
    }
    assert found["student_chain_no_extra_objects_4x-highres_at_least_0.90"]["met"] is False
    for key in ("8x-highres", "32x-highres"):
        assert found[f"student_chain_pixel_agreement_{key}_at_least_0.95"] == {
            "value": None,
            "met": None,
            "run": False,
        }
    student["4x-highres"]["prompt_accuracy"] = 0.64
    assert not quality.targets({"student": student})["student_chain_within_5_points_of_1x_4x-highres"]["met"]
    del student["1x"]
    assert (
        quality.targets({"student": student})["student_chain_within_5_points_of_1x_4x-highres"]["met"] is None
    )


@pytest.mark.slow
def test_vae_attention_bench_measures_every_variant(tmp_path, monkeypatch):
    """bench/vae_attention.py on a small image: the reference, local radii, tiles and bfloat16, each
    with its times and its shift from the reference."""
    bench = _load_bench_script("vae_attention", monkeypatch)
    out = tmp_path / "vae.json"
    result = bench.main(["--size", "256", "--radii", "4", "--tiles", "128", "--out", str(out)])
    assert json.loads(out.read_text())["variants"] == result["variants"]
    variants = result["variants"]
    assert list(variants) == ["full", "local r=4", "tiles 128 px", "local r=16, bfloat16"]
    for name, row in variants.items():
        assert row["encode_s"] >= 0 and row["decode_s"] >= 0
        if name != "full":
            assert 0 < row["decoded_shift_mean"] <= row["decoded_shift_max"] < 2
    assert variants["local r=16, bfloat16"]["bf16"] and isinstance(
        result["config"]["cpu_computes_bf16"], bool
    )


def test_scaling_bench_quick_caps_softmax_and_resumes(tmp_path, monkeypatch, capsys):
    """bench/scaling.py --quick, cut down: every row has a breakdown that adds up to its run, a tiny
    softmax cap leaves the larger size "not run", and a rerun takes every row from the .jsonl."""
    scaling = _load_bench_script("scaling", monkeypatch)
    out = tmp_path / "scaling.json"
    argv = ["--quick", "--steps", "4", "--dit-sizes", "256", "--pixart-blocks", "1"]
    argv += ["--softmax-cap-s", "0.001", "--no-progress", "--out", str(out)]
    result = scaling.main(argv)
    assert json.loads(out.read_text())["rows"] == result["rows"]
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra
        assert out.with_suffix(".png").stat().st_size > 0
    rows = {(row["section"], row["method"], row["size"]): row for row in result["rows"]}
    chain = {("chain", method, size) for method in ("linfusion", "softmax") for size in (256, 512)}
    assert set(rows) == chain | {("dit", method, 256) for method in ("softmax", "clear", "lit")}
    capped = rows["chain", "softmax", 512]
    assert capped["status"] == "not run" and "over the 0.001 s cap" in capped["reason"]
    assert "wall_s" not in capped
    for row in result["rows"]:
        if row["status"] == "ok":
            parts = row["breakdown"]
            assert parts["consistent"] and parts["sum_s"] == pytest.approx(parts["wall_s"])
            assert parts["attention_s"] > 0 and row["peak_rss_mib"] > 0
    assert rows["chain", "linfusion", 512]["stage_sizes"] == [128, 512]  # 4x: one SDEdit stage
    assert rows["chain", "linfusion", 512]["breakdown"]["vae_s"] > 0
    assert result["complete"] and not result["interrupted"]
    assert {target["met"] for target in result["targets"]} == {None}  # no row at a target's size

    def measure(*args, **kwargs):
        raise AssertionError("a finished row was measured again")

    dit_step = scaling.DiTStep
    monkeypatch.setattr(scaling, "Chain", measure)
    monkeypatch.setattr(scaling, "DiTStep", measure)
    assert scaling.main(argv)["rows"] == result["rows"]
    capsys.readouterr()
    scaling.main(["--markdown", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| tiny-shapes chain | softmax | 512 px | not run: softmax at 256 px took" in table
    with pytest.raises(SystemExit, match="other settings"):
        scaling.main([*argv, "--no-profile"])
    # A section's own settings changed: its rows are measured again, the other section's stay.
    monkeypatch.setattr(scaling, "DiTStep", dit_step)
    rerun = {
        (row["section"], row["method"], row["size"]): row
        for row in scaling.main([*argv, "--pixart-blocks", "2"])["rows"]
    }
    assert rerun["chain", "linfusion", 512] == rows["chain", "linfusion", 512]
    assert rerun["dit", "clear", 256]["wall_s"] != rows["dit", "clear", 256]["wall_s"]
    assert "the dit settings changed" in capsys.readouterr().out

"""Training of the benchmark classifier: its targets, corruptions and a short deterministic run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lindiff.data import make_example, masks, render, to_tensor
from lindiff.evaluation import EVAL_SEEDS, ShapeClassifier, detect_objects, stripe_score
from recipes.tiny_shapes.classifier_training import (
    Augmentations,
    add_stripes,
    augment,
    ground_truth,
    real_accuracy,
    silhouettes,
    train_classifier,
)


def test_silhouettes_of_every_object_keep_an_object() -> None:
    examples = [make_example(EVAL_SEEDS + i) for i in range(4)]
    _, _, object_masks, shapes = ground_truth(examples)
    noisy = silhouettes(object_masks, 32, torch.Generator().manual_seed(0))
    assert noisy.shape == (len(shapes), 1, 32, 32) and (noisy.flatten(1).amax(dim=1) > 0.5).all()


def test_stripe_score_separates_flat_fills_from_stripes() -> None:
    examples = [make_example(EVAL_SEEDS + i) for i in range(8)]
    images, colours, _, _ = ground_truth(examples)
    striped = add_stripes(images, colours, torch.ones(8, dtype=torch.bool), torch.Generator().manual_seed(0))
    for index, example in enumerate(examples):
        objects = masks(example.scene)  # one mask per object: their colours differ
        assert stripe_score(images[index], objects) < 0.01
        assert stripe_score(striped[index], objects) > 0.05
        assert stripe_score(render(example.scene), objects) < 0.01
    assert stripe_score(images[0], (colours[0] > 0).numpy()) >= 0.0  # one (H, W) mask works too
    assert np.isnan(stripe_score(images[0], np.zeros((128, 128), bool)))


def test_augment_moves_targets_with_flips_and_calls_reconstruct() -> None:
    examples = [make_example(EVAL_SEEDS + i) for i in range(4)]
    images, colours, _, _ = ground_truth(examples)
    calls = []

    def reconstruct(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return batch

    only_flip = Augmentations(
        stripes=0, flip=1, reconstruct=0.5, jitter=0, drift=0, resample=0, blur=0, noise=0, jpeg=0
    )
    out = augment(images.clone(), colours.clone(), torch.Generator(), only_flip, reconstruct)
    torch.testing.assert_close(out[0], images.flip(-1))
    assert torch.equal(out[1], colours.flip(-1))
    assert calls == [2]
    full = augment(images.clone(), colours.clone(), torch.Generator().manual_seed(1))
    assert full[0].shape == images.shape and full[0].abs().max() <= 1.0
    with pytest.raises(ValueError, match="blur"):
        Augmentations(blur=1.5)
    with pytest.raises(ValueError, match="max_morph"):
        Augmentations(max_morph=-1)


def test_train_classifier_is_deterministic_and_saves(tmp_path) -> None:
    first = train_classifier(tmp_path / "a", steps=2, batch_size=4, seed=3, progress=False)
    second = train_classifier(None, steps=2, batch_size=4, seed=3, progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b.half().float()), name  # the first returns what it saved: fp16 weights
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 2 and record["seed"] == 3
    loaded = ShapeClassifier.from_pretrained(tmp_path / "a")
    renders = torch.stack([to_tensor(render(make_example(EVAL_SEEDS).scene))])
    assert len(detect_objects(loaded, renders)) == 1
    scores = real_accuracy(loaded, count=3, blur=1.0, noise=0.05)
    assert scores["num_prompts"] == 3 and 0.0 <= scores["prompt_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="steps"):
        train_classifier(None, steps=0)

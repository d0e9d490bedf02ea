"""One stripe fill for the stripes corpus and the classifier's augmentation, each as it drew before."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from lindiff.data import SHAPE_COLOURS, ShapesConfig, make_example
from recipes.tiny_shapes.architectures import TRAINING_WORLD
from recipes.tiny_shapes.classifier_training import TRAIN_SEEDS, add_stripes, ground_truth
from recipes.tiny_shapes.corpus import render_corpus
from recipes.tiny_shapes.stripes import LIGHTENED, stripes

CORPUS_SHA256 = "ea81e29a1599819d6ccbb0ef0de7d03f4903bfc84aeec88640bb22d689f2df17"
"""The first 32 striped scenes of the build's corpus (seed 0), as the numpy fill that drew the
shipped build's corpus drew them: every other 16 px band along ``x + y`` of period 32 px, object
pixels halved, or lightened halfway to white where the pixel's brightest channel was below 64."""

AUGMENTATION_SHA256 = "478d91d2a374e23ef3f137483b204eefdf0176fb1ddc403beec7817de4fddc56"
"""``add_stripes`` of the classifier's first 32 training scenes with generator seed 7, as its own
torch fill drew them before (black objects lightened, every other colour darkened)."""


def test_stripes_change_only_objects() -> None:
    corpus = render_corpus(1, 3, 128, ShapesConfig())
    image, labels = corpus.images[0], corpus.labels[0]
    striped = corpus.striped().images[0]
    assert np.array_equal(striped[labels == 0], image[labels == 0])
    changed = (striped != image).any(axis=-1)
    assert 0.3 < changed[labels > 0].mean() < 0.7
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None, :, :10].float()
    period, phase, direction = torch.full((1,), 32.0), torch.zeros(1), torch.ones(1)
    with pytest.raises(ValueError, match="images must be"):
        stripes(pixels, corpus.colours([0]), period, phase, direction)


def test_only_black_is_lightened() -> None:
    assert [colour for colour, lit in zip(SHAPE_COLOURS, LIGHTENED[1:], strict=True) if lit] == ["black"]
    assert not LIGHTENED[0]


def test_corpus_stripes_are_those_of_the_shipped_build() -> None:
    """Byte for byte: the training world has no black objects, so the per-colour rule for dark
    colours and the old per-pixel one agree (no object pixel of it is that dark)."""
    corpus = render_corpus(32, 0, 128, TRAINING_WORLD)
    for chunk in (7, 256):
        striped = corpus.striped(chunk)
        assert hashlib.sha256(striped.images.tobytes()).hexdigest() == CORPUS_SHA256
    assert striped.labels is corpus.labels and striped.captions is corpus.captions


def test_classifier_stripes_are_unchanged() -> None:
    examples = [make_example(TRAIN_SEEDS + i) for i in range(32)]
    images, colours, _, _ = ground_truth(examples)
    assert (colours == 1 + SHAPE_COLOURS.index("black")).any()  # both rules for dark colours are used
    generator = torch.Generator().manual_seed(7)
    striped = add_stripes(images, colours, torch.ones(32, dtype=torch.bool), generator)
    assert hashlib.sha256(striped.numpy().tobytes()).hexdigest() == AUGMENTATION_SHA256
    assert torch.rand(1, generator=generator).item() == 0.19561558961868286  # the same draws
    unchosen = add_stripes(images, colours, torch.zeros(32, dtype=torch.bool), torch.Generator())
    assert torch.equal(unchosen, images)

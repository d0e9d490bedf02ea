"""Scoring of generated shape images: a per-pixel classifier, object detection and metrics.

A small :class:`ShapeClassifier`, trained on rendered scenes of :mod:`lindiff.data` (corrupted
to look generated), labels every pixel with a colour (or background) and a shape. Connected
components of one colour become :class:`DetectedObject` s, which the metrics compare with what
the prompt's :class:`~lindiff.data.SceneSpec` says (GenEval-style prompt accuracy, position
accuracy); the classifier's pooled features give a Fréchet distance to real renders.

    from lindiff.evaluation import ShapeClassifier, detect_objects, prompt_correct
    classifier = ShapeClassifier.from_pretrained(lindiff.assets.path("tiny-shapes-classifier"))
    objects = detect_objects(classifier, images)[0]          # images: (B, 3, H, W) in [-1, 1]
    prompt_correct(parse_caption(prompt), objects)

High-resolution chains: :func:`chain_fidelity` compares each final image, downsampled, with the
chain's native stage (pixel agreement of the colour maps, extra and missing objects).

Clips: :func:`score_clip` tracks each object the caption names through the frames and compares
its fitted motion with the caption (``bench/video_quality.py``).

``bench/quality.py`` scores a pipeline and its linear-attention student with it; the classifier's
training is part of the tiny-shapes recipe (``recipes/tiny_shapes`` in a source checkout).
"""

from .classifier import ClassifierOutput, ShapeClassifier
from .detection import (
    DETECTION_SIZE,
    MIN_AREA,
    DetectedObject,
    connected_components,
    detect_from_logits,
    detect_objects,
    shape_names,
)
from .fidelity import ChainFidelity, chain_fidelity
from .metrics import (
    EVAL_SEEDS,
    POSITION_SEPARATION,
    frechet_distance,
    mask_iou,
    position_correct,
    prompt_correct,
    prompt_scores,
    stripe_score,
)
from .motion import ClipScore, fitted_velocity, score_clip, track_object

__all__ = [
    "DETECTION_SIZE",
    "EVAL_SEEDS",
    "MIN_AREA",
    "POSITION_SEPARATION",
    "ChainFidelity",
    "ClassifierOutput",
    "ClipScore",
    "DetectedObject",
    "ShapeClassifier",
    "chain_fidelity",
    "connected_components",
    "detect_from_logits",
    "detect_objects",
    "fitted_velocity",
    "frechet_distance",
    "mask_iou",
    "position_correct",
    "prompt_correct",
    "prompt_scores",
    "score_clip",
    "shape_names",
    "stripe_score",
    "track_object",
]

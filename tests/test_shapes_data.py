"""The shapes world: seeded scenes, rendering and ground truth, the caption grammar."""

import itertools
import json

import numpy as np
import pytest

from lindiff.data import (
    BACKGROUNDS,
    RELATIONS,
    RGB,
    SHAPE_COLOURS,
    SHAPES,
    VOCABULARY,
    CaptionConfig,
    ObjectGroup,
    Scene,
    SceneSpec,
    ShapeObject,
    ShapesConfig,
    condition_image,
    format_caption,
    label_map,
    make_example,
    masks,
    parse_caption,
    rasterize,
    relation_holds,
    render,
    sample_scene,
    spec_holds,
)

EXAMPLES = [make_example(seed) for seed in range(400)]


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood lies in ``mask`` (clear of anti-aliased borders)."""
    pad = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_and.reduce([pad[i : i + h, j : j + w] for i in range(3) for j in range(3)])


def test_same_seed_same_example_and_pixels():
    for seed in (0, 7, 123):
        a, b = make_example(seed), make_example(seed)
        assert a == b and a.scene.seed == seed
        assert np.array_equal(np.asarray(render(a.scene)), np.asarray(render(b.scene)))
        assert np.array_equal(label_map(a.scene), label_map(b.scene))
    assert sample_scene(5) == make_example(5).scene
    assert sample_scene(np.random.default_rng(5)) == sample_scene(5)


def test_different_seeds_differ():
    scenes = [e.scene for e in EXAMPLES[:50]]
    assert all(a != b for a, b in itertools.combinations(scenes, 2))
    images = {render(s).tobytes() for s in scenes}
    assert len(images) == len(scenes)


def test_pinned_captions():
    # Regression guard: a change to sampling or captioning changes the data set.
    assert [e.text for e in EXAMPLES[:4]] == [
        "a green triangle and an orange star",
        "a yellow square above a black star",
        "a blue circle",
        "a green circle on a black background",
    ]


def test_every_shape_colour_background_and_count_appears():
    objects = [obj for e in EXAMPLES for obj in e.scene.objects]
    assert {obj.shape for obj in objects} == set(SHAPES)
    assert {obj.colour for obj in objects} == set(SHAPE_COLOURS)
    assert {e.scene.background for e in EXAMPLES} == set(BACKGROUNDS)
    assert {len(e.scene.objects) for e in EXAMPLES} == {1, 2, 3}
    assert {g.count for e in EXAMPLES for g in e.spec.groups} == {1, 2, 3}
    assert all(obj.colour != e.scene.background for e in EXAMPLES for obj in e.scene.objects)


def test_colours_are_well_separated():
    for a, b in itertools.combinations(SHAPE_COLOURS, 2):
        assert np.linalg.norm(np.subtract(RGB[a], RGB[b])) > 75, (a, b)
    for background, colour in itertools.product(BACKGROUNDS, SHAPE_COLOURS):
        if background != colour:
            assert np.linalg.norm(np.subtract(RGB[background], RGB[colour])) > 75, (background, colour)


def test_objects_fit_the_image_and_keep_apart():
    config = ShapesConfig()
    for e in EXAMPLES:
        for obj in e.scene.objects:
            x0, y0, x1, y1 = obj.box
            assert config.margin - 1e-9 <= min(x0, y0) and max(x1, y1) <= 1 - config.margin + 1e-9
        for a, b in itertools.combinations(e.scene.objects, 2):
            gap_x = max(a.box[0], b.box[0]) - min(a.box[2], b.box[2])
            gap_y = max(a.box[1], b.box[1]) - min(a.box[3], b.box[3])
            assert max(gap_x, gap_y) >= config.min_gap - 1e-9


def test_masks_match_rendered_pixels_and_boxes():
    for e in EXAMPLES[:60]:
        scene = e.scene
        image, labels = rasterize(scene)
        pixels = np.asarray(image)
        object_masks = masks(scene)
        assert object_masks.shape == (len(scene.objects), 128, 128) and object_masks.dtype == bool
        assert np.array_equal(object_masks.any(axis=0), labels > 0)
        for obj, mask in zip(scene.objects, object_masks, strict=True):
            inner = _erode(mask)
            assert inner.sum() > 0.5 * mask.sum() > 0
            assert (pixels[inner] == RGB[obj.colour]).all()
            x0, y0, x1, y1 = obj.pixel_box(128)
            ys, xs = np.nonzero(mask)
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / 128
            assert np.abs(centroid - obj.center).max() < 0.02
        outside = np.ones((128, 128), dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.pixel_box(128)
            outside[y0:y1, x0:x1] = False
        assert (pixels[outside] == RGB[scene.background]).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_area_matches_geometry(shape):
    obj = ShapeObject(shape, "red", (0.5, 0.5), 0.4, 17.0)
    points = obj.outline(512)
    x, y = points[:, 0], points[:, 1]
    area = np.pi * (0.2 * 512) ** 2 if shape == "circle" else 0.5 * abs(x @ np.roll(y, 1) - y @ np.roll(x, 1))
    measured = masks(Scene("white", (obj,)), 512).sum()
    assert abs(measured - area) / area < 0.005


def test_masks_are_consistent_across_resolutions():
    for e in EXAMPLES[:20]:
        small = masks(e.scene, 128)
        large = masks(e.scene, 512).reshape(len(e.scene.objects), 128, 4, 128, 4).mean(axis=(2, 4))
        for a, b in zip(small, large >= 0.5, strict=True):
            assert (a & b).sum() / (a | b).sum() > 0.97
    assert render(EXAMPLES[0].scene, 1024).size == (1024, 1024)


def test_caption_grammar_round_trip():
    for e in EXAMPLES:
        assert parse_caption(e.text) == e.spec
        assert format_caption(parse_caption(e.text)) == e.text
        assert spec_holds(e.spec, e.scene)
        assert e.spec.num_objects == len(e.scene.objects)
        assert set(e.text.replace(",", " , ").split()) <= set(VOCABULARY)
    kinds = {
        (len(e.spec.groups), e.spec.relation is not None, e.spec.background is not None) for e in EXAMPLES
    }
    assert {
        (1, False, False),
        (1, False, True),
        (2, True, True),
        (2, False, False),
        (3, False, True),
    } <= kinds


def test_caption_examples():
    spec = parse_caption("a red circle to the left of a blue triangle")
    assert spec == SceneSpec((ObjectGroup(1, "red", "circle"), ObjectGroup(1, "blue", "triangle")), "left")
    spec = parse_caption("Two green squares on a white background")
    assert spec == SceneSpec((ObjectGroup(2, "green", "square"),), None, "white")
    spec = parse_caption("one orange star, a red circle and two black stars")
    assert [g.count for g in spec.groups] == [1, 1, 2]
    assert format_caption(spec) == "one orange star, one red circle and two black stars"


@pytest.mark.parametrize(
    "text, word",
    [
        ("", "a count"),
        ("a red", "a shape"),
        ("two red circle", "a plural shape"),
        ("a pink circle", "a colour"),
        ("a red circle next to a blue star", "'on', a relation or the end"),
        ("a red circle, a blue star", "'and'"),
        ("a red circle on a red background", "a background"),
        ("a red circle on a white background please", "the end"),
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text, word):
    with pytest.raises(ValueError, match=f"expected {word}"):
        parse_caption(text)


def test_relations_are_true_of_the_geometry():
    relations = set()
    for e in EXAMPLES:
        if e.spec.relation is None:
            continue
        relations.add(e.spec.relation)
        subject, reference = e.spec.groups
        subjects = [o for o in e.scene.objects if (o.colour, o.shape) == (subject.colour, subject.shape)]
        references = [
            o for o in e.scene.objects if (o.colour, o.shape) == (reference.colour, reference.shape)
        ]
        object_masks = masks(e.scene)
        centroid = {
            id(o): np.argwhere(m).mean(axis=0)[::-1] / 128
            for o, m in zip(e.scene.objects, object_masks, strict=True)
        }
        axis, sign = {"left": (0, 1), "right": (0, -1), "above": (1, 1), "below": (1, -1)}[e.spec.relation]
        for s, r in itertools.product(subjects, references):
            assert sign * (r.center[axis] - s.center[axis]) >= 0.2
            assert sign * (centroid[id(r)][axis] - centroid[id(s)][axis]) >= 0.18
            assert relation_holds(centroid[id(s)], centroid[id(r)], e.spec.relation, 0.18)
    assert relations == set(RELATIONS)


def test_relation_holds_needs_the_named_axis_to_dominate():
    assert relation_holds((0.2, 0.5), (0.6, 0.6), "left")
    assert relation_holds((0.6, 0.6), (0.2, 0.5), "right")
    assert not relation_holds((0.2, 0.2), (0.5, 0.8), "left")  # mostly above, not left
    assert relation_holds((0.2, 0.2), (0.5, 0.8), "above")
    assert not relation_holds((0.4, 0.5), (0.5, 0.5), "left")  # too close


def test_spec_holds_rejects_false_specs():
    scene = Scene(
        "white",
        (ShapeObject("circle", "red", (0.2, 0.5), 0.2), ShapeObject("star", "blue", (0.8, 0.5), 0.2)),
    )
    assert spec_holds(parse_caption("a red circle to the left of a blue star on a white background"), scene)
    for text in (
        "a red circle to the right of a blue star",
        "a red circle above a blue star",
        "a red circle and a green star",
        "two red circles and a blue star",
        "a red circle",
        "a red circle and a blue star on a black background",
    ):
        assert not spec_holds(parse_caption(text), scene), text


@pytest.mark.parametrize("kind", ["edges", "mask"])
@pytest.mark.parametrize("size", [64, 200])
def test_condition_images(kind, size):
    scene = EXAMPLES[4].scene
    image = condition_image(scene, kind, size)
    assert image.mode == "RGB" and image.size == (size, size)
    on = np.asarray(image)[..., 0] == 255
    assert set(np.unique(np.asarray(image))) <= {0, 255}
    union = label_map(scene, size) > 0
    if kind == "mask":
        assert np.array_equal(on, union)
    else:
        assert on.any() and not (on & ~union).any() and on.sum() < 0.6 * union.sum()


def test_impossible_configs_fail_clearly():
    with pytest.raises(RuntimeError, match="could not place 3 objects"):
        sample_scene(0, config=ShapesConfig(num_objects=(3, 3), size_range=(0.8, 0.9)))


def test_config_is_respected():
    config = ShapesConfig(
        num_objects=(3, 3), shapes=("star",), colours=("red", "blue"), backgrounds=("gray",)
    )
    for seed in range(20):
        scene = sample_scene(seed, config=config)
        assert len(scene.objects) == 3 and scene.background == "gray"
        assert {o.shape for o in scene.objects} == {"star"} and {o.colour for o in scene.objects} <= {
            "red",
            "blue",
        }
    never = CaptionConfig(p_background=0.0, p_relation=0.0)
    assert all(make_example(s, caption_config=never).spec.background is None for s in range(20))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: sample_scene(-1), "seed"),
        (lambda: sample_scene(0, size=0), "size"),
        (lambda: sample_scene(0, size="128"), "size"),
        (lambda: render(sample_scene(0), supersample=0), "supersample"),
        (lambda: ShapesConfig(num_objects=(0, 3)), "num_objects"),
        (lambda: ShapesConfig(num_objects=(1, 4)), "num_objects"),
        (lambda: ShapesConfig(size_range=(0.5, 0.2)), "size_range"),
        (lambda: ShapesConfig(shapes=("hexagon",)), "shapes"),
        (lambda: ShapesConfig(colours=("pink",)), "colours"),
        (lambda: ShapesConfig(backgrounds=("red",)), "backgrounds"),
        (lambda: ShapesConfig(max_iou=2.0), "max_iou"),
        (lambda: ShapesConfig(colours=("white",), backgrounds=("white",)), "colours"),
        (lambda: CaptionConfig(p_background=1.5), "p_background"),
        (lambda: condition_image(sample_scene(0), "depth"), "kind"),
        (lambda: relation_holds((0, 0), (1, 1), "near"), "relation"),
        (lambda: SceneSpec((ObjectGroup(1, "red", "star"),), "left"), "relation"),
        (lambda: ObjectGroup(4, "red", "star"), "count"),
        (lambda: ShapeObject("hexagon", "red", (0.5, 0.5), 0.2), "shape"),
        (lambda: Scene("pink", ()), "background"),
    ],
)
def test_bad_arguments_raise_value_errors_that_name_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="edges, mask"):
        condition_image(sample_scene(0), "depth")
    with pytest.raises(ValueError, match="circle, square, triangle, star"):
        ShapesConfig(shapes=("hexagon",))


def test_scene_dict_round_trip():
    for e in EXAMPLES[:20]:
        data = json.loads(json.dumps(e.scene.to_dict()))
        assert Scene.from_dict(data) == e.scene and Scene.from_dict(data).seed == e.scene.seed


def test_vocabulary():
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    assert {"a", "an", "one", "two", "three", "to", "the", "left", "of", ",", "background"} <= set(VOCABULARY)
    assert set(SHAPE_COLOURS) | set(BACKGROUNDS) | set(SHAPES) <= set(VOCABULARY)

"""Captions for shape scenes: a small grammar, its parser, and the truth of a caption.

Grammar (``[...]`` optional; ``|`` alternatives)::

    caption  := body [ "on a" BACKGROUND "background" ]
    body     := group RELATION group              (two kinds of object only)
              | group [ [ "," group ] "and" group ]
    group    := COUNT COLOUR NOUN                 (plural noun for counts above one)
    COUNT    := "a" | "an" | "one" | "two" | "three"
                ("an" before a vowel, "one" when another group has two or more)
    RELATION := "to the left of" | "to the right of" | "above" | "below"

A group names every object of one colour and shape. ``A RELATION B`` means every object of A
lies in the 90-degree cone around the named direction from every object of B, at least
``min_separation`` away along that axis, so a relation is only said when it is plain to see.
Examples: "a red circle to the left of a blue triangle", "two green squares on a white
background", "a yellow star, a black circle and a purple square".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from .shapes import BACKGROUNDS, RGB, SHAPE_COLOURS, SHAPES, Scene, ShapeObject, check_choice

COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
RELATIONS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(COUNT_WORDS)
        | set(RGB)
        | set(SHAPES)
        | set(PLURALS.values())
        | {word for phrase in RELATIONS.values() for word in phrase.split()}
        | {",", "and", "on", "background"}
    )
)
"""Every word a caption can contain (``","`` included), for building a tokenizer vocabulary."""


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` objects of one colour and shape."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.count not in (1, 2, 3):
            raise ValueError(f"count must be 1, 2 or 3; got {self.count!r}")
        check_choice("colour", self.colour, SHAPE_COLOURS)
        check_choice("shape", self.shape, SHAPES)


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says: groups in caption order, an optional relation, an optional background.

    ``relation`` (a key of :data:`RELATIONS`) relates ``groups[0]`` to ``groups[1]``.
    """

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("groups must name at least one ObjectGroup")
        if self.relation is not None:
            check_choice("relation", self.relation, tuple(RELATIONS))
            if len(self.groups) != 2:
                raise ValueError(f"a relation needs exactly 2 groups; got {len(self.groups)}")
        if self.background is not None:
            check_choice("background", self.background, BACKGROUNDS)

    @property
    def num_objects(self) -> int:
        return sum(group.count for group in self.groups)


@dataclass(frozen=True)
class CaptionConfig:
    """How captions are chosen for a scene.

    Attributes:
        p_background: probability of naming the background.
        p_relation: probability of stating a relation when the scene has exactly two kinds of
            object and some relation between them holds.
        min_separation: smallest distance between centres along the named axis, in fractions
            of the image side.
    """

    p_background: float = 0.5
    p_relation: float = 0.7
    min_separation: float = 0.2

    def __post_init__(self) -> None:
        for name in ("p_background", "p_relation", "min_separation"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value!r}")


def relation_holds(
    subject: Sequence[float], reference: Sequence[float], relation: str, min_separation: float = 0.2
) -> bool:
    """Whether the centre ``subject`` is ``relation`` (left, right, above, below) of ``reference``.

    Centres are ``(x, y)`` with y down. True when the offset along the named direction is at least
    ``min_separation`` and at least the offset along the other axis.
    """
    check_choice("relation", relation, tuple(RELATIONS))
    dx, dy = reference[0] - subject[0], reference[1] - subject[1]
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= min_separation and along >= abs(across)


def _groups_relate(
    subjects: list[ShapeObject], references: list[ShapeObject], relation: str, min_separation: float
) -> bool:
    return all(
        relation_holds(s.center, r.center, relation, min_separation) for s in subjects for r in references
    )


def _kinds(scene: Scene) -> dict[tuple[str, str], list[ShapeObject]]:
    kinds: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in scene.objects:
        kinds.setdefault((obj.colour, obj.shape), []).append(obj)
    return kinds


def describe(scene: Scene, rng: np.random.Generator, config: CaptionConfig | None = None) -> SceneSpec:
    """Choose a true spec for ``scene``: group order, relation and background mention come from ``rng``."""
    config = config or CaptionConfig()
    kinds = list(_kinds(scene).items())
    order, relation = None, None
    if len(kinds) == 2 and rng.random() < config.p_relation:
        options = [
            (first, name)
            for first in (0, 1)
            for name in RELATIONS
            if _groups_relate(kinds[first][1], kinds[1 - first][1], name, config.min_separation)
        ]
        if options:
            first, relation = options[rng.integers(len(options))]
            order = [first, 1 - first]
    if order is None:
        order = rng.permutation(len(kinds)).tolist()
    groups = tuple(ObjectGroup(len(kinds[i][1]), *kinds[i][0]) for i in order)
    background = scene.background if rng.random() < config.p_background else None
    return SceneSpec(groups, relation, background)


def _phrase(group: ObjectGroup, other_counts: list[int]) -> str:
    if group.count == 1:
        count = "one" if any(n > 1 for n in other_counts) else "an" if group.colour[0] in "aeiou" else "a"
        return f"{count} {group.colour} {group.shape}"
    words = {2: "two", 3: "three"}
    return f"{words[group.count]} {group.colour} {PLURALS[group.shape]}"


def format_caption(spec: SceneSpec) -> str:
    """The caption of ``spec`` in the grammar of this module."""
    counts = [g.count for g in spec.groups]
    phrases = [_phrase(g, counts[:i] + counts[i + 1 :]) for i, g in enumerate(spec.groups)]
    if spec.relation is not None:
        body = f"{phrases[0]} {RELATIONS[spec.relation]} {phrases[1]}"
    elif len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if spec.background is not None:
        body += f" on a {spec.background} background"
    return body


def caption(scene: Scene, rng: np.random.Generator, config: CaptionConfig | None = None) -> str:
    """A random true caption of ``scene``: ``format_caption(describe(scene, rng, config))``."""
    return format_caption(describe(scene, rng, config))


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.lower().replace(",", " , ").split()
        self.pos = 0

    def peek(self, ahead: int = 0) -> str | None:
        index = self.pos + ahead
        return self.words[index] if index < len(self.words) else None

    def take(self, allowed: Collection[str], what: str) -> str:
        word = self.peek()
        if word not in allowed:
            got = "the end" if word is None else repr(word)
            raise ValueError(
                f"cannot parse caption {self.text!r}: expected {what} at word {self.pos + 1}, got {got}"
            )
        self.pos += 1
        return word

    def end(self) -> None:
        if self.peek() is not None:
            raise ValueError(
                f"cannot parse caption {self.text!r}: expected the end at word {self.pos + 1}, "
                f"got {self.peek()!r}"
            )

    def group(self) -> ObjectGroup:
        count = COUNT_WORDS[self.take(COUNT_WORDS, "a count (" + ", ".join(COUNT_WORDS) + ")")]
        colour = self.take(SHAPE_COLOURS, "a colour (" + ", ".join(SHAPE_COLOURS) + ")")
        nouns = {shape: shape for shape in SHAPES} if count == 1 else {p: s for s, p in PLURALS.items()}
        noun = self.take(nouns, ("a shape" if count == 1 else "a plural shape") + f" ({', '.join(nouns)})")
        return ObjectGroup(count, colour, nouns[noun])

    def relation(self) -> str | None:
        for name, phrase in RELATIONS.items():
            words = phrase.split()
            if self.words[self.pos : self.pos + len(words)] == words:
                self.pos += len(words)
                return name
        return None


def parse_caption(text: str) -> SceneSpec:
    """Invert :func:`format_caption`: read a caption of this grammar back into a :class:`SceneSpec`.

    Case and spacing are ignored. Raises ``ValueError`` naming the first word that breaks the grammar.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    reader = _Reader(text)
    groups = [reader.group()]
    relation = reader.relation()
    if relation is not None:
        groups.append(reader.group())
    else:
        while reader.peek() == ",":
            reader.take(",", "','")
            groups.append(reader.group())
        if len(groups) > 1 or reader.peek() == "and":
            reader.take({"and"}, "'and'")
            groups.append(reader.group())
    background = None
    if reader.peek() is not None:
        reader.take({"on"}, "'on', a relation or the end")
        reader.take({"a"}, "'a'")
        background = reader.take(BACKGROUNDS, "a background (" + ", ".join(BACKGROUNDS) + ")")
        reader.take({"background"}, "'background'")
        reader.end()
    return SceneSpec(tuple(groups), relation, background)


def spec_holds(spec: SceneSpec, scene: Scene, min_separation: float = 0.2) -> bool:
    """Whether everything ``spec`` says is true of ``scene`` (counts, colours, shapes, relation, background)."""
    kinds = _kinds(scene)
    said = Counter({(g.colour, g.shape): g.count for g in spec.groups})
    if len(said) != len(spec.groups) or said != Counter({k: len(v) for k, v in kinds.items()}):
        return False
    if spec.background is not None and spec.background != scene.background:
        return False
    if spec.relation is None:
        return True
    first, second = ((g.colour, g.shape) for g in spec.groups[:2])
    return _groups_relate(kinds[first], kinds[second], spec.relation, min_separation)

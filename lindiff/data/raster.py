"""Rasterisation of shape scenes: the image and its pixel ground truth from one coverage.

Each object is sampled exactly at ``supersample x supersample`` points per pixel (a point is
inside when its centre is: scanline spans for polygons, the exact circle for circles). The
count of inside points gives the anti-aliasing alpha, and a pixel belongs to an object when at
least half of its points are inside, so masks, boxes and pixels always agree, at any size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .shapes import RGB, Scene, ShapeObject, check_choice, check_size

CONDITION_KINDS: tuple[str, ...] = ("edges", "mask")


def _spans(
    obj: ShapeObject, scale: float, origin: tuple[float, float], rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where sample rows cross ``obj``: ``(starts, ends)``, each ``(rows, spans)``, ``inf`` when unused.

    Sample row ``i`` lies at ``y = origin[1] + i + 0.5`` and x is measured from ``origin[0]``, in
    units of ``scale``. The spans of one row are disjoint.
    """
    ys = origin[1] + np.arange(rows) + 0.5
    if obj.shape == "circle":
        cx, cy = obj.center[0] * scale - origin[0], obj.center[1] * scale
        half = np.sqrt(np.maximum((0.5 * obj.size * scale) ** 2 - (ys - cy) ** 2, 0.0))[:, None]
        return cx - half, cx + half
    points = obj.outline(scale) - (origin[0], 0.0)
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    row = ys[:, None]
    crosses = (y0 <= row) != (y1 <= row)
    slope = (x1 - x0) / np.where(y1 == y0, 1.0, y1 - y0)
    xs = np.sort(np.where(crosses, x0 + (row - y0) * slope, np.inf), axis=1)
    if xs.shape[1] % 2:
        xs = xs[:, :-1]
    return xs[:, 0::2], xs[:, 1::2]


def _coverage(obj: ShapeObject, size: int, supersample: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Samples inside ``obj`` per pixel (``int (h, w)``, 0..supersample**2) over its box, and the offset.

    Sample ``j`` of a row is inside when its centre ``j + 0.5`` lies in a span. Span ends are
    accumulated per pixel row, then a running sum along x gives each sample's inside count.
    """
    x0, y0, x1, y1 = obj.pixel_box(size)
    w, h = x1 - x0, y1 - y0
    samples = w * supersample
    starts, ends = _spans(obj, size * supersample, (x0 * supersample, y0 * supersample), h * supersample)
    first = np.clip(np.ceil(starts - 0.5), 0, samples).astype(np.int64)
    stop = np.clip(np.ceil(ends - 0.5), 0, samples).astype(np.int64)
    offset = (np.arange(h * supersample) // supersample * (samples + 1))[:, None]
    length = h * (samples + 1)
    edges = np.bincount((first + offset).ravel(), minlength=length)
    edges -= np.bincount((stop + offset).ravel(), minlength=length)
    inside = np.cumsum(edges.reshape(h, samples + 1)[:, :samples], axis=1)
    return inside.reshape(h, w, supersample).sum(axis=2), (x0, y0)


def rasterize(scene: Scene, size: int | None = None, supersample: int = 4) -> tuple[Image.Image, np.ndarray]:
    """Render the scene and its label map from one rasterisation.

    Objects are drawn in order, later ones on top. A pixel belongs to the topmost object that
    covers at least half of it.

    Args:
        scene: what to draw.
        size: image side in pixels; ``scene.size`` when ``None``.
        supersample: samples per pixel along each axis for anti-aliasing.

    Returns:
        The RGB image ``(size, size)`` and a ``uint8`` label map ``(size, size)``: 0 for the
        background, ``i + 1`` for ``scene.objects[i]``.
    """
    size = check_size(scene.size if size is None else size)
    supersample = check_size(supersample, "supersample")
    image = Image.new("RGB", (size, size), RGB[scene.background])
    labels = np.zeros((size, size), dtype=np.uint8)
    full = supersample * supersample
    for index, obj in enumerate(scene.objects, start=1):
        count, (x, y) = _coverage(obj, size, supersample)
        alpha = Image.fromarray(((count * 255 + full // 2) // full).astype(np.uint8))
        image.paste(RGB[obj.colour], (x, y, x + alpha.width, y + alpha.height), alpha)
        window = labels[y : y + alpha.height, x : x + alpha.width]
        window[2 * count >= full] = index
    return image, labels


def render(scene: Scene, size: int | None = None, supersample: int = 4) -> Image.Image:
    """The anti-aliased RGB image of ``scene`` at ``size`` pixels (``scene.size`` by default)."""
    return rasterize(scene, size, supersample)[0]


def label_map(scene: Scene, size: int | None = None, supersample: int = 4) -> np.ndarray:
    """``uint8 (size, size)``: 0 for background, ``i + 1`` where ``scene.objects[i]`` is visible."""
    return rasterize(scene, size, supersample)[1]


def masks(scene: Scene, size: int | None = None, supersample: int = 4) -> np.ndarray:
    """Visible-pixel masks, ``bool (num_objects, size, size)``; their union is ``label_map(...) > 0``."""
    labels = label_map(scene, size, supersample)
    return labels[None] == np.arange(1, len(scene.objects) + 1, dtype=np.uint8)[:, None, None]


def condition_image(
    scene: Scene, kind: str = "edges", size: int | None = None, supersample: int = 4
) -> Image.Image:
    """A ControlNet condition: white on black, mode ``RGB``, ``(size, size)``.

    Args:
        kind: ``"mask"`` fills every object; ``"edges"`` draws the 1-pixel inner outline of
            each object, as a Canny edge map would.
    """
    check_choice("kind", kind, CONDITION_KINDS)
    labels = label_map(scene, size, supersample)
    if kind == "mask":
        on = labels > 0
    else:
        pad = np.pad(labels, 1)
        neighbours = (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:])
        on = (labels > 0) & np.logical_or.reduce([n != labels for n in neighbours])
    return Image.fromarray(np.repeat(on[..., None], 3, axis=2).astype(np.uint8) * 255)

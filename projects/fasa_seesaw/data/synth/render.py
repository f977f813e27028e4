# Copyright (c) fasa_seesaw contributors.
"""Drawing the synthetic images: shapes, textures, placement without overlap, polygons."""

import numpy as np
from typing import Dict, List, Optional, Tuple
import cv2
import pycocotools.mask as mask_util

from .spec import SynthSpec

_BORDER = 1.0  # px kept free at the image border, so polygons lie strictly inside the image
_BOX_MARGIN = 2.0  # px kept free between objects' boxes, so objects never touch
_COLOUR_JITTER = 10  # +- per RGB channel and instance
_SECONDARY_SHADE = 0.35  # texture colour = class colour * shade
_PLACE_ATTEMPTS = 24  # rejection-sampling attempts per size level
_SHRINK_LEVELS = 4  # required objects shrink this many times before generation gives up
_EXTRA_ATTEMPTS = 16  # optional objects (extra instances) give up sooner

# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _regular(n: int, radius_ratio: Optional[float] = None) -> np.ndarray:
    """Regular n-gon (or 2n-pointed star if radius_ratio is given) with circumradius 1."""
    steps = 2 * n if radius_ratio is not None else n
    ang = -np.pi / 2 + 2 * np.pi * np.arange(steps) / steps
    radius = np.ones(steps)
    if radius_ratio is not None:
        radius[1::2] = radius_ratio
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)


def _crescent(steps: int = 16) -> np.ndarray:
    """The unit disc minus a disc of radius 0.8 centred at (0.5, 0): outer arc, then inner arc."""
    outer = np.deg2rad(np.linspace(52.4, 307.6, steps))
    inner = np.deg2rad(np.linspace(277.9, 82.1, steps))
    return np.concatenate(
        [
            np.stack([np.cos(outer), np.sin(outer)], axis=1),
            np.stack([0.5 + 0.8 * np.cos(inner), 0.8 * np.sin(inner)], axis=1),
        ]
    )


def _unit_shapes() -> Dict[str, np.ndarray]:
    """Shape templates centred at 0 spanning about [-1, 1]; scaled and rotated per instance."""
    arm = 0.33
    cross = np.array(
        [
            [-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm],
            [arm, 1], [-arm, 1], [-arm, arm], [-1, arm], [-1, -arm], [-arm, -arm],
        ]
    )  # fmt: skip
    arrow = np.array(
        [[-1, -0.25], [0.2, -0.25], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.25], [-1, 0.25]]
    )
    # The backbone pretraining's shapes (fasa_seesaw.pretrain), disjoint from the datasets'.
    extra = {
        "semicircle": np.concatenate([_regular(24)[6:19], [[0.0, 0.0]]]) - np.array([0.0, 0.5]),
        "crescent": _crescent(),
        "trapezoid": np.array([[-1, 0.6], [-0.45, -0.6], [0.45, -0.6], [1, 0.6]]),
        "parallelogram": np.array([[-1, 0.5], [-0.4, -0.5], [1, -0.5], [0.4, 0.5]]),
        "kite": np.array([[0, -1], [0.55, -0.35], [0, 1], [-0.55, -0.35]]),
        "chevron": np.array([[-1, -0.2], [0, -0.9], [1, -0.2], [1, 0.3], [0, -0.4], [-1, 0.3]]),
        "l_shape": np.array([[-0.8, -1], [-0.2, -1], [-0.2, 0.4], [0.8, 0.4], [0.8, 1], [-0.8, 1]]),
        "t_shape": np.array(
            [[-1, -1], [1, -1], [1, -0.45], [0.3, -0.45], [0.3, 1], [-0.3, 1], [-0.3, -0.45]]
            + [[-1, -0.45]]
        ),
        "four_star": _regular(4, radius_ratio=0.38),
        "octagon": _regular(8),
    }
    return {
        **{k: v.astype(np.float64) for k, v in extra.items()},
        "circle": _regular(24),
        "ellipse": _regular(24) * np.array([1.0, 0.55]),
        "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / np.sqrt(2.0),
        "triangle": _regular(3),
        "diamond": np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], dtype=np.float64),
        "pentagon": _regular(5),
        "hexagon": _regular(6),
        "star": _regular(5, radius_ratio=0.45),
        "cross": cross.astype(np.float64),
        "arrow": arrow.astype(np.float64),
    }


UNIT_SHAPES = _unit_shapes()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-contrast gray-ish background: tint + linear gradient + blurry noise + pixel noise."""
    base = rng.uniform(90.0, 165.0) + rng.uniform(-12.0, 12.0, size=3)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = coords[None, :] * np.cos(theta) + coords[:, None] * np.sin(theta)
    grad = rng.uniform(-25.0, 25.0) * ramp
    low = cv2.resize(
        rng.normal(0.0, 7.0, size=(5, 5, 3)).astype(np.float32),
        (size, size),
        interpolation=cv2.INTER_CUBIC,
    )
    noise = rng.normal(0.0, 4.0, size=(size, size, 3)).astype(np.float32)
    img = base.astype(np.float32) + grad[:, :, None] + low + noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Binary (anti-alias-free) texture in the object's own frame: True = secondary colour."""
    if texture == "striped":
        return (np.floor(2.0 * u / period).astype(np.int64) % 2) == 1
    if texture == "checkered":
        cells = np.floor(2.0 * u / period) + np.floor(2.0 * v / period)
        return (cells.astype(np.int64) % 2) == 1
    if texture == "dotted":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return du * du + dv * dv < (0.3 * period) ** 2
    # The backbone pretraining's textures (fasa_seesaw.pretrain), disjoint from the datasets'.
    if texture == "ringed":
        return (np.floor(np.sqrt(u * u + v * v) / (0.5 * period)).astype(np.int64) % 2) == 1
    if texture == "grid":
        return (np.mod(u, period) < 0.25 * period) | (np.mod(v, period) < 0.25 * period)
    if texture == "zigzag":
        tooth = np.abs(np.mod(v, period) - period / 2)
        return (np.floor((u + tooth) / (0.5 * period)).astype(np.int64) % 2) == 1
    if texture == "halved":
        return u > 0
    return np.zeros(u.shape, dtype=bool)


def _try_place(
    rng: np.random.Generator,
    unit: np.ndarray,
    diameter: float,
    size: int,
    boxes: np.ndarray,
) -> Optional[Tuple[np.ndarray, float, np.ndarray]]:
    """One rejection-sampling attempt. Returns (polygon, angle, box) or None on overlap."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    poly = unit @ np.array([[c, s], [-s, c]]) * (diameter / 2.0)
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    span_lo = _BORDER - lo
    span_hi = size - _BORDER - hi
    if (span_hi < span_lo).any():
        return None
    centre = rng.uniform(span_lo, span_hi)
    poly = poly + centre
    box = np.concatenate([lo + centre, hi + centre])
    if len(boxes):
        m = _BOX_MARGIN
        hit = (
            (box[0] - m < boxes[:, 2])
            & (box[2] + m > boxes[:, 0])
            & (box[1] - m < boxes[:, 3])
            & (box[3] + m > boxes[:, 1])
        )
        if hit.any():
            return None
    return poly, angle, box


def _draw(
    img: np.ndarray,
    poly: np.ndarray,
    angle: float,
    diameter: float,
    colour: np.ndarray,
    texture: str,
) -> None:
    """Fills the polygon on img (in place) with a two-tone texture in the object's frame."""
    height, width = img.shape[:2]
    x0, y0 = np.floor(poly.min(axis=0)).astype(int)
    x1, y1 = np.ceil(poly.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    # Rasterise with pycocotools, the rasteriser detectron2 and the LVIS evaluator apply to the
    # json polygons, so drawn pixels and ground-truth masks agree exactly (cv2.fillPoly includes
    # the boundary and would paint ~1 px rings outside the annotated mask).
    # Full-image coordinates: pycocotools is not exactly translation invariant at the boundary.
    rle = mask_util.frPyObjects(np.round(poly, 2).reshape(1, -1).tolist(), height, width)
    inside = mask_util.decode(rle)[y0:y1, x0:x1, 0].astype(bool)
    centre = poly.mean(axis=0)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xx + 0.5 - centre[0], yy + 0.5 - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    second = _texture_mask(texture, u, v, period=max(5.0, diameter / 3.5))
    secondary = np.round(colour * _SECONDARY_SHADE)
    paint = np.where(second[:, :, None], secondary, colour).astype(np.uint8)
    patch = img[y0:y1, x0:x1]
    patch[inside] = paint[inside]


def polygon_record(poly: np.ndarray) -> Tuple[List[float], float, List[float]]:
    """Rounds the polygon and derives area (shoelace) and bbox from the rounded coordinates."""
    pts = np.round(poly, 2)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    x_min, y_min = float(x.min()), float(y.min())
    bbox = [x_min, y_min, round(float(x.max()) - x_min, 2), round(float(y.max()) - y_min, 2)]
    return [float(val) for val in pts.reshape(-1)], round(area, 2), bbox


def render_image(
    rng: np.random.Generator,
    spec: SynthSpec,
    classes: np.ndarray,
    n_annotated: np.ndarray,
    extra_unannotated: np.ndarray,
    visuals: List[Tuple[np.ndarray, np.ndarray, str]],
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray, bool]]]:
    """Draws one image.

    Args:
        classes: class indices present in the image (each gets >= 1 annotated instance).
        n_annotated: annotated instances wanted per entry of `classes`.
        extra_unannotated: bool per entry; draw one more, unannotated instance.
        visuals: per class (unit polygon, RGB colour, texture).

    Returns:
        (RGB image, list of (class index, polygon, annotated)). The first instance of each class
        is guaranteed to be placed (shrinking it if needed); other instances are dropped if they
        do not fit, so per-class image counts stay exact.
    """
    size = spec.image_size
    img = _background(rng, size)
    order = rng.permutation(len(classes))
    # Required instances first, then additional annotated ones, then unannotated ones.
    jobs = [(classes[i], True, True) for i in order]
    jobs += [(classes[i], True, False) for i in order for _ in range(n_annotated[i] - 1)]
    jobs += [(classes[i], False, False) for i in order if extra_unannotated[i]]
    jobs = jobs[: spec.max_objects_per_image]

    boxes = np.zeros((0, 4))
    placed = []
    for k, annotated, required in jobs:
        unit, colour, texture = visuals[k]
        diameter = rng.uniform(spec.min_object_size, spec.max_object_size)
        levels = _SHRINK_LEVELS if required else 1
        attempts = _PLACE_ATTEMPTS if required else _EXTRA_ATTEMPTS
        result = None
        for level in range(levels):
            scale = 0.8**level
            for _ in range(attempts):
                result = _try_place(rng, unit, diameter * scale, size, boxes)
                if result is not None:
                    break
            if result is not None:
                break
        if result is None:
            if required:
                raise RuntimeError(
                    f"Could not place a required object in a {size}px image of spec "
                    f"'{spec.name}'; lower max_objects_per_image or max_object_size"
                )
            continue
        poly, angle, box = result
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        inst_colour = np.clip(colour + jitter, 0, 255).astype(np.float64)
        _draw(img, poly, angle, diameter * scale, inst_colour, texture)
        boxes = np.vstack([boxes, box])
        placed.append((int(k), poly, annotated))
    return img, placed

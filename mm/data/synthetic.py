"""The shapes world: synthetic image-text-mask data small enough for a tiny CLIP to learn on a CPU.

Each scene is one coloured shape ("a red circle", labelled with its class) or two different ones in a
clear spatial relation ("a red circle to the left of a blue square"), on a dark, slightly noisy
background. Shapes are solid, colours saturated and far apart: the point is a signal a model can pick
up in minutes, not realism. Every sample also carries the union of its shapes as a binary mask, so the
same shards serve segmentation, and a scene graph for structure-aware training.

The clutter world (render_clutter, write_clutter) is where fine-grained matching matters: 4-6 small
objects on a cluttered background, captions naming one or two of them by colour, shape and position.

The vessels world (render_vessels, write_vessels, at the end) is segmentation only: thin branching
curves on a fundus-like background, for thin-structure (clDice) tests and demos without DRIVE.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mm.data.shards import png_bytes, write_samples
from mm.errors import UserError

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
COLOUR_RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 100, 255), "yellow": (240, 220, 40)}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of",
                    "above": "above", "below": "below"}
CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
MIN_IMAGE_SIZE = 32

_MARGIN = 1
_BACKGROUND = 24
_NOISE = 8
_SINGLE_SIZE = (0.35, 0.7)  # side of the shape's box, as a share of the image side
_PAIR_SIZE = (0.2, 0.38)  # small enough that two fit side by side with a gap


@dataclass
class Scene:
    image: Image.Image  # RGB
    mask: Image.Image  # L, 255 on any shape, 0 elsewhere
    caption: str
    scene_graph: dict[str, Any]
    boxes: list[tuple[int, int, int, int]]  # per scene-graph object: (x0, y0, x1, y1), x1 and y1 exclusive
    label: int | None = None  # index into CLASSNAMES, single-object scenes only
    classname: str | None = None
    named: list[int] | None = None  # clutter world: scene-graph indices of the objects the caption names

    def metadata(self) -> dict[str, Any]:
        """The sample's json field."""
        meta: dict[str, Any] = {"scene_graph": self.scene_graph, "boxes": [list(b) for b in self.boxes]}
        if self.label is not None:
            meta.update(label=self.label, classname=self.classname)
        if self.named is not None:
            meta["named"] = self.named
        return meta


def render_scene(rng: random.Random, image_size: int, single_fraction: float,
                 label: int | None = None) -> Scene:
    """One random scene; a single object with probability single_fraction, else a related pair.

    `label` forces a single object of that class (used for class-balanced evaluation sets).
    """
    s = image_size
    noise_seed = rng.getrandbits(64)
    if label is not None or rng.random() < single_fraction:
        classes = [label if label is not None else rng.randrange(len(CLASSNAMES))]
        side = rng.randint(round(_SINGLE_SIZE[0] * s), round(_SINGLE_SIZE[1] * s))
        x, y = rng.randint(_MARGIN, s - _MARGIN - side), rng.randint(_MARGIN, s - _MARGIN - side)
        boxes = [(x, y, x + side, y + side)]
        relations: list[dict[str, Any]] = []
        caption = f"a {CLASSNAMES[classes[0]]}"
    else:
        classes = rng.sample(range(len(CLASSNAMES)), 2)
        relation = rng.choice(RELATIONS)
        boxes = _place_pair(rng, s, relation)
        relations = [{"subject": 0, "predicate": relation, "object": 1}]
        caption = f"a {CLASSNAMES[classes[0]]} {RELATION_PHRASES[relation]} a {CLASSNAMES[classes[1]]}"

    pixels = np.random.default_rng(noise_seed).integers(-_NOISE, _NOISE + 1, (s, s, 3)) + _BACKGROUND
    image = Image.fromarray(pixels.astype(np.uint8))
    mask = Image.new("L", (s, s), 0)
    objects = []
    for cls, box in zip(classes, boxes):
        colour, shape = _colour_shape(cls)
        _draw(ImageDraw.Draw(image), shape, box, COLOUR_RGB[colour])
        _draw(ImageDraw.Draw(mask), shape, box, 255)
        objects.append({"name": shape, "attributes": [colour]})
    single = len(classes) == 1
    return Scene(image=image, mask=mask, caption=caption,
                 scene_graph={"objects": objects, "relations": relations}, boxes=boxes,
                 label=classes[0] if single else None, classname=CLASSNAMES[classes[0]] if single else None)


def _colour_shape(cls: int) -> tuple[str, str]:
    return COLOURS[cls // len(SHAPES)], SHAPES[cls % len(SHAPES)]


def _place_pair(rng: random.Random, s: int, relation: str) -> list[tuple[int, int, int, int]]:
    """Boxes (subject, object) of two non-overlapping shapes for which `relation` clearly holds."""
    lo, hi = round(_PAIR_SIZE[0] * s), round(_PAIR_SIZE[1] * s)
    first, second = rng.randint(lo, hi), rng.randint(lo, hi)
    gap = max(2, s // 16)
    # Lay out "first left of second" with a gap between the boxes, then rotate into the relation.
    x1 = rng.randint(_MARGIN, s - _MARGIN - first - gap - second)
    x2 = rng.randint(x1 + first + gap, s - _MARGIN - second)
    dx = (x2 + second / 2) - (x1 + first / 2)
    y1 = rng.randint(_MARGIN, s - _MARGIN - first)
    # The cross-axis offset stays under half the main one so "left of" never looks like "above".
    centre2 = y1 + first / 2 + rng.uniform(-dx / 2, dx / 2)
    y2 = min(max(round(centre2 - second / 2), _MARGIN), s - _MARGIN - second)
    a, b = (x1, y1, x1 + first, y1 + first), (x2, y2, x2 + second, y2 + second)
    if relation in ("above", "below"):
        a, b = (a[1], a[0], a[3], a[2]), (b[1], b[0], b[3], b[2])
    return [a, b] if relation in ("left of", "above") else [b, a]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Any) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def _check_set_size(num_samples: int, image_size: int, min_size: int, balanced: bool, world: str) -> None:
    """The checks every synthetic world's writer makes before it renders anything."""
    if num_samples < 1:
        raise UserError(f"number of samples must be at least 1, got {num_samples}")
    if image_size < min_size:
        raise UserError(f"image size must be at least {min_size}{world}, got {image_size}")
    if balanced and num_samples % len(CLASSNAMES):
        raise UserError(f"a balanced set needs a multiple of {len(CLASSNAMES)} samples, got {num_samples}")


def write_shapes_world(out_dir: str | os.PathLike, num_samples: int, image_size: int = 64, seed: int = 0,
                       shard_size: int = 500, single_fraction: float = 0.5, prefix: str = "shapes",
                       balanced: bool = False, overwrite: bool = False, progress: bool = False) -> list[str]:
    """Write shapes-world shards (png, mask.png, txt, json); returns the shard paths.

    Sample i depends only on (seed, i, balanced), never on the shard size. `balanced` writes a
    held-out zero-shot set instead: single objects only, every class equally often (num_samples must
    be a multiple of len(CLASSNAMES)); single_fraction is then unused.
    """
    _check_set_size(num_samples, image_size, MIN_IMAGE_SIZE, balanced, "")
    if not 0.0 <= single_fraction <= 1.0:
        raise UserError(f"single-object fraction must be between 0 and 1, got {single_fraction}")

    def samples() -> Iterator[dict[str, bytes]]:
        # A separate stream name keeps an evaluation set from repeating training scenes of the same seed.
        stream = "balanced" if balanced else "mixed"
        for i in tqdm(range(num_samples), desc="scenes", unit="img", disable=not progress):
            rng = random.Random(f"shapes:{stream}:{seed}:{i}")
            scene = render_scene(rng, image_size, single_fraction,
                                 label=i % len(CLASSNAMES) if balanced else None)
            yield {"__key__": f"{i:08d}", "png": png_bytes(scene.image), "mask.png": png_bytes(scene.mask),
                   "txt": scene.caption.encode("utf-8"), "json": json.dumps(scene.metadata()).encode("utf-8")}

    return write_samples(samples(), out_dir, prefix, shard_size, overwrite)


# ---------------------------------------------------------------------------------------------------
# The clutter world: small objects among distractors, for token-wise (FILIP) matching.
#
# In the shapes world one object fills a third of the picture, so a pooled embedding already says
# everything a caption does. Here a caption names one or two of 4-6 small objects, so the words must
# bind to a few patches. Objects in the class colours (COLOURS) are what labels and most captions name;
# neutral colours make the distractors. The labelled (balanced) set holds exactly one object in a class
# colour among 3-5 neutral distractors, at least one of which has its shape: the class (colour + shape
# of that one object) cannot be read off "which colours and which shapes appear somewhere".

NEUTRALS = ("grey", "white", "brown")
NEUTRAL_RGB = {"grey": (130, 130, 130), "white": (235, 235, 235), "brown": (150, 95, 45)}
CLUTTER_RGB = {**COLOUR_RGB, **NEUTRAL_RGB}
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
                    "left": "on the left", "centre": "in the centre", "right": "on the right",
                    "bottom left": "at the bottom left", "bottom": "at the bottom",
                    "bottom right": "at the bottom right"}
_CLUTTER_OBJECTS = (4, 6)
_CLUTTER_SIZE = (0.14, 0.2)  # side of an object's box, as a share of the image side
_CLUTTER_STROKES = (8, 14)  # faint lines and specks behind the objects
MIN_CLUTTER_SIZE = 48  # smaller, and the objects are a few pixels wide


def position_of(box: tuple[int, int, int, int], image_size: int) -> str:
    """The 3 x 3 grid cell of the box's centre, as a caption names it."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col, row = min(2, int(3 * cx / image_size)), min(2, int(3 * cy / image_size))
    return POSITIONS[3 * row + col]


def _place_boxes(rng: random.Random, s: int, n: int) -> list[tuple[int, int, int, int]]:
    """n non-overlapping square boxes with a 2 px gap; retried from scratch in the rare dead end."""
    lo, hi = round(_CLUTTER_SIZE[0] * s), round(_CLUTTER_SIZE[1] * s)
    while True:
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(200 * n):
            side = rng.randint(lo, hi)
            x, y = rng.randint(_MARGIN, s - _MARGIN - side), rng.randint(_MARGIN, s - _MARGIN - side)
            box = (x, y, x + side, y + side)
            if all(box[0] >= b[2] + 2 or b[0] >= box[2] + 2 or box[1] >= b[3] + 2 or b[1] >= box[3] + 2
                   for b in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    return boxes


def render_clutter(rng: random.Random, image_size: int, label: int | None = None) -> Scene:
    """One clutter scene. Without `label`: 4-6 objects, 1-3 of them in class colours, and a caption
    naming one or two objects (class-coloured ones first) by colour, shape and position, each
    phrase true of that object alone. With `label`: that class's object among neutral distractors.

    The json's `named` lists the scene-graph indices of the objects the caption names, in order.
    """
    s = image_size
    noise_seed = rng.getrandbits(64)
    n = rng.randint(*_CLUTTER_OBJECTS)
    boxes = _place_boxes(rng, s, n)
    if label is not None:
        target_colour, target_shape = _colour_shape(label)
        kinds = [(target_colour, target_shape), (rng.choice(NEUTRALS), target_shape)]
        kinds += [(rng.choice(NEUTRALS), rng.choice(SHAPES)) for _ in range(n - 2)]
        order = [0] + rng.sample(range(1, n), n - 1)  # the target first; distractors in random order
        kinds = [kinds[i] for i in order]
        named = [0]
    else:
        coloured = rng.randint(1, 3)
        kinds = [(rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(coloured)]
        kinds += [(rng.choice(NEUTRALS), rng.choice(SHAPES)) for _ in range(n - coloured)]
        named = []
    phrases = [f"a {c} {sh} {POSITION_PHRASES[position_of(b, s)]}" for (c, sh), b in zip(kinds, boxes)]
    if label is None:
        # Only objects whose phrase describes nothing else in the scene can be named.
        unique = [i for i in range(n) if phrases.count(phrases[i]) == 1]
        first = [i for i in unique if kinds[i][0] in COLOURS] or unique
        named = [rng.choice(first)]
        if rng.random() < 0.5 and len(unique) > 1:
            named.append(rng.choice([i for i in unique if i != named[0]]))
    caption = " and ".join(phrases[i] for i in named)

    pixels = np.random.default_rng(noise_seed).integers(-_NOISE, _NOISE + 1, (s, s, 3)) + _BACKGROUND
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(*_CLUTTER_STROKES)):  # dim, desaturated: clutter, never an object
        grey = rng.randint(45, 80)
        colour = tuple(grey + rng.randint(-10, 10) for _ in range(3))
        if rng.random() < 0.5:
            draw.line([(rng.uniform(0, s), rng.uniform(0, s)) for _ in range(2)], fill=colour, width=1)
        else:
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(1, 2.5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    mask = Image.new("L", (s, s), 0)
    for (colour, shape), box in zip(kinds, boxes):
        _draw(draw, shape, box, CLUTTER_RGB[colour])
        _draw(ImageDraw.Draw(mask), shape, box, 255)
    objects = [{"name": shape, "attributes": [colour]} for colour, shape in kinds]
    return Scene(image=image, mask=mask, caption=caption, scene_graph={"objects": objects, "relations": []},
                 boxes=boxes, label=label, classname=CLASSNAMES[label] if label is not None else None,
                 named=named)


def write_clutter(out_dir: str | os.PathLike, num_samples: int, image_size: int = 64, seed: int = 0,
                  shard_size: int = 500, prefix: str = "clutter", balanced: bool = False,
                  overwrite: bool = False, progress: bool = False) -> list[str]:
    """Write clutter-world shards (png, mask.png, txt, json); returns the shard paths.

    Sample i depends only on (seed, i, balanced). `balanced` writes the labelled fine-grained set:
    one class-coloured object among neutral distractors, every class of CLASSNAMES equally often.
    An unbalanced set with another seed is the retrieval set.
    """
    _check_set_size(num_samples, image_size, MIN_CLUTTER_SIZE, balanced, " for the clutter world")

    def samples() -> Iterator[dict[str, bytes]]:
        stream = "balanced" if balanced else "mixed"
        for i in tqdm(range(num_samples), desc="scenes", unit="img", disable=not progress):
            scene = render_clutter(random.Random(f"clutter:{stream}:{seed}:{i}"), image_size,
                                   label=i % len(CLASSNAMES) if balanced else None)
            yield {"__key__": f"{i:08d}", "png": png_bytes(scene.image), "mask.png": png_bytes(scene.mask),
                   "txt": scene.caption.encode("utf-8"), "json": json.dumps(scene.metadata()).encode("utf-8")}

    return write_samples(samples(), out_dir, prefix, shard_size, overwrite)


# ---------------------------------------------------------------------------------------------------
# The vessels world: thin curves for segmentation.
#
# Filled shapes never test what TopoLoRA-SAM's clDice is for: structures one to three pixels wide whose
# connectivity a blob-shaped prediction breaks. These fundus-like images give thin-structure tests and
# demos such a target without downloading DRIVE.

_FUNDUS_RGB = np.array([95.0, 32.0, 14.0])  # dark orange-red background, brightest at the centre
_VESSEL_RGB = np.array([235.0, 140.0, 90.0])  # brighter and paler than the background
_CURVES = (2, 5)
_WIDTHS = (1, 3)


def render_vessels(rng: random.Random, image_size: int) -> tuple[Image.Image, Image.Image, int]:
    """One fundus-like image (RGB), its curve mask (L, 255 on exactly the curve pixels) and the number
    of curves: 2-5 smooth cubic Bezier curves 1-3 px wide on a dark, noisy, vignetted reddish
    background; each curve after the first branches off an earlier one with probability 1/2."""
    s = image_size
    strength = Image.new("L", (s, s), 0)  # per-pixel curve brightness, 0 off the curves
    draw = ImageDraw.Draw(strength)
    curves: list[np.ndarray] = []
    widths: list[int] = []
    for _ in range(rng.randint(*_CURVES)):
        if curves and rng.random() < 0.5:  # a branch: start on an earlier curve, a pixel thinner
            parent = rng.randrange(len(curves))
            start = curves[parent][rng.randrange(len(curves[parent]))]
            width = max(_WIDTHS[0], widths[parent] - 1)
        else:
            start = _point(rng, s)
            width = rng.randint(*_WIDTHS)
        end = _point(rng, s)
        while np.hypot(*(end - start)) < 0.4 * s:  # long enough to look like a vessel, not a blob
            end = _point(rng, s)
        # Inner control points near the chord, pushed sideways: a gentle bend, never a hairpin.
        chord, normal = end - start, np.array([start[1] - end[1], end[0] - start[0]])
        c1, c2 = (start + f * chord + rng.uniform(-0.3, 0.3) * normal for f in (1 / 3, 2 / 3))
        t = np.linspace(0.0, 1.0, 4 * s)[:, None]
        points = (1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t ** 2 * c2 + t ** 3 * end
        draw.line([tuple(p) for p in points], fill=rng.randint(150, 255), width=width, joint="curve")
        curves.append(points)
        widths.append(width)

    noise = np.random.default_rng(rng.getrandbits(64))
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
    vignette = 1.0 - 1.2 * (xx ** 2 + yy ** 2)
    background = _FUNDUS_RGB * vignette[..., None] + noise.normal(0, 5, (s, s, 3))
    alpha = np.asarray(strength, dtype=np.float64)[..., None] / 255 * noise.uniform(0.85, 1.0, (s, s, 1))
    pixels = np.where(alpha > 0, _VESSEL_RGB * alpha + background * (1 - alpha) * 0.3, background)
    mask = Image.fromarray(np.where(np.asarray(strength) > 0, 255, 0).astype(np.uint8))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), mask, len(curves)


def _point(rng: random.Random, s: int) -> np.ndarray:
    return np.array([rng.uniform(0, s - 1), rng.uniform(0, s - 1)])


def write_vessels(out_dir: str | os.PathLike, num_samples: int, image_size: int = 64, seed: int = 0,
                  shard_size: int = 500, prefix: str = "vessels", overwrite: bool = False,
                  progress: bool = False) -> list[str]:
    """Write vessel-like segmentation shards (png, mask.png 0/255, json {"curves": n}), the layout
    TopoLoRA-SAM reads; returns the shard paths. Sample i depends only on (seed, i)."""
    if num_samples < 1:
        raise UserError(f"number of samples must be at least 1, got {num_samples}")
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"image size must be at least {MIN_IMAGE_SIZE}, got {image_size}")

    def samples() -> Iterator[dict[str, bytes]]:
        for i in tqdm(range(num_samples), desc="images", unit="img", disable=not progress):
            image, mask, curves = render_vessels(random.Random(f"vessels:{seed}:{i}"), image_size)
            yield {"__key__": f"{i:08d}", "png": png_bytes(image), "mask.png": png_bytes(mask),
                   "json": json.dumps({"curves": curves}).encode("utf-8")}

    return write_samples(samples(), out_dir, prefix, shard_size, overwrite)

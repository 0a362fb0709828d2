"""Class names and prompt templates for zero-shot classification: built-in sets or text files.

Built-in sets: `shapes` (the synthetic shapes world), `cifar10` and `cifar100` (the class names
CLIP_benchmark and OpenAI's prompt-engineering notebook use, with OpenAI's 18 CIFAR templates) and
`imagenet` (open_clip's curated class names and OpenAI's 80 templates, taken from the installed
open_clip package).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from pathlib import Path

from mm.errors import UserError


def _shapes_classnames() -> list[str]:
    from mm.data.synthetic import CLASSNAMES

    return list(CLASSNAMES)


CIFAR10_CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                      "truck")

CIFAR100_CLASSNAMES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear",
    "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm",
)

# OpenAI's 18 templates for CIFAR-10 and CIFAR-100 (CLIP's prompt-engineering notebook).
CIFAR_TEMPLATES = (
    'a photo of a {}.',
    'a blurry photo of a {}.',
    'a black and white photo of a {}.',
    'a low contrast photo of a {}.',
    'a high contrast photo of a {}.',
    'a bad photo of a {}.',
    'a good photo of a {}.',
    'a photo of a small {}.',
    'a photo of a big {}.',
    'a photo of the {}.',
    'a blurry photo of the {}.',
    'a black and white photo of the {}.',
    'a low contrast photo of the {}.',
    'a high contrast photo of the {}.',
    'a bad photo of the {}.',
    'a good photo of the {}.',
    'a photo of the small {}.',
    'a photo of the big {}.',
)


def template_strings(templates: Sequence[str | Callable[[str], str]]) -> list[str]:
    """Templates as '{}' format strings; callables (open_clip's lambdas) are called with '{}'."""
    out = []
    for t in templates:
        s = t if isinstance(t, str) else t("{}")
        if s.count("{}") != 1 or s.replace("{}", "").count("{") or s.replace("{}", "").count("}"):
            raise UserError(f"templates: {s!r} is not a template with one '{{}}'")
        out.append(s)
    return out


def _imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _imagenet_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return template_strings(OPENAI_IMAGENET_TEMPLATES)


BUILTIN_CLASSNAMES = {"shapes": _shapes_classnames, "cifar10": lambda: list(CIFAR10_CLASSNAMES),
                      "cifar100": lambda: list(CIFAR100_CLASSNAMES), "imagenet": _imagenet_classnames}
BUILTIN_TEMPLATES = {"shapes": lambda: ["a {}", "a {} shape", "a picture of a {}"],
                     "cifar10": lambda: list(CIFAR_TEMPLATES), "cifar100": lambda: list(CIFAR_TEMPLATES),
                     "imagenet": _imagenet_templates}


def _load(spec: str, builtin: dict, what: str) -> list[str]:
    if spec in builtin:
        return builtin[spec]()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{what}: {spec!r} is neither a built-in set ({', '.join(builtin)}) nor a file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{what}: {spec} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{what}: cannot read {spec} ({e.strerror or e})") from None
    if not lines:
        raise UserError(f"{what}: {spec} is empty")
    return lines


def load_classnames(spec: str) -> list[str]:
    return _load(spec, BUILTIN_CLASSNAMES, "classnames")


def load_templates(spec: str) -> list[str]:
    """Templates with exactly one '{}' (the class name); any other placeholder ('{style}', '{0}', a second
    '{}', a stray brace) is refused here, where str.format would fail on it only mid-evaluation."""
    templates = _load(spec, BUILTIN_TEMPLATES, "templates")
    for t in templates:
        try:
            fields = [(name, fmt, conv) for _, name, fmt, conv in string.Formatter().parse(t) if name is not None]
        except ValueError as e:
            raise UserError(f"templates: {spec}: template {t!r} is not a format string ({e}); write a literal "
                            "brace as '{{' or '}}'") from None
        if not fields:
            raise UserError(f"templates: {spec}: template {t!r} has no '{{}}' for the class name")
        others = ["{" + name + (f"!{conv}" if conv else "") + (f":{fmt}" if fmt else "") + "}"
                  for name, fmt, conv in fields if (name, fmt, conv) != ("", "", None)]
        if others or len(fields) > 1:
            found = ", ".join(others) if others else f"{len(fields)} '{{}}'"
            raise UserError(f"templates: {spec}: template {t!r} must hold exactly one '{{}}' (the class name) and "
                            f"no other placeholder; found {found}")
    return templates

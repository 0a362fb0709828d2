"""Class names and prompt templates for zero-shot classification: built-in sets or text files."""

from __future__ import annotations

from pathlib import Path

from mm.errors import UserError


def _shapes_classnames() -> list[str]:
    from mm.data.synthetic import CLASSNAMES

    return list(CLASSNAMES)


BUILTIN_CLASSNAMES = {"shapes": _shapes_classnames}
BUILTIN_TEMPLATES = {"shapes": lambda: ["a {}", "a {} shape", "a picture of a {}"]}


def _load(spec: str, builtin: dict, what: str) -> list[str]:
    if spec in builtin:
        return builtin[spec]()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{what}: {spec!r} is neither a built-in set ({', '.join(builtin)}) nor a file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{what}: {spec} is empty")
    return lines


def load_classnames(spec: str) -> list[str]:
    return _load(spec, BUILTIN_CLASSNAMES, "classnames")


def load_templates(spec: str) -> list[str]:
    templates = _load(spec, BUILTIN_TEMPLATES, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"templates: {spec}: template {bad[0]!r} has no '{{}}' for the class name")
    return templates

"""Write constraints.txt: the exact versions, in the running environment, of every package pyproject.toml
declares (dependencies and every extra) and of everything those need, as pip freeze would print them.

    python scripts/freeze_constraints.py > constraints.txt

pyproject.toml gives ranges, so mm installs into an environment that already holds other versions;
constraints.txt is the set the tests ran on (`pip install -c constraints.txt -e ".[dev]"`, as
scripts/setup.sh does).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# The installer's own tools belong to the environment, not to mm (some packages list setuptools).
PACKAGING_TOOLS = ("pip", "setuptools", "wheel")


def declared(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """Every requirement of [project].dependencies and of every extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    texts = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    return [Requirement(t) for t in texts]


def closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of the roots and, recursively, what they require here."""
    found: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"error: {req.name} is declared or required but not installed here")
        found[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            # Markers decide per environment: a dependency of an extra counts when that extra was asked for.
            wanted = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""}))
            if wanted:
                todo.append((sub, frozenset(sub.extras)))
    for name in ("mm", *PACKAGING_TOOLS):
        found.pop(name, None)
    return found


def main() -> None:
    print("# Tested versions of mm's declared dependencies and of what they need (scripts/freeze_constraints.py).")
    print('# pip install -c constraints.txt -e ".[dev]"; pyproject.toml itself gives ranges.')
    for name, version in sorted(closure(declared()).items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()

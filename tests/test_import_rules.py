"""The floors of the package and the one rule between them: imports point down.

    top      mm.cli, mm.__main__, mm.evaluate.*, and every command-line module (*cli*)
    tasks    mm.tasks.*                      (the trainers; they know the engine's contract)
    engine   mm.engine.*                     (the training loop; it knows no trainer)
    parts    mm.data, mm.models, mm.losses, mm.metrics, mm.scenegraph
    base     mm.errors, mm.config, mm.dist, mm.exports, mm.cliargs

Every import counts, including those inside functions (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mm"
LOWER = ("mm.engine", "mm.data", "mm.models", "mm.losses", "mm.metrics")
UPPER = ("mm.tasks", "mm.evaluate", "mm.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_cli(module: str) -> bool:
    return module in ("mm.cli", "mm.__main__") or module.rsplit(".", 1)[-1].endswith("cli")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m == "mm" or m.startswith("mm.")}


MODULES = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def upward_imports(modules: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a lower-floor module from mm.tasks, mm.evaluate or a CLI module."""
    bad = []
    for module, imports in modules.items():
        if not _within(module, LOWER) or _is_cli(module):
            continue
        for target in sorted(imports):
            if target in modules and (_within(target, UPPER) or _is_cli(target)):
                bad.append(f"{module} -> {target}")
    return bad


def test_lower_floors_never_import_tasks_evaluation_or_command_lines():
    assert upward_imports(MODULES) == []


def test_the_rule_catches_an_upward_import():
    """The checker itself: a planted upward import, a lazy one included, is reported."""
    planted = dict(MODULES)
    planted["mm.metrics.zeroshot"] = MODULES["mm.metrics.zeroshot"] | {"mm.tasks"}
    planted["mm.engine.trainer"] = MODULES["mm.engine.trainer"] | {"mm.cli"}
    assert upward_imports(planted) == ["mm.engine.trainer -> mm.cli", "mm.metrics.zeroshot -> mm.tasks"]


def test_the_engine_knows_no_task_and_the_parts_know_no_engine():
    for module, imports in MODULES.items():
        if _within(module, ("mm.engine",)):
            assert not any(_within(t, ("mm.tasks", "mm.evaluate")) for t in imports), module
        if _within(module, ("mm.data", "mm.models", "mm.losses", "mm.metrics", "mm.scenegraph")) \
                and not _is_cli(module):
            assert not any(_within(t, ("mm.engine", "mm.tasks", "mm.evaluate")) for t in imports), module


def test_models_import_no_losses_and_no_scene_graphs():
    for module, imports in MODULES.items():
        if _within(module, ("mm.models",)):
            assert not any(_within(t, ("mm.losses", "mm.scenegraph")) for t in imports), module


def test_exports_and_config_sit_at_the_bottom():
    for module in ("mm.exports", "mm.config", "mm.errors", "mm.dist", "mm.cliargs"):
        assert {t.split(".")[1] for t in MODULES[module]} <= {"errors"}, module


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, ("mm",))))
def test_no_import_cycles(module):
    """No module reaches itself through the import graph (module-level and lazy imports together)."""
    graph = {m: {t if t in MODULES else t.rsplit(".", 1)[0] for t in imps} & MODULES.keys()
             for m, imps in MODULES.items()}
    # A package's __init__ imports its submodules: an edge to the package itself is not a cycle back.
    seen, stack = set(), [t for t in graph[module] if not module.startswith(t + ".")]
    while stack:
        m = stack.pop()
        if m == module:
            pytest.fail(f"{module} imports itself through the graph")
        if m in seen:
            continue
        seen.add(m)
        stack.extend(t for t in graph[m] if not m.startswith(t + "."))

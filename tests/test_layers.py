"""The library imports downward only (DESIGN "Layout"), lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "s2clip_cli"
LAYERS = ("models", "data", "refine", "pipeline", "analysis", "evaluation", "commands", "cli")

# layer -> layers it must never import (besides `commands` and `cli`, which nothing below imports).
FORBIDDEN: dict[str, set[str]] = {
    "models": {"data", "refine", "pipeline", "analysis", "evaluation"},
    "data": {"models", "refine", "pipeline", "analysis", "evaluation"},
    "refine": {"pipeline", "evaluation", "analysis", "data"},
    "pipeline": {"evaluation", "analysis", "data"},
    "analysis": {"evaluation", "refine"},
    "evaluation": {"refine", "pipeline", "analysis"},
    "base": set(LAYERS) - {"data"},  # errors, config, io, profiling, distributed, methods (a table over data.presets)
}


def _layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":  # `python -m s2clip_cli`: the entry point, above everything
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every s2clip module `path` imports (absolute names), at any depth of the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names] if not node.module or node.level else [target]
            found.extend((node.lineno, t) for t in names if t.startswith("s2clip_cli"))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("s2clip_cli"))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_rank_machinery_sits_below_the_drivers_that_share_it() -> None:
    """`distributed` (ranks, failure flags, progress) serves `eval` and `segment`: a base module that
    imports no layer, not a part of `evaluation`."""
    module = PACKAGE / "distributed.py"
    assert _layer_of(_module_name(module)) == "base" and not (PACKAGE / "evaluation" / "distributed.py").exists()
    assert not [t for _, t in _imports(module) if _layer_of(t) != "base"]
    users = {p.relative_to(PACKAGE).as_posix() for p in SOURCES
             if "s2clip_cli.distributed" in {t for _, t in _imports(p)}}
    assert {"commands/evaluate.py", "commands/segment.py", "evaluation/runner.py"} <= users, users


def test_the_rules_see_every_module_and_lazy_imports() -> None:
    assert len(SOURCES) > 40
    segmenter = PACKAGE / "pipeline" / "segmenter.py"
    assert any(t.startswith("s2clip_cli.refine") for _, t in _imports(segmenter))  # a lazy import inside refine()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downward(path: Path) -> None:
    layer = _layer_of(_module_name(path))
    forbidden = set(FORBIDDEN.get(layer, set()))
    if layer not in ("commands", "cli"):
        forbidden |= {"commands", "cli"}
    if layer == "commands":
        forbidden |= {"cli"}
    bad = [f"line {line}: {target}" for line, target in _imports(path) if _layer_of(target) in forbidden
           and _layer_of(target) != layer]
    assert not bad, f"{_module_name(path)} ({layer}) imports against the layers: {bad}"

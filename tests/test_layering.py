"""The packages' layering (docs/architecture.md, "Layers"): every import of pipeline/ points down a fixed order,
so there are no package loops; the cache package is the format alone; recipes are leaves. Read from the
source (module-level and function-level imports alike), so a lazy import counts as much as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"

# bottom to top: a unit may import only units of an earlier group (or its own)
LAYERS = [
    {"errors"},
    {"registry", "schema", "atomic", "dtypes", "blocks", "resources"},
    {"head"},
    {"targets"},
    {"cache", "losses"},
    {"sources", "teacher", "config"},
    {"data", "student", "evaluate"},
    {"train", "phase_one"},
    {"recipes"},
    {"cli"},
]
RANK = {unit: i for i, group in enumerate(LAYERS) for unit in group}
FORMAT_ONLY = {"cache": {"errors", "registry", "atomic", "dtypes", "head", "targets"}}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pipeline"


def _imports() -> list[tuple[str, str, str]]:
    """(importing module, its unit, imported unit) for every pipeline import across units."""
    out = []
    for path in sorted(PIPELINE.rglob("*.py")):
        module = ".".join(path.relative_to(PIPELINE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                names = [f"pipeline.{a.name}" for a in node.names] if node.module == "pipeline" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("pipeline.")]
            out += [(module, _unit(module), _unit(n)) for n in names if _unit(n) != _unit(module)]
    return out


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PIPELINE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(RANK), (units ^ set(RANK))


def test_imports_point_down():
    upward = [f"{m} imports {dst}" for m, src, dst in _imports() if RANK[dst] >= RANK[src]]
    assert not upward, upward


def test_the_cache_package_is_the_format():
    extra = [f"{m} imports {dst}" for m, src, dst in _imports() if src == "cache" and dst not in FORMAT_ONLY["cache"]]
    assert not extra, extra


def test_recipes_are_leaves():
    """Only the CLI imports recipes; inside recipes, only the demo (the chain of the other commands) imports
    another recipe, and then only its entry point."""
    outside = [m for m, src, dst in _imports() if dst == "recipes" and src != "cli"]
    assert not outside, outside
    for path in (PIPELINE / "recipes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline.recipes"):
                assert path.stem == "demo", f"{path.name} imports {node.module}"
                assert all(a.name.startswith("run_") or a.name in ("build_cache", "cache_info", "verify_cache")
                           for a in node.names), [a.name for a in node.names]

"""The package's layers, read from the import statements of src/sact (issue 22, docs/layout.md): imports point down the layers, the checkpoint
format (``sact.io``) knows no models, the engine imports no task, the sparse engine no harness,
and no module is on an import cycle, counting imports inside functions too (so none can hide one)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in (SRC / "sact").rglob("*.py")}


def imports(name: str) -> list[tuple[str, bool]]:
    """``(imported sact module, at module level?)`` for every import statement of module ``name``.

    ``from .x import y`` names ``x.y`` when that is a module of sact (``from . import
    registry``), else ``x``; a package's own ``__init__`` is not counted for its submodules.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, id(node) in top) for n in names if n.split(".")[0] == "sact"]
    return found


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_import_parser_reads_relative_absolute_and_function_level_imports():
    assert ("sact.io.checkpoint", True) in imports("sact.models.loading")  # from ..io.checkpoint import ...
    assert ("sact.models.registry", True) in imports("sact.models.loading")  # from . import registry
    assert ("sact.models", False) in imports("sact.detection.task")  # from ..models import create_model, in a def


def test_the_checkpoint_format_imports_no_model_code():
    io = [m for m in MODULES if _in(m, "sact.io")]
    assert "sact.io.checkpoint" in io
    models = ("sact.models", "sact.stage", "sact.units", "sact.engine")
    bad = [(m, t) for m in io for t, _ in imports(m) if _in(t, *models)]
    assert bad == []


def _graph() -> dict[str, set[str]]:
    """sact module -> the sact modules it imports (module level and inside functions)."""
    return {m: {t for t, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def _on_cycle(graph: dict[str, set[str]], start: str) -> bool:
    """A depth-first search for a path from ``start`` back to ``start``."""
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt == start:
                return True
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def test_no_module_of_models_or_io_is_on_an_import_cycle():
    graph = _graph()
    layered = [m for m in MODULES if _in(m, "sact.models", "sact.io", "sact.checkpoint")]
    assert len(layered) >= 8
    assert [m for m in layered if _on_cycle(graph, m)] == []


def test_models_and_io_import_each_other_at_module_level_only():
    layered = ("sact.models", "sact.io", "sact.checkpoint", "sact.stage")
    hidden = [(m, t) for m in MODULES if _in(m, "sact.models", "sact.io")
              for t, top in imports(m) if not top and _in(t, *layered)]
    assert hidden == []


def test_the_engine_imports_no_task():
    """Tasks register themselves with the engine (sact.engine.tasks.register_task)."""
    engine = [m for m in MODULES if _in(m, "sact.engine") and m not in ALIASES]
    bad = [(m, t) for m in engine for t, _ in imports(m)
           if _in(t, "sact.detection", "sact.classification") and (m, t) not in REEXPORTS]
    assert bad == []


def test_the_sparse_engine_is_library_only():
    """No harness in sact.sparse: its modules (the alias modules of the moved harness aside)
    import no argparse, tools, commands or CLI."""
    sparse = [m for m in MODULES if _in(m, "sact.sparse")]
    aliases = {"sact.sparse.bench", "sact.sparse.profile", "sact.sparse.workloads", "sact.sparse.break_even"}
    bad = [(m, t) for m in sparse if m not in aliases for t, _ in imports(m)
           if _in(t, "sact.tools", "sact.commands", "sact.cli")]
    assert bad == []


def test_no_module_of_sact_is_on_an_import_cycle():
    graph = _graph()
    assert [m for m in MODULES if _on_cycle(graph, m)] == []


# The layers, bottom first (docs/layout.md). A module imports from its own layer or the layers
# below; `__main__` modules are entry points (the cli layer).
LAYERS = (
    ("core", ("sact.errors", "sact._version", "sact.native", "sact.act", "sact.halting", "sact.halting_fused", "sact.units",
              "sact.stage", "sact.flops", "sact.output", "sact.viz", "sact.tb")),
    ("data and io", ("sact.data", "sact.io")),
    ("models", ("sact.models",)),
    ("sparse engine and training engine", ("sact.sparse", "sact.engine")),
    ("tasks", ("sact.classification", "sact.detection")),
    ("tools", ("sact.tools", "sact.saliency")),
    ("cli", ("sact.cli", "sact.commands")),
)
# moved modules kept for one release: sact.X is the same module object as its new place
ALIASES = {"sact.checkpoint", "sact.fileio", "sact.ponder", "sact.gallery", "sact.plots", "sact.export",
           "sact.convert_tf", "sact.inference", "sact.engine.demo", "sact.engine.demo_report", "sact.engine.eval_run",
           "sact.sparse.bench",
           "sact.sparse.profile", "sact.sparse.workloads", "sact.sparse.break_even"}


# a moved public name a package still re-exports for one release (imported when first used)
REEXPORTS = {("sact.engine", "sact.classification.evaluate")}


def layer(module: str) -> int | None:
    if module.endswith(".__main__"):
        return len(LAYERS) - 1
    found = [(len(p), i) for i, (_, packages) in enumerate(LAYERS) for p in packages if _in(module, p)]
    return max(found)[1] if found else None


def test_every_module_has_a_layer_and_every_alias_exists():
    assert [m for m in MODULES if m != "sact" and m not in ALIASES and layer(m) is None] == []
    assert sorted(ALIASES - set(MODULES)) == []


def test_imports_point_down_the_layers():
    """Counting imports inside functions: none reaches a higher layer (no lazy import dodges the order)."""
    up = [(m, t) for m in MODULES if m != "sact" and m not in ALIASES for t, _ in imports(m)
          if layer(t) is not None and layer(t) > layer(m) and (m, t) not in REEXPORTS]
    assert up == []


def test_the_package_imports_moved_modules_from_their_new_place():
    through_alias = [(m, t) for m in MODULES if m not in ALIASES and m != "sact" for t, _ in imports(m) if t in ALIASES]
    assert through_alias == []


def test_aliases_are_the_moved_modules_themselves():
    import importlib

    # sact.checkpoint and sact.sparse.{bench,...} re-export names gathered from two new modules each
    for name in ALIASES - {"sact.checkpoint"} - {m for m in ALIASES if _in(m, "sact.sparse")}:
        module = importlib.import_module(name)
        assert module.__name__ != name, name  # the new module, not a copy of its names
        assert importlib.import_module(module.__name__) is module

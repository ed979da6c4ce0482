"""The import rule of the README's architecture section: every module of lpo/ sits in one layer and imports
only from its own layer or the layers below; no stage imports another stage; the import graph has no cycle.

Imports inside functions count (a lazy import is still a dependency); imports under ``if TYPE_CHECKING:``
do not (they never run). Walks the AST: no module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lpo"

# The layers, lowest first: a module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("lpo", "lpo.config", "lpo.utils")),
    ("foundations", ("lpo.world", "lpo.data", "lpo.diffusion", "lpo.branching", "lpo.sampling", "lpo.losses",
                     "lpo.calibration", "lpo.metrics.stats", "lpo.checkpoint")),
    ("models", ("lpo.backbones", "lpo.policy", "lpo.reward", "lpo.metrics")),
    ("procedures", ("lpo.training", "lpo.methods", "lpo.generate")),
    ("stages", ("lpo.stages",)),
    ("tools", ("lpo.tools", "lpo.cli", "lpo.__main__")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    if level is None:
        raise AssertionError(f"{module}: in no layer of tests/test_layers.py (add it to LAYERS)")
    return level


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def lpo_imports(path: Path, modules: set[str]) -> set[str]:
    """The lpo modules `path` imports (resolving `from lpo.x import y` to lpo.x.y when y is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "lpo" or a.name.startswith("lpo."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "lpo" or node.module.startswith("lpo.")):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {m: lpo_imports(p, set(paths)) - {m} for m, p in paths.items()}


GRAPH = import_graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_downwards(module):
    mine = layer_of(module)
    upward = sorted(d for d in GRAPH[module] if layer_of(d) > mine)
    assert not upward, (f"{module} ({LAYERS[mine][0]}) imports a higher layer: "
                        + ", ".join(f"{d} ({LAYERS[layer_of(d)][0]})" for d in upward))


def test_no_stage_imports_another_stage():
    offenders = {m: sorted(d for d in deps if d.startswith("lpo.stages.") and d != m)
                 for m, deps in GRAPH.items() if m.startswith("lpo.stages.")}
    assert not {m: d for m, d in offenders.items() if d}, offenders


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH.get(module, ())):
            if dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])


def test_the_checker_sees_upward_and_lazy_imports(tmp_path):
    """The walker is not vacuous: a lazy import inside a function and an upward import are both found."""
    source = tmp_path / "x.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lpo.stages import report\n"
                      "def f():\n    from lpo.stages.optimize import run\n    import lpo.methods.engine\n")
    found = lpo_imports(source, set(GRAPH))
    assert found == {"lpo.stages.optimize", "lpo.methods.engine"}
    assert layer_of("lpo.stages.optimize") > layer_of("lpo.diffusion")
    assert layer_of("lpo.metrics.stats") < layer_of("lpo.metrics.scorers")  # the longest prefix wins

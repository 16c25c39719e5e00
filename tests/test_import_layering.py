"""The package's import graph has no cycle and no upward edge between layers.

Every ``import`` in ``amortized3d/`` counts, at module level and inside functions (a function-level
import that hides a cycle is still a cycle), read with ``ast`` without importing anything; only
``if TYPE_CHECKING:`` imports, which never run, are left out of the cycle check.

Layers are assigned by package path, most specific prefix first, so a new file under
``rendering/`` is in the rendering layer without being listed here. A new *top-level* module
must be given a layer below (the test says so): where it sits is a decision, not a default.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "amortized3d"

# Low to high: a module may import its own layer and the layers before it, never a later one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("amortized3d", "amortized3d.cameras", "amortized3d.schedules", "amortized3d.slugs",
                    "amortized3d.checkpoint_io", "amortized3d.corpora", "amortized3d.optim", "amortized3d.data",
                    "amortized3d.sd_loading", "amortized3d.atomic", "amortized3d.fingerprint", "amortized3d.console",
                    "amortized3d.step_timer", "amortized3d.threads", "amortized3d.allocator",
                    "amortized3d.row_sparse")),
    ("fields", ("amortized3d.generators",)),                     # generators and the Field interface
    ("rendering and text", ("amortized3d.rendering", "amortized3d.text")),
    ("priors", ("amortized3d.priors",)),
    # the ground-truth world and its reference renders (references.py builds the analytic prior's set)
    ("world", ("amortized3d.scenes",)),
    ("guidance", ("amortized3d.guidance",)),
    ("update order", ("amortized3d.update_order", "amortized3d.divergence")),  # framework-free training steps
    ("model", ("amortized3d.model", "amortized3d.export")),      # what a checkpoint renders; file writers
    ("evaluation", ("amortized3d.evaluation",)),                 # orbit, scorers, oracle, retrieval, clip, shard
    ("system", ("amortized3d.system", "amortized3d.callbacks", "amortized3d.run_guard",
                "amortized3d.config_version")),
    ("build", ("amortized3d.build",)),
    # entry points: training, checkpoint loading, scripts' evaluate/export, benchmarks, toys
    ("entry points", ("amortized3d.train", "amortized3d.evaluation.checkpoint", "amortized3d.evaluation.evaluate",
                      "amortized3d.evaluation.exporting", "amortized3d.evaluation.final", "amortized3d.benchmark",
                      "amortized3d.benchmark_scale", "amortized3d.benchmark_sd", "amortized3d.benchmark_steps",
                      "amortized3d.toys", "amortized3d.toy_sd")),
]
def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only: they never run)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return ids


def _imports(name: str, path: Path, modules: dict[str, Path], runtime_only: bool = False) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (relative imports resolved);
    ``runtime_only``: without the ``if TYPE_CHECKING:`` ones."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph(runtime_only: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, runtime_only) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        for rank, (_, prefixes) in enumerate(LAYERS):
            if prefix in prefixes and (prefix != PACKAGE or module == PACKAGE):  # the root is no catch-all
                return rank
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = _graph()
    # a few edges known to exist, or a parsing bug would make every check below pass vacuously
    assert "amortized3d.generators.base" in graph["amortized3d.rendering.volume_renderer"]  # relative import
    assert "amortized3d.build" in graph["amortized3d.train"]
    assert "amortized3d.model" in graph["amortized3d.system"]
    assert sum(len(v) for v in graph.values()) > 100


def test_every_module_has_a_layer():
    unassigned = [m for m in _graph() if _layer(m) is None]
    assert not unassigned, (f"modules without a layer: {unassigned}; add their path to LAYERS in "
                            "tests/test_import_layering.py (the lowest layer whose modules they import)")


def test_no_import_cycle():
    # Imports that run count (function-level ones too); `if TYPE_CHECKING:` ones (annotations) do
    # not: they cannot deadlock an import. The layering below counts them as well.
    cycles = _cycles(_graph(runtime_only=True))
    assert not cycles, f"import cycles (function-level imports included): {cycles}"


def test_no_upward_import():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in sorted(_graph().items()) for b in sorted(targets)
              if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


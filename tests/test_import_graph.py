"""The import graph of src/moescope: no cycles, no upward imports (DESIGN.md, one-way flow).

Every module is parsed with ``ast`` (nothing is imported). An edge A -> B is an
``import``/``from ... import`` of moescope module B in A; ``from pkg import name`` counts as
an edge to ``pkg.name`` when that is a module, else to ``pkg``. Imports under
``if TYPE_CHECKING:`` are left out (they never run). Two graphs:

- all runtime imports (module level and inside functions, so a cycle hidden behind a
  lazy import counts): no cycle between modules;
- the same imports: each must go to the same or a
  lower layer of :data:`LAYERS`, the order of DESIGN.md's one-way flow, and
  ``report/`` may import from ``analysis/`` only its result types.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "moescope"

#: Layers, lowest first: a module may import its own layer and those below.
#: (``moescope`` itself, the package ``__init__``, re-exports the public API and is the top.)
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "moescope._cliopts",
        "moescope._json",
        "moescope._optional",
        "moescope._rundir",
        "moescope._text",
        "moescope.errors",
        "moescope.layer_names",
        "moescope.trace",
    ),
    ("moescope.nn", "moescope.capture", "moescope.data"),
    ("moescope.stats",),
    # moescope.core (the lead's MonitorCore) sits with the monitor: it builds the stats.
    ("moescope.monitor", "moescope.core", "moescope.alerts", "moescope.cost", "moescope.profiling"),
    ("moescope.plots", "moescope.sinks"),
    ("moescope.integrations", "moescope.serve", "moescope.watch", "moescope.placement"),
    ("moescope.report",),
    ("moescope.analysis",),
    ("moescope.cli", "moescope.demo", "moescope"),
)

#: Known upward edges, each with the reason it is there and what removes it.
ALLOWED_UPWARD = {
    # The token recorder (a consumer, stats/) builds a private MoEMonitor when none is
    # passed (RoutingRecorder(model) without monitor=): a lazy import on that path only.
    # Goes away when a consumer can attach to the capture pipeline without a monitor.
    ("moescope.stats.token_recorder", "moescope.monitor"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _resolve(mod: str, node: ast.ImportFrom) -> str | None:
    if node.level:
        base = mod.split(".")
        is_pkg = MODULES[mod].name == "__init__.py"
        base = base if is_pkg else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)
    return node.module


def _imports(mod: str, tree: ast.AST) -> Iterator[tuple[str, bool]]:
    """``(target module, at module level)`` for every runtime import of ``mod``."""

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk(sub, top)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "moescope" or a.name.startswith("moescope."):
                        yield _known(a.name), top
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(mod, child)
                if base and (base == "moescope" or base.startswith("moescope.")):
                    for a in child.names:
                        if base == "moescope" and a.name.startswith("__"):
                            continue  # package metadata (__version__), not code
                        sub = f"{base}.{a.name}"
                        yield (sub if sub in MODULES else _known(base)), top
            else:
                inner = top and not isinstance(
                    child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
                )
                yield from walk(child, inner)

    yield from walk(tree, True)


def _known(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _graph() -> dict[str, set[tuple[str, bool]]]:
    g: dict[str, set[tuple[str, bool]]] = {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        g[mod] = {(t, top) for t, top in _imports(mod, tree) if t != mod}
    return g


GRAPH = _graph()


def _layer(mod: str) -> int:
    best, depth = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and len(n) > depth:
                best, depth = i, len(n)
    assert best >= 0, f"{mod} is in no layer of LAYERS; add it where it belongs"
    return best


def _cycles(module_level: bool = False) -> list[list[str]]:
    """Strongly connected components (> 1 module) of the import graph (Tarjan); all
    runtime imports, or module-level ones only."""
    edges = {m: sorted({t for t, top in ts if top or not module_level}) for m, ts in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_graph_is_read() -> None:
    # The parser must see the edges that really exist (a broken walker passes everything).
    assert ("moescope.stats.snapshot", True) in {(t, top) for t, top in GRAPH["moescope.alerts"]}
    assert ("moescope.monitor", False) in GRAPH["moescope.stats.token_recorder"]
    assert all(t in MODULES for ts in GRAPH.values() for t, _ in ts)


def test_no_import_cycles() -> None:
    assert not _cycles(module_level=True), "module-level import cycles"
    cycles = list(_cycles())
    assert not cycles, f"import cycles (lazy imports included): {cycles}"


def test_no_upward_imports() -> None:
    bad = []
    for mod, targets in GRAPH.items():
        for t, _ in targets:
            if _layer(t) > _layer(mod) and (mod, t) not in ALLOWED_UPWARD:
                bad.append(f"{mod} -> {t}")
    assert not bad, "upward imports (see LAYERS):\n" + "\n".join(sorted(bad))


def test_allowed_upward_edges_still_exist() -> None:
    # An exception that no longer applies must be removed, not kept as a loophole.
    for mod, t in ALLOWED_UPWARD:
        assert t in {x for x, _ in GRAPH[mod]}, f"{mod} -> {t} is gone: drop it"


def test_report_imports_only_result_types_from_analysis() -> None:
    # report/ renders what analysis/ computed: it may name analysis' result types for the
    # type checker (under TYPE_CHECKING, not in GRAPH) and never runs analysis code.
    bad = [
        f"{mod} -> {t}"
        for mod, targets in GRAPH.items()
        if mod.startswith("moescope.report")
        for t, _ in targets
        if t.startswith("moescope.analysis")
    ]
    assert not bad, bad


def test_stats_and_capture_stay_below() -> None:
    # Spelled out because these are the easiest to break: stats never reads report or
    # analysis, capture never reads stats.
    for mod, targets in GRAPH.items():
        for t, _ in targets:
            if mod.startswith("moescope.stats."):
                assert not t.startswith(("moescope.report", "moescope.analysis")), (mod, t)
            if mod.startswith("moescope.capture"):
                assert not t.startswith("moescope.stats"), (mod, t)


def test_tests_import_conftest_helpers_at_module_top() -> None:
    """Inside a test function, ``conftest`` can resolve to tests/with_vllm/conftest.py or
    tests/with_engines/conftest.py (whichever pytest loaded last), so a helper import
    there breaks only in the full run. Import the helpers at module top."""
    import re

    tests = Path(__file__).resolve().parent
    bad = [
        f"{p.relative_to(tests)}:{i}"
        for p in sorted(tests.rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"\s+(from conftest import|import conftest)", line)
    ]
    assert not bad, f"import conftest helpers at module top: {bad}"

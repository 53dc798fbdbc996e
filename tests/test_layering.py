"""The package's layering, read from the source (AST only: nothing is imported).

- ``strategies/`` is the ground floor: it imports nothing from ``syncbench.experiments``,
  ``syncbench.sweeps`` or ``syncbench.analysis``;
- the two backends, ``experiments/sim`` and ``experiments/procs``, never import each other
  (what both need lives in the backend-neutral core under ``experiments/``);
- no import cycles between modules, counting imports inside functions;
- no product file over ``MAX_LINES`` lines (one concern per file).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "syncbench"
FOLDERS = ("experiments", "strategies", "sweeps", "analysis")  # installed as syncbench.<folder>
MAX_LINES = 600


def product_files() -> dict[str, Path]:
    """Module name -> file, for every product .py file (``syncbench.experiments.sim.engine``)."""
    modules: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [PACKAGE, *path.relative_to(REPO).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The product modules ``name`` imports anywhere in its file (top level, functions,
    ``TYPE_CHECKING`` blocks): ``from pkg import sub`` counts as ``pkg.sub`` when that is a module."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = product_files()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            strongconnect(v)
    return found


def edges_between(graph: dict[str, set[str]], source: str, target: str) -> list[str]:
    def inside(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return sorted(f"{m} -> {t}" for m, ts in graph.items() if inside(m, source) for t in ts if inside(t, target))


def test_strategies_import_nothing_above_them():
    graph = import_graph()
    above = [edge for layer in ("experiments", "sweeps", "analysis")
             for edge in edges_between(graph, f"{PACKAGE}.strategies", f"{PACKAGE}.{layer}")]
    assert not above, "strategies/ is the ground floor, yet imports:\n" + "\n".join(above)


def test_the_two_backends_never_import_each_other():
    graph = import_graph()
    sim, procs = f"{PACKAGE}.experiments.sim", f"{PACKAGE}.experiments.procs"
    crossing = edges_between(graph, sim, procs) + edges_between(graph, procs, sim)
    assert not crossing, ("a backend imports the other (move what both need into the core under "
                          "experiments/):\n" + "\n".join(crossing))


def test_no_import_cycles_counting_imports_inside_functions():
    graph = import_graph()
    found = cycles(graph)
    detail = []
    for component in found:
        members = set(component)
        detail.append("  " + ", ".join(component) + "\n" + "\n".join(
            f"      {m} -> {t}" for m in component for t in sorted(graph[m] & members)))
    assert not found, "import cycles between modules:\n" + "\n".join(detail)


def test_no_product_file_is_over_the_line_limit():
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines())
             for path in product_files().values()}
    over = sorted((n, f) for f, n in sizes.items() if n > MAX_LINES)
    assert not over, (f"product files over {MAX_LINES} lines (split them by concern): "
                      + ", ".join(f"{f} ({n})" for n, f in reversed(over)))


def test_the_graph_counts_imports_inside_functions_and_type_checking_blocks(tmp_path):
    """The checks above are only as good as the graph: an import inside a function, or under
    ``if TYPE_CHECKING:``, is an edge too."""
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from syncbench.sweeps.spec import Sweep\n"
                    "def f():\n    from syncbench.experiments import signals\n    import syncbench.analysis.stats\n")
    known = {"syncbench.experiments", "syncbench.experiments.signals", "syncbench.sweeps.spec", "syncbench.analysis.stats"}
    assert imported_modules("syncbench.x.mod", path, known) == {
        "syncbench.experiments.signals", "syncbench.sweeps.spec", "syncbench.analysis.stats"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

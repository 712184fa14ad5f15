"""quantkern's imports flow one way: no import cycle among its modules, and the lower layers import nothing
from the layers above them (``core`` nothing outside itself; ``algorithms`` nothing from ``kernels``,
``nn``, ``io`` or ``api``). The graph is built from the sources with ``ast``, without importing anything.

Module-level imports are those that run when a module is imported: top-level statements, also inside
``if`` / ``try`` / ``with`` blocks and class bodies, but not under ``if TYPE_CHECKING:`` nor inside
functions. Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so it counts as an import of ``a.b``
too (except from inside ``a.b`` itself, whose ``__init__`` is already running); importing a name that
``a.b``'s ``__init__`` defines (``from .. import __version__``) needs that ``__init__``, even from inside. Cycles are checked on
module-level imports; the layer rules on every import, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` for every ``.py`` file under ``root / package``."""
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _import_nodes(tree: ast.Module, module_level: bool):
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return

    def walk(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from walk(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                yield from walk(node.body)

    yield from walk(tree.body)


def import_graph(root: Path, package: str = "quantkern", module_level: bool = True) -> dict[str, set[str]]:
    """``{module: {modules of ``package`` it imports}}``."""
    mods = _modules(root, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod, (path, is_pkg) in mods.items():
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path)), module_level):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base = mod.split(".")[: None if is_pkg else -1]
                base = base[: len(base) - (node.level - 1)] + ([node.module] if node.module else [])
                base = ".".join(base)
            else:
                base = node.module
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
            targets |= subs
            if len(subs) < len(node.names):  # a name defined in base itself (``from .. import __version__``)
                targets.add(base)
        for t in targets:
            if t != package and not t.startswith(package + "."):
                continue
            t = known(t)
            if t != mod:  # what is imported, even the package this module is in
                graph[mod].add(t)
            parts = t.split(".")
            for i in range(1, len(parts)):  # a.b.c runs a.b's __init__ too: already running inside a.b
                name = ".".join(parts[:i])
                if name in mods and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(_cycle_in(graph, comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def _cycle_in(graph, comp: set[str]) -> list[str]:
    start = min(comp)
    path, seen = [start], {start}
    while True:  # every node of a strongly connected component has a successor inside it
        nxt = sorted(w for w in graph[path[-1]] if w in comp)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [w for w in nxt if w not in seen]
        step = fresh[0] if fresh else nxt[0]
        if step in seen:
            return path[path.index(step):] + [step]
        path.append(step)
        seen.add(step)


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_import_cycles_at_module_level():
    cycles = find_cycles(import_graph(ROOT))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer, forbidden", [
    ("quantkern.core", None),  # None: anything of quantkern outside the layer itself
    ("quantkern.algorithms", ("quantkern.kernels", "quantkern.nn", "quantkern.io", "quantkern.api")),
])
def test_lower_layers_do_not_import_upper_ones(layer, forbidden):
    graph = import_graph(ROOT, module_level=False)
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _under(m, layer) for t in ts
                 if (not _under(t, layer) and t != "quantkern" if forbidden is None
                     else any(_under(t, f) for f in forbidden)))
    assert not bad, f"{layer} imports from layers above it:\n" + "\n".join(bad)


def test_the_checks_see_cycles_and_layer_violations(tmp_path):
    """The graph builder itself: a cycle through a package __init__, a TYPE_CHECKING-only import and a
    function-level import (neither a module-level cycle), a lower layer importing an upper one."""
    files = {
        "pkg/__init__.py": "from .api import thing\n",
        "pkg/api/__init__.py": "from .front import thing\n",
        "pkg/api/front.py": "from ..io.save import save\nthing = 1\n",
        "pkg/io/__init__.py": "from .save import save\n",
        "pkg/io/save.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..core.x import y\n"
                          "def save():\n    from ..api import thing\n",
        "pkg/core/__init__.py": "",
        "pkg/core/x.py": "try:\n    from ..io import save\nexcept ImportError:\n    pass\ny = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.io.save"] == set()  # TYPE_CHECKING and function-level imports do not count
    assert find_cycles(graph) == []
    assert "pkg.io" in import_graph(tmp_path, "pkg", module_level=False)["pkg.core.x"]

    (tmp_path / "pkg/io/save.py").write_text("from ..api.front import thing\ndef save():\n    pass\n")
    cycles = find_cycles(import_graph(tmp_path, "pkg"))
    assert len(cycles) == 1 and set(cycles[0]) == {"pkg.api", "pkg.api.front", "pkg.io", "pkg.io.save"}, cycles
    assert cycles[0][0] == cycles[0][-1]

    (tmp_path / "pkg/io/save.py").write_text("from .. import thing\n")  # a name of the package being imported
    cycles = find_cycles(import_graph(tmp_path, "pkg"))
    assert len(cycles) == 1 and "pkg" in cycles[0], cycles
    (tmp_path / "pkg/io/save.py").write_text("from .. import core\n")  # a submodule: no need of pkg's names
    assert find_cycles(import_graph(tmp_path, "pkg")) == []


def test_export_rules_import_no_exporter():
    """The format rules say what a format can store without importing the writers (io/awq, io/compressed,
    io/gguf_export, io/save), so checking a plan never loads an exporter."""
    graph = import_graph(ROOT, module_level=False)  # imports inside functions count too
    writers = {"quantkern.io.awq", "quantkern.io.compressed", "quantkern.io.compressed_act",
               "quantkern.io.gguf_export", "quantkern.io.save"}
    assert not graph["quantkern.io.export_rules"] & writers, graph["quantkern.io.export_rules"]

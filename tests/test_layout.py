"""The package layout: no import cycles, and each room imports only the rooms below it.

Every module of the package (``moepass/``, with ``moepass/lowering/`` and
``moepass/kernels/``) is parsed with
``ast``; an import anywhere in a module (also inside a function) is an edge,
except imports under ``if TYPE_CHECKING:``, which never run.  The rules are
the ones each subpackage's docstring states; docs/architecture.md ("Layout") draws them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (("moepass", "moepass"),)

#: room -> the rooms its modules may import ("root" is the ``moepass`` package itself, the public facade).
MAY_IMPORT: dict[str, set[str]] = {
    "compiler": {"runtime", "policies", "lowering", "quantize"},
    "runtime": {"policies", "lowering", "quantize"},
    "policies": set(),
    "quantize": set(),
    "reports": {"compiler", "runtime", "policies"},
    "exports": {"compiler", "runtime", "policies", "lowering", "quantize"},
    "bundled": {"compiler", "runtime", "policies", "quantize", "root"},
    "lowering": {"runtime", "kernels", "quantize"},
    "kernels": {"runtime", "zoo"},
    "zoo": {"compiler", "runtime", "policies", "quantize", "reports", "exports", "bundled", "lowering", "kernels", "root"},
    "cli": {
        "compiler", "runtime", "policies", "quantize", "reports", "exports", "bundled", "lowering", "kernels", "zoo", "root",
    },
    "root": {"compiler", "runtime", "policies", "quantize", "reports", "exports"},
}
#: Modules every room may import: the block description the compiler hands the rest (the
#: contract: specs and the lifted elementwise programs they carry), and the version.
SHARED = {"moepass.compiler.spec", "moepass.compiler.lifted", "moepass._version"}
#: Single modules a room may import beyond its rooms.
ALSO: dict[str, set[str]] = {
    # policies are built on the routing primitives (rank, weigh); the ops call the policies
    "policies": {"moepass.runtime.routing"},
    # the lowerings raise the exports' errors; the ONNX fusion reads example values off graphs
    "lowering": {"moepass.exports.errors", "moepass.compiler.dataflow"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports (the longest known module of each imported name)."""

    def known(name: str) -> str | None:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
    while stack:
        for node in ast.iter_child_nodes(stack.pop()):
            if _is_type_checking(node):
                continue
            stack.append(node)
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")
                    if path.name != "__init__.py":
                        parts.pop()
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for name in names:
                if name == "moepass" or name.startswith("moepass."):
                    target = known(name)
                    if target and target != module:
                        found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    modules = _modules()
    result = nx.DiGraph()
    for module, path in modules.items():
        result.add_node(module)
        result.add_edges_from((module, target) for target in _imported(module, path, modules))
    return result


def room(module: str) -> str:
    """``moepass.compiler.detect.router`` -> ``compiler``; the package itself is ``root``."""
    parts = module.split(".")
    return "root" if len(parts) == 1 else parts[1]


def test_the_scanner_sees_lazy_imports_and_skips_type_checking_ones(graph):
    """The graph the rules are checked on is the real one (so the tests below can fail)."""
    assert graph.has_edge("moepass.compiler.stages", "moepass.compiler.rewrite")
    # a function-level import counts (InspectionReport.save imports the HTML writer) ...
    assert graph.has_edge("moepass.reports.inspection", "moepass.reports.html_report")
    # ... an import only for annotations does not (the HTML writer names InspectionReport in them)
    assert not graph.has_edge("moepass.reports.html_report", "moepass.reports.inspection")
    assert graph.has_edge("moepass.runtime.ops", "moepass.lowering")
    assert len(graph) > 100


def test_no_import_cycles(graph):
    cycles = sorted(" -> ".join([*cycle, cycle[0]]) for cycle in nx.simple_cycles(graph, length_bound=8))
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:20])


def test_every_module_is_in_a_room(graph):
    unknown = sorted(m for m in graph if room(m) not in MAY_IMPORT and m not in SHARED)
    assert not unknown, f"modules outside the rooms (put them in a subpackage, see docs/architecture.md, 'Layout'): {unknown}"


def test_imports_follow_the_rooms(graph):
    wrong = []
    for source, target in graph.edges:
        here, there = room(source), room(target)
        if here == there or target in SHARED or target in ALSO.get(here, set()):
            continue
        if there not in MAY_IMPORT.get(here, set()):
            wrong.append(f"{source} imports {target} ({here} may import {sorted(MAY_IMPORT.get(here, ()))})")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(wrong))


def test_nothing_imports_the_command_line(graph):
    assert all("cli" not in rooms for name, rooms in MAY_IMPORT.items() if name != "cli")
    users = sorted(s for s, t in graph.edges if room(t) == "cli" and room(s) != "cli")
    assert not users, f"the library imports the command line: {users}"


def test_no_folder_of_the_checkout_shadows_an_installed_package():
    """From the checkout's root (``python -m``, pytest) a top-level folder is importable by its name.

    transformers >= 5.25 imports the ``kernels`` distribution; a ``kernels/`` package at the root
    was found first and broke every import of transformers.  Each folder at the root whose name an
    installed distribution also provides must resolve to that distribution, not to the checkout.
    """
    import importlib.metadata
    import importlib.util
    import subprocess
    import sys

    provided = importlib.metadata.packages_distributions()
    assert provided, "no installed distribution reports its top-level names: the check below would see nothing"
    clashes = []
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()):
        if (folder / "__init__.py").exists() and folder.name != "moepass":
            clashes.append(f"{folder.name}/ is a package at the checkout's root: it would shadow any `{folder.name}`")
        if folder.name not in provided:
            continue
        # a fresh interpreter started in the root, as `python -m pytest` is
        probe = "import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); print(s.origin or list(s.submodule_search_locations or []))"
        origin = subprocess.run(
            [sys.executable, "-c", probe, folder.name], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        if str(ROOT) in origin and str(ROOT / "moepass") not in origin:
            clashes.append(f"`import {folder.name}` from the root resolves to {origin}, not to {provided[folder.name]}")
    assert not clashes, "\n".join(clashes)

"""What importing wmhqc_lib does to the process (the slow and unused import it skips), and the
library's import structure: floors that only import downwards, and no import circles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PROBE = """
import json, sys
{first}
import wmhqc_lib
import nbformat, plotly.io
plotly.io.renderers  # what a notebook's first figure loads: nbformat, then jsonschema
nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]))
print(json.dumps({{"jsonschema": "jsonschema" in sys.modules,
                  "rfc3987_syntax": repr(sys.modules.get("rfc3987_syntax"))}}))
"""


def _probe(first: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_plotly_and_notebook_validation_load_without_the_iri_parser():
    seen = _probe()
    assert seen["jsonschema"] and seen["rfc3987_syntax"] == "None"


def test_a_process_that_loaded_jsonschema_first_keeps_its_iri_checks():
    seen = _probe("import jsonschema")
    assert seen["rfc3987_syntax"].startswith("<module 'rfc3987_syntax'")


# ---------------------------------------------------------------------------------------------
# Import structure, read statically with ast (no module is executed).

LIBRARY = Path(__file__).resolve().parents[1] / "wmhqc_lib"

#: Floors, lowest first: a module may import modules of its own floor or of lower ones only.
#: Modules directly in the package other than these (cli.py, __init__.py) are on top.
FLOORS = {"config": 0, "overlap": 0, "data": 1, "nets": 2, "qc": 3, "study": 4, "deploy": 5}
TOP = max(FLOORS.values()) + 1


@dataclass(frozen=True)
class Edge:
    """One import of a library module by another, with where it is written."""

    source: str
    target: str
    path: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.path.name}:{self.line}: {self.text})"


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted name of every module under the package directory ``root`` (packages by their
    ``__init__.py``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _deepest(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the library (None outside it)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def import_edges(root: Path) -> list[Edge]:
    """Every import of one library module by another, at any depth of the code (inside
    functions and ``if TYPE_CHECKING`` too), relative imports resolved. ``from . import x`` and
    ``from .x import y`` import module ``x`` (``x.y`` when ``y`` is a module itself)."""
    modules = _module_names(root)
    edges = []
    for source, path in modules.items():
        code = path.read_text()
        lines = code.splitlines()
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        for node in ast.walk(ast.parse(code, filename=str(path))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    if node.level - 1 >= len(base_parts):
                        raise AssertionError(f"{path}:{node.lineno}: relative import beyond "
                                             f"the top of {root.name}")
                    base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names]
            else:
                continue
            text = lines[node.lineno - 1].strip()
            for name in dict.fromkeys(wanted):
                target = _deepest(name, modules)
                if target is not None and target != source:
                    edges.append(Edge(source, target, path, node.lineno, text))
    return edges


def floor(module: str) -> int:
    """The floor of a dotted module name: its subpackage's, or that of a top-level module."""
    parts = module.split(".")
    return FLOORS.get(parts[1], TOP) if len(parts) > 1 else TOP


def upward_imports(edges: list[Edge]) -> list[Edge]:
    """Imports of a module on a higher floor than the importer's."""
    return [e for e in edges if floor(e.target) > floor(e.source)]


def import_circles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def _circle_report(edges: list[Edge], circles: list[list[str]]) -> str:
    """Each circle's modules and the import lines that close it."""
    parts = []
    for circle in circles:
        inside = [str(e) for e in edges if e.source in circle and e.target in circle]
        parts.append("circle " + " <-> ".join(circle) + ":\n    " + "\n    ".join(inside))
    return "\n".join(parts)


def test_library_modules_import_only_their_own_floor_or_lower():
    edges = import_edges(LIBRARY)
    assert len(edges) > 20, "the parser found too few imports to be reading the library"
    bad = upward_imports(edges)
    assert not bad, ("modules import a higher floor (floors, lowest first: config and overlap < "
                     "data < nets < qc < study < deploy < cli and the package itself):\n  "
                     + "\n  ".join(map(str, bad)))


def test_library_modules_import_no_circle():
    edges = import_edges(LIBRARY)
    circles = import_circles(edges)
    assert not circles, "modules import each other in a circle:\n" + _circle_report(edges, circles)


def test_overlap_imports_nothing_from_the_library():
    """overlap.py is on the lowest floor so that data/ and nets/ can measure Dice."""
    assert [e for e in import_edges(LIBRARY) if e.source == "wmhqc_lib.overlap"] == []


@pytest.fixture
def tangled(tmp_path: Path) -> Path:
    """A small package with an upward import inside a function and a relative circle."""
    root = tmp_path / "wmhqc_lib"
    for sub in ("data", "qc", "study"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "overlap.py").write_text("import numpy\n")
    (root / "data" / "prep.py").write_text(
        "from ..overlap import dice\n\ndef f():\n    from ..qc.metrics import dice\n")
    (root / "qc" / "metrics.py").write_text("from ..overlap import dice\n")
    (root / "study" / "a.py").write_text("from . import b\n")
    (root / "study" / "b.py").write_text("def g():\n    from .c import h\n")
    (root / "study" / "c.py").write_text("import wmhqc_lib.study.a\n")
    return root


def test_the_checks_find_an_upward_import_inside_a_function(tangled: Path):
    bad = upward_imports(import_edges(tangled))
    assert [str(e) for e in bad] == [
        "wmhqc_lib.data.prep -> wmhqc_lib.qc.metrics (prep.py:4: from ..qc.metrics import dice)"]


def test_the_checks_find_a_circle_through_relative_and_absolute_imports(tangled: Path):
    edges = import_edges(tangled)
    circles = import_circles(edges)
    assert circles == [["wmhqc_lib.study.a", "wmhqc_lib.study.b", "wmhqc_lib.study.c"]]
    report = _circle_report(edges, circles)
    assert "b.py:2: from .c import h" in report and "c.py:1: import wmhqc_lib.study.a" in report

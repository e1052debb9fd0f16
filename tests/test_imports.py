"""The package's layers (ARCHITECTURE.md): no import cycle between modules or packages, and no import upward.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` at any depth (function-level
and ``TYPE_CHECKING`` imports included, relative ones resolved), so a lazy import cannot hide a cycle. ``from P import
m`` where ``P.m`` is a module is an edge to ``P.m``; importing a module of another package is an edge to that
package's ``__init__`` too (Python runs it first), while a module's own packages' ``__init__`` files are left out (they
run before it anyway, and re-exporting a package's names from its ``__init__`` is no cycle). Importing by a string
(``importlib.import_module``) is not seen.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "gptqlora"

# ARCHITECTURE.md's layers, bottom up: a module or package may import its own package and lower layers only. The
# longest matching prefix decides (so a module may sit apart from its package); every module must match one.
LAYER = {
    "gptqlora": 0,  # the package's __init__: the version and lazy public names
    "gptqlora.errors": 0, "gptqlora.hardware": 0, "gptqlora.files": 0,
    "gptqlora.config": 1, "gptqlora.targets": 1, "gptqlora.distributed": 1,
    "gptqlora.data": 2, "gptqlora.quant": 2,
    "gptqlora.models": 3, "gptqlora.provenance": 3, "gptqlora.lora": 3, "gptqlora.loss": 3,
    "gptqlora.eval": 4, "gptqlora.train": 4,
    "gptqlora.verifier": 5,
    "gptqlora.context": 6, "gptqlora.session": 6, "gptqlora.workflows": 6,
    "gptqlora.commands": 7,
    "gptqlora.cli": 8,
}
COMMANDS = "gptqlora.commands"
# Edges between two packages of one layer that the layering allows: (importer, imported).
SAME_LAYER = {
    ("gptqlora.files", "gptqlora.errors"), ("gptqlora.hardware", "gptqlora.errors"),  # layer 0 knows the errors
    ("gptqlora.config", "gptqlora.targets"),  # the option groups validate target specs with their grammar
    ("gptqlora.lora", "gptqlora.provenance"),  # an adapter records and checks the base it was trained on
    ("gptqlora.workflows", "gptqlora.context"),  # a job runs in the run's context (its device, world and output)
}


# ---------------------------------------------------------------------------------------------- the graph

def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    found = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The modules of ours that one import statement names, resolved as Python resolves them."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, one level up per extra dot
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:  # "import a.b.c" of a namespace package resolves to its deepest module
            name = name.rpartition(".")[0]
        parts = name.split(".")
        for n in range(1, len(parts) + 1):  # the module, and the packages Python runs before it that are not ours
            dotted = ".".join(parts[:n])
            if dotted in known and dotted != module and (n == len(parts) or not module.startswith(dotted + ".")):
                out.append(dotted)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, lazy imports included."""
    known = modules(src)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            graph[module].update(_imported(node, module, is_package, known))
    return graph


def package_of(module: str) -> str:
    """The unit of the package-level checks: ``gptqlora.X`` (``gptqlora`` itself for the package's __init__)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> the other packages it imports (``package_of`` each side)."""
    out: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        out[package_of(a)].update(package_of(b) for b in targets if package_of(b) != package_of(a))
    return dict(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def layer_key(module: str) -> str | None:
    """The entry of ``LAYER`` that places ``module``: its longest matching prefix."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER:
            return ".".join(parts[:n])
    return None


def _allowed(a: str, b: str) -> bool:
    """Whether module ``a`` may import module ``b`` (see ``LAYER``, ``SAME_LAYER``, ``COMMANDS``)."""
    ka, kb = layer_key(a), layer_key(b)
    if package_of(a) == package_of(b):
        if package_of(a) == COMMANDS:  # the registry lists every command; a command imports no other
            return a == COMMANDS
        return LAYER[kb] <= LAYER[ka]
    return LAYER[kb] < LAYER[ka] or (package_of(a), package_of(b)) in SAME_LAYER


def layer_violations(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """Edges that go up a layer, sideways between two packages of one layer, or from one command to another.

    Returns:
        (importing package, imported package) -> the module edges ``"a -> b"`` behind it.
    """
    bad: dict[tuple[str, str], list[str]] = defaultdict(list)
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if not _allowed(a, b):
                bad[(package_of(a), package_of(b))].append(f"{a} -> {b}")
    return dict(bad)


# ---------------------------------------------------------------------------------------------- the checks

@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_graph_sees_lazy_relative_and_conditional_imports(tmp_path):
    g = import_graph(_tree(tmp_path, {
        "gptqlora/__init__.py": "",
        "gptqlora/a.py": "def f():\n    from gptqlora.sub import b\n",
        "gptqlora/sub/__init__.py": "from . import b\n",
        "gptqlora/sub/b.py": "from ..a import f\nimport gptqlora.sub.c\n",
        "gptqlora/sub/c.py": "if True:\n    from gptqlora import a\n"}))
    assert g == {"gptqlora": set(), "gptqlora.a": {"gptqlora.sub", "gptqlora.sub.b"}, "gptqlora.sub": {"gptqlora.sub.b"},
                 "gptqlora.sub.b": {"gptqlora.a", "gptqlora.sub.c"}, "gptqlora.sub.c": {"gptqlora.a"}}
    assert cycles(g) == [["gptqlora.a", "gptqlora.sub", "gptqlora.sub.b", "gptqlora.sub.c"]]
    assert cycles(package_graph(g)) == [["gptqlora.a", "gptqlora.sub"]]


def test_a_package_init_that_imports_its_importer_lazily_is_a_cycle(tmp_path):
    """The shape quant/kernels had: the layer imports a backend, the backends' __init__ imports the layer."""
    g = import_graph(_tree(tmp_path, {
        "gptqlora/__init__.py": "",
        "gptqlora/q/kernels/__init__.py": "def set_kernel():\n    from gptqlora.q.linear import Linear\n",
        "gptqlora/q/kernels/dense.py": "",
        "gptqlora/q/linear.py": "from gptqlora.q.kernels import dense\n"}))
    assert cycles(g) == [["gptqlora.q.kernels", "gptqlora.q.linear"]]


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if layer_key(m) is None] == []


def test_no_cycle_between_modules(graph):
    assert cycles(graph) == []


def test_no_cycle_between_packages(graph):
    assert cycles(package_graph(graph)) == []


def test_every_import_goes_down_a_layer(graph):
    """Each edge goes to a lower layer, or stays within its package; commands never import each other."""
    assert layer_violations(graph) == {}


@pytest.mark.process  # a fresh interpreter: this one has imported everything already
def test_importing_the_package_imports_triton_only_if_transformers_does():
    """Triton's interpreter mode (its CPU tests: tests/quant/kernels) is read at its first import, so no module of
    ours may import it at import time, as transformers.modeling_layers does: only the backend that runs triton
    kernels does, at first use."""
    import os
    import subprocess
    import sys

    probe = ("import importlib, pkgutil, sys, transformers, gptqlora; before = 'triton' in sys.modules\n"
             "for m in pkgutil.walk_packages(gptqlora.__path__, 'gptqlora.'):\n"
             "    if 'triton' not in m.name: importlib.import_module(m.name)\n"
             "print(before, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.stdout.split()[-2:] in (["False", "False"], ["True", "True"]), out.stdout

"""Architecture: imports go one way through the layers of the package (issue 13).

Every module of the package is parsed (imports inside functions count: a lazy import is still a
dependency) and mapped to its node: a subpackage (``io``, ``xray``, ...) or a top-level module
(``config``, ``cli``, ...).  An import from a node to a node of the same or a higher layer fails,
as does any cycle between nodes, a loose top-level module other than the four allowed, a node
missing from the layer table, and gemmi outside ``io``.  The checker is run on synthetic import
graphs first, so that the test can be seen to fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxrefine"

# Layer of each node, from the bottom.  A node may import nodes of a lower layer only.
LAYER = {
    "errors": 0,
    "core": 1,  # cell, symmetry, hkl, bins; plain containers io fills (numpy only)
    "config": 2,
    "io": 3,  # the only place gemmi lives: files in, arrays out, arrays back to files
    "xray": 4, "restraints": 4,  # pure JAX energies; never import each other
    "problem": 5,  # Params, Problem, setup, the X-ray state fit
    "refine": 6,  # energy, optimiser, weights, macrocycle loop, outputs
    "validate": 7,  # maps, RSCC, register scan, omit, waters (between-cycle actions)
    "fleet": 8, "demo": 8,
    "commands": 9,
    "cli": 10,
}
# pure layers: no files, no gemmi, no configuration: only errors and the core arrays below them
PURE = {"xray": {"errors", "core"}, "restraints": {"errors", "core"}}
TOP_LEVEL_MODULES = {"__init__", "cli", "config", "errors"}  # everything else lives in a folder
GEMMI_NODES = {"io"}


def node_of(module: str) -> str | None:
    """'jaxrefine.xray.fmodel' -> 'xray'; 'jaxrefine.cli' -> 'cli'; 'jaxrefine' -> '__init__'."""
    parts = module.split(".")
    if parts[0] != "jaxrefine":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imported(tree: ast.AST, module: str, is_package: bool):
    """Absolute names imported anywhere in a module (function bodies included)."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            yield from (a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (n.level - 1)]
                full = ".".join(base + ([n.module] if n.module else []))
            else:
                full = n.module or ""
            yield full
            if not n.module:  # "from . import x": x may be a subpackage
                yield from (f"{full}.{a.name}" for a in n.names)


def package_graph(root: Path = PACKAGE):
    """(edges {node: {node: [module, ...]}}, nodes, gemmi users {node: [module, ...]}) of the package."""
    edges, nodes, gemmi = {}, set(), {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        here = node_of(module) if module != "jaxrefine" else "__init__"
        nodes.add(here)
        for target in _imported(ast.parse(path.read_text(), str(path)), module, is_package):
            if target.split(".")[0] == "gemmi":
                gemmi.setdefault(here, []).append(module)
            there = node_of(target)
            if there and there not in (here, "__init__") and _exists(root, there):
                edges.setdefault(here, {}).setdefault(there, []).append(module)
    return edges, nodes, gemmi


def _exists(root: Path, node: str) -> bool:
    return (root / node).is_dir() or (root / f"{node}.py").exists()


def layer_violations(edges: dict, layer: dict = LAYER, pure: dict = PURE) -> list:
    """One line per import that goes against the layer order (``__init__`` may import anything)."""
    out = []
    for src, targets in sorted(edges.items()):
        if src == "__init__":
            continue
        for dst, modules in sorted(targets.items()):
            if src not in layer or dst not in layer:
                missing = src if src not in layer else dst
                out.append(f"{missing}: not in the layer table of tests/test_layers.py (give it a layer)")
            elif src in pure and dst not in pure[src]:
                out.append(f"{src} -> {dst} ({modules[0]}): {src} is a pure layer and may import only {sorted(pure[src])}")
            elif layer[dst] >= layer[src]:
                out.append(f"{src} -> {dst} ({modules[0]}): layer {layer[src]} imports layer {layer[dst]}")
    return out


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one node (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


# ----------------------------------------------------------------------------- the checker itself
def test_checker_finds_bad_graphs():
    """The checks fail on synthetic graphs with an upward import, a pure-layer import of io, an
    xray <-> restraints import, a cycle and an unknown node, and pass on a clean one."""
    clean = {"refine": {"problem": ["m"], "xray": ["m"]}, "problem": {"io": ["m"], "restraints": ["m"]}, "io": {"core": ["m"]}}
    assert layer_violations(clean) == [] and cycles(clean) == []
    assert any("layer 6 imports layer 7" in v for v in layer_violations({"refine": {"validate": ["jaxrefine.refine.x"]}}))
    assert any("pure layer" in v for v in layer_violations({"xray": {"io": ["jaxrefine.xray.fmodel"]}}))
    assert any("pure layer" in v for v in layer_violations({"xray": {"restraints": ["m"]}}))
    assert any("not in the layer table" in v for v in layer_violations({"workflows": {"io": ["m"]}}))
    assert cycles({"refine": {"validate": ["a"]}, "validate": {"problem": ["b"]}, "problem": {"refine": ["c"]}}) == [
        ["problem", "refine", "validate"]]


def test_checker_reads_lazy_and_relative_imports(tmp_path):
    """A lazy relative import inside a function is found and mapped to its folder."""
    pkg = tmp_path / "jaxrefine"
    (pkg / "xray").mkdir(parents=True)
    (pkg / "io").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "xray" / "__init__.py").write_text("")
    (pkg / "xray" / "fmodel.py").write_text("def f():\n    from ..io.mask import solvent_mask\n    import gemmi\n")
    edges, nodes, gemmi = package_graph(pkg)
    assert edges == {"xray": {"io": ["jaxrefine.xray.fmodel"]}} and gemmi == {"xray": ["jaxrefine.xray.fmodel"]}
    assert layer_violations(edges)


# ----------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph():
    return package_graph()


def test_imports_follow_the_layers(graph):
    edges, _, _ = graph
    assert layer_violations(edges) == []


def test_no_import_cycles_between_folders(graph):
    edges, _, _ = graph
    assert cycles(edges) == []


def test_every_node_has_a_layer(graph):
    _, nodes, _ = graph
    assert sorted(nodes - set(LAYER) - {"__init__"}) == []


def test_top_level_shows_the_architecture():
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert sorted(loose - TOP_LEVEL_MODULES) == [], "move loose top-level modules into the folder of their layer"


def test_gemmi_only_in_io(graph):
    _, _, gemmi = graph
    assert sorted(set(gemmi) - GEMMI_NODES) == [], gemmi

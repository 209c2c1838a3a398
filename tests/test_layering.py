"""The import rule of DESIGN.md: spec core → runtime → passes → compile driver → CLI, imports only
downward (or within a layer), no cycles, and no project import hidden inside a function."""
import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("echoc", "passes", "runtime")
CORE_PREFIXES = ("echoc.spec", "echoc.yaml")   # echoc.spec, echoc.spec_io, echoc.spec_types, echoc.yaml_loader
CORE = {"echoc", "echoc.errors"}
CLI = {"echoc.cli", "echoc.__main__"}


def layer(module: str) -> int:
    """0 core, 1 runtime, 2 passes, 3 compile driver, 4 CLI."""
    if module in CORE or module.startswith(CORE_PREFIXES):
        return 0
    if module in CLI:
        return 4
    return {"runtime": 1, "passes": 2, "echoc": 3}[module.split(".")[0]]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement."""
    found = []
    scopes = [(tree, False)]
    while scopes:
        node, in_fn = scopes.pop()
        for child in ast.iter_child_nodes(node):
            nested = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in child.names] + [base]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES:
                    found.append((_resolve(name), child.lineno, in_fn))
            scopes.append((child, nested))
    return found


def _resolve(name: str) -> str:
    """`from runtime import comm` names runtime.comm; `from runtime.model import MoE` names runtime.model."""
    parts = name.split(".")
    while parts:
        candidate = ROOT.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return name


def import_graph() -> tuple[nx.DiGraph, list[str]]:
    graph, hidden = nx.DiGraph(), []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = module_name(path)
            graph.add_node(module)
            tree = ast.parse(path.read_text(), str(path))
            for target, line, in_fn in project_imports(tree, module, path.name == "__init__.py"):
                if in_fn:
                    hidden.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
                if target != module and target not in PACKAGES:   # a package's empty __init__ is no edge
                    graph.add_edge(module, target, line=line)
    return graph, hidden


def test_no_upward_import():
    graph, _ = import_graph()
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}) at line {d['line']}"
              for a, b, d in graph.edges(data=True) if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycle():
    graph, _ = import_graph()
    assert list(nx.simple_cycles(graph)) == []


def test_no_project_import_inside_a_function():
    _, hidden = import_graph()
    assert hidden == []


@pytest.mark.parametrize("source,expected", [
    ("def f():\n    from runtime import comm\n", True),
    ("from runtime import comm\n", False),
])
def test_the_checker_sees_hidden_imports(source, expected):
    found = project_imports(ast.parse(source), "passes.x", False)
    assert found and found[0][0] == "runtime.comm" and found[0][2] is expected


def test_the_checker_sees_an_upward_import():
    targets = {t for t, _, _ in project_imports(ast.parse("from echoc.compile import Build\n"), "runtime.x", False)}
    target, = targets
    assert target == "echoc.compile" and layer(target) > layer("runtime.x")
    assert layer("runtime.model") < layer("passes.buffer_plan") < layer("echoc.compile") < layer("echoc.cli")
    assert layer("echoc.spec") == layer("echoc.spec_io") == layer("echoc.errors") == 0

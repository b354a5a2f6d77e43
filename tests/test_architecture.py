"""The package's shape: no import cycles, one place that reads pickles, one place that builds networks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "plca"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for type hints only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every plca module ``path`` imports at run time, at module level or inside functions
    (``from a import b`` counts as ``a.b`` when that is a module, else ``a``)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    known = set(modules())
    graph = {name: imports_of(path, known) for name, path in modules().items()}
    # importing a submodule runs its parents' __init__ first; that is not a dependency of the child
    return {name: {dep for dep in deps if dep != name and not name.startswith(dep + ".")} for name, deps in graph.items()}


def test_no_import_cycles_in_the_package():
    assert find_cycle(package_graph()) is None, " -> ".join(find_cycle(package_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def calls_in(path: Path, name: str) -> int:
    count = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == name:
                count += 1
    return count


def test_one_torch_load_call_site():
    sites = {name: calls_in(path, "load") for name, path in modules().items()}
    torch_loads = {name for name, path in modules().items()
                   if "torch.load(" in path.read_text().replace("``torch.load(", "")}
    assert torch_loads == {"plca.serialization"}, torch_loads
    assert sites["plca.serialization"] >= 1


def test_networks_are_assembled_in_one_place():
    builders = {name for name, path in modules().items()
                if calls_in(path, "create_backbone") or calls_in(path, "create_head")}
    assert builders == {"plca.models.segmentor"}, builders
    direct = {name for name, path in modules().items() if calls_in(path, "Segmentor")}
    assert direct == {"plca.models.segmentor"}, direct


# a string that names a backbone or a family of them (resnet18, mit_b0, efficientnet_lite0, timm:...)
BACKBONE_NAME = re.compile(r"resnet|mit_b|efficientnet|timm:", re.IGNORECASE)


def backbone_name_tests(source: str) -> list[str]:
    """Where ``source`` tests a value against a backbone name: ``x == "resnet18"``, ``x in ("mit_b0", ...)``,
    ``x.startswith("resnet")``; docstrings, comments, messages and help text are not tests."""
    def named(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(element) for element in node.elts)
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(BACKBONE_NAME.search(node.value))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(named(side) for side in (node.left, *node.comparators)):
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith", "removeprefix", "partition")
              and any(named(arg) for arg in node.args)):
            found.append((node.lineno, ast.unparse(node)))
    return [f"line {line}: {code}" for line, code in sorted(found)]


def test_the_finder_finds_backbone_name_tests():
    source = ('"""resnet101 is the default."""\n'
              'a = name.startswith("resnet")  # resnet\n'
              'b = name == "mit_b5" or name in ("efficientnet_lite0", "x")\n'
              'c = name.partition("timm:")\n'
              'd = error(f"backbone {name} is not resnet101")\n'
              'e = name == "resnet"\n')
    found = backbone_name_tests(source)
    assert sorted({line.split(":")[0] for line in found}) == ["line 2", "line 3", "line 4", "line 6"], found


def test_no_module_outside_models_tests_a_backbone_name():
    """Outside :mod:`plca.models` code asks the registry (contracts, resolved_style, identify_weights)."""
    found = {name: tests for name, path in modules().items()
             if not (name == "plca.models" or name.startswith("plca.models."))
             if (tests := backbone_name_tests(path.read_text()))}
    assert found == {}, found

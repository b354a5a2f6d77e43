"""The package's shape: no import cycles, one place that reads pickles, one place that builds networks,
no function too long to read on a screen or two."""

from __future__ import annotations

import ast
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


#: The most lines a function or method may span (``def`` line to its last line, docstring included).
MAX_FUNCTION_LINES = 80
#: Argument-parser tables: one ``add_argument`` per option, read as a table rather than as a story.
PARSER_TABLES = {"plca/cli.py:build_parser"}


def functions_in(tree: ast.AST, prefix: str = ""):
    """``(qualified name, node)`` of every function and method, nested ones too (``Class.method.inner``)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from functions_in(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from functions_in(child, f"{prefix}{child.name}.")
        else:
            yield from functions_in(child, prefix)


def long_functions(limit: int) -> dict[str, int]:
    """``'plca/path.py:qualified.name'`` -> its number of lines, for each function longer than ``limit``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent).as_posix()
        for name, node in functions_in(ast.parse(path.read_text())):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found[f"{where}:{name}"] = lines
    return found


def test_no_function_is_longer_than_80_lines():
    too_long = {name: lines for name, lines in long_functions(MAX_FUNCTION_LINES).items() if name not in PARSER_TABLES}
    assert not too_long, (f"over {MAX_FUNCTION_LINES} lines (split them into named steps): "
                          + ", ".join(f"{name} ({lines})" for name, lines in sorted(too_long.items())))


def test_the_length_check_sees_methods_and_nested_functions():
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n\ndef h():\n    pass\n")
    assert [name for name, _ in functions_in(tree)] == ["A.f", "A.f.g", "h"]
    assert set(PARSER_TABLES) <= set(long_functions(0)), "an allowed parser table no longer exists"

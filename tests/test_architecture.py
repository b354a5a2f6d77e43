"""The package's shape: layers that import only downwards, no import cycles, one place that reads
pickles, one place that builds networks, no function too long to read on a screen or two."""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
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
            if isinstance(child, ast.If) and getattr(child.test, "id",
                                                     getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(path: Path, known: set[str], type_checking: bool = False) -> set[str]:
    """Every plca module ``path`` imports at run time, at module level or inside functions
    (``from a import b`` counts as ``a.b`` when that is a module, else ``a``); with
    ``type_checking`` also those under ``if TYPE_CHECKING:``."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if type_checking else _runtime_nodes(tree)):
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


def package_graph(type_checking: bool = False) -> dict[str, set[str]]:
    known = set(modules())
    graph = {name: imports_of(path, known, type_checking) for name, path in modules().items()}
    # importing a submodule runs its parents' __init__ first; that is not a dependency of the child
    return {name: {dep for dep in deps if dep != name and not name.startswith(dep + ".")}
            for name, deps in graph.items()}


def test_no_import_cycles_in_the_package():
    assert find_cycle(package_graph()) is None, " -> ".join(find_cycle(package_graph()))


def test_no_import_cycles_with_the_type_checking_imports():
    """An import needed only for a type hint is still a dependency: no cycle through one either."""
    graph = package_graph(type_checking=True)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


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


# ---------------------------------------------------------------------------------------------- layers

#: The package's layers, lowest first. A module may import modules of its own layer or of lower
#: ones, never of a higher one; imports under ``if TYPE_CHECKING:`` count. A package stands for all
#: its modules; ``plca`` is the root ``__init__`` alone. Every module must fall in a layer, so a new
#: top-level module is placed here on purpose.
LAYERS: tuple[tuple[str, ...], ...] = (
    # file helpers (atomic writes, flatten), the one reader of pickles, plain data -> dataclasses, the plugin
    # loader: they import nothing of plca
    ("plca.files", "plca.serialization", "plca.version", "plca.dataclass_reader", "plca.plugins"),
    # dataset formats, label maps, transforms, checks of the files
    ("plca.data",),
    # networks (backbones, heads, weights); pure loss functions; the root re-exports the loss API
    ("plca.models", "plca.losses", "plca"),
    # metrics, protocols and the evaluation pass: a library of data, models and losses, below the
    # methods (which may use its metrics) and the engine (which evaluates during training)
    ("plca.evaluation",),
    # what a training step computes (source-only, PLCA, self-training and its add-ons)
    ("plca.methods",),
    # the loop, devices, checkpoints, logging; the config (checked against the registries of data,
    # models, methods and engine.optim; run_dir and the trainer read it); loading a trained model
    # for inference (the config and models) and segmenting whole images with it
    ("plca.engine", "plca.config", "plca.inference", "plca.prediction"),
    # the commands' implementations: evaluate, predict, export, prepare, report, sweep, weights, demo
    ("plca.tools", "plca.demo"),
    # the Python inference API (plca.load_model, plca.segment): the tools' loading and inference, as functions
    ("plca.api",),
    # argument parsing and error reporting; the console command around it (names a missing extra)
    ("plca.cli", "plca.console"),
)

#: ``(importer, imported)`` edges allowed against the layer rule, each with the reason.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("plca", "plca.api"): "the root re-exports load_model and segment; plca.api imports the layers they use only "
                          "when called, so `import plca` stays light (tests/test_light_import.py)",
}


def layer_of(module: str, layers: Sequence[Sequence[str]] = LAYERS) -> int | None:
    """Index in ``layers`` of the entry that is ``module`` or its nearest enclosing package (the root
    ``plca`` only for the root itself); None when none is."""
    index = {name: level for level, names in enumerate(layers) for name in names}
    name = module
    while name:
        if name in index and (name != "plca" or module == "plca"):
            return index[name]
        name = name.rpartition(".")[0]
    return None


def layer_violations(graph: dict[str, set[str]], layers: Sequence[Sequence[str]] = LAYERS) -> list[tuple[str, str]]:
    """``(importer, imported)`` for every edge that goes up a layer (modules in no layer are skipped:
    :func:`test_every_module_is_in_a_layer` names them)."""
    found = []
    for module in sorted(graph):
        for dep in sorted(graph[module]):
            low, high = layer_of(module, layers), layer_of(dep, layers)
            if low is not None and high is not None and high > low:
                found.append((module, dep))
    return found


def full_import_graph() -> dict[str, set[str]]:
    """Every import edge, TYPE_CHECKING ones included; also a module's import of a parent package."""
    known = set(modules())
    return {name: imports_of(path, known, type_checking=True) - {name} for name, path in modules().items()}


def test_every_module_is_in_a_layer():
    unplaced = sorted(name for name in modules() if layer_of(name) is None)
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_modules_import_only_their_own_layer_or_lower_ones():
    graph = full_import_graph()
    violations = [edge for edge in layer_violations(graph) if edge not in LAYER_EXCEPTIONS]
    assert not violations, "imports that go up a layer:\n" + "\n".join(
        f"{module} (layer {layer_of(module)}) -> {dep} (layer {layer_of(dep)})" for module, dep in violations)


def test_the_layer_exceptions_are_still_needed():
    graph = full_import_graph()
    stale = [edge for edge in LAYER_EXCEPTIONS if edge[1] not in graph.get(edge[0], set())]
    assert not stale, f"remove these from LAYER_EXCEPTIONS, the import is gone: {stale}"


def test_evaluation_is_a_library_of_data_models_and_losses():
    """``plca.evaluation`` (the confusion matrix, the protocols, the evaluation pass) needs neither a
    tool, nor the training engine, nor a method: ``plca evaluate`` lives in :mod:`plca.tools.evaluate`."""
    graph = full_import_graph()
    used = {dep for name, deps in graph.items() if name.startswith("plca.evaluation") for dep in deps}
    assert {layer_of(dep) for dep in used} <= {layer_of("plca.data"), layer_of("plca.models"),
                                                 layer_of("plca.evaluation")}, sorted(used)
    assert not any(dep.startswith(("plca.tools", "plca.engine", "plca.methods", "plca.config")) for dep in used)


def test_the_layer_check_finds_an_upward_import():
    layers = (("plca.a",), ("plca.b", "plca"), ("plca.c",))
    graph = {"plca.a.x": {"plca.b.y"}, "plca.b.y": {"plca.a.x", "plca"}, "plca": {"plca.a"},
             "plca.c": {"plca.b.y", "plca.a.x"}}
    assert layer_of("plca.a.x.z", layers) == 0 and layer_of("plca", layers) == 1
    assert layer_of("plca.d", layers) is None  # the root's entry is the root alone
    assert layer_violations(graph, layers) == [("plca.a.x", "plca.b.y")]


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


# a string that names a backbone or a family of them (resnet18, mit_b0, efficientnet_lite0, timm:...)
BACKBONE_NAME = re.compile(r"resnet|mit_b|efficientnet|timm:", re.IGNORECASE)


def backbone_name_tests(source: str, pattern: re.Pattern = BACKBONE_NAME) -> list[str]:
    """Where ``source`` tests a value against a backbone name (or another ``pattern``): ``x == "resnet18"``,
    ``x in ("mit_b0", ...)``, ``x.startswith("resnet")``; docstrings, comments, messages and help text are not
    tests."""
    def named(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(element) for element in node.elts)
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(pattern.search(node.value))

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


def test_no_module_outside_the_formats_tests_a_format_name():
    """Outside :mod:`plca.data.formats` code asks the format registry (its layouts, label maps, splits,
    submission layouts), never ``if fmt == "acdc"``; the finder is the backbone one's, with the format names."""
    from plca.data.formats.registry import format_names

    pattern = re.compile("^(" + "|".join(re.escape(name) for name in format_names()) + ")$")
    assert backbone_name_tests('ok = fmt in ("gta5", "x")\nmsg = f"{fmt} is not gta5"\n', pattern) == [
        'line 1: fmt in (\'gta5\', \'x\')']
    found = {name: tests for name, path in modules().items()
             if not (name == "plca.data.formats" or name.startswith("plca.data.formats."))
             if (tests := backbone_name_tests(path.read_text(), pattern))}
    assert found == {}, found

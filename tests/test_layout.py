"""The package's import graph: one direction, no cycles, model files free of applications.

The flat modules of `modeling_moss_speech/` are the model (what a checkpoint's remote code ships); `trainer/`,
`hub/` and `apps/` are applications built on it. Every import is read from the source with `ast`, including the
ones inside functions, because transformers' remote-code loader follows those too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import modeling_moss_speech

PACKAGE = "modeling_moss_speech"
ROOT = Path(modeling_moss_speech.__file__).resolve().parent
# Layer of each top-level part of the package; a module may import its own layer and the ones below.
LAYERS = {"model": 0, "trainer": 1, "hub": 1, "apps": 2}
# Modules run as programs, never imported: they sit above everything.
ENTRY_POINTS = {f"{PACKAGE}.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Dotted name → source file of every module of the package."""
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The package modules that one import statement of `module` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself.
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]
    else:
        return []
    found = []
    for name in names:
        while name and name not in modules:  # `import pkg.mod.attr` style names: the longest module prefix
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (anywhere in its source), without itself."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = {target for node in ast.walk(tree)
                         for target in _imported(node, module, is_package, modules) if target != module}
    return graph


def layer(module: str) -> str:
    """`model` for the flat modules and the package itself, else the subpackage (`trainer`, `hub`, `apps`)."""
    parts = module.split(".")
    # `pretrained/` is a folder of weights next to the flat module `pretrained.py`, not a subpackage.
    if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1] / "__init__.py").is_file()):
        return parts[1]
    return "model"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_is_in_a_known_layer():
    assert {layer(module) for module in package_modules()} <= set(LAYERS)


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_run_downward():
    upward = [f"{module} ({layer(module)}) imports {target} ({layer(target)})"
              for module, targets in import_graph().items() if module not in ENTRY_POINTS
              for target in targets if LAYERS[layer(target)] > LAYERS[layer(module)]]
    assert not upward, upward


def test_trainer_and_hub_are_independent():
    crossing = [f"{module} imports {target}" for module, targets in import_graph().items()
                for target in targets if {layer(module), layer(target)} == {"trainer", "hub"}]
    assert not crossing, crossing


@pytest.mark.parametrize("lm", ["configuration_moss_speech", "modeling_moss_speech", "generation_moss_speech"])
def test_language_model_never_imports_the_processor(lm):
    assert not {f"{PACKAGE}.processing_moss_speech", f"{PACKAGE}.chat_moss_speech"} & import_graph()[f"{PACKAGE}.{lm}"]


def test_graph_sees_relative_function_level_and_absolute_imports():
    graph = import_graph()
    # A function-level relative import (the Gradio demo is imported only when `moss-speech demo` runs).
    assert f"{PACKAGE}.apps.demo" in graph[f"{PACKAGE}.apps.cli.demo"]
    # `from ... import pretrained` (a module through the package), `from . import chat` and an absolute import.
    assert f"{PACKAGE}.pretrained" in graph[f"{PACKAGE}.apps.cli.common"]
    assert f"{PACKAGE}.apps.cli.chat" in graph[f"{PACKAGE}.apps.cli.main"]
    assert f"{PACKAGE}.apps.cli.main" in graph[f"{PACKAGE}.__main__"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_test_modules_share_builders_only_through_helpers():
    """A builder two test modules need lives in tests/helpers.py; no test module imports another or conftest."""
    tests = Path(__file__).resolve().parent
    local = {path.stem for path in tests.glob("*.py")} - {"helpers"}
    crossing = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            crossing += [f"{path.name} imports {name}" for name in names if name and name.split(".")[0] in local]
    assert not crossing, crossing

"""The stages import down, never up, and nothing imports in a loop (docs/architecture.md's layers, read off the code).

Every import counts: at the top of a module, inside a function, or for type checking only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROWS

PACKAGE = Path(__file__).resolve().parents[1] / "batch"

# Lowest first. A module may import its own layer and the layers below; a name is a module or a stage folder.
LAYERS = [
    {"batch.errors", "batch.interrupts", "batch.pricing", "batch.process", "batch.providers", "batch.shard",
     "batch.storage", "batch.wording", "batch.proxy"},
    {"batch.logs", "batch.config"},
    {"batch.input"},
    {"batch.records", "batch.replies"},
    # batch.shared: the account's limits in Redis, which the budget (money) and the pool (online) both keep to.
    {"batch.plan", "batch.executor", "batch.money", "batch.checkpoint", "batch.shared"},
    {"batch.online", "batch.preflight"},
    {"batch.batch_api"},
    {"batch.summary", "batch.commands"},
    {"batch.runner"},
    {"batch.api", "batch.cli"},
    {"batch", "batch.__main__"},
    {"batch.simulator"},  # beside the runtime: it may use batch's schema code, and the runtime never imports it
]
# The one way up: the `batch simulate` command starts the simulator, importing it only when it is asked for.
ALLOWED_UP = {("batch.cli", "batch.simulator")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, bool]]:
    """The batch modules a file imports, each with whether the import sits inside a function."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}: a relative import (batch imports by absolute names)"
                for alias in child.names:  # `from batch.x import y` imports the module batch.x.y when there is one
                    child_module = f"{child.module}.{alias.name}"
                    found.append((child_module if child_module in MODULES else child.module, nested))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return [(name, nested) for name, nested in found if name == "batch" or name.startswith(("batch.", "bench"))]


def layer_of(module: str) -> int:
    stage = max((name for layer in LAYERS for name in layer if module == name or module.startswith(f"{name}.")),
                key=len)
    return next(number for number, layer in enumerate(LAYERS) if stage in layer)


def stage_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


GRAPH = {module: [name for name, _ in imports(path)] for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)  # raises ValueError (max of nothing) for a module outside every layer


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    for imported, in_function in imports(MODULES[module]):
        assert not imported.startswith("bench"), f"{module} imports the benchmark ({imported})"
        if (module, stage_of(imported)) in ALLOWED_UP:
            assert in_function, f"{module} imports {imported} at its top: only the command that needs it may"
            continue
        assert layer_of(imported) <= layer_of(module), f"{module} (layer {layer_of(module)}) imports {imported} " \
                                                       f"(layer {layer_of(imported)}): an import up the layers"


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as its nodes in order), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", path.append(node)
        for after in sorted(graph.get(node, ())):
            if state.get(after) == "open":
                return path[path.index(after):] + [after]
            if after not in state and (found := visit(after)):
                return found
        state[node], _ = "done", path.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_no_module_imports_in_a_loop():
    graph = {module: {name for name in names if name != module} for module, names in GRAPH.items()}
    assert cycle_in(graph) is None


def test_no_stage_imports_in_a_loop():
    stages: dict[str, set[str]] = {}
    for module, names in GRAPH.items():
        stages.setdefault(stage_of(module), set()).update(stage_of(name) for name in names
                                                          if stage_of(name) != stage_of(module)
                                                          and (stage_of(module), stage_of(name)) not in ALLOWED_UP)
    assert cycle_in(stages) is None


def test_the_loop_finder_finds_a_loop():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


def test_a_run_imports_neither_the_simulator_nor_the_benchmark(start_sim, make_job, tmp_path):
    job = make_job(start_sim(), rows=ROWS[:3])
    report = tmp_path / "modules.txt"
    program = ("import atexit, runpy, sys\n"
               f"atexit.register(lambda: open({str(report)!r}, 'w').write('\\n'.join(sorted(sys.modules))))\n"
               f"sys.argv = ['batch', 'run', {str(job)!r}]\n"
               "runpy.run_module('batch', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = report.read_text().split("\n")
    assert "batch.runner" in loaded  # the report is of a real run
    assert [name for name in loaded if name.startswith(("batch.simulator", "bench"))] == []

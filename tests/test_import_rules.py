"""Who may import whom: the rules that keep the files a fork edits small and the machinery apart.

Read from every project module's source (its AST), so a rule holds for every path through the
code, not only the ones a test happens to run. An import counts wherever it is written, at the
top of a module or inside a function (a function-level import still runs when it is called);
only imports under ``if TYPE_CHECKING:`` do not count, since they never run.

    serving/   reaches the project's own modules (handler, model_loader, storage, tasks) only
               through what handler.py hands in (``serving/parts.py``), and never imports dev/
    builder/   the weights stage of the image: imports nothing of serving, tasks, model_loader,
               storage, handler or dev, so the code can change without rebuilding the weights
    start      ``python handler.py`` (what a serverless container runs) never reaches dev/:
               the local endpoint and aiohttp belong to pod mode
    cycles     no two project modules import each other, directly or round a loop
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from serving.config import PROJECT_ROOT

PACKAGES = ("serving", "tasks", "builder", "dev")
TOP_MODULES = ("handler", "model_loader", "storage")
PROJECT = ("handler", "model_loader", "storage", "tasks", "dev")   # what serving/ may not import
WEIGHTS_STAGE_FORBIDDEN = ("serving", "tasks", "model_loader", "storage", "handler", "dev")


def project_modules() -> dict[str, Path]:
    """Every module of the shipped project by dotted name (``serving.worker``, ``handler``)."""
    found = {name: PROJECT_ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` that can run: all but those under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports at runtime. ``from serving import patches`` imports
    the module serving.patches; ``from tasks import TASKS`` the package tasks."""
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif node.module and not node.level:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            names = []
        for name in names:
            while name and name not in modules:    # ``import serving.x.y``: the nearest module
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def _violations(importers: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(module, target) for module, targets in import_graph().items()
            if _top(module) == importers for target in targets if _top(target) in forbidden}


def test_serving_reaches_the_project_only_through_what_handler_hands_in():
    found = _violations("serving", PROJECT)
    assert found == set(), "serving/ imports the project's own modules"


def test_the_weights_stage_imports_nothing_of_the_worker():
    found = _violations("builder", WEIGHTS_STAGE_FORBIDDEN)
    assert found == set(), "builder/ imports the worker's code"


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_a_serverless_start_never_reaches_dev():
    graph = import_graph()
    for entry in ("serving.launch", "handler"):
        assert {m for m in reachable(entry, graph) if _top(m) == "dev"} == set(), entry


def test_no_project_modules_import_each_other_round_a_loop():
    graph = import_graph()
    on_a_loop = {module for module, targets in graph.items()
                 if any(module in reachable(target, graph) for target in targets)}
    assert on_a_loop == set(), "these modules import each other, directly or round a loop"


def test_the_rules_see_imports_in_functions_and_skip_type_checking(tmp_path):
    """The reader itself: a function-level import counts, a TYPE_CHECKING one does not."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from tasks.base import Task\n"
                      "def load():\n    from storage import storage_from_settings\n"
                      "from serving import patches\n")
    assert imports_of(source, project_modules()) == {"storage", "serving.patches"}


def test_importing_handler_loads_neither_the_model_stack_nor_dev():
    """What ``python handler.py`` imports before it prepares the process (the collector off,
    the secret filter on), and all that the SDK's heartbeat child imports when it runs the file
    again: no torch, no runpod, no dev/ nor aiohttp."""
    probe = ("import json, sys, handler, serving.start\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'transformers', 'runpod', 'dev', 'aiohttp', 'tasks', 'storage'})))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_serving_package_lists_every_module_it_holds():
    """serving/__init__.py is the map a newcomer reads first: each module, one line."""
    import serving

    listed = {line.split()[0] for line in (serving.__doc__ or "").splitlines()
              if line.startswith("    ") and line.split()[0].endswith(".py")}
    held = {p.name for p in (PROJECT_ROOT / "serving").glob("*.py") if p.name != "__init__.py"}
    assert held - listed == set(), "add these to serving/__init__.py's list"
    assert listed - held == set(), "listed in serving/__init__.py but gone"

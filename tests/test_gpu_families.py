"""The families on CUDA: one model of each answers on the GPU what it answers on the CPU in
float32, through the worker's job wiring. Deselected by default (marker ``gpu``); ``make
gpu-check`` runs it. The models are the tiny random ones the CPU tests make; it skips where
pydantic or boto3 (the worker's job wiring) are missing, and the audio kinds where av is.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("pydantic")
pytest.importorskip("boto3")

from tests.support.families import one_model_of_each  # noqa: E402 - after the skips


def _answer(path: Path, device: str, job_input: dict[str, Any]) -> Any:
    from tests.support.worker import build_worker

    worker = build_worker({"MODEL_PATH": str(path), "MODEL_DEVICE": device,
                           "MODEL_DTYPE": "float32"})

    async def run() -> list[Any]:
        return [out async for out in worker.handle({"id": "gpu", "input": job_input})]

    [out] = asyncio.run(run())
    return out


def _numbers_close(a: Any, b: Any) -> bool:
    """Equal JSON but for floats (1e-3) and files (compared by size: PNG bytes of maps may
    differ in a pixel's rounding)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if {"data", "sha256"} <= a.keys():
            return a["content_type"] == b["content_type"]
        return a.keys() == b.keys() and all(_numbers_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_numbers_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-3, abs_tol=1e-4)
    return a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(one_model_of_each()) if torch.cuda.is_available()
                         else ["none"])
def test_a_family_answers_on_the_gpu_what_it_answers_on_the_cpu(kind, tmp_path):
    make, job_input = one_model_of_each()[kind]
    torch.manual_seed(0)
    make(tmp_path / kind)
    on_gpu = _answer(tmp_path / kind, "cuda", job_input)
    on_cpu = _answer(tmp_path / kind, "cpu", job_input)
    assert "error" not in on_gpu, on_gpu
    assert _numbers_close(on_gpu, on_cpu), (on_gpu, on_cpu)

"""What the tests of the model kinds served with no code share: one job's answer, JSON compared
within float tolerance, and the check that each kind's banner example answers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from serving.worker import Worker
from tests.support.worker import collect


def answer(loop, worker: Worker, job_input: dict[str, Any]) -> Any:
    """The one thing the worker yields for a job with ``job_input``."""
    [out] = loop.run(collect(worker, job_input))
    return out


def close(a: Any, b: Any) -> bool:
    """Equal JSON, numbers within float tolerance (batched rows are padded)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6)
    return a == b


def check_banner_examples(loop, workers: dict[str, Worker], model_dirs: dict[str, Path]) -> None:
    """The local endpoint's banner prints ``Task.example_for``: for each kind it must answer."""
    from model_loader import ModelSource, read_model_files

    for name, worker in workers.items():
        files = read_model_files(ModelSource(model_dirs[name], "MODEL_PATH"))
        example = type(worker.task).example_for(files)
        out = answer(loop, worker, example)
        assert "error" not in out, (name, example, out)

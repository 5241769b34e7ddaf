"""Every family that batches: concurrent jobs share one pipeline call (images whose pixels keep
their shape: one per size), and each job answers what it answers alone (batched rows are
padded; the answers may not depend on batch-mates).

One tiny model of each family (``tests/support/families.py``), four jobs of other inputs at
once. Speech recognition (one clip per call on a CPU) and text to speech (one text per call)
do not batch here; their own tests say so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.families import FAMILIES
from serving.worker import Worker
from tests.support.families import answer, at_once, close, one_model_of_each
from tests.support.images import image_uri, picture
from tests.support.worker import build_worker
from tests.test_audio_families import data_uri, tone, wav_bytes

TEXTS = ["I loved it", "The soup was cold and late", "John lives in Paris",
         "A quiet delight from the first scene to the last"]
SIZES = [(40, 30), (36, 44), (44, 36), (32, 32)]
BATCHING = [kind for kind in one_model_of_each()
            if kind in FAMILIES and FAMILIES[kind].batch
            and kind not in ("automatic-speech-recognition", "whisper")]


def _variants(kind: str, job: dict[str, Any], sized: bool) -> list[dict[str, Any]]:
    """Four jobs like ``job``, each with an input of its own (texts of other lengths, images of
    other sizes; of two sizes where ``sized``), the same parameters."""
    one = job["inputs"]
    sizes = [SIZES[0], SIZES[0], SIZES[1], SIZES[1]] if sized else SIZES
    if kind == "fill-mask":
        inputs: list[Any] = [f"{t} [MASK]." for t in TEXTS]
    elif kind == "question-answering":
        inputs = [{"question": "Who lives there?", "context": t} for t in TEXTS]
    elif kind == "image-text-to-text":
        inputs = [{**one, "image": image_uri(picture(i, size))} for i, size in enumerate(sizes)]
    elif kind == "audio-classification":     # clips of other lengths: padded to the same
        inputs = [data_uri(wav_bytes(tone(0.3 + 0.2 * i, seed=i))) for i in range(4)]
    elif isinstance(one, str) and one.startswith("data:image"):
        inputs = [image_uri(picture(i, size)) for i, size in enumerate(sizes)]
    else:
        inputs = list(TEXTS)
    return [{**job, "inputs": x} for x in inputs]


def _counted_calls(worker: Worker) -> list[int]:
    """Calls of the worker's pipeline (or runner), counted from now on."""
    engine = worker.task.batcher.engine
    calls: list[int] = []
    if engine.family.runner is not None:
        runner = engine.family.runner

        def counted_runner(*args: Any) -> Any:
            calls.append(1)
            return runner(*args)

        engine.family = dataclasses.replace(engine.family, runner=counted_runner)
    else:
        pipe = engine.pipe

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return pipe(*args, **kwargs)

        engine.pipe = counted
    return calls


@pytest.mark.parametrize("kind", BATCHING)
def test_concurrent_jobs_share_a_call_and_answer_as_alone(kind: str, tmp_path: Path, loop
                                                          ) -> None:
    make, job = one_model_of_each()[kind]
    torch.manual_seed(0)
    make(tmp_path / kind)
    # A batch of four runs as soon as the four jobs are in: the wait below is only a bound.
    worker = build_worker({"MODEL_PATH": str(tmp_path / kind), "WORKER_MAX_BATCH_SIZE": "4"})
    # Where an image's pixels keep its shape (DETR's, YOLOS's processors), only images of one
    # size stack into a batch: two sizes, two calls.
    sized = worker.task.sized_images
    jobs = _variants(kind, job, sized)
    alone = [answer(loop, worker, j) for j in jobs]
    calls = _counted_calls(worker)
    worker.task.batcher.wait_s = 2.0        # the four gather however slow the machine is

    outs = at_once(loop, worker, jobs)
    assert all("error" not in out for out in outs), outs
    assert len(calls) == (2 if sized else 1), f"{len(calls)} calls for {len(jobs)} jobs"
    for got, want in zip(outs, alone, strict=True):
        assert close(got, want), (got, want)

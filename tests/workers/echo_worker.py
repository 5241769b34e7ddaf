"""A test-only worker: the real runpod worker loop around a tiny handler, for local_endpoint tests.

It is not the project's worker (handler.py); it exists to drive the platform edge we fake.
``ECHO_WORKER_MODE=echo`` (default) serves an async handler; ``ECHO_WORKER_MODE=stream`` an
async generator. Both run 3 jobs at a time and aggregate streams. What a job's input asks::

    echo: any           answered back, with the job's s3Config and this process's pid
    progress: [values]  sent one by one with progress_update, progress_gap_s apart (0.5)
    sleep_s: seconds    awaited (cancellable)
    cancel_marker: path written with the job id when the job is cancelled
    fail: message       answered as {"error": message, "detail": "kept"}
    blob_bytes: n       answered as {"blob": "x" * n}
    chunks: n           (stream mode) yields {"index": i} n times, gap_s apart (0.3)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import runpod

CONCURRENCY = 3


def _spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["input"] if isinstance(job.get("input"), dict) else {}


async def echo(job: dict[str, Any]) -> dict[str, Any]:
    spec = _spec(job)
    try:
        for value in spec.get("progress", []):
            runpod.serverless.progress_update(job, value)
            await asyncio.sleep(float(spec.get("progress_gap_s", 0.5)))
        await asyncio.sleep(float(spec.get("sleep_s", 0)))
    except asyncio.CancelledError:
        if marker := spec.get("cancel_marker"):
            Path(marker).write_text(job["id"])
        raise
    if spec.get("fail"):
        return {"error": str(spec["fail"]), "detail": "kept"}
    if spec.get("blob_bytes"):
        return {"blob": "x" * int(spec["blob_bytes"])}
    return {"echo": spec.get("echo"), "s3Config": job.get("s3Config"), "pid": os.getpid()}


async def stream(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    spec = _spec(job)
    for index in range(int(spec.get("chunks", 3))):
        await asyncio.sleep(float(spec.get("gap_s", 0.3)))
        yield {"index": index}


if __name__ == "__main__":
    runpod.serverless.start({
        "handler": stream if os.environ.get("ECHO_WORKER_MODE") == "stream" else echo,
        "concurrency_modifier": lambda current: CONCURRENCY,
        "return_aggregate_stream": True,
    })

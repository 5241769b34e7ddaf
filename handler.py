"""RunPod entry point: load the model once, then hand RunPod's jobs to the worker.

The model is loaded at import, before ``runpod.serverless.start``, in the main process only:
the SDK's heartbeat runs in a ``multiprocessing`` child, and under the spawn and forkserver start
methods that child imports this file again; it must not load a second copy of the model.

Run it:
    python handler.py                                  the RunPod worker loop (production), or
                                                       ./test_input.json when run locally
    python handler.py --test_input '{"input": {...}}'  one job, printed; exit 1 if it failed
    python handler.py --test_input @job.json           the same, the job read from a file
    python -m dev.local_endpoint -- python handler.py  a local endpoint that behaves like RunPod

A startup failure (bad setting, no model) prints one line saying what and how to fix it and
exits 1 before any job is taken. Never imports boto3; job handling lives in ``worker.py``.

Start-up imports what the path in use needs: the test mode never imports the runpod SDK; the
worker loop imports it in a thread while the model loads (``serving/sdk.py``) and takes jobs through
``serving/intake.py`` (WORKER_INTAKE).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

# Startup makes hundreds of thousands of long-lived objects (torch's and transformers' modules,
# the model), and the cyclic collector would scan them again and again as they are made: about
# 0.8 s of a 4.5 s cold start on two CPU cores. It runs once the model is loaded (not in the
# test mode, which exits after its job), and everything startup made is then frozen out of
# later collections (gc.freeze), so a job never waits on a full scan of it (0.3 s each).
gc.disable()

from serving import redaction  # noqa: E402

# The SDK's default log level, DEBUG, prints whole jobs and answers (a job's s3Config, presigned
# links); INFO prints job ids and states. And whatever prints goes through the secret filter.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
redaction.install()

from serving.device import check_device  # noqa: E402
from serving.errors import WorkerError  # noqa: E402
from serving.sdk import BackgroundImport, import_sdk  # noqa: E402
from serving.worker import Worker, build_worker, configure_logging  # noqa: E402

log = logging.getLogger("worker")


def _in_child_process() -> bool:
    """True in a multiprocessing child, including while spawn re-runs this file in it.

    Spawn and forkserver run the parent's main file again as ``__mp_main__`` before the child
    is bootstrapped, when ``parent_process()`` is still None: both checks are needed.
    """
    return __name__ == "__mp_main__" or multiprocessing.parent_process() is not None


def _local_test_job(argv: list[str]) -> dict[str, Any] | None:
    """The job of the SDK's local test mode (--test_input or ./test_input.json), if any."""
    if os.environ.get("RUNPOD_WEBHOOK_GET_JOB") or "--rp_serve_api" in argv:
        return None
    if "--test_input" in argv:
        raw = argv[argv.index("--test_input") + 1]
        if raw.startswith("@"):          # a file: media too large for one argument (128 KiB)
            with open(raw[1:], encoding="utf-8") as f:
                raw = f.read()
    elif os.path.exists("test_input.json"):
        with open("test_input.json", encoding="utf-8") as f:
            raw = f.read()
    else:
        return None
    job = json.loads(raw)
    job.setdefault("id", "local_test")
    return job


# The job of the test mode, when this process is one: then the runpod SDK is never imported.
TEST_JOB = _local_test_job(sys.argv[1:]) if __name__ == "__main__" else None
_SDK: BackgroundImport | None = None


def _load_in_main_process() -> Worker | None:
    global _SDK
    if _in_child_process():
        return None          # the SDK's heartbeat child: it never needs the model
    configure_logging()
    if TEST_JOB is None:     # the worker loop: the SDK imports while the model loads
        _SDK = BackgroundImport()
    try:
        return build_worker()
    except WorkerError as exc:
        log.error("startup failed: %s", exc)
        sys.exit(1)


try:
    WORKER = _load_in_main_process()
finally:
    if TEST_JOB is None:
        gc.collect()         # once, so that no garbage of the load (cycles may hold tensors)
    gc.freeze()              # is frozen: what startup made stays; later collections skip it
    gc.enable()



async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
    """RunPod's handler: an async generator, so ``"stream": true`` jobs can stream."""
    assert WORKER is not None, "handler called outside the main process"
    from runpod.serverless import progress_update  # imported by main(), before any job

    async for item in WORKER.handle(job, progress=progress_update):
        yield item
    if WORKER.needs_refresh:
        # A generator handler cannot return refresh_worker; the SDK reads it from the config
        # after each job and asks the platform to replace this worker.
        START_CONFIG["refresh_worker"] = True


def concurrency_modifier(current: int) -> int:
    assert WORKER is not None
    return WORKER.concurrency(current)


START_CONFIG: dict[str, Any] = {
    "handler": handler,
    "concurrency_modifier": concurrency_modifier,
    # A generator handler's final output is [] unless this is set; with it, it is the list of
    # everything yielded: [answer] for a whole answer, the chunks for a stream.
    "return_aggregate_stream": True,
}


def device_is_usable() -> None:
    """Runs before the first job on RunPod: a broken GPU exits instead of failing jobs."""
    assert WORKER is not None
    check_device(WORKER.loaded.device)


async def run_test_job(job: dict[str, Any]) -> int:
    """Run one job as the SDK's test mode should: iterate the stream, print the result.

    The SDK's own test mode never iterates a generator handler and exits 0 whatever happened;
    this prints ``{"output": [...]}`` or ``{"error": ...}`` as the platform would deliver it and
    returns the exit code: 1 if the job failed.
    """
    assert WORKER is not None
    outputs: list[dict[str, Any] | str] = []
    async for item in WORKER.handle(job):
        if isinstance(item, dict) and item.get("error"):   # OpenAI streams yield SSE strings
            print(json.dumps({"error": item["error"]}, ensure_ascii=False), flush=True)
            return 1
        outputs.append(item)
    print(json.dumps({"output": outputs}, ensure_ascii=False), flush=True)
    return 0


def main() -> None:
    if TEST_JOB is not None:
        code = asyncio.run(run_test_job(TEST_JOB))
        # The answer is printed; the interpreter's teardown of torch and transformers (1 s or
        # more on two cores) has nothing left to do, so it is skipped once everything is out.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    runpod = _SDK.result() if _SDK is not None else import_sdk()
    if WORKER is not None:
        runpod.serverless.register_fitness_check(device_is_usable)
        if WORKER.settings.intake == "fast":
            from serving.intake import install
            install()
    runpod.serverless.start(START_CONFIG)


if __name__ == "__main__":
    main()

"""The worker process: load the model once, then RunPod's worker loop or the local test mode.

Owns what ``python handler.py`` does with the project's pieces (``serving.parts.Parts``), which
``handler.py`` hands to ``serve`` as a function, so that they are imported here, in order:

1. the cyclic collector is switched off, and stdout and stderr go through the secret filter
   (``patches.filter_output``), before torch, transformers or runpod are imported;
2. in a ``multiprocessing`` child nothing happens: the SDK's heartbeat runs in one, and under
   the spawn and forkserver start methods it runs ``handler.py`` again (as ``__mp_main__``);
   it must not load a second copy of the model;
3. the pieces are imported and the model loaded; in the worker loop the runpod SDK imports in a
   thread meanwhile (``patches.import_runpod``);
4. ``--test_input JSON`` (or ``@job.json``, or ./test_input.json without RunPod's job URL) runs
   one job and prints ``{"output": [...]}`` or ``{"error": ...}``, exit 1 if it failed, without
   ever importing the runpod SDK; else ``runpod.serverless.start`` runs the worker loop with
   ``handle`` as its handler, the fitness check ``device_is_usable``, a constant
   ``concurrency_modifier`` and, with WORKER_INTAKE=fast, ``serving/intake.py``'s intake.

A startup failure (bad setting, no model) logs one line saying what and how to fix it and exits 1
before any job is taken. Imports only the standard library and ``serving.patches`` at import;
never imports ``dev/`` (the local endpoint and aiohttp belong to pod mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from serving import patches

if TYPE_CHECKING:
    from serving.parts import Parts
    from serving.worker import Worker

log = logging.getLogger("worker")


def serve(parts: Callable[[], Parts], argv: Sequence[str] | None = None) -> None:
    """Run this worker process: ``parts()`` imports and returns the project's pieces."""
    if in_child_process():
        return
    # Startup makes hundreds of thousands of long-lived objects (torch's and transformers'
    # modules, the model), and the cyclic collector would scan them again and again as they are
    # made: about 0.8 s of a 4.5 s cold start on two CPU cores. It runs once the model is loaded
    # (not in the test mode, which exits after its job), and everything startup made is then
    # frozen out of later collections (gc.freeze), so a job never waits on a full scan (0.3 s).
    gc.disable()
    # The SDK's default log level, DEBUG, prints whole jobs and answers (a job's s3Config,
    # presigned links); INFO prints job ids and states. Whatever prints is filtered.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    patches.filter_output()
    test_job = local_test_job(sys.argv[1:] if argv is None else list(argv))
    sdk: BackgroundImport | None = None
    try:
        from serving import placement  # noqa: F401 - torch, transformers, accelerate: timed
        from serving.errors import WorkerError
        from serving.worker import build_worker, configure_logging

        configure_logging()
        project = parts()
        if test_job is None:     # the worker loop: the SDK imports while the model loads
            sdk = BackgroundImport()
        try:
            worker = build_worker(project)
        except WorkerError as exc:
            log.error("startup failed: %s", exc)
            sys.exit(1)
    finally:
        if test_job is None:
            gc.collect()         # once, so that no garbage of the load (cycles may hold tensors)
        gc.freeze()              # is frozen: what startup made stays; later collections skip it
        gc.enable()
    if test_job is not None:
        code = asyncio.run(run_test_job(worker, test_job))
        # The answer is printed; the interpreter's teardown of torch and transformers (1 s or
        # more on two cores) has nothing left to do, so it is skipped once everything is out.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    run_worker_loop(worker, sdk.result() if sdk is not None else patches.import_runpod())


def in_child_process() -> bool:
    """True in a multiprocessing child, including while spawn re-runs the main file in it.

    Spawn and forkserver run the parent's main file again as ``__mp_main__`` before the child
    is bootstrapped, when ``parent_process()`` is still None: both checks are needed.
    """
    main = sys.modules.get("__main__")
    return getattr(main, "__name__", "") == "__mp_main__" or \
        multiprocessing.parent_process() is not None


def local_test_job(argv: Sequence[str]) -> dict[str, Any] | None:
    """The job of the SDK's local test mode (--test_input or ./test_input.json), if any."""
    if os.environ.get("RUNPOD_WEBHOOK_GET_JOB") or "--rp_serve_api" in argv:
        return None
    if "--test_input" in argv:
        raw = argv[list(argv).index("--test_input") + 1]
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


async def run_test_job(worker: Worker, job: dict[str, Any]) -> int:
    """Run one job as the SDK's test mode should: iterate the stream, print the result.

    The SDK's own test mode never iterates a generator handler and exits 0 whatever happened;
    this prints ``{"output": [...]}`` or ``{"error": ...}`` as the platform would deliver it and
    returns the exit code: 1 if the job failed.
    """
    outputs: list[dict[str, Any] | str] = []
    async for item in worker.handle(job):
        if isinstance(item, dict) and item.get("error"):   # OpenAI streams yield SSE strings
            print(json.dumps({"error": item["error"]}, ensure_ascii=False), flush=True)
            return 1
        outputs.append(item)
    print(json.dumps({"output": outputs}, ensure_ascii=False), flush=True)
    return 0


def run_worker_loop(worker: Worker, runpod: ModuleType) -> None:
    """``runpod.serverless.start`` with ``worker`` behind its handler; returns when it stops."""
    config: dict[str, Any] = {
        "concurrency_modifier": worker.concurrency,   # a constant: see Worker.concurrency
        # A generator handler's final output is [] unless this is set; with it, it is the list
        # of everything yielded: [answer] for a whole answer, the chunks for a stream.
        "return_aggregate_stream": True,
    }

    async def handle(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
        """RunPod's handler: an async generator, so ``"stream": true`` jobs can stream."""
        async for item in worker.handle(job, progress=runpod.serverless.progress_update):
            yield item
        if worker.needs_refresh:
            # A generator handler cannot return refresh_worker; the SDK reads it from the
            # config after each job and asks the platform to replace this worker.
            config["refresh_worker"] = True

    def device_is_usable() -> None:
        """Runs before the first job on RunPod: a broken GPU exits instead of failing jobs."""
        from serving.device import check_device

        check_device(worker.loaded.device)

    config["handler"] = handle
    runpod.serverless.register_fitness_check(device_is_usable)
    if worker.settings.intake == "fast":
        patches.install_intake()
    runpod.serverless.start(config)


class BackgroundImport:
    """``patches.import_runpod()`` in a daemon thread, started at once, so that the SDK's
    import (about 1 s of Python) overlaps the model load (file reads and device work, which
    leave the interpreter free); ``result()`` waits for it."""

    def __init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="import-runpod", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A failure is not lost: result() imports again in its own thread and raises it there.
        with contextlib.suppress(BaseException):
            patches.import_runpod()

    def result(self) -> ModuleType:
        """The runpod module, once the thread is done."""
        self._thread.join()
        return patches.import_runpod()

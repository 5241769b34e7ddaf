"""A local RunPod serverless endpoint: the platform edge, faked on loopback, as measured.

It speaks both sides of RunPod's queue API so that the real worker loop
(``runpod.serverless.start`` in production mode) and the SDK's real client (``runpod.Endpoint``)
meet on one machine, with nothing of RunPod's own local modes in between::

    client side  /v2/{endpoint}/run, /runsync            POST
                 /v2/{endpoint}/status/{id}, /stream/{id}, /cancel/{id}, /health   GET or POST
                 /v2/{endpoint}/purge-queue              POST
                 /v2/{endpoint}/openai/v1/...            OpenAI-compatible routes (below)
    worker side  /v2/{endpoint}/job-take/{worker}        one job, or 204       (long-poll)
                 /v2/{endpoint}/job-take-batch/{worker}  a list of jobs, or 204 (long-poll)
                 /v2/{endpoint}/job-stop/{worker}        {"jobsToStop": [...]}, or 204 (long-poll)
                 /v2/{endpoint}/job-done/{worker}/{id}   result or progress (JSON, form type)
                 /v2/{endpoint}/job-stream/{worker}/{id} one {"output": chunk} per yield
                 /v2/{endpoint}/ping/{worker}            heartbeat

Faithful to production, as measured against the runpod SDK, faults included: a job-done body
over the payload limit (/run 10 MiB, /runsync 20 MiB) gets 400 and the job ends COMPLETED with
no output; a non-string ``error`` ends COMPLETED with no output; a FAILED job reports ``error``
and the rest of the answer as ``output``; cancel marks CANCELLED and reaches the worker through
job-stop. Not modelled: webhooks are passed to the worker but never called, no retries, no
queue TTL, no scaling.

Who may call what. Worker routes hand out jobs with their ``s3Config`` secrets and accept
results, so they answer only a caller that sends the worker secret: a random key made per
endpoint and handed to the worker in ``RUNPOD_AI_API_KEY`` (``worker_env``), which is what the
SDK sends as its raw ``Authorization`` header on job-take, job-done, job-stream, job-stop and
ping, as RunPod authenticates its workers. Anything else gets 401 and changes nothing (it is
not even counted as a worker). A secret rather than "loopback peers only": behind a reverse
proxy or an SSH tunnel inside the pod every caller is a loopback peer, so an address check
fails open exactly where pod mode is exposed, while a secret holds whatever the network path.
SDK quirk: job-take, job-done, job-stream and job-stop send the ``api_key`` of the ``[default]``
profile in ``~/.runpod/config.toml`` instead of ``RUNPOD_AI_API_KEY`` when that file has one
(only the heartbeat always sends the variable); ``WorkerProcess`` reads the same file (under
the worker's ``HOME``) and lets the endpoint accept that key too, so a developer who ran
``runpod config`` still gets a working worker. Client routes check ``api_key`` when one is set;
an endpoint bound to anything but loopback refuses to start without one.

OpenAI-compatible routes, as RunPod's ``https://api.runpod.ai/v2/{endpoint}/openai/v1``: a
request to ``.../openai/v1/chat/completions`` (or ``completions``, ``embeddings``, ``models``)
becomes a job with ``{"openai_route": "/v1/chat/completions", "openai_input": <the body>}``,
the caller waits for it, and the job's output is the HTTP answer: the single item of the
aggregated output as JSON, or, for ``"stream": true``, the worker's streamed chunks written as
they arrive as ``text/event-stream`` (strings as they are; other chunks as ``data: <json>``
events). Faithful: the job input shape (what worker-vllm reads) and the SSE text worker-vllm
yields. Guessed (RunPod does not document it): a FAILED job answers HTTP 404/400/500 with the
OpenAI error object when the error string holds one as JSON (our workers' choice), else wraps
the error string in one; a stream that fails midway ends with a ``data: {"error": ...}`` event.

Use it from tests with ``LocalEndpoint(...).start()`` and ``WorkerProcess``, or from a shell::

    python -m dev.local_endpoint [--host 127.0.0.1] [--port 8000] [--endpoint-id local] \\
        [--key-file PATH] -- python handler.py

The CLI takes the client key from the environment (``LOCAL_ENDPOINT_API_KEY``), never from its
command line, which any user of the machine can read in ``/proc/*/cmdline``; it removes the
variable before starting the worker, which has no use for it. Without a key it stays keyless
on loopback; with ``--key-file`` it makes a random key and writes it there (mode 0600) instead,
and it refuses to listen on any other address keyless. It logs where the key is, never the key:
a log is copied to consoles, collectors and bug reports, a 0600 file is read only by whoever
could already read the container's files.

This module never imports runpod or torch: it is the platform, not the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypedDict, TypeVar

from aiohttp import web

MIB = 1024 * 1024
RUN_LIMIT_BYTES = 10 * MIB          # RunPod docs: /run input and result, 10 MB
RUNSYNC_LIMIT_BYTES = 20 * MIB      # RunPod docs: /runsync input and result, 20 MB
RUN_RETENTION_S = 30 * 60.0         # a /run result is kept 30 min after it ends
RUNSYNC_RETENTION_S = 60.0          # a /runsync result is kept 1 min after it ends
RUNSYNC_WAIT_MS = 90_000            # /runsync waits 90 s unless ?wait= says otherwise
RUNSYNC_WAIT_RANGE_MS = (1_000, 300_000)  # the ?wait= values RunPod documents
EXECUTION_TIMEOUT_S = 600.0         # RunPod's default endpoint execution timeout
POLL_HOLD_S = 2.0                   # how long job-take and job-stop hold an empty answer
STOP_RESEND_S = 0.5                 # a stop signal is repeated this often while the worker
STOP_GIVE_UP_S = 10.0               # may still hold the job, for at most this long
WORKER_SEEN_S = 15.0                # a worker unheard of for longer is not counted by /health
API_KEY_ENV = "LOCAL_ENDPOINT_API_KEY"  # the CLI's client key: environment, never argv

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

_WORKER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_T = TypeVar("_T")


class JobStatusBody(TypedDict, total=False):
    """What /status, /runsync and /cancel answer; fields appear only once they are known."""

    id: str
    status: str                # IN_QUEUE | IN_PROGRESS | COMPLETED | FAILED | CANCELLED | TIMED_OUT
    output: Any                # the result; the last progress update while IN_PROGRESS
    error: str                 # FAILED only
    delayTime: int             # ms from submission to a worker taking the job
    executionTime: int         # ms from taken to ended
    workerId: str


@dataclass
class _Job:
    """One request, from submission until its retention ends."""

    id: str
    input: Any
    sync: bool                                   # /runsync: its own limit and retention
    passthrough: dict[str, Any]                  # s3Config, webhook: handed to the worker as sent
    execution_timeout_s: float | None
    submitted: float = field(default_factory=time.monotonic)
    status: str = IN_QUEUE
    worker_id: str | None = None
    started: float | None = None
    ended: float | None = None
    has_output: bool = False
    output: Any = None
    error: str | None = None
    unread_chunks: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> JobStatusBody:
        answer: JobStatusBody = {"id": self.id, "status": self.status}
        if self.started is not None:
            answer["delayTime"] = round((self.started - self.submitted) * 1000)
            if self.ended is not None:
                answer["executionTime"] = round((self.ended - self.started) * 1000)
        if self.worker_id is not None:
            answer["workerId"] = self.worker_id
        if self.has_output:
            answer["output"] = self.output
        if self.error is not None:
            answer["error"] = self.error
        return answer

    def for_worker(self) -> dict[str, Any]:
        return {"id": self.id, "input": self.input, **self.passthrough}


class LocalEndpoint:
    """A RunPod endpoint on loopback, served from a background thread.

    ``start()`` binds (``port=0`` picks a free port) and returns once it answers; ``stop()``
    ends it. ``base_url`` is what ``runpod.endpoint_url_base`` should be; ``worker_env(id)``
    is the environment a worker process needs to take this endpoint's jobs, including the
    worker secret that worker routes require. With ``api_key`` set, client routes refuse any
    other key with 401; a ``host`` other than loopback requires one (ValueError otherwise).
    Limits are bytes of request (and result) body; retention and timeouts are seconds.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        endpoint_id: str = "local",
        api_key: str | None = None,
        *,
        run_limit_bytes: int = RUN_LIMIT_BYTES,
        runsync_limit_bytes: int = RUNSYNC_LIMIT_BYTES,
        run_retention_s: float = RUN_RETENTION_S,
        runsync_retention_s: float = RUNSYNC_RETENTION_S,
        execution_timeout_s: float | None = EXECUTION_TIMEOUT_S,
        poll_hold_s: float = POLL_HOLD_S,
    ) -> None:
        if not api_key and not is_loopback(host):
            raise ValueError(f"refusing to serve {host!r} without a client key: anyone who "
                             "can reach it could run jobs; set an api_key, or bind 127.0.0.1")
        self.host = host
        self.port = port
        self.endpoint_id = endpoint_id
        self.pings = 0                       # heartbeats received (the SDK pings from a child)
        self.api_key = api_key or None
        self.run_limit_bytes = run_limit_bytes
        self.runsync_limit_bytes = runsync_limit_bytes
        self.run_retention_s = run_retention_s
        self.runsync_retention_s = runsync_retention_s
        self.execution_timeout_s = execution_timeout_s
        self.poll_hold_s = poll_hold_s
        self._worker_key = secrets.token_urlsafe(32)     # handed to workers in worker_env
        self._worker_keys = [self._worker_key]             # keys worker routes accept
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[str] = deque()
        self._stops: dict[str, dict[str, float]] = {}  # worker id -> {job id: give up at}
        self._stop_sent: dict[str, float] = {}         # worker id -> last stop delivery
        self._seen: dict[str, float] = {}               # worker id -> last contact
        self._draining: set[str] = set()
        self._counts = {COMPLETED: 0, FAILED: 0}
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"LocalEndpoint({self.endpoint_id!r}, {self.base_url})"

    # ---------------------------------------------------------------- lifecycle (any thread)
    @property
    def base_url(self) -> str:
        """The API base, e.g. ``http://127.0.0.1:8000/v2``; the endpoint id comes after it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}/v2"

    def timings(self, since: float = 0.0) -> list[tuple[float, float]]:
        """(queue wait, execution) seconds of each job submitted after ``since`` (a
        ``time.monotonic()``) that has ended: what RunPod reports as delayTime/executionTime."""
        jobs = list(self._jobs.values())
        return [(j.started - j.submitted, j.ended - j.started) for j in jobs
                if j.submitted >= since and j.started is not None and j.ended is not None]

    def start(self, timeout_s: float = 10.0) -> LocalEndpoint:
        """Serve in a daemon thread; return once bound. Raises what binding raised."""
        self._thread = threading.Thread(target=self._thread_main, name="local-endpoint",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"local endpoint did not start within {timeout_s} s")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Answer every waiting long-poll, close the server and end its thread."""
        if self._loop is None or self._stopped is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout_s)

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def worker_env(self, worker_id: str = "local-worker") -> dict[str, str]:
        """The environment RunPod gives a worker, pointed at this endpoint.

        Holds the webhook URLs in the form the SDK rewrites (``$ID``, ``$RUNPOD_POD_ID``, a
        ``?`` already present), the worker id and key, and the two switches that skip the
        SDK's host checks (free RAM, disk, DNS, GPU), which fail on a laptop.
        """
        if not _WORKER_ID.fullmatch(worker_id):
            raise ValueError(f"worker id {worker_id!r}: use 1..64 letters, digits, - or _")
        api = f"{self.base_url}/{self.endpoint_id}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{api}/job-take/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{api}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{api}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_PING": f"{api}/ping/$RUNPOD_POD_ID?gpu=local",
            "RUNPOD_PING_INTERVAL": "10000",             # ms, RunPod's default
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_POD_HOSTNAME": f"{worker_id}-local",
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,     # also turns SDK logs into JSON lines
            "RUNPOD_AI_API_KEY": self._worker_key,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    def accept_worker_key(self, key: str) -> None:
        """Also accept ``key`` on worker routes (the SDK's config-file key; see the module)."""
        if not key:
            raise ValueError("an empty worker key would let any caller in")
        if key not in self._worker_keys:
            self._worker_keys.append(key)

    def wait_for_worker(self, worker_id: str, timeout_s: float = 30.0) -> bool:
        """True once ``worker_id`` has called any worker route; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if worker_id in self._seen:
                return True
            time.sleep(0.05)
        return False

    def drain_worker(self, worker_id: str) -> None:
        """Give ``worker_id`` no more jobs and answer its waiting polls now (before SIGTERM)."""
        self._call(self._drain(worker_id))

    def wait_for_status(self, job_id: str, statuses: Sequence[str] = tuple(FINAL_STATUSES),
                        timeout_s: float = 30.0) -> JobStatusBody:
        """Block until the job is in one of ``statuses``; raise TimeoutError after ``timeout_s``."""
        return self._call(self._wait_status(job_id, frozenset(statuses), timeout_s),
                          timeout_s + 5)

    # ------------------------------------------------------------------- the server thread
    def _call(self, coro: Coroutine[Any, Any, _T], timeout_s: float = 10.0) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the local endpoint is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._startup_error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        self._stopped = asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            sweeper = asyncio.create_task(self._sweep())
            await self._stopped.wait()
            sweeper.cancel()
            self._closing = True
            await self._notify()
        finally:
            await runner.cleanup()

    def _app(self) -> web.Application:
        # Streamed, capped reads below; aiohttp's own cap must not answer first.
        app = web.Application(middlewares=[self._errors_as_json],
                              client_max_size=max(self.run_limit_bytes,
                                                  self.runsync_limit_bytes) + MIB)
        p = "/v2/{endpoint_id}"
        app.router.add_post(p + "/run", self._run)
        app.router.add_post(p + "/runsync", self._runsync)
        for verb in ("GET", "POST"):
            app.router.add_route(verb, p + "/status/{job_id}", self._status)
            app.router.add_route(verb, p + "/stream/{job_id}", self._stream)
            app.router.add_route(verb, p + "/cancel/{job_id}", self._cancel)
            app.router.add_route(verb, p + "/health", self._health)
        app.router.add_post(p + "/purge-queue", self._purge_queue)
        app.router.add_route("*", p + "/openai/v1/{path:.*}", self._openai)
        app.router.add_get(p + "/job-take/{worker_id}", self._job_take)
        app.router.add_get(p + "/job-take-batch/{worker_id}", self._job_take)
        app.router.add_get(p + "/job-stop/{worker_id}", self._job_stop)
        app.router.add_post(p + "/job-done/{worker_id}/{job_id}", self._job_done)
        app.router.add_post(p + "/job-stream/{worker_id}/{job_id}", self._job_stream)
        app.router.add_get(p + "/ping/{worker_id}", self._ping)
        return app

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _wait_until(self, ready: Any, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until ``ready()`` is true or the endpoint is closing."""
        assert self._changed is not None
        async with self._changed:
            try:
                async with asyncio.timeout(max(timeout_s, 0.0)):
                    await self._changed.wait_for(lambda: self._closing or ready())
            except TimeoutError:
                pass
            return bool(ready())

    async def _sweep(self) -> None:
        """Every 0.2 s: time out jobs past their execution limit, forget expired results."""
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            changed = False
            for job in list(self._jobs.values()):
                if (job.status == IN_PROGRESS and job.execution_timeout_s is not None
                        and job.started is not None
                        and now - job.started > job.execution_timeout_s):
                    self._stop_running(job, TIMED_OUT)
                    changed = True
                elif job.ended is not None:
                    keep = self.runsync_retention_s if job.sync else self.run_retention_s
                    if now - job.ended > keep:
                        del self._jobs[job.id]
            if changed:
                await self._notify()

    async def _drain(self, worker_id: str) -> None:
        self._draining.add(worker_id)
        await self._notify()

    async def _wait_status(self, job_id: str, statuses: frozenset[str],
                           timeout_s: float) -> JobStatusBody:
        def reached() -> bool:
            job = self._jobs.get(job_id)
            return job is None or job.status in statuses

        if not await self._wait_until(reached, timeout_s):
            raise TimeoutError(f"job {job_id} not in {sorted(statuses)} after {timeout_s} s")
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(f"job {job_id} does not exist (never submitted, or expired)")
        return job.body()

    # -------------------------------------------------------------------- job state changes
    def _finish(self, job: _Job, status: str) -> None:
        job.status = status
        job.ended = time.monotonic()
        if status in self._counts:
            self._counts[status] += 1

    def _stop_running(self, job: _Job, status: str) -> None:
        """End a running job as CANCELLED or TIMED_OUT and tell its worker to stop it."""
        self._finish(job, status)
        if job.worker_id is not None:
            self._stops.setdefault(job.worker_id, {})[job.id] = time.monotonic() + STOP_GIVE_UP_S

    # ---------------------------------------------------------------------- client routes
    def _refused(self, request: web.Request) -> web.Response | None:
        if request.match_info["endpoint_id"] != self.endpoint_id:
            return _error(404, f"endpoint {request.match_info['endpoint_id']!r} does not exist "
                               f"here; this local endpoint is {self.endpoint_id!r}")
        if self.api_key is None:
            return None
        if not _key_matches(request, [self.api_key]):
            return _error(401, "unauthorized: send 'Authorization: Bearer <api key>' with the "
                               "key this endpoint was started with")
        return None

    async def _submit(self, request: web.Request, sync: bool) -> _Job | web.Response:
        route, limit = ("/runsync", self.runsync_limit_bytes) if sync else \
            ("/run", self.run_limit_bytes)
        raw = await _read_capped(request, limit)
        if raw is None:
            return _error(413, f"request body is larger than {route} accepts "
                               f"({_size(limit)}); pass large inputs by URL")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, f"{route} body is not valid JSON")
        if not isinstance(body, dict) or "input" not in body:
            return _error(400, f'{route} body must be a JSON object with an "input" field')
        policy = body.get("policy") if isinstance(body.get("policy"), dict) else {}
        timeout_ms = policy.get("executionTimeout")
        if timeout_ms is not None and (not isinstance(timeout_ms, int | float) or timeout_ms <= 0):
            return _error(400, "policy.executionTimeout must be a positive number of ms")
        return await self._enqueue(
            body["input"], sync, {k: body[k] for k in ("webhook", "s3Config") if k in body},
            timeout_ms / 1000 if timeout_ms is not None else self.execution_timeout_s)

    async def _enqueue(self, job_input: Any, sync: bool, passthrough: dict[str, Any],
                       execution_timeout_s: float | None) -> _Job:
        job = _Job(
            id=f"{'sync-' if sync else ''}{uuid.uuid4()}-u1",
            input=job_input,
            sync=sync,
            passthrough=passthrough,
            execution_timeout_s=execution_timeout_s,
        )
        self._jobs[job.id] = job
        self._queue.append(job.id)
        await self._notify()
        return job

    async def _run(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        job = await self._submit(request, sync=False)
        if isinstance(job, web.Response):
            return job
        return web.json_response({"id": job.id, "status": job.status})

    async def _runsync(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        lo, hi = RUNSYNC_WAIT_RANGE_MS
        raw_wait = request.query.get("wait", str(RUNSYNC_WAIT_MS))
        try:
            wait_ms = int(raw_wait)
        except ValueError:
            return _error(400, f"wait={raw_wait!r} is not an integer; use {lo}..{hi} (ms)")
        if not lo <= wait_ms <= hi:
            return _error(400, f"wait={wait_ms} is out of range; use {lo}..{hi} (ms)")
        job = await self._submit(request, sync=True)
        if isinstance(job, web.Response):
            return job
        await self._wait_until(lambda: job.status in FINAL_STATUSES, wait_ms / 1000)
        if job.status in FINAL_STATUSES:
            return web.json_response(job.body())
        return web.json_response({"id": job.id, "status": job.status})

    def _known_job(self, request: web.Request) -> _Job | web.Response:
        if refused := self._refused(request):
            return refused
        job = self._jobs.get(request.match_info["job_id"])
        if job is None:
            return _error(404, "request does not exist (never submitted, or its result "
                               "expired)")
        return job

    async def _status(self, request: web.Request) -> web.Response:
        job = self._known_job(request)
        return job if isinstance(job, web.Response) else web.json_response(job.body())

    async def _stream(self, request: web.Request) -> web.Response:
        job = self._known_job(request)
        if isinstance(job, web.Response):
            return job
        chunks, job.unread_chunks = job.unread_chunks, []
        answer: dict[str, Any] = {"status": job.status, "stream": chunks}
        if job.error is not None:
            answer["error"] = job.error
        return web.json_response(answer)

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self._known_job(request)
        if isinstance(job, web.Response):
            return job
        if job.status == IN_QUEUE:
            self._queue.remove(job.id)
            self._finish(job, CANCELLED)
        elif job.status == IN_PROGRESS:
            self._stop_running(job, CANCELLED)
        await self._notify()
        return web.json_response({"id": job.id, "status": job.status})

    async def _health(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        now = time.monotonic()
        running_jobs = [j for j in self._jobs.values() if j.status == IN_PROGRESS]
        live = {w for w, t in self._seen.items()
                if now - t <= WORKER_SEEN_S and w not in self._draining}
        busy = {j.worker_id for j in running_jobs} & live
        return web.json_response({
            "jobs": {
                "completed": self._counts[COMPLETED],
                "failed": self._counts[FAILED],
                "inProgress": len(running_jobs),
                "inQueue": len(self._queue),
                "retried": 0,
            },
            "workers": {
                "idle": len(live - busy),
                "initializing": 0,
                "ready": len(live - busy),
                "running": len(busy),
                "throttled": 0,
                "unhealthy": 0,
            },
        })

    async def _purge_queue(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        removed = len(self._queue)
        while self._queue:
            self._finish(self._jobs[self._queue.popleft()], CANCELLED)
        await self._notify()
        return web.json_response({"removed": removed, "status": "completed"})

    # ------------------------------------------------------------ OpenAI-compatible routes
    async def _openai(self, request: web.Request) -> web.StreamResponse:
        if refused := self._refused(request):
            return refused
        body: Any = {}
        if request.method == "POST":
            raw = await _read_capped(request, self.runsync_limit_bytes)
            if raw is None:
                return _openai_error(413, f"the request is larger than "
                                          f"{_size(self.runsync_limit_bytes)}")
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return _openai_error(400, "the request body is not valid JSON")
        job = await self._enqueue(
            {"openai_route": "/v1/" + request.match_info["path"], "openai_input": body},
            True, {}, self.execution_timeout_s)
        wait_s = self.execution_timeout_s or EXECUTION_TIMEOUT_S
        if not (isinstance(body, dict) and body.get("stream") is True):
            await self._wait_until(lambda: job.status in FINAL_STATUSES, wait_s)
            return _openai_whole(job)
        await self._wait_until(lambda: bool(job.unread_chunks) or job.status in FINAL_STATUSES,
                               wait_s)
        if not job.unread_chunks:
            return _openai_whole(job)   # failed (or ended) before its first chunk
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        while True:
            chunks, job.unread_chunks = job.unread_chunks, []
            for chunk in chunks:
                out = chunk["output"]
                await response.write((out if isinstance(out, str) else
                                      f"data: {json.dumps(out)}\n\n").encode())
            if job.status in FINAL_STATUSES and not job.unread_chunks:
                break
            if not await self._wait_until(
                    lambda: bool(job.unread_chunks) or job.status in FINAL_STATUSES, wait_s):
                break
        if job.status != COMPLETED:
            status, error = _openai_failure(job)
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        await response.write_eof()
        return response

    # ---------------------------------------------------------------------- worker routes
    def _worker(self, request: web.Request) -> str:
        """Refuse (401) a caller without the worker secret; for a worker, note its contact and
        forget stop signals for jobs it no longer holds. Every worker route calls this first,
        before it reads a body or changes anything."""
        if not _key_matches(request, self._worker_keys):
            raise web.HTTPUnauthorized(
                reason="unauthorized: worker routes need the worker secret this endpoint gave "
                       "its worker in RUNPOD_AI_API_KEY")
        worker_id = request.match_info["worker_id"]
        self._seen[worker_id] = time.monotonic()
        pending = self._stops.get(worker_id)
        if pending and request.query.get("job_in_progress") == "0":
            pending.clear()
        elif pending and "job_id" in request.query:  # ping: the ids the worker still holds
            held = set(request.query["job_id"].split(","))
            for job_id in [j for j in pending if j not in held]:
                del pending[job_id]
        return worker_id

    async def _job_take(self, request: web.Request) -> web.Response:
        worker_id = self._worker(request)
        wanted = 1
        if "job-take-batch" in request.path:
            try:
                wanted = max(1, int(request.query.get("batch_size", "1")))
            except ValueError:
                return _error(400, "batch_size must be an integer")
        if worker_id in self._draining:
            await asyncio.sleep(0.1)  # a draining worker polls in a loop; keep it from spinning
            return web.Response(status=204)
        await self._wait_until(lambda: bool(self._queue) or worker_id in self._draining,
                               self.poll_hold_s)
        if worker_id in self._draining or self._closing:
            return web.Response(status=204)
        jobs = []
        while self._queue and len(jobs) < wanted:
            job = self._jobs[self._queue.popleft()]
            job.status, job.worker_id, job.started = IN_PROGRESS, worker_id, time.monotonic()
            jobs.append(job.for_worker())
        if not jobs:
            return web.Response(status=204)
        await self._notify()
        return web.json_response(jobs if "job-take-batch" in request.path else jobs[0])

    async def _job_stop(self, request: web.Request) -> web.Response:
        """Long-poll for stop signals. A signal is repeated while the worker may hold the job:
        a cancel that lands before the SDK has made the job's task is otherwise lost (the SDK
        drops a stop for a job it does not know yet). Repeats end when the worker reports no
        job in progress, its ping omits the job, or after STOP_GIVE_UP_S."""
        worker_id = self._worker(request)
        deadline = time.monotonic() + self.poll_hold_s
        while True:
            now = time.monotonic()
            pending = self._stops.setdefault(worker_id, {})
            for job_id, give_up_at in list(pending.items()):
                if now > give_up_at:
                    del pending[job_id]
            next_due = self._stop_sent.get(worker_id, 0.0) + STOP_RESEND_S
            if pending and now >= next_due:
                self._stop_sent[worker_id] = now
                return web.json_response({"jobsToStop": list(pending)})
            if now >= deadline or worker_id in self._draining or self._closing:
                return web.Response(status=204)
            known = len(pending)
            await self._wait_until(
                lambda pending=pending, known=known: (len(pending) != known
                                                      or worker_id in self._draining),
                (min(deadline, next_due) if pending else deadline) - now)

    async def _worker_post(self, request: web.Request) -> tuple[_Job | None, Any, bool]:
        """Read a job-done or job-stream body: (job, parsed JSON, body was over the limit)."""
        self._worker(request)
        job = self._jobs.get(request.match_info["job_id"])
        raw = await _read_capped(request, self._limit_for(job))
        if raw is None:
            return job, None, True
        try:
            # The SDK sends JSON under a form content type; read the bytes, not the form.
            return job, json.loads(raw), False
        except ValueError:
            return job, None, False

    def _limit_for(self, job: _Job | None) -> int:
        """A result's limit is its route's: /runsync's for /runsync jobs, else /run's."""
        return self.runsync_limit_bytes if job is not None and job.sync else self.run_limit_bytes

    async def _job_done(self, request: web.Request) -> web.Response:
        job, data, over_limit = await self._worker_post(request)
        if over_limit:
            # Measured production behaviour (runpod-python #309): the result is refused with
            # 400 and the job still ends COMPLETED, with no output. Reproduced on purpose.
            if job is not None and job.status == IN_PROGRESS:
                self._finish(job, COMPLETED)
                await self._notify()
            return _error(400, "Failed to return job results: the result is larger than "
                               f"{_size(self._limit_for(job))}")
        if not isinstance(data, dict):
            return _error(400, "job-done body must be a JSON object")
        if job is None:
            return _error(404, "no such job (expired or purged)")
        if job.status != IN_PROGRESS:
            return web.json_response({})  # cancelled or timed out: a late result is dropped
        if data.get("status") == IN_PROGRESS:  # progress_update
            job.has_output, job.output = "output" in data, data.get("output")
            await self._notify()
            return web.json_response({})
        error = data.get("error")
        job.has_output, job.output = "output" in data, data.get("output")
        if error and isinstance(error, str):
            job.error = error
            self._finish(job, FAILED)
        else:
            if error:  # runpod-python #299: a non-string error loses the whole answer
                job.has_output, job.output = False, None
            self._finish(job, COMPLETED)
        await self._notify()
        return web.json_response({})

    async def _job_stream(self, request: web.Request) -> web.Response:
        job, data, over_limit = await self._worker_post(request)
        if over_limit:
            return _error(400, f"stream chunk is larger than {_size(self._limit_for(job))}")
        if not isinstance(data, dict):
            return _error(400, "job-stream body must be a JSON object")
        if job is not None and job.status == IN_PROGRESS:
            job.unread_chunks.append({"output": data.get("output")})
            await self._notify()
        return web.json_response({})

    async def _ping(self, request: web.Request) -> web.Response:
        self._worker(request)
        self.pings += 1
        return web.json_response({})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_matches(request: web.Request, keys: Sequence[str]) -> bool:
    """Whether the request's ``Authorization`` (raw, as the SDK's worker sends it, or
    ``Bearer <key>``) is one of ``keys``. Every key is compared, in constant time."""
    given = request.headers.get("Authorization", "").strip()
    if given[:7].lower() == "bearer ":
        given = given[7:].strip()
    found = False
    for key in keys:
        found |= secrets.compare_digest(given.encode(), key.encode())
    return found and bool(given)


def _openai_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                        "code": None}}, status=status)


def _openai_failure(job: _Job) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for a job that did not complete."""
    if job.status not in FINAL_STATUSES:
        return 504, {"error": {"message": f"the job is still {job.status}; no answer in time",
                               "type": "timeout", "param": None, "code": None}}
    if job.status != FAILED:
        return 500, {"error": {"message": f"the job ended {job.status}", "type": "server_error",
                               "param": None, "code": None}}
    try:
        body = json.loads(job.error or "")
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        body = {"error": {"message": job.error, "type": "server_error", "param": None,
                          "code": None}}
    error = body["error"]
    status = (404 if error.get("code") == "model_not_found"
              else 400 if error.get("type") == "invalid_request_error" else 500)
    return status, body


def _openai_whole(job: _Job) -> web.Response:
    """A finished job's output as the OpenAI answer: the one item of the aggregated output."""
    if job.status != COMPLETED:
        status, body = _openai_failure(job)
        return web.json_response(body, status=status)
    output = job.output
    if isinstance(output, list) and len(output) == 1:
        output = output[0]
    if not job.has_output or output is None:
        return _openai_error(502, "the job completed with no output", "server_error")
    return web.json_response(output)


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB ({n} bytes)" if n >= MIB else f"{n} bytes"


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to be over ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    data = bytearray()
    async for chunk in request.content.iter_chunked(256 * 1024):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


# -------------------------------------------------------------------------------- workers
def sdk_config_key(env: Mapping[str, str]) -> str | None:
    """The key the runpod SDK in a process with ``env`` sends on job-take, job-done, job-stream
    and job-stop instead of ``RUNPOD_AI_API_KEY``: the ``[default]`` profile's ``api_key`` in
    ``$HOME/.runpod/config.toml`` ("" if the profile has none); None when it sends the variable
    (no file, not TOML, no such profile). Mirrors ``runpod.http_client.get_auth_header``."""
    home = env.get("HOME") or os.path.expanduser("~")
    try:
        with open(Path(home) / ".runpod" / "config.toml", "rb") as f:
            profile = tomllib.load(f).get("default")
    except (OSError, ValueError):
        return None
    if not isinstance(profile, dict):
        return None
    return str(profile.get("api_key", ""))


class WorkerProcess:
    """A worker command (e.g. ``python handler.py``) run against a LocalEndpoint.

    The process gets ``base_env`` (default: this process's environment) plus the endpoint's
    ``worker_env`` plus ``extra_env``. Its output goes to ``output`` (default: inherited, so a
    terminal sees it). ``stop()`` ends it the way RunPod does: SIGTERM, after which the SDK
    takes no new job, lets in-flight jobs finish and post, and exits 0. Where the SDK would
    send a ``~/.runpod/config.toml`` key instead of the worker secret, the endpoint is told to
    accept it (a profile with an empty key is refused: the SDK would send nothing).
    """

    def __init__(self, endpoint: LocalEndpoint, command: Sequence[str],
                 worker_id: str = "local-worker", *, base_env: Mapping[str, str] | None = None,
                 extra_env: Mapping[str, str] | None = None, output: IO[Any] | None = None,
                 cwd: str | None = None) -> None:
        self.endpoint = endpoint
        self.command = list(command)
        self.worker_id = worker_id
        self.env = {**(os.environ if base_env is None else base_env),
                    "PYTHONUNBUFFERED": "1",
                    **endpoint.worker_env(worker_id), **(extra_env or {})}
        self.output = output
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        config_key = sdk_config_key(self.env)
        if config_key is not None:
            if not config_key.strip():
                raise ValueError("~/.runpod/config.toml has a [default] profile without an "
                                 "api_key: the runpod SDK would send an empty key to the "
                                 "endpoint; add the key or remove the profile")
            endpoint.accept_worker_key(config_key.strip())

    def start(self) -> WorkerProcess:
        self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd,
                                        stdout=self.output, stderr=self.output)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Return once the worker asks for jobs; raise RuntimeError if it exits or is too slow."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.endpoint.wait_for_worker(self.worker_id, timeout_s=0.2):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {shlex.join(self.command)!r} exited with code "
                                   f"{self.process.returncode} before taking jobs")
        raise RuntimeError(f"worker {shlex.join(self.command)!r} did not ask for jobs "
                           f"within {timeout_s} s")

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, let in-flight jobs drain, return the exit code (SIGKILL after ``timeout_s``)."""
        assert self.process is not None, "start() first"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            # Answer its waiting job-take and job-stop polls now, so it exits without waiting
            # out their hold, and so no job is handed to a worker that is going away.
            self.endpoint.drain_worker(self.worker_id)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Its children too: the SDK's heartbeat process would outlive it and ping on.
                for pid in [*descendants(self.process.pid), self.process.pid]:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, children first (from /proc; none where there is none)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (name) state ppid ...": the name may hold spaces and parentheses.
            parent = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat_file.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


# -------------------------------------------------------------------------------- the CLI
class _Shutdown(Exception):
    """SIGTERM to the CLI, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _raise_shutdown(signum: int, frame: object) -> None:
    raise _Shutdown


def usage_text(endpoint: LocalEndpoint, command: Sequence[str],
               key_file: Path | None = None) -> str:
    """What the CLI prints once the worker is ready: how to call the endpoint. It names where
    the client key is (``key_file``, if it made one), never the key itself."""
    if endpoint.api_key is None:
        auth, key = "", '"local"  # any key; none is checked'
    elif key_file is not None:
        auth = f' -H "Authorization: Bearer $(cat {shlex.quote(str(key_file))})"'
        key = f'open({str(key_file)!r}).read().strip()'
    else:
        auth = " -H 'Authorization: Bearer <your key>'"
        key = '"<your key>"'
    url = f"{endpoint.base_url}/{endpoint.endpoint_id}"
    lines = [
        f"Local RunPod endpoint {endpoint.endpoint_id!r} at {endpoint.base_url}",
        f"  worker: {shlex.join(command)}" if command else "  no worker started",
    ]
    if key_file is not None:
        lines.append(f"  client key: made for this run, in {key_file} (mode 0600); "
                     "clients send it as 'Authorization: Bearer <key>'")
    elif endpoint.api_key is not None:
        lines.append("  client key: the one you set; clients send 'Authorization: Bearer <key>'")
    return "\n".join([
        *lines,
        "Call it with curl:",
        f"  curl -s -X POST {url}/runsync -H 'Content-Type: application/json'{auth} "
        """-d '{"input": {"prompt": "Hello"}}'""",
        "or with the runpod SDK:",
        "  import runpod",
        f"  runpod.api_key = {key}",
        f'  runpod.endpoint_url_base = "{endpoint.base_url}"',
        f'  print(runpod.Endpoint("{endpoint.endpoint_id}").run_sync({{"prompt": "Hello"}}))',
        "Ctrl-C stops both.",
    ])


def write_key_file(path: Path) -> str:
    """Make a random client key and write it to ``path``, readable by this user only (0600).

    The file is created under a temporary name with mode 0600 from the start, then renamed
    over ``path``: the key is never readable by others, not even for a moment, and a symlink
    planted at ``path`` is replaced rather than written through. The folder is created 0700.
    """
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return key


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dev.local_endpoint [options] -- WORKER COMMAND``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m dev.local_endpoint",
        description="A local RunPod endpoint, and a worker started against it. Clients must "
                    f"send the key in ${API_KEY_ENV} when it is set (never pass a key as an "
                    "argument: command lines are readable by every user of the machine).",
        epilog="Example: python -m dev.local_endpoint --port 8000 -- python handler.py")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (127.0.0.1); any other needs a client key")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks one")
    parser.add_argument("--endpoint-id", default="local", help="the id in /v2/<id>/...")
    parser.add_argument("--key-file", type=Path, default=None,
                        help=f"without ${API_KEY_ENV}: make a client key and write it to this "
                             "file (mode 0600); the log names the file, never the key")
    parser.add_argument("--worker-id", default="local-worker", help="RUNPOD_POD_ID of the worker")
    parser.add_argument("--run-limit-mb", type=float, default=RUN_LIMIT_BYTES / MIB,
                        help="/run input and result limit, MiB (10)")
    parser.add_argument("--runsync-limit-mb", type=float, default=RUNSYNC_LIMIT_BYTES / MIB,
                        help="/runsync input and result limit, MiB (20)")
    parser.add_argument("--execution-timeout-s", type=float, default=EXECUTION_TIMEOUT_S,
                        help="jobs running longer end TIMED_OUT, seconds (600); 0: never")
    opts = parser.parse_args(args)

    # Out of this process's environment at once: the worker started below inherits it.
    api_key = os.environ.pop(API_KEY_ENV, "").strip() or None
    key_file: Path | None = None
    if api_key is None and opts.key_file is not None:
        key_file = opts.key_file.expanduser().absolute()
        try:
            api_key = write_key_file(key_file)
        except OSError as err:
            print(f"local_endpoint: cannot write the client key to {key_file}: {err}; "
                  "choose a writable --key-file", file=sys.stderr, flush=True)
            return 1
    try:
        endpoint = LocalEndpoint(
            opts.host, opts.port, opts.endpoint_id, api_key,
            run_limit_bytes=int(opts.run_limit_mb * MIB),
            runsync_limit_bytes=int(opts.runsync_limit_mb * MIB),
            execution_timeout_s=opts.execution_timeout_s or None,
        )
    except ValueError as err:
        print(f"local_endpoint: {err} (set {API_KEY_ENV}, or pass --key-file PATH to have "
              "one made)", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, _raise_shutdown)
    worker: WorkerProcess | None = None
    try:
        endpoint.start()
        if not command:
            print(usage_text(endpoint, command, key_file), flush=True)
            print("Start a worker with this environment:", flush=True)
            for name, value in endpoint.worker_env(opts.worker_id).items():
                print(f"  export {name}={shlex.quote(value)}", flush=True)
            while True:
                time.sleep(3600)
        worker = WorkerProcess(endpoint, command, opts.worker_id).start()
        worker.wait_ready()
        print(usage_text(endpoint, command, key_file), flush=True)
        assert worker.process is not None
        return worker.process.wait()
    except (KeyboardInterrupt, _Shutdown):
        return 0 if worker is None else worker.stop()
    except (RuntimeError, ValueError) as err:
        print(f"local_endpoint: {err}", file=sys.stderr, flush=True)
        return 1 if worker is None or worker.returncode is None else worker.returncode
    finally:
        if worker is not None and worker.returncode is None:
            worker.stop()
        endpoint.stop()


if __name__ == "__main__":
    sys.exit(main())

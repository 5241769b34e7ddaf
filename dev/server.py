"""The local endpoint's HTTP server: the client routes of RunPod's queue API, the client key
check, and what keeps a published port standing (pod mode serves it through RunPod's public
proxy)::

    /v2/{endpoint}/run, /runsync            POST
    /v2/{endpoint}/status/{id}, /stream/{id}, /cancel/{id}, /health   GET or POST
    /v2/{endpoint}/purge-queue              POST
    /v2/{endpoint}/openai/v1/...            OpenAI-compatible routes (see dev/local_endpoint.py)

and, beside them, the worker routes of ``dev/jobs.py``, which owns the queue and job states.

Client routes check ``api_key`` when one is set (``Authorization: Bearer <key>`` or the raw
key, compared in constant time); an endpoint bound to anything but loopback refuses to start
without one, or with one shorter than ``MIN_KEY_CHARS``, which a caller could guess.

Connections, as a public port needs: request headers must arrive whole within
``read_timeout_s`` of the connection opening (or of its previous answer), else the connection
is closed (slowloris); a body not whole ``read_timeout_s`` after its headers is answered 408 and
its connection not kept (aiohttp reads on for at most 10 s, then closes it); one peer address
holds at most ``max_connections_per_peer`` connections at once, and one more is answered 429
and closed before anything of it is read, so a flood from one address cannot take every
socket. Behind a proxy all its callers share its address: the cap is per proxy, so it is sized
for a proxy's worth of long /runsync waits.

Never imports runpod or torch: it is the platform, not the worker.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from aiohttp import web

from dev.jobs import (
    COMPLETED,
    FAILED,
    FINAL_STATUSES,
    Job,
    JobBoard,
    JobStatusBody,
)
from dev.wire import MIB, error, key_matches, peer_gate_factory, read_capped, size
from serving.config import (
    POD_KEY_MIN_CHARS,
    WORKER_POD_MAX_CONNECTIONS_PER_PEER,
    WORKER_POD_READ_TIMEOUT_S,
)

RUN_LIMIT_BYTES = 10 * MIB          # RunPod docs: /run input and result, 10 MB
RUNSYNC_LIMIT_BYTES = 20 * MIB      # RunPod docs: /runsync input and result, 20 MB
RUN_RETENTION_S = 30 * 60.0         # a /run result is kept 30 min after it ends
RUNSYNC_RETENTION_S = 60.0          # a /runsync result is kept 1 min after it ends
RUNSYNC_WAIT_MS = 90_000            # /runsync waits 90 s unless ?wait= says otherwise
RUNSYNC_WAIT_RANGE_MS = (1_000, 300_000)  # the ?wait= values RunPod documents
EXECUTION_TIMEOUT_S = 600.0         # RunPod's default endpoint execution timeout
POLL_HOLD_S = 2.0                   # how long job-take and job-stop hold an empty answer
# Pod mode's defaults, declared once in serving/config.py: headers (and a body) must arrive
# within READ_TIMEOUT_S; one peer address holds at most MAX_CONNECTIONS_PER_PEER connections;
# a client key beyond loopback has MIN_KEY_CHARS at least (a shorter one falls to guessing).
READ_TIMEOUT_S = float(WORKER_POD_READ_TIMEOUT_S.default or 0)
MAX_CONNECTIONS_PER_PEER = int(WORKER_POD_MAX_CONNECTIONS_PER_PEER.default or 0)
MIN_KEY_CHARS = POD_KEY_MIN_CHARS

_WORKER_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_T = TypeVar("_T")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalEndpoint:
    """A RunPod endpoint on loopback, served from a background thread.

    ``start()`` binds (``port=0`` picks a free port) and returns once it answers; ``stop()``
    ends it. ``base_url`` is what ``runpod.endpoint_url_base`` should be; ``worker_env(id)``
    is the environment a worker process needs to take this endpoint's jobs, including the
    worker secret that worker routes require. With ``api_key`` set, client routes refuse any
    other key with 401; a ``host`` other than loopback requires one of at least
    ``MIN_KEY_CHARS`` characters (ValueError otherwise). Limits are bytes of request (and
    result) body; retention and timeouts are seconds.
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
        read_timeout_s: float = READ_TIMEOUT_S,
        max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
    ) -> None:
        if not is_loopback(host):
            if not api_key:
                raise ValueError(f"refusing to serve {host!r} without a client key: anyone who "
                                 "can reach it could run jobs; set an api_key, or bind "
                                 "127.0.0.1")
            if len(api_key) < MIN_KEY_CHARS:
                raise ValueError(f"refusing to serve {host!r} with a client key of "
                                 f"{len(api_key)} characters: use at least {MIN_KEY_CHARS}, "
                                 "or bind 127.0.0.1")
        if read_timeout_s <= 0 or max_connections_per_peer < 1:
            raise ValueError("read_timeout_s must be > 0 and max_connections_per_peer >= 1")
        self.host = host
        self.port = port
        self.endpoint_id = endpoint_id
        self.api_key = api_key or None
        self.execution_timeout_s = execution_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections_per_peer = max_connections_per_peer
        self.board = JobBoard(run_limit_bytes=run_limit_bytes,
                              runsync_limit_bytes=runsync_limit_bytes,
                              run_retention_s=run_retention_s,
                              runsync_retention_s=runsync_retention_s,
                              poll_hold_s=poll_hold_s, read_timeout_s=read_timeout_s)
        self.peers: dict[str, int] = {}          # peer address -> open connections
        self._loop: asyncio.AbstractEventLoop | None = None
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

    @property
    def pings(self) -> int:
        """Heartbeats received (the SDK pings from a child process)."""
        return self.board.pings

    @property
    def run_limit_bytes(self) -> int:
        return self.board.run_limit_bytes

    @property
    def runsync_limit_bytes(self) -> int:
        return self.board.runsync_limit_bytes

    # How long finished jobs' results are kept (RunPod: 30 min for /run, 1 min for /runsync);
    # settable on a running endpoint, as tests that read every result at the end do.
    @property
    def run_retention_s(self) -> float:
        return self.board.run_retention_s

    @run_retention_s.setter
    def run_retention_s(self, seconds: float) -> None:
        self.board.run_retention_s = seconds

    @property
    def runsync_retention_s(self) -> float:
        return self.board.runsync_retention_s

    @runsync_retention_s.setter
    def runsync_retention_s(self, seconds: float) -> None:
        self.board.runsync_retention_s = seconds

    def timings(self, since: float = 0.0) -> list[tuple[float, float]]:
        """(queue wait, execution) seconds of each job submitted after ``since`` (a
        ``time.monotonic()``) that has ended: what RunPod reports as delayTime/executionTime."""
        jobs = list(self.board.jobs.values())
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
        if not (1 <= len(worker_id) <= 64 and set(worker_id) <= _WORKER_ID_CHARS):
            raise ValueError(f"worker id {worker_id!r}: use 1..64 letters, digits, - or _")
        api = f"{self.base_url}/{self.endpoint_id}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{api}/job-take/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{api}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{api}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_PING": f"{api}/ping/$RUNPOD_POD_ID?gpu=local",
            "RUNPOD_PING_INTERVAL": "10000",             # ms, RunPod's default
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": self.board.worker_key,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    def accept_worker_key(self, key: str) -> None:
        """Also accept ``key`` on worker routes (the SDK's config-file key; see
        ``dev/local_endpoint.py``)."""
        if not key:
            raise ValueError("an empty worker key would let any caller in")
        if key not in self.board.worker_keys:
            self.board.worker_keys.append(key)

    def wait_for_worker(self, worker_id: str, timeout_s: float = 30.0) -> bool:
        """True once ``worker_id`` has called any worker route; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if worker_id in self.board.seen:
                return True
            time.sleep(0.05)
        return False

    def drain_worker(self, worker_id: str) -> None:
        """Give ``worker_id`` no more jobs and answer its waiting polls now (before SIGTERM)."""
        self._call(self.board.drain(worker_id))

    def wait_for_status(self, job_id: str,
                        statuses: Sequence[str] = tuple(FINAL_STATUSES),
                        timeout_s: float = 30.0) -> JobStatusBody:
        """Block until the job is in one of ``statuses``; raise TimeoutError after ``timeout_s``."""
        return self._call(self.board.wait_status(job_id, frozenset(statuses), timeout_s),
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
        self._stopped = asyncio.Event()
        self.board.open()
        # keepalive_timeout is aiohttp's clock for a connection waiting for its next request's
        # headers: armed when the connection opens and after each answer, it closes one whose
        # headers are not whole by then (its default, an hour, let half-open connections pile
        # up). A request being handled is never cut by it.
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=2.0,
                               keepalive_timeout=self.read_timeout_s)
        await runner.setup()
        server: asyncio.Server | None = None
        try:
            assert runner.server is not None
            server = await self._loop.create_server(
                peer_gate_factory(runner.server, self.peers, self.max_connections_per_peer),
                self.host, self.port, reuse_address=True)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            sweeper = asyncio.create_task(self.board.sweep())
            await self._stopped.wait()
            sweeper.cancel()
            await self.board.close()
        finally:
            if server is not None:
                server.close()
            await runner.cleanup()

    def _app(self) -> web.Application:
        # Streamed, capped reads below; aiohttp's own cap must not answer first.
        app = web.Application(middlewares=[_errors_as_json],
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
        self.board.add_routes(app, p, job_take=self._job_take)
        return app

    # A seam for subclasses that watch the worker side (a test records every job-take).
    async def _job_take(self, request: web.Request) -> web.Response:
        return await self.board.job_take(request)

    @property
    def _jobs(self) -> dict[str, Job]:
        return self.board.jobs

    # ---------------------------------------------------------------------- client routes
    def _refused(self, request: web.Request) -> web.Response | None:
        if request.match_info["endpoint_id"] != self.endpoint_id:
            return error(404, f"endpoint {request.match_info['endpoint_id']!r} does not exist "
                              f"here; this local endpoint is {self.endpoint_id!r}")
        if self.api_key is None:
            return None
        if not key_matches(request, [self.api_key]):
            return error(401, "unauthorized: send 'Authorization: Bearer <api key>' with the "
                              "key this endpoint was started with")
        return None

    async def _submit(self, request: web.Request, sync: bool) -> Job | web.Response:
        route, limit = ("/runsync", self.runsync_limit_bytes) if sync else \
            ("/run", self.run_limit_bytes)
        raw = await read_capped(request, limit, self.read_timeout_s)
        if raw is None:
            return error(413, f"request body is larger than {route} accepts "
                              f"({size(limit)}); pass large inputs by URL")
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, f"{route} body is not valid JSON")
        if not isinstance(body, dict) or "input" not in body:
            return error(400, f'{route} body must be a JSON object with an "input" field')
        policy = body.get("policy") if isinstance(body.get("policy"), dict) else {}
        timeout_ms = policy.get("executionTimeout")
        if timeout_ms is not None and (not isinstance(timeout_ms, int | float) or timeout_ms <= 0):
            return error(400, "policy.executionTimeout must be a positive number of ms")
        return await self.board.enqueue(
            body["input"], sync, {k: body[k] for k in ("webhook", "s3Config") if k in body},
            timeout_ms / 1000 if timeout_ms is not None else self.execution_timeout_s)

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
            return error(400, f"wait={raw_wait!r} is not an integer; use {lo}..{hi} (ms)")
        if not lo <= wait_ms <= hi:
            return error(400, f"wait={wait_ms} is out of range; use {lo}..{hi} (ms)")
        job = await self._submit(request, sync=True)
        if isinstance(job, web.Response):
            return job
        await self.board.wait_until(lambda: job.status in FINAL_STATUSES, wait_ms / 1000)
        if job.status in FINAL_STATUSES:
            return web.json_response(job.body())
        return web.json_response({"id": job.id, "status": job.status})

    def _known_job(self, request: web.Request) -> Job | web.Response:
        if refused := self._refused(request):
            return refused
        job = self.board.jobs.get(request.match_info["job_id"])
        if job is None:
            return error(404, "request does not exist (never submitted, or its result "
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
        await self.board.cancel(job)
        return web.json_response({"id": job.id, "status": job.status})

    async def _health(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        return web.json_response(self.board.health())

    async def _purge_queue(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        removed = await self.board.purge()
        return web.json_response({"removed": removed, "status": "completed"})

    # ------------------------------------------------------------ OpenAI-compatible routes
    async def _openai(self, request: web.Request) -> web.StreamResponse:
        if refused := self._refused(request):
            return refused
        body: Any = {}
        if request.method == "POST":
            raw = await read_capped(request, self.runsync_limit_bytes, self.read_timeout_s)
            if raw is None:
                return _openai_error(413, f"the request is larger than "
                                          f"{size(self.runsync_limit_bytes)}")
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return _openai_error(400, "the request body is not valid JSON")
        job = await self.board.enqueue(
            {"openai_route": "/v1/" + request.match_info["path"], "openai_input": body},
            True, {}, self.execution_timeout_s)
        wait_s = self.execution_timeout_s or EXECUTION_TIMEOUT_S
        if not (isinstance(body, dict) and body.get("stream") is True):
            await self.board.wait_until(lambda: job.status in FINAL_STATUSES, wait_s)
            return _openai_whole(job)
        await self.board.wait_until(
            lambda: bool(job.unread_chunks) or job.status in FINAL_STATUSES, wait_s)
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
            if not await self.board.wait_until(
                    lambda: bool(job.unread_chunks) or job.status in FINAL_STATUSES, wait_s):
                break
        if job.status != COMPLETED:
            status, failure = _openai_failure(job)
            await response.write(f"data: {json.dumps(failure)}\n\n".encode())
        await response.write_eof()
        return response


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        answer = error(exc.status, exc.reason)
        if exc.headers.get("Connection") == "close":
            answer.force_close()
        return answer


# ------------------------------------------------------------------------- OpenAI answers
def _openai_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                        "code": None}}, status=status)


def _openai_failure(job: Job) -> tuple[int, dict[str, Any]]:
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
    err = body["error"]
    status = (404 if err.get("code") == "model_not_found"
              else 400 if err.get("type") == "invalid_request_error" else 500)
    return status, body


def _openai_whole(job: Job) -> web.Response:
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

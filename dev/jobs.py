"""The platform's job protocol, as the local endpoint plays it: the queue, each job's states, and
the routes a worker calls (the worker side of RunPod's queue API)::

    /v2/{endpoint}/job-take/{worker}        one job, or 204       (long-poll)
    /v2/{endpoint}/job-take-batch/{worker}  a list of jobs, or 204 (long-poll)
    /v2/{endpoint}/job-stop/{worker}        {"jobsToStop": [...]}, or 204 (long-poll)
    /v2/{endpoint}/job-done/{worker}/{id}   result or progress (JSON, form type)
    /v2/{endpoint}/job-stream/{worker}/{id} one {"output": chunk} per yield
    /v2/{endpoint}/ping/{worker}            heartbeat

A job goes IN_QUEUE -> IN_PROGRESS (taken) -> COMPLETED | FAILED (its worker posted), or
CANCELLED (cancel, purge) or TIMED_OUT (past its execution timeout) from either; a stop signal
then reaches its worker through job-stop. Ended jobs are kept for their retention, then
forgotten. Faithful to production, as measured against the runpod SDK, faults included (see
``dev/local_endpoint.py``).

Every worker route answers only a caller that sends a worker key (``JobBoard.worker_keys``) and
checks it before it reads a body or changes anything; a refused caller is not even counted as a
worker. ``dev/server.py`` serves these routes beside the client routes; this module owns the
state both change, and never speaks to clients. Never imports runpod or torch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from aiohttp import web

from dev.wire import error, key_matches, read_capped, size

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

STOP_RESEND_S = 0.5                 # a stop signal is repeated this often while the worker
STOP_GIVE_UP_S = 10.0               # may still hold the job, for at most this long
WORKER_SEEN_S = 15.0                # a worker unheard of for longer is not counted by /health
SWEEP_EVERY_S = 0.2                 # how often timeouts and retention are checked


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
class Job:
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


class JobBoard:
    """The queue, every job's state, and the worker routes that change them.

    Lives on the endpoint's event loop: ``open()`` there before serving, ``close()`` to answer
    every waiting long-poll. Limits are bytes of result body (a job's route decides which);
    times are seconds.
    """

    def __init__(self, *, run_limit_bytes: int, runsync_limit_bytes: int,
                 run_retention_s: float, runsync_retention_s: float, poll_hold_s: float,
                 read_timeout_s: float) -> None:
        self.run_limit_bytes = run_limit_bytes
        self.runsync_limit_bytes = runsync_limit_bytes
        self.run_retention_s = run_retention_s
        self.runsync_retention_s = runsync_retention_s
        self.poll_hold_s = poll_hold_s
        self.read_timeout_s = read_timeout_s
        self.pings = 0                                  # heartbeats received
        self.worker_key = secrets.token_urlsafe(32)     # handed to workers in worker_env
        self.worker_keys = [self.worker_key]            # keys worker routes accept
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.seen: dict[str, float] = {}                # worker id -> last contact
        self.draining: set[str] = set()
        self.counts = {COMPLETED: 0, FAILED: 0}
        self.closing = False
        self._stops: dict[str, dict[str, float]] = {}   # worker id -> {job id: give up at}
        self._stop_sent: dict[str, float] = {}          # worker id -> last stop delivery
        self._changed: asyncio.Condition | None = None

    # --------------------------------------------------------------------- on the loop
    def open(self) -> None:
        """Make the condition every long-poll waits on; call on the serving loop."""
        self._changed = asyncio.Condition()

    async def close(self) -> None:
        """Answer every waiting long-poll now; no poll waits from here on."""
        self.closing = True
        await self.notify()

    async def notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until ``ready()`` is true or the board is closing."""
        assert self._changed is not None
        async with self._changed:
            try:
                async with asyncio.timeout(max(timeout_s, 0.0)):
                    await self._changed.wait_for(lambda: self.closing or ready())
            except TimeoutError:
                pass
            return bool(ready())

    async def sweep(self) -> None:
        """Forever: time out jobs past their execution limit, forget expired results."""
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            now = time.monotonic()
            changed = False
            for job in list(self.jobs.values()):
                if (job.status == IN_PROGRESS and job.execution_timeout_s is not None
                        and job.started is not None
                        and now - job.started > job.execution_timeout_s):
                    self.stop_running(job, TIMED_OUT)
                    changed = True
                elif job.ended is not None:
                    keep = self.runsync_retention_s if job.sync else self.run_retention_s
                    if now - job.ended > keep:
                        del self.jobs[job.id]
            if changed:
                await self.notify()

    async def drain(self, worker_id: str) -> None:
        """Give ``worker_id`` no more jobs and answer its waiting polls now."""
        self.draining.add(worker_id)
        await self.notify()

    async def wait_status(self, job_id: str, statuses: frozenset[str],
                          timeout_s: float) -> JobStatusBody:
        def reached() -> bool:
            job = self.jobs.get(job_id)
            return job is None or job.status in statuses

        if not await self.wait_until(reached, timeout_s):
            raise TimeoutError(f"job {job_id} not in {sorted(statuses)} after {timeout_s} s")
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(f"job {job_id} does not exist (never submitted, or expired)")
        return job.body()

    # --------------------------------------------------------------------- state changes
    async def enqueue(self, job_input: Any, sync: bool, passthrough: dict[str, Any],
                      execution_timeout_s: float | None) -> Job:
        job = Job(
            id=f"{'sync-' if sync else ''}{uuid.uuid4()}-u1",
            input=job_input,
            sync=sync,
            passthrough=passthrough,
            execution_timeout_s=execution_timeout_s,
        )
        self.jobs[job.id] = job
        self.queue.append(job.id)
        await self.notify()
        return job

    def finish(self, job: Job, status: str) -> None:
        job.status = status
        job.ended = time.monotonic()
        if status in self.counts:
            self.counts[status] += 1

    def stop_running(self, job: Job, status: str) -> None:
        """End a running job as CANCELLED or TIMED_OUT and tell its worker to stop it."""
        self.finish(job, status)
        if job.worker_id is not None:
            self._stops.setdefault(job.worker_id, {})[job.id] = time.monotonic() + STOP_GIVE_UP_S

    async def cancel(self, job: Job) -> None:
        """Cancel a queued job (never handed out) or a running one (its worker is told)."""
        if job.status == IN_QUEUE:
            self.queue.remove(job.id)
            self.finish(job, CANCELLED)
        elif job.status == IN_PROGRESS:
            self.stop_running(job, CANCELLED)
        await self.notify()

    async def purge(self) -> int:
        """Cancel every queued job; how many there were."""
        removed = len(self.queue)
        while self.queue:
            self.finish(self.jobs[self.queue.popleft()], CANCELLED)
        await self.notify()
        return removed

    def health(self) -> dict[str, Any]:
        """What /health answers: job counts, and workers heard from lately."""
        now = time.monotonic()
        running_jobs = [j for j in self.jobs.values() if j.status == IN_PROGRESS]
        live = {w for w, t in self.seen.items()
                if now - t <= WORKER_SEEN_S and w not in self.draining}
        busy = {j.worker_id for j in running_jobs} & live
        return {
            "jobs": {
                "completed": self.counts[COMPLETED],
                "failed": self.counts[FAILED],
                "inProgress": len(running_jobs),
                "inQueue": len(self.queue),
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
        }

    def limit_for(self, job: Job | None) -> int:
        """A result's limit is its route's: /runsync's for /runsync jobs, else /run's."""
        return self.runsync_limit_bytes if job is not None and job.sync else self.run_limit_bytes

    # --------------------------------------------------------------------- worker routes
    def add_routes(self, app: web.Application, prefix: str,
                   job_take: Callable[[web.Request], Awaitable[web.Response]] | None = None
                   ) -> None:
        """Serve the worker routes under ``prefix`` (``/v2/{endpoint_id}``); ``job_take``
        answers job-take and job-take-batch in place of ``self.job_take`` (it calls it)."""
        take = job_take or self.job_take
        app.router.add_get(prefix + "/job-take/{worker_id}", take)
        app.router.add_get(prefix + "/job-take-batch/{worker_id}", take)
        app.router.add_get(prefix + "/job-stop/{worker_id}", self._job_stop)
        app.router.add_post(prefix + "/job-done/{worker_id}/{job_id}", self._job_done)
        app.router.add_post(prefix + "/job-stream/{worker_id}/{job_id}", self._job_stream)
        app.router.add_get(prefix + "/ping/{worker_id}", self._ping)

    def _worker(self, request: web.Request) -> str:
        """Refuse (401) a caller without a worker key; for a worker, note its contact and
        forget stop signals for jobs it no longer holds. Every worker route calls this first,
        before it reads a body or changes anything."""
        if not key_matches(request, self.worker_keys):
            raise web.HTTPUnauthorized(
                reason="unauthorized: worker routes need the worker secret this endpoint gave "
                       "its worker in RUNPOD_AI_API_KEY")
        worker_id = request.match_info["worker_id"]
        self.seen[worker_id] = time.monotonic()
        pending = self._stops.get(worker_id)
        if pending and request.query.get("job_in_progress") == "0":
            pending.clear()
        elif pending and "job_id" in request.query:  # ping: the ids the worker still holds
            held = set(request.query["job_id"].split(","))
            for job_id in [j for j in pending if j not in held]:
                del pending[job_id]
        return worker_id

    async def job_take(self, request: web.Request) -> web.Response:
        """job-take and job-take-batch: long-poll for queued jobs, hand out up to the number
        asked for (``batch_size``)."""
        worker_id = self._worker(request)
        wanted = 1
        if "job-take-batch" in request.path:
            try:
                wanted = max(1, int(request.query.get("batch_size", "1")))
            except ValueError:
                return error(400, "batch_size must be an integer")
        if worker_id in self.draining:
            await asyncio.sleep(0.1)  # a draining worker polls in a loop; keep it from spinning
            return web.Response(status=204)
        await self.wait_until(lambda: bool(self.queue) or worker_id in self.draining,
                              self.poll_hold_s)
        if worker_id in self.draining or self.closing:
            return web.Response(status=204)
        jobs = []
        while self.queue and len(jobs) < wanted:
            job = self.jobs[self.queue.popleft()]
            job.status, job.worker_id, job.started = IN_PROGRESS, worker_id, time.monotonic()
            jobs.append(job.for_worker())
        if not jobs:
            return web.Response(status=204)
        await self.notify()
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
            if now >= deadline or worker_id in self.draining or self.closing:
                return web.Response(status=204)
            known = len(pending)
            await self.wait_until(
                lambda pending=pending, known=known: (len(pending) != known
                                                      or worker_id in self.draining),
                (min(deadline, next_due) if pending else deadline) - now)

    async def _worker_post(self, request: web.Request) -> tuple[Job | None, Any, bool]:
        """Read a job-done or job-stream body: (job, parsed JSON, body was over the limit)."""
        self._worker(request)
        job = self.jobs.get(request.match_info["job_id"])
        raw = await read_capped(request, self.limit_for(job), self.read_timeout_s)
        if raw is None:
            return job, None, True
        try:
            # The SDK sends JSON under a form content type; read the bytes, not the form.
            return job, json.loads(raw), False
        except ValueError:
            return job, None, False

    async def _job_done(self, request: web.Request) -> web.Response:
        job, data, over_limit = await self._worker_post(request)
        if over_limit:
            # Measured production behaviour (runpod-python #309): the result is refused with
            # 400 and the job still ends COMPLETED, with no output. Reproduced on purpose.
            if job is not None and job.status == IN_PROGRESS:
                self.finish(job, COMPLETED)
                await self.notify()
            return error(400, "Failed to return job results: the result is larger than "
                              f"{size(self.limit_for(job))}")
        if not isinstance(data, dict):
            return error(400, "job-done body must be a JSON object")
        if job is None:
            return error(404, "no such job (expired or purged)")
        if job.status != IN_PROGRESS:
            return web.json_response({})  # cancelled or timed out: a late result is dropped
        if data.get("status") == IN_PROGRESS:  # progress_update
            job.has_output, job.output = "output" in data, data.get("output")
            await self.notify()
            return web.json_response({})
        err = data.get("error")
        job.has_output, job.output = "output" in data, data.get("output")
        if err and isinstance(err, str):
            job.error = err
            self.finish(job, FAILED)
        else:
            if err:  # runpod-python #299: a non-string error loses the whole answer
                job.has_output, job.output = False, None
            self.finish(job, COMPLETED)
        await self.notify()
        return web.json_response({})

    async def _job_stream(self, request: web.Request) -> web.Response:
        job, data, over_limit = await self._worker_post(request)
        if over_limit:
            return error(400, f"stream chunk is larger than {size(self.limit_for(job))}")
        if not isinstance(data, dict):
            return error(400, "job-stream body must be a JSON object")
        if job is not None and job.status == IN_PROGRESS:
            job.unread_chunks.append({"output": data.get("output")})
            await self.notify()
        return web.json_response({})

    async def _ping(self, request: web.Request) -> web.Response:
        self._worker(request)
        self.pings += 1
        return web.json_response({})

"""How the runpod worker loop takes jobs: as soon as a slot is free, each job counted once.

Owns one class, ``Intake``, which ``serving/start.py`` puts in place of the SDK's ``JobScaler``
before ``runpod.serverless.start`` (``patches.install_intake``). The loop stays the SDK's
production loop: its job fetch (``get_job``, the batch job-take), its job runner and result
posts (``handle_job``), stop signals, heartbeat, fitness checks and SIGTERM drain are untouched.
Only the scheduling between them changes, where runpod 1.12.0 (``serverless/modules/rp_scale.py``)
caps a worker whose jobs are short:

- a taken job is counted twice until its task starts (it is in the queue and in the progress
  set), so after taking a burst the worker asks for fewer jobs than it has room for, believes
  itself full and sleeps 1 s while jobs wait in the platform's queue;
- when full, it sleeps 1 s before asking again, however soon a job ends;
- a taken job waits for ``run_jobs``' next 0.1 s poll before its task starts.

``Intake`` counts each job once, asks again as soon as a job ends, and starts a taken job at
once. It also runs only what it can run: an element of the job-take answer that is not an object
with a non-empty string ``id``, or whose id the worker already holds, is dropped with one log
line naming what was wrong, never its content, and the good jobs taken with it run. In 1.12.0
such an element ends the SDK's loop: without an ``id`` it exits 1 and loses the jobs taken with
it; with an integer one it fails every later job-take URL and spins without polling again while
the heartbeat still reports the worker healthy. Errors the loop retries are logged, and an error
waits ``ERROR_WAIT_S`` before the next job-take rather than asking again at once.

The SDK's hooks cannot do this: 1.12.0 reads ``jobs_fetcher`` and ``jobs_handler`` from the start
config only in its local test mode (no ``RUNPOD_WEBHOOK_GET_JOB``), and a
``concurrency_modifier`` cannot change how jobs are counted (a changed value even stops intake
until every job has drained). ``Intake`` is installed only on the SDK version it was written
against; on any other the SDK's own scaler runs and one warning says so. ``WORKER_INTAKE=sdk``
chooses the SDK's own scaler.

Imports runpod: only ``patches.install_intake`` imports this module, on the worker-loop path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from runpod.http_client import TooManyRequests
from runpod.serverless.modules import rp_scale

WAKE_S = 0.1          # the SDK's own poll, kept only so shutdown is noticed as soon as before
FULL_WAIT_S = 1.0     # the SDK's pause when full; a job ending cuts it short
ERROR_WAIT_S = 1.0    # after a failed job-take; SIGTERM cuts it short

log = logging.getLogger("worker.intake")
sdk_log = rp_scale.log   # the SDK's logger: the loop's own messages keep its format


class Intake(rp_scale.JobScaler):
    """The SDK's ``JobScaler`` with its intake counted once and driven by events."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._job_ended = asyncio.Event()     # a slot is free: ask for jobs now
        self._job_taken = asyncio.Event()     # a job is queued: start it now

    def current_occupancy(self) -> int:
        # A taken job is in job_progress from the moment it is queued until its task ends; the
        # SDK adds the queue's length to this, counting a queued job twice.
        return self.job_progress.get_job_count()

    async def get_jobs(self, session: Any) -> None:
        """The SDK's ``get_jobs``, except that a full worker waits for a job to end."""
        while self.is_alive():
            await self.set_scale()
            jobs_needed = self.current_concurrency - self.current_occupancy()
            if jobs_needed <= 0:
                self._job_ended.clear()   # no await since counting: no end can be missed
                await _wait(self._job_ended, FULL_WAIT_S)
                continue
            try:
                acquired = await asyncio.wait_for(self.jobs_fetcher(session, jobs_needed),
                                                  timeout=self.jobs_fetcher_timeout)
                jobs = self._runnable(acquired or [])
                if not jobs:
                    continue
                for job in jobs:
                    await self.jobs_queue.put(job)
                    self.job_progress.add(job)
                self._job_taken.set()
                sdk_log.info(f"Jobs in queue: {self.jobs_queue.qsize()}")
            except TooManyRequests:
                await asyncio.sleep(5)   # the SDK's debounce
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                log.debug("job-take: no answer within %s s; asking again",
                          self.jobs_fetcher_timeout)
            except Exception as error:  # noqa: BLE001 - as the SDK: log, ask again
                sdk_log.error(f"Failed to get job. | Error Type: {type(error).__name__} | "
                              f"Error Message: {error}")
                await _wait(self._shutdown_event, ERROR_WAIT_S)
            finally:
                await asyncio.sleep(0)

    def _runnable(self, acquired: list[Any]) -> list[dict[str, Any]]:
        """The taken jobs the loop can run; one log line for each element dropped."""
        jobs: list[dict[str, Any]] = []
        held = {job.id for job in self.job_progress}
        for position, job in enumerate(acquired, 1):
            problem = _malformed(job)
            if problem is None and job["id"] in held:
                problem = "its id is a job this worker already holds"
            if problem is not None:
                log.error("job-take answer, element %d of %d: %s; dropped, the other jobs run",
                          position, len(acquired), problem)
                continue
            held.add(job["id"])
            jobs.append(job)
        return jobs

    async def run_jobs(self, session: Any) -> None:
        """The SDK's ``run_jobs``, except that a taken job wakes it."""
        tasks: set[asyncio.Task[Any]] = set()
        last_count = 0
        while self.is_alive() or not self.jobs_queue.empty():
            while len(tasks) < self.current_concurrency and not self.jobs_queue.empty():
                job = self.jobs_queue.get_nowait()
                task = asyncio.create_task(self.handle_job(session, job))
                tasks.add(task)
                self.jobs_tasks[job["id"]] = task
            if len(tasks) != last_count:
                sdk_log.info(f"Jobs in progress: {len(tasks)}")
                last_count = len(tasks)
            self._job_taken.clear()      # the queue was emptied (or no slot) since the last set
            taken = asyncio.ensure_future(self._job_taken.wait())
            done, _ = await asyncio.wait({*tasks, taken}, timeout=WAKE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            taken.cancel()
            tasks.difference_update(done)
        # As the SDK: let the last jobs finish; a stopped job's CancelledError is expected.
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                sdk_log.error(f"JobScaler.run_jobs | Task failed during shutdown drain: {result}")

    async def handle_job(self, session: Any, job: dict[str, Any]) -> None:
        try:
            await super().handle_job(session, job)
        finally:
            self._job_ended.set()        # after the SDK removed the job from job_progress


def _malformed(job: Any) -> str | None:
    """What makes a job-take element unrunnable, in words that show none of its content."""
    if not isinstance(job, dict):
        return f"not an object but {type(job).__name__}"
    if "id" not in job:
        return "an object without an id"
    if not isinstance(job["id"], str):
        return f"an object whose id is {type(job['id']).__name__}, not a string"
    if not job["id"]:
        return "an object whose id is empty"
    return None


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)

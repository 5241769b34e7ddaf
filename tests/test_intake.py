"""The worker loop asks for as many jobs as it has room for: serving/intake.py under the
real SDK loop.

``python handler.py`` runs the SDK's production loop (``runpod.serverless.start``) behind a local
endpoint that notes, at every job-take, how many jobs the worker asked for and how many it held
then. The runpod SDK (1.12.0) counts a taken job twice until its task starts, so right after a
take it asks for too few and, believing itself full, pauses intake for a second.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dev.local_endpoint import COMPLETED, IN_PROGRESS, LocalEndpoint, WorkerProcess
from serving.config import PROJECT_ROOT
from tests.support.endpoint import _clean_env, call

pytestmark = pytest.mark.slow

CONCURRENCY = 4
LONG_JOB = {"prompt": "Tell me a very long story about the sea.", "max_new_tokens": 1000,
            "temperature": 0}     # decodes for longer than the test lasts; cancelled at the end


class TakeRecordingEndpoint(LocalEndpoint):
    """A local endpoint that notes each job-take as (jobs asked for, jobs the worker held)."""

    def __init__(self) -> None:
        super().__init__()
        self.takes: list[tuple[int, int]] = []

    async def _job_take(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        held = sum(1 for job in self._jobs.values()
                   if job.worker_id == worker_id and job.status == IN_PROGRESS)
        self.takes.append((int(request.query.get("batch_size", "1")), held))
        return await super()._job_take(request)


@pytest.fixture
def recorded(default_model_dir: Path, tmp_path: Path) -> Iterator[TakeRecordingEndpoint]:
    endpoint = TakeRecordingEndpoint().start()
    out = (tmp_path / "worker.log").open("wb")
    worker = WorkerProcess(endpoint, [sys.executable, "handler.py"], "intake-worker",
                           base_env=_clean_env(), output=out, cwd=str(PROJECT_ROOT),
                           extra_env={"MODEL_PATH": str(default_model_dir),
                                      "WORKER_CONCURRENCY": str(CONCURRENCY)}).start()
    out.close()
    try:
        worker.wait_ready(180)
        yield endpoint
    finally:
        worker.stop(30)
        endpoint.stop()


def _wait_for_take_holding(endpoint: TakeRecordingEndpoint, held: int) -> None:
    """Wait until the worker asks for jobs while holding ``held`` (it asks again at once)."""
    deadline = time.monotonic() + 60          # a generous bound that proves "did not hang"
    while (all(h != held for _, h in endpoint.takes)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(h == held for _, h in endpoint.takes), endpoint.takes


def _submit_and_wait_taken(endpoint: LocalEndpoint, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        status, body = call(endpoint, "POST", "run", {"input": LONG_JOB}, auth=None)
        assert status == 200, body
        ids.append(body["id"])
    for job_id in ids:
        endpoint.wait_for_status(job_id, [IN_PROGRESS], timeout_s=60)
    return ids


def test_after_each_take_the_worker_asks_for_exactly_its_free_slots(recorded):
    endpoint = recorded
    ids: list[str] = []
    try:
        for burst in (1, 2):            # 1 job held, then 3: no job ends in between
            ids += _submit_and_wait_taken(endpoint, burst)
            _wait_for_take_holding(endpoint, len(ids))
        takes = list(endpoint.takes)
    finally:
        for job_id in ids:
            call(endpoint, "POST", f"cancel/{job_id}", auth=None)
    # Every take, also the first ones after a job was taken and not yet started, asks for the
    # slots the worker really has free: the SDK's own intake asked for 2 with 1 job held.
    assert all(asked == CONCURRENCY - held for asked, held in takes), takes
    assert (CONCURRENCY - 3, 3) in takes, takes


# ----------------------------------------------------------------------------------------------
# A malformed element in the job-take answer costs only itself
# ----------------------------------------------------------------------------------------------
SHORT_JOB = {"prompt": "Say hi.", "max_new_tokens": 2}
SECRET = "malformed-element-secret"      # in every malformed element: must not reach the log
# Each list goes in front of the jobs of one job-take answer, in order.
MALFORMED = [
    [{"input": SHORT_JOB, "s3Config": {"accessSecret": SECRET}},     # no id: the SDK exits 1
     {"id": ["a", SECRET], "input": SHORT_JOB}, f"job-{SECRET}", None, 7,
     {"id": "", "input": SHORT_JOB}],
    [{"id": 7, "input": {"prompt": SECRET}}],                          # the SDK spins, never polls
]


class MalformedTakeEndpoint(LocalEndpoint):
    """A local endpoint whose next job-take answers carry malformed elements before the jobs."""

    def __init__(self) -> None:
        super().__init__()
        self.extras: list[list[Any]] = [list(extra) for extra in MALFORMED]

    async def _job_take(self, request: web.Request) -> web.Response:
        answer = await super()._job_take(request)
        if answer.status != 200 or not self.extras:
            return answer
        jobs = json.loads(answer.body)
        return web.json_response(self.extras.pop(0) + (jobs if isinstance(jobs, list) else [jobs]))


def _answered(endpoint: LocalEndpoint, worker: WorkerProcess, job_id: str) -> str:
    """The job's final status; fails at once if the worker process ends first."""
    deadline = time.monotonic() + 120           # a generous bound that proves "did not hang"
    while time.monotonic() < deadline:
        assert worker.returncode is None, f"the worker exited with {worker.returncode}"
        try:
            return endpoint.wait_for_status(job_id, timeout_s=1)["status"]
        except TimeoutError:
            continue
    raise AssertionError(f"job {job_id} was not answered")


def test_malformed_job_take_elements_are_dropped_and_the_good_jobs_run(
        default_model_dir: Path, tmp_path: Path):
    """Pins the SDK loop's failures: an element without an id (or with a list one) made the
    worker exit 1 and lose the good job beside it; an integer id stopped it polling for good."""
    endpoint = MalformedTakeEndpoint().start()
    log_path = tmp_path / "worker.log"
    out = log_path.open("wb")
    worker = WorkerProcess(endpoint, [sys.executable, "handler.py"], "malformed-take",
                           base_env=_clean_env(), output=out, cwd=str(PROJECT_ROOT),
                           extra_env={"MODEL_PATH": str(default_model_dir),
                                      "WORKER_CONCURRENCY": "2"}).start()
    out.close()
    try:
        worker.wait_ready(180)
        for _ in range(len(MALFORMED) + 1):      # the last take is clean: still polling
            status, body = call(endpoint, "POST", "run", {"input": SHORT_JOB}, auth=None)
            assert status == 200, body
            assert _answered(endpoint, worker, body["id"]) == COMPLETED
        assert not endpoint.extras               # every malformed answer was served
    finally:
        code = worker.stop(30)
        endpoint.stop()
    log = log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    dropped = [line for line in log.splitlines() if "job-take answer, element" in line]
    assert len(dropped) == sum(len(extra) for extra in MALFORMED), log[-3000:]
    assert any("without an id" in line for line in dropped), dropped
    assert any("id is int, not a string" in line for line in dropped), dropped
    assert SECRET not in log

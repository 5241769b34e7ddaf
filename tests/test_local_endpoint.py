"""The local endpoint, driven the way production is: the real runpod worker loop in a subprocess,
the SDK's real client, real HTTP on loopback. Fixtures: tests/support/endpoint.py."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import requests
import runpod

from config import PROJECT_ROOT
from local_endpoint import LocalEndpoint
from tests.support.endpoint import (
    API_KEY,
    ECHO_WORKER,
    RUN_LIMIT,
    RUNSYNC_LIMIT,
    Service,
    call,
    sdk_client,
)


def wait_for_file(path: Path, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


class TestRunSync:
    def test_run_sync_answers_the_handler_output(self, echo_service: Service) -> None:
        output = echo_service.client.run_sync({"echo": "hello"}, timeout=30)
        assert output["echo"] == "hello"
        assert output["pid"] == echo_service.worker.process.pid

    def test_runsync_answers_the_full_status_and_passes_s3config_to_the_worker(
            self, echo_service: Service) -> None:
        s3 = {"accessId": "a", "accessSecret": "s", "bucketName": "b", "endpointUrl": "http://x"}
        status, body = call(echo_service.endpoint, "POST", "runsync",
                            {"input": {"echo": 1}, "s3Config": s3})
        assert status == 200
        assert body["status"] == "COMPLETED"
        assert body["id"].startswith("sync-")
        assert body["output"]["s3Config"] == s3
        assert body["workerId"] == "test-worker"
        assert {"delayTime", "executionTime"} <= body.keys()

    def test_runsync_that_outlasts_its_wait_answers_in_progress_with_the_id(
            self, echo_service: Service) -> None:
        status, body = call(echo_service.endpoint, "POST", "runsync?wait=1000",
                            {"input": {"sleep_s": 1.6}})
        assert status == 200
        assert body["status"] == "IN_PROGRESS"
        assert "output" not in body
        done = echo_service.endpoint.wait_for_status(body["id"], timeout_s=10)
        assert done["status"] == "COMPLETED"


class TestRunAndStatus:
    def test_run_then_status_then_output(self, echo_service: Service) -> None:
        job = echo_service.client.run({"echo": [1, 2]})
        assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        assert job.output(timeout=10)["echo"] == [1, 2]
        assert job.status() == "COMPLETED"

    def test_a_failed_job_reports_its_error_string_and_the_rest_as_output(
            self, echo_service: Service) -> None:
        job = echo_service.client.run({"fail": "model not loaded"})
        echo_service.endpoint.wait_for_status(job.job_id, timeout_s=10)
        status, body = call(echo_service.endpoint, "GET", f"status/{job.job_id}")
        assert status == 200
        assert body["status"] == "FAILED"
        assert body["error"] == "model not loaded"
        assert body["output"] == {"detail": "kept"}

    def test_progress_updates_show_in_progress_with_output(self, echo_service: Service) -> None:
        job = echo_service.client.run({"progress": ["loading", "generating"],
                                       "progress_gap_s": 0.6})
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, body = call(echo_service.endpoint, "GET", f"status/{job.job_id}")
            if body["status"] != "IN_PROGRESS":
                break
            if "output" in body:
                seen.append(body["output"])
            time.sleep(0.1)
        assert body["status"] == "COMPLETED"
        assert seen, "no progress update was visible in /status"
        assert set(seen) <= {"loading", "generating"}

    def test_an_unknown_job_is_404(self, echo_service: Service) -> None:
        status, body = call(echo_service.endpoint, "GET", "status/nope")
        assert status == 404
        assert "does not exist" in body["error"]


class TestStream:
    def test_stream_delivers_every_chunk_in_order(self, stream_service: Service) -> None:
        job = stream_service.client.run({"chunks": 4, "gap_s": 0.4})
        assert list(job.stream()) == [{"index": i} for i in range(4)]
        # return_aggregate_stream: the final answer is the list of chunks
        assert job.output(timeout=5) == [{"index": i} for i in range(4)]

    def test_stream_returns_only_the_chunks_since_the_last_call(
            self, stream_service: Service) -> None:
        job = stream_service.client.run({"chunks": 3, "gap_s": 0.1})
        stream_service.endpoint.wait_for_status(job.job_id, timeout_s=10)
        _, first = call(stream_service.endpoint, "GET", f"stream/{job.job_id}")
        _, second = call(stream_service.endpoint, "POST", f"stream/{job.job_id}")
        assert first == {"status": "COMPLETED", "stream": [{"output": {"index": i}}
                                                           for i in range(3)]}
        assert second == {"status": "COMPLETED", "stream": []}


class TestCancel:
    def test_cancel_stops_a_running_job_and_the_worker_serves_on(
            self, echo_service: Service, tmp_path: Path) -> None:
        marker = tmp_path / "cancelled"
        job = echo_service.client.run({"sleep_s": 30, "cancel_marker": str(marker)})
        echo_service.endpoint.wait_for_status(job.job_id, ["IN_PROGRESS"], timeout_s=10)
        assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
        assert wait_for_file(marker), "the handler's task never got CancelledError"
        assert job.status() == "CANCELLED"
        after = echo_service.client.run_sync({"echo": "next"}, timeout=30)
        assert after == {"echo": "next", "s3Config": None, "pid": echo_service.worker.process.pid}

    def test_a_job_past_its_execution_timeout_ends_timed_out_and_is_stopped(
            self, echo_service: Service, tmp_path: Path) -> None:
        marker = tmp_path / "stopped"
        job = echo_service.client.run({"input": {"sleep_s": 30, "cancel_marker": str(marker)},
                                       "policy": {"executionTimeout": 500}})
        done = echo_service.endpoint.wait_for_status(job.job_id, timeout_s=10)
        assert done["status"] == "TIMED_OUT"
        assert wait_for_file(marker)

    def test_a_queued_job_is_cancelled_and_never_handed_out(
            self, bare_endpoint: LocalEndpoint) -> None:
        job = sdk_client(bare_endpoint).run({"echo": 1})
        assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
        assert call(bare_endpoint, "GET", "health")[1]["jobs"]["inQueue"] == 0


class TestHealth:
    def test_health_counts_running_and_completed_jobs(self, echo_service: Service) -> None:
        before = echo_service.client.health()
        job = echo_service.client.run({"sleep_s": 1})
        echo_service.endpoint.wait_for_status(job.job_id, ["IN_PROGRESS"], timeout_s=10)
        during = echo_service.client.health()
        echo_service.endpoint.wait_for_status(job.job_id, timeout_s=10)
        after = echo_service.client.health()
        assert during["jobs"]["inProgress"] == 1
        assert during["workers"]["running"] == 1
        assert after["jobs"]["completed"] == before["jobs"]["completed"] + 1
        assert after["jobs"]["inProgress"] == 0
        assert after["workers"] == {**after["workers"], "idle": 1, "running": 0}

    def test_health_counts_queued_jobs_and_purge_queue_empties_it(
            self, bare_endpoint: LocalEndpoint) -> None:
        client = sdk_client(bare_endpoint)
        client.run({"a": 1})
        client.run({"b": 2})
        assert client.health()["jobs"]["inQueue"] == 2
        assert client.health()["workers"]["idle"] == 0
        assert client.purge_queue() == {"removed": 2, "status": "completed"}
        assert client.health()["jobs"]["inQueue"] == 0


class TestPayloadLimits:
    def test_a_run_body_over_the_limit_is_refused_with_a_clear_message(
            self, echo_service: Service) -> None:
        with pytest.raises(requests.HTTPError) as refused:
            echo_service.client.run({"pad": "x" * RUN_LIMIT})
        assert refused.value.response.status_code == 413
        error = refused.value.response.json()["error"]
        assert "/run" in error and f"{RUN_LIMIT} bytes" in error

    def test_runsync_accepts_a_body_that_run_refuses(self, echo_service: Service) -> None:
        body = {"input": {"echo": "x" * (RUN_LIMIT + 1000)}}
        assert call(echo_service.endpoint, "POST", "run", body)[0] == 413
        status, answer = call(echo_service.endpoint, "POST", "runsync", body)
        assert status == 200 and answer["status"] == "COMPLETED"
        assert RUN_LIMIT < len(answer["output"]["echo"]) < RUNSYNC_LIMIT

    def test_a_result_over_the_limit_ends_completed_with_no_output(
            self, echo_service: Service) -> None:
        # Pins production's bug (runpod-python #309): the fake must reproduce it.
        job = echo_service.client.run({"blob_bytes": RUN_LIMIT + 1000})
        done = echo_service.endpoint.wait_for_status(job.job_id, timeout_s=10)
        assert done["status"] == "COMPLETED"
        assert "output" not in done
        assert job.output() is None


class TestAuth:
    def test_a_wrong_key_is_refused_with_401(self, echo_service: Service) -> None:
        with pytest.raises(RuntimeError, match="401 Unauthorized"):
            sdk_client(echo_service.endpoint, api_key="wrong").health()

    def test_bearer_and_raw_keys_are_both_accepted(self, echo_service: Service) -> None:
        assert call(echo_service.endpoint, "GET", "health", auth=f"Bearer {API_KEY}")[0] == 200
        assert call(echo_service.endpoint, "GET", "health", auth=API_KEY)[0] == 200
        assert call(echo_service.endpoint, "GET", "health", auth=None)[0] == 401


class TestConcurrency:
    def test_three_two_second_jobs_run_in_parallel(self, echo_service: Service) -> None:
        # Relative to one such job alone, timed the same way here (B, >= 2 s). Serial would
        # take >= 3 x 2 s, more than 2 B; parallel takes about B plus up to 1 s: the SDK counts
        # a job it has taken twice (local queue + in progress) until its task starts, so with
        # concurrency 3 it often pauses intake for 1 s and the third job starts a second late.
        def run(count: int) -> tuple[float, list[dict]]:
            started = time.monotonic()
            jobs = [echo_service.client.run({"sleep_s": 2, "echo": i}) for i in range(count)]
            done = [echo_service.endpoint.wait_for_status(j.job_id, timeout_s=60) for j in jobs]
            return time.monotonic() - started, done

        alone, _ = run(1)
        together, done = run(3)
        assert [d["output"]["echo"] for d in done] == [0, 1, 2]
        assert all(d["executionTime"] >= 1900 for d in done)
        assert together < 2 * alone, (
            f"3 x 2 s jobs took {together:.1f} s, one alone {alone:.1f} s: not run in parallel")


class TestShutdown:
    def test_sigterm_drains_an_in_flight_job_and_the_worker_exits_0(
            self, fresh_service: Service) -> None:
        job = fresh_service.client.run({"sleep_s": 1.5, "echo": "drained"})
        fresh_service.endpoint.wait_for_status(job.job_id, ["IN_PROGRESS"], timeout_s=10)
        assert fresh_service.worker.stop(timeout_s=20) == 0, fresh_service.log_tail()
        _, body = call(fresh_service.endpoint, "GET", f"status/{job.job_id}")
        assert body["status"] == "COMPLETED"
        assert body["output"]["echo"] == "drained"


class TestSdkClientQuirks:
    """What the SDK's client does that a caller must know; pinned so an upgrade shows."""

    def test_run_sync_hides_a_failure_and_returns_the_rest_of_the_answer(
            self, echo_service: Service) -> None:
        assert echo_service.client.run_sync({"fail": "boom"}, timeout=30) == {"detail": "kept"}

    def test_asyncio_job_output_times_out_at_once_by_default(self, echo_service: Service) -> None:
        async def scenario() -> None:
            saved = runpod.endpoint_url_base
            runpod.endpoint_url_base = echo_service.endpoint.base_url
            try:
                async with aiohttp.ClientSession() as session:
                    endpoint = runpod.AsyncioEndpoint("local", session, api_key=API_KEY)
                    job = await endpoint.run({"sleep_s": 0.5})
                    with pytest.raises(TimeoutError):
                        await job.output()
                    assert (await job.output(timeout=10))["pid"] > 0
            finally:
                runpod.endpoint_url_base = saved

        asyncio.run(scenario())


class TestCommandLine:
    def test_cli_starts_the_worker_prints_how_to_call_and_stops_both_on_sigterm(self) -> None:
        cli = subprocess.Popen(
            [sys.executable, "local_endpoint.py", "--port", "0", "--", sys.executable,
             str(ECHO_WORKER)],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"PATH": "/usr/bin:/bin", "RUNPOD_LOG_LEVEL": "ERROR"})
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in cli.stdout],
                         daemon=True).start()
        try:
            url = None
            deadline = time.monotonic() + 30
            while url is None and time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if match := re.search(r"curl -s -X POST (\S+/runsync)", line):
                    url = match.group(1)
            assert url, "the CLI never printed how to call the endpoint"
            answer = requests.post(url, json={"input": {"echo": "cli"}}, timeout=30).json()
            assert answer["output"]["echo"] == "cli"
        finally:
            cli.send_signal(signal.SIGTERM)
            rc = cli.wait(30)
        assert rc == 0

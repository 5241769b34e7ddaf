"""The local endpoint, driven the way production is: the real runpod worker loop in a subprocess,
the SDK's real client, real HTTP on loopback. Fixtures: tests/support/endpoint.py."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import requests
import runpod

from dev.local_endpoint import LocalEndpoint, WorkerProcess, descendants, usage_text
from serving.config import PROJECT_ROOT
from tests.support.endpoint import (
    API_KEY,
    ECHO_WORKER,
    RUN_LIMIT,
    RUNSYNC_LIMIT,
    Service,
    call,
    sdk_client,
    start_worker_service,
    stop_service,
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


class TestRetention:
    def test_result_retention_set_on_the_endpoint_reaches_its_job_board(
            self, bare_endpoint: LocalEndpoint) -> None:
        """Pins the split: setting it on the endpoint changed nothing, so the soak's results
        expired after RunPod's one minute and the soak counted them lost."""
        bare_endpoint.run_retention_s = bare_endpoint.runsync_retention_s = 3600.0
        assert bare_endpoint.board.run_retention_s == 3600.0
        assert bare_endpoint.board.runsync_retention_s == 3600.0


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


JOB_SECRET = "job-bucket-secret-0123456789"
S3CONFIG = {"accessId": "AKIAJOB", "accessSecret": JOB_SECRET, "bucketName": "b",
            "endpointUrl": "http://127.0.0.1:9"}
# What an attacker sends: nothing, the client key (a client is not a worker), a guess, an empty
# bearer, the raw client key as the SDK's worker would send its own.
STRANGERS = {"no key": None, "the client key": f"Bearer {API_KEY}", "a guess": "Bearer guess",
             "an empty bearer": "Bearer ", "the raw client key": API_KEY}


def worker_auth(endpoint: LocalEndpoint) -> str:
    """The worker secret, sent as the SDK sends it (a raw Authorization header)."""
    return endpoint.worker_env()["RUNPOD_AI_API_KEY"]


def submit(endpoint: LocalEndpoint) -> str:
    status, body = call(endpoint, "POST", "run", {"input": {"echo": 1}, "s3Config": S3CONFIG})
    assert status == 200, body
    return body["id"]


def take(endpoint: LocalEndpoint, worker_id: str = "w1") -> dict:
    """Take the next job as the real worker would."""
    status, job = call(endpoint, "GET", f"job-take/{worker_id}?gpu=local",
                       auth=worker_auth(endpoint))
    assert status == 200, job
    return job


class TestWorkerRoutesRefuseStrangers:
    """An attacker who can reach the endpoint (pod mode publishes it) but holds no worker
    secret: every worker route refuses them and nothing changes."""

    @pytest.mark.parametrize("auth", list(STRANGERS.values()), ids=list(STRANGERS))
    @pytest.mark.parametrize("route", ["job-take/attacker?gpu=local",
                                       "job-take-batch/attacker?gpu=local&batch_size=8"])
    def test_a_stranger_cannot_take_a_queued_job_nor_see_its_bucket_secret(
            self, bare_endpoint: LocalEndpoint, route: str, auth: str | None) -> None:
        job_id = submit(bare_endpoint)
        status, body = call(bare_endpoint, "GET", route, auth=auth)
        assert status == 401, body
        assert JOB_SECRET not in str(body)
        assert call(bare_endpoint, "GET", f"status/{job_id}")[1]["status"] == "IN_QUEUE"
        health = call(bare_endpoint, "GET", "health")[1]
        assert health["workers"]["idle"] == 0, "a refused caller was counted as a worker"
        assert take(bare_endpoint)["s3Config"]["accessSecret"] == JOB_SECRET  # the real one can

    @pytest.mark.parametrize("auth", list(STRANGERS.values()), ids=list(STRANGERS))
    def test_a_stranger_cannot_forge_a_result_or_a_stream_chunk(
            self, bare_endpoint: LocalEndpoint, auth: str | None) -> None:
        submit(bare_endpoint)
        job_id = take(bare_endpoint, "w1")["id"]
        for route, body in ((f"job-stream/w1/{job_id}?gpu=local", {"output": "forged chunk"}),
                            (f"job-done/w1/{job_id}?gpu=local", {"output": "forged answer"}),
                            (f"job-done/w1/{job_id}?gpu=local&isStream=false",
                             {"status": "IN_PROGRESS", "output": "forged progress"})):
            status, answer = call(bare_endpoint, "POST", route, body, auth=auth)
            assert status == 401, (route, answer)
        _, state = call(bare_endpoint, "GET", f"status/{job_id}")
        assert state["status"] == "IN_PROGRESS" and "output" not in state, state
        assert call(bare_endpoint, "GET", f"stream/{job_id}")[1]["stream"] == []
        status, _ = call(bare_endpoint, "POST", f"job-done/w1/{job_id}?gpu=local",
                         {"output": "real"}, auth=worker_auth(bare_endpoint))
        assert status == 200
        assert call(bare_endpoint, "GET", f"status/{job_id}")[1]["output"] == "real"

    @pytest.mark.parametrize("auth", list(STRANGERS.values()), ids=list(STRANGERS))
    def test_a_stranger_cannot_clear_or_take_a_pending_cancel(
            self, bare_endpoint: LocalEndpoint, auth: str | None) -> None:
        submit(bare_endpoint)
        job_id = take(bare_endpoint, "w1")["id"]
        assert call(bare_endpoint, "POST", f"cancel/{job_id}")[1]["status"] == "CANCELLED"
        for route in ("ping/w1?gpu=local&job_in_progress=0", "ping/w1?gpu=local&job_id=other",
                      "job-stop/w1?gpu=local"):
            status, answer = call(bare_endpoint, "GET", route, auth=auth)
            assert status == 401, (route, answer)
        status, stops = call(bare_endpoint, "GET", "job-stop/w1?gpu=local",
                             auth=worker_auth(bare_endpoint))
        assert (status, stops) == (200, {"jobsToStop": [job_id]})

    def test_the_worker_secret_is_random_per_endpoint_and_not_the_client_key(self) -> None:
        first, second = LocalEndpoint(api_key=API_KEY), LocalEndpoint(api_key=API_KEY)
        keys = {worker_auth(first), worker_auth(second), API_KEY}
        assert len(keys) == 3 and all(len(k) >= 32 for k in keys - {API_KEY})


class TestNeverOpenBeyondLoopback:
    @pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
    def test_an_endpoint_on_another_address_without_a_client_key_refuses_to_start(
            self, host: str) -> None:
        with pytest.raises(ValueError, match="without a client key"):
            LocalEndpoint(host=host)

    @pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
    def test_loopback_may_stay_keyless_for_make_serve(self, host: str) -> None:
        assert LocalEndpoint(host=host).api_key is None

    def test_an_endpoint_beyond_loopback_refuses_a_key_shorter_than_16_characters(self) -> None:
        """Pins: a one-character client key was served on 0.0.0.0, and fell to 60 guesses."""
        with pytest.raises(ValueError, match="client key of 15 characters: use at least 16"):
            LocalEndpoint(host="0.0.0.0", api_key="k" * 15)
        assert LocalEndpoint(host="0.0.0.0", api_key="k" * 16).api_key == "k" * 16

    def test_the_cli_refuses_a_short_key_beyond_loopback_in_one_line_naming_the_variable(
            self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "dev.local_endpoint", "--host", "0.0.0.0", "--port", "0",
             "--", "true"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30,
            env={"PATH": "/usr/bin:/bin", "LOCAL_ENDPOINT_API_KEY": "Zq9"})
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Zq9" not in done.stderr
        assert "LOCAL_ENDPOINT_API_KEY has 3 characters" in done.stderr
        assert "at least 16" in done.stderr


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await reader.read()


class TestPublishedPort:
    """What pod mode's public port meets: connections that never finish a request, and floods
    from one address. Real sockets on loopback; a second loopback address plays another peer."""

    def test_connections_whose_headers_never_finish_are_closed_within_the_timeout(
            self) -> None:
        """Pins: 200 half-open connections were still open after 80 s (aiohttp's own clock
        for a connection's next request is an hour)."""
        endpoint = LocalEndpoint(api_key=API_KEY, read_timeout_s=1.0).start()

        async def scenario() -> None:
            slow = [await asyncio.open_connection("127.0.0.1", endpoint.port)
                    for _ in range(20)]
            for _, writer in slow[:15]:     # a request line and part of the headers, no end
                writer.write(b"POST /v2/local/run HTTP/1.1\r\nHost: x\r\nX-Slow: a")
                await writer.drain()
            # the other 5 send nothing at all
            async with asyncio.timeout(1.0 + 4.0):   # the timeout, and slack for 2 CPUs
                await asyncio.gather(*(_closed(reader) for reader, _ in slow))
            for _, writer in slow:
                writer.close()

        try:
            asyncio.run(scenario())
            assert call(endpoint, "GET", "health")[0] == 200
        finally:
            endpoint.stop()

    def test_a_kept_alive_connection_whose_next_headers_never_finish_is_closed(self) -> None:
        endpoint = LocalEndpoint(api_key=API_KEY, read_timeout_s=1.0).start()

        async def scenario() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.write(b"GET /v2/local/health HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /v2/local/health HTTP/1.1\r\nHost: x\r\n")   # never ends
            async with asyncio.timeout(1.0 + 4.0):
                await _closed(reader)
            writer.close()

        try:
            asyncio.run(scenario())
        finally:
            endpoint.stop()

    def test_a_body_that_never_arrives_whole_is_answered_408_within_the_timeout(self) -> None:
        endpoint = LocalEndpoint(api_key=API_KEY, read_timeout_s=1.0).start()

        async def scenario() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.write(b"POST /v2/local/run HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'{"inp')
            async with asyncio.timeout(1.0 + 4.0):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), head
            assert b"Connection: close" in head
            writer.close()

        try:
            asyncio.run(scenario())
            assert call(endpoint, "GET", "health")[1]["jobs"]["inQueue"] == 0
        finally:
            endpoint.stop()

    def test_the_read_timeout_never_cuts_an_answer_that_takes_longer(self) -> None:
        """A guard: the timeout is for requests arriving, not for answers (long-polls,
        /runsync waits)."""
        endpoint = LocalEndpoint(api_key=API_KEY, read_timeout_s=1.0).start()
        try:
            status, body = call(endpoint, "POST", "runsync?wait=2500", {"input": {}})
            assert (status, body["status"]) == (200, "IN_QUEUE")
        finally:
            endpoint.stop()

    def test_a_flood_from_one_address_is_refused_past_the_cap_while_another_is_served(
            self) -> None:
        """Pins: one address could open connections without limit."""
        endpoint = LocalEndpoint(api_key=API_KEY, max_connections_per_peer=4).start()
        health = (b"GET /v2/local/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n")

        async def scenario() -> None:
            flood = [await asyncio.open_connection("127.0.0.1", endpoint.port)
                     for _ in range(4)]
            extra = [await asyncio.open_connection("127.0.0.1", endpoint.port)
                     for _ in range(3)]
            async with asyncio.timeout(5):
                refused = await asyncio.gather(*(_closed(reader) for reader, _ in extra))
            for answer in refused:
                assert answer.startswith(b"HTTP/1.1 429"), answer
                assert b"too many connections from 127.0.0.1 (at most 4" in answer
            # Another peer is served, and so is a request on an admitted connection.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", endpoint.port, local_addr=("127.0.0.2", 0))
            writer.write(health)
            async with asyncio.timeout(5):
                assert (await _closed(reader)).startswith(b"HTTP/1.1 200")
            reader, writer = flood[0]
            writer.write(health)
            async with asyncio.timeout(5):
                assert (await _closed(reader)).startswith(b"HTTP/1.1 200")
            for _, writer in flood + extra:
                writer.close()

        try:
            asyncio.run(scenario())
        finally:
            endpoint.stop()


class TestBanner:
    """What the CLI prints once the worker is ready: a request the served task accepts."""

    @pytest.mark.parametrize("example", [
        {"messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 32},
        {"texts": ["Hello", "world"]},
        {"image": "data:image/png;base64,iVBORw0KGgo="},
    ], ids=["generate", "embed", "upscale"])
    def test_the_banner_calls_the_endpoint_with_the_served_tasks_example(
            self, bare_endpoint: LocalEndpoint, example: dict) -> None:
        """Pins: the banner showed {"prompt": "Hello"} whatever the task."""
        text = usage_text(bare_endpoint, ["python", "handler.py"], None, example)
        curl = shlex.split(next(line for line in text.splitlines() if "curl -s" in line))
        assert json.loads(curl[curl.index("-d") + 1]) == {"input": example}
        assert f"run_sync({example!r})" in text
        assert "prompt" not in text

    def test_without_a_known_task_the_banner_leaves_the_input_to_the_caller(
            self, bare_endpoint: LocalEndpoint) -> None:
        text = usage_text(bare_endpoint, ["python", "my_worker.py"])
        curl = shlex.split(next(line for line in text.splitlines() if "curl -s" in line))
        assert json.loads(curl[curl.index("-d") + 1]) == {"input": {}}
        assert "your worker's" in text and "prompt" not in text

    def test_every_task_example_is_valid_input_for_its_task(self) -> None:
        import base64
        import io

        from PIL import Image

        from serving.config import WorkerSettings
        from serving.validation import parse_input
        from tasks import TASKS
        from tasks.embed import EmbedInput
        from tasks.generate import GenerateInput
        from tasks.upscale import UpscaleInput

        contracts = {"generate": GenerateInput, "embed": EmbedInput, "upscale": UpscaleInput}
        # The pipeline task's example depends on the kind: each is run in the families' tests.
        assert set(contracts) == set(TASKS) - {"pipeline"}
        limits = {"limits": WorkerSettings.from_env({})}
        for name in contracts:
            task = TASKS[name]
            assert task.example, f"{name} has no example"
            parse_input(contracts[name], task.example, limits)
        uri = TASKS["upscale"].example["image"]
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        image.load()

    @pytest.mark.slow
    def test_the_task_example_program_names_the_task_the_worker_would_serve(
            self, default_model_dir: Path) -> None:
        from tasks.generate import GenerateTask

        env = {"PATH": "/usr/bin:/bin", "MODEL_PATH": str(default_model_dir)}
        done = subprocess.run([sys.executable, "-m", "dev.task_example"], cwd=PROJECT_ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == {"task": "generate",
                                           "input": GenerateTask.example}
        done = subprocess.run([sys.executable, "-m", "dev.task_example"], cwd=PROJECT_ROOT,
                              env={**env, "MODEL_PATH": "/nonexistent"}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1
        assert done.stderr.startswith("task_example: MODEL_PATH=/nonexistent does not exist")


class TestSdkConfigFileKey:
    """The SDK sends ~/.runpod/config.toml's key instead of RUNPOD_AI_API_KEY on its job
    routes when that file has a [default] profile; the endpoint must still serve that worker."""

    def test_a_worker_whose_sdk_reads_a_config_file_key_still_takes_jobs(
            self, tmp_path: Path) -> None:
        home = tmp_path / "home"
        (home / ".runpod").mkdir(parents=True)
        (home / ".runpod" / "config.toml").write_text('[default]\napi_key = "rpa_CONFIGKEY42"\n')
        service = start_worker_service([sys.executable, str(ECHO_WORKER)],
                                       tmp_path / "worker.log", "cfg-worker",
                                       extra_env={"ECHO_WORKER_MODE": "echo", "HOME": str(home)})
        try:
            assert service.client.run_sync({"echo": "cfg"}, timeout=30)["echo"] == "cfg"
            # ... and that key is a worker key, not a way in for clients
            assert call(service.endpoint, "GET", "health", auth="rpa_CONFIGKEY42")[0] == 401
        finally:
            stop_service(service)

    def test_a_config_file_profile_without_a_key_is_refused_before_the_worker_starts(
            self, bare_endpoint: LocalEndpoint, tmp_path: Path) -> None:
        (tmp_path / ".runpod").mkdir()
        (tmp_path / ".runpod" / "config.toml").write_text("[default]\n")
        with pytest.raises(ValueError, match="without an api_key"):
            WorkerProcess(bare_endpoint, ["true"], base_env={"HOME": str(tmp_path)})


# slow: three two-second jobs, measured running together (~5 s)
@pytest.mark.slow
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


    def test_a_worker_that_ignores_sigterm_is_killed_with_its_children(
            self, bare_endpoint: LocalEndpoint, tmp_path: Path) -> None:
        """After the drain time, SIGKILL reaches the worker and every process it started (the
        SDK's heartbeat process would otherwise outlive it)."""
        pids = tmp_path / "pids"
        script = ("import os, signal, subprocess, sys, time\n"
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "child = subprocess.Popen([sys.executable, '-c', "
                  "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "time.sleep(600)'])\n"
                  f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
                  "time.sleep(600)\n")
        worker = WorkerProcess(bare_endpoint, [sys.executable, "-c", script],
                               base_env={"HOME": str(tmp_path)}).start()
        deadline = time.monotonic() + 30
        while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        parent, child = (int(p) for p in pids.read_text().split())
        assert worker.stop(timeout_s=1) == -signal.SIGKILL

        def gone(pid: int) -> bool:          # a zombie is dead, waiting to be reaped
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except FileNotFoundError:
                return True

        deadline = time.monotonic() + 10
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(child), "the worker's child outlived it"
        assert not Path(f"/proc/{parent}").exists()


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


class Cli:
    """``python -m dev.local_endpoint ARGS -- echo worker``, its output read line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dev.local_endpoint", *args, "--", sys.executable,
             str(ECHO_WORKER)],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"PATH": "/usr/bin:/bin", "RUNPOD_LOG_LEVEL": "ERROR", **(env or {})})
        self.printed: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=lambda: [self._lines.put(line) for line in self.process.stdout],
                         daemon=True).start()

    def runsync_url(self, timeout_s: float = 30.0) -> str:
        """The /runsync URL the CLI prints once its worker is ready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            self.printed.append(line)
            if match := re.search(r"curl -s -X POST (\S+/runsync)", line):
                time.sleep(0.2)   # the rest of the usage text
                while not self._lines.empty():
                    self.printed.append(self._lines.get())
                return match.group(1)
        raise AssertionError("the CLI never printed how to call the endpoint:\n"
                             + "".join(self.printed))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def every_command_line() -> str:
    """What any user of the machine can read: every process's command line."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(lines)


def ask(url: str, auth: str | None) -> int:
    headers = {"Authorization": auth} if auth else {}
    return requests.post(url, json={"input": {"echo": "cli"}}, headers=headers,
                         timeout=30).status_code


# slow: each test starts the CLI and a worker process (~4 s)
@pytest.mark.slow
class TestCommandLine:
    def test_a_client_key_from_the_environment_is_required_and_never_on_a_command_line(
            self) -> None:
        key = "cli-client-key-31415926535"
        cli = Cli(["--port", "0"], env={"LOCAL_ENDPOINT_API_KEY": key})
        try:
            url = cli.runsync_url()
            assert ask(url, None) == 401 and ask(url, "Bearer guess") == 401
            assert ask(url, f"Bearer {key}") == 200
            assert key not in every_command_line()
            assert key not in "".join(cli.printed)
            tree = descendants(cli.process.pid)
            assert tree, "no worker process under the CLI"
            for pid in tree:         # the worker never holds the client key
                assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        finally:
            assert cli.stop() == 0

    def test_without_a_key_a_key_file_gets_a_new_private_key_and_only_its_path_is_printed(
            self, tmp_path: Path) -> None:
        key_file = tmp_path / "keys" / "pod-api-key"
        cli = Cli(["--port", "0", "--key-file", str(key_file)])
        try:
            url = cli.runsync_url()
            key = key_file.read_text().strip()
            assert len(key) >= 32
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
            assert ask(url, None) == 401
            assert ask(url, f"Bearer {key}") == 200
            printed = "".join(cli.printed)
            assert str(key_file) in printed and key not in printed
            assert key not in every_command_line()
        finally:
            assert cli.stop() == 0
        assert [p.name for p in key_file.parent.iterdir()] == ["pod-api-key"]  # no temp file

    def test_the_cli_refuses_to_listen_beyond_loopback_without_a_key(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "dev.local_endpoint", "--host", "0.0.0.0", "--port", "0", "--",
             "true"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30,
            env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 2, done.stderr
        assert "without a client key" in done.stderr
        assert "LOCAL_ENDPOINT_API_KEY" in done.stderr and "--key-file" in done.stderr

    def test_cli_starts_the_worker_prints_how_to_call_and_stops_both_on_sigterm(self) -> None:
        cli = Cli(["--port", "0"])
        try:
            answer = requests.post(cli.runsync_url(), json={"input": {"echo": "cli"}},
                                   timeout=30).json()
            assert answer["output"]["echo"] == "cli"
        finally:
            assert cli.stop() == 0

"""The real handler, the real runpod worker loop and the SDK's own client, over real HTTP.

One worker process (``python handler.py`` on the default model) serves the whole module
through the local endpoint, as on RunPod: every job goes job-take → handler → job-done.
"""

from __future__ import annotations

import hashlib
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.endpoint import (
    RUN_LIMIT,
    Service,
    call,
    start_handler_service,
    start_worker_service,
    stop_service,
)

pytestmark = pytest.mark.slow

CAPITAL = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
           "max_new_tokens": 24}


@pytest.fixture(scope="module")
def model_service(default_model_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("model-worker") / "worker.log"
    service = start_handler_service(
        default_model_dir, log, "model-worker", WORKER_CONCURRENCY="4")
    yield service
    stop_service(service)


def wait_final(service: Service, job_id: str, timeout_s: float = 120) -> dict:
    return service.endpoint.wait_for_status(job_id, timeout_s=timeout_s)


class TestAnswers:
    def test_run_sync_answers_paris(self, model_service):
        output = model_service.client.run_sync({"input": CAPITAL}, timeout=120)
        assert isinstance(output, list) and len(output) == 1, output
        assert "Paris" in output[0]["text"]
        assert output[0]["finish_reason"] == "stop"

    def test_run_then_status_then_output(self, model_service):
        job = model_service.client.run({"input": CAPITAL})
        assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        output = job.output(timeout=120)
        assert job.status() == "COMPLETED"
        assert "Paris" in output[0]["text"]

    def test_stream_chunks_join_to_the_whole_greedy_answer(self, model_service):
        job_input = {"messages": [{"role": "user", "content": "Name three colors."}],
                     "max_new_tokens": 40}
        whole = model_service.client.run_sync({"input": job_input}, timeout=120)[0]
        job = model_service.client.run({"input": {**job_input, "stream": True}})
        chunks = list(job.stream())
        assert len(chunks) >= 2, chunks
        assert "".join(c["text"] for c in chunks) == whole["text"]
        assert chunks[-1]["finish_reason"] == whole["finish_reason"]
        # With return_aggregate_stream the final output is the chunks as well.
        assert job.output(timeout=30) == chunks


class TestFailures:
    def test_bad_input_fails_naming_the_field_and_the_worker_serves_on(self, model_service):
        status, body = call(model_service.endpoint, "POST", "runsync",
                            {"input": {"prompt": "hi", "temprature": 0.5}})
        assert status == 200
        assert body["status"] == "FAILED"
        assert body["error"].startswith("input.temprature: unknown field")
        assert "Traceback" not in body["error"]
        assert "Paris" in model_service.client.run_sync({"input": CAPITAL}, timeout=120)[0]["text"]

    def test_input_that_is_not_an_object_fails_cleanly(self, model_service):
        status, body = call(model_service.endpoint, "POST", "runsync", {"input": [1, 2, 3]})
        assert body["status"] == "FAILED"
        assert body["error"] == "input: must be a JSON object, got list; send {\"input\": {...}}"

    def test_request_over_the_payload_limit_is_refused(self, model_service):
        status, body = call(model_service.endpoint, "POST", "run",
                            {"input": {"prompt": "x" * (RUN_LIMIT + 1)}})
        assert status == 413
        assert "larger than /run accepts (65536 bytes)" in body["error"]

    def test_cancel_stops_a_long_job_and_the_next_job_runs(self, model_service):
        started = time.monotonic()
        model_service.client.run_sync({"input": CAPITAL}, timeout=120)
        baseline = time.monotonic() - started          # the same job on an idle worker
        job = model_service.client.run({"input": {"prompt": "Count to a thousand:",
                                                  "max_new_tokens": 1000}})
        deadline = time.monotonic() + 60
        while job.status() != "IN_PROGRESS" and time.monotonic() < deadline:
            time.sleep(0.2)
        job.cancel()
        assert wait_final(model_service, job.job_id)["status"] == "CANCELLED"
        started = time.monotonic()
        output = model_service.client.run_sync({"input": CAPITAL}, timeout=120)
        assert "Paris" in output[0]["text"]
        # The cancelled job left the device: its 1000 tokens would cost ~100 x this answer
        # (about 10 tokens), so the next answer costs about what it did on an idle worker.
        after = time.monotonic() - started
        assert after < 5 * baseline + 1, f"{after:.1f} s after the cancel, {baseline:.1f} s idle"


class TestLoadedOnce:
    def test_model_loads_once_although_the_heartbeat_child_imports_handler_again(
            self, default_model_dir, tmp_path):
        """Under spawn the SDK's heartbeat process re-runs handler.py's top level (as measured
        against runpod 1.12.0)."""
        spawn_main = ("import multiprocessing, runpy; multiprocessing.set_start_method('spawn'); "
                      "runpy.run_path('handler.py', run_name='__main__')")
        log = tmp_path / "worker.log"
        service = start_worker_service(
            [sys.executable, "-c", spawn_main], log, "spawn-worker",
            extra_env={"MODEL_PATH": str(default_model_dir), "RUNPOD_PING_INTERVAL": "1000"})
        try:
            assert "Paris" in service.client.run_sync({"input": CAPITAL}, timeout=120)[0]["text"]
            # The child pings only after importing handler.py (and loading a model, if it would).
            deadline = time.monotonic() + 60
            while service.endpoint.pings == 0 and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            stop_service(service)
        text = log.read_text()
        assert text.count("model ready:") == 1, text[-3000:]
        assert service.endpoint.pings > 0, "the heartbeat child never ran"


@pytest.fixture(scope="module")
def linked_service(default_model_dir: Path, s3_server, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Service]:
    """A worker whose answers over 300 bytes go to the rclone S3 server as links."""
    bucket = s3_server.make_bucket()
    log = tmp_path_factory.mktemp("linked-worker") / "worker.log"
    service = start_handler_service(
        default_model_dir, log, "linked-worker",
        **s3_server.env(bucket, OUTPUT_INLINE_LIMIT_BYTES="300"))
    yield service
    stop_service(service)


class TestLargeAnswersThroughTheWorkerLoop:
    """The bug this project exists to prevent: a large answer COMPLETED with no output."""

    BIG = {"batch": [{"prompt": f"Item {i}:", "max_new_tokens": 8} for i in range(8)]}

    def test_large_answer_under_runsync_is_a_link_to_the_whole_answer(self, linked_service):
        output = linked_service.client.run_sync({"input": self.BIG}, timeout=120)
        link = output[0]["output_link"]
        with urllib.request.urlopen(link["url"], timeout=10) as response:
            body = response.read()
        assert hashlib.sha256(body).hexdigest() == link["sha256"]
        assert len(body.decode().splitlines()) == 8

    def test_large_answer_under_run_is_a_link_and_small_ones_stay_inline(self, linked_service):
        job = linked_service.client.run({"input": self.BIG})
        assert "output_link" in job.output(timeout=120)[0]
        small = linked_service.client.run_sync(
            {"input": {"prompt": "Hi", "max_new_tokens": 2}}, timeout=120)
        assert "text" in small[0]

    def test_progress_of_a_long_batch_shows_in_status(self, linked_service):
        # Items of different lengths finish at different times, seconds apart.
        job = linked_service.client.run({"input": {"batch": [
            {"prompt": f"Story {i}:", "max_new_tokens": 4 + 4 * i} for i in range(16)]}})
        seen = []
        deadline = time.monotonic() + 240       # did not hang (2 CPU cores, shared, can be slow)
        while time.monotonic() < deadline:
            _, body = call(linked_service.endpoint, "GET", f"status/{job.job_id}")
            if body["status"] == "IN_PROGRESS" and body.get("output"):
                seen.append(body["output"])
            if body["status"] in ("COMPLETED", "FAILED"):
                break
            time.sleep(0.3)
        assert body["status"] == "COMPLETED"
        assert seen, "no progress was visible while the batch ran"
        assert seen[-1]["total"] == 16 and 0 < seen[-1]["done"] < 16

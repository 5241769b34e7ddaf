"""It keeps serving: startup faults, device faults, time limits, shutdown, and secrets.

Faults we cannot cause on a CPU (a poisoned CUDA context) are injected at the device edge: a
forward hook on the real model that raises what CUDA raises.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from serving.redaction import MASK, RedactingStream, redact, secret_values
from serving.worker import Worker
from tasks.generate import GenerateTask
from tests.support.endpoint import call, start_handler_service, stop_service
from tests.support.worker import chat, collect

ROOT = Path(__file__).resolve().parent.parent
CAPITAL = chat("What is the capital of France?", max_new_tokens=20)


def fresh_worker(worker: Worker, **limits) -> Worker:
    """The same loaded model with its own task and batcher (so a fault stays in this test)."""
    settings = dataclasses.replace(worker.settings, **limits)
    return dataclasses.replace(worker, settings=settings,
                               task=GenerateTask(worker.loaded, settings))


# slow: each test starts a worker process (torch, transformers: ~4 s on 2 cores)
@pytest.mark.slow
class TestStartupFaults:
    """Each exits 1 before taking a job, with one line saying what and how to fix it."""

    @staticmethod
    def start(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MODEL_", "WORKER_", "BUCKET_", "HF_", "RUNPOD_"))}
        return subprocess.run([sys.executable, "handler.py"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**clean, **env})

    @staticmethod
    def failure_line(result: subprocess.CompletedProcess) -> str:
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr + result.stdout
        lines = [line for line in result.stderr.splitlines() if "startup failed" in line]
        assert len(lines) == 1, result.stderr[-2000:]
        return result.stderr[result.stderr.index("startup failed"):]

    def test_no_model_anywhere_lists_every_place_looked(self, tmp_path):
        message = self.failure_line(self.start({
            "MODEL_NAME": "org/missing", "MODEL_BAKED_DIR": str(tmp_path / "baked"),
            "RUNPOD_HF_CACHE": str(tmp_path / "rp"), "HF_HUB_CACHE": str(tmp_path / "hf")},
            tmp_path))
        assert "no model org/missing found" in message
        for place in ("MODEL_BAKED_DIR", "RUNPOD_HF_CACHE", "HF_HUB_CACHE", "make model"):
            assert place in message

    def test_a_bad_setting_names_the_variable_and_legal_values(self, tmp_path):
        message = self.failure_line(self.start({"WORKER_CONCURRENCY": "many"}, tmp_path))
        assert "WORKER_CONCURRENCY='many' is not an integer; use an integer from 1 to 256" \
            in message

    def test_corrupt_weights_say_how_to_rebuild(self, tmp_path, default_model_dir):
        broken = tmp_path / "broken"
        broken.mkdir()
        for name in os.listdir(default_model_dir):
            if not name.endswith(".safetensors") and (default_model_dir / name).is_file():
                (broken / name).write_bytes((default_model_dir / name).read_bytes())
        (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
        message = self.failure_line(self.start({"MODEL_PATH": str(broken)}, tmp_path))
        assert "could not be loaded" in message and "make model" in message

    @pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
    def test_asking_for_a_gpu_on_a_machine_without_one(self, tmp_path, default_model_dir):
        message = self.failure_line(self.start(
            {"MODEL_PATH": str(default_model_dir), "MODEL_DEVICE": "cuda"}, tmp_path))
        assert "MODEL_DEVICE=cuda but no CUDA device is visible" in message


@pytest.mark.slow
class TestRuntimeFaults:
    def test_a_poisoned_device_fails_jobs_clearly_and_asks_for_a_new_worker(self, loop, worker):
        faulty = fresh_worker(worker)

        def hook(module, args, kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        handle = faulty.loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            first = loop.run(collect(faulty, CAPITAL))[0]
        finally:
            handle.remove()
        assert first["error_code"] == "device_fault"
        assert first["refresh_worker"] is True
        assert faulty.needs_refresh
        # Later jobs fail at once instead of running on a broken device.
        assert loop.run(collect(faulty, CAPITAL))[0]["error_code"] == "device_fault"
        assert not worker.needs_refresh

    def test_a_runaway_job_ends_at_the_time_limit(self, loop, worker):
        # What a token costs on this machine (CPU or GPU), measured here: the 1000-token job,
        # uncut, would take about 1000 times that.
        started = time.monotonic()
        sample = loop.run(collect(fresh_worker(worker),
                                  {"prompt": "Count:", "max_new_tokens": 32}))[0]
        per_token = (time.monotonic() - started) / max(1, sample["usage"]["completion_tokens"])
        limited = fresh_worker(worker, job_timeout_s=1.0)
        started = time.monotonic()
        out = loop.run(collect(limited, {"prompt": "Count:", "max_new_tokens": 1000}))[0]
        elapsed = time.monotonic() - started
        assert out["error_code"] == "timeout"
        assert "WORKER_JOB_TIMEOUT_S" in out["error"]
        assert elapsed < 1.0 + 0.5 * 1000 * per_token, (
            f"ended after {elapsed:.1f} s; uncut it would take ~{1000 * per_token:.0f} s")

    def test_sigterm_drains_in_flight_jobs_and_loses_none(self, default_model_dir, tmp_path):
        service = start_handler_service(default_model_dir, tmp_path / "worker.log",
                                        "drain-worker", WORKER_CONCURRENCY="4")
        try:
            jobs = [service.client.run({"input": {"prompt": f"Story {i}:",
                                                  "max_new_tokens": 40}}) for i in range(3)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(j.status() == "IN_QUEUE" for j in jobs):
                time.sleep(0.1)
            code = service.worker.stop(timeout_s=120)
            statuses = [service.endpoint.wait_for_status(j.job_id, timeout_s=5)["status"]
                        for j in jobs]
        finally:
            stop_service(service)
        assert code == 0
        assert statuses == ["COMPLETED"] * 3


class TestSecrets:
    BUCKET_SECRET = "bucket-secret-value-1234"
    JOB_SECRET = "per-job-secret-value-5678"
    HF_SECRET = "hf_tokenvalue_abcdefgh"

    def test_redaction_masks_values_fields_signatures_and_bearer_tokens(self):
        env = {"BUCKET_SECRET_ACCESS_KEY": self.BUCKET_SECRET, "HF_TOKEN": self.HF_SECRET}
        text = redact(
            f"key={self.BUCKET_SECRET} {{'accessSecret': '{self.JOB_SECRET}'}} "
            f"https://x/b/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc123 "
            f"Authorization: Bearer {self.HF_SECRET}", secret_values(env))
        for secret in (self.BUCKET_SECRET, self.JOB_SECRET, self.HF_SECRET, "abc123", "AK%2F1"):
            assert secret not in text
        assert text.count(MASK) == 5

    def test_a_line_split_across_writes_is_still_masked(self, capsys):
        import io
        sink = io.StringIO()
        stream = RedactingStream(sink, [self.BUCKET_SECRET])
        stream.write("start " + self.BUCKET_SECRET[:8])
        stream.write(self.BUCKET_SECRET[8:] + " end\n")
        assert sink.getvalue() == f"start {MASK} end\n"

    @pytest.mark.slow
    def test_no_secret_reaches_the_worker_log_even_at_debug_level(
            self, default_model_dir, s3_server, tmp_path):
        bucket = s3_server.make_bucket()
        # The worker's own bucket uses the server's real credentials; the secrets we look for
        # are the HF token and a job's own s3Config (a wrong one, so it also makes an error).
        log = tmp_path / "worker.log"
        service = start_handler_service(default_model_dir, log, "secret-worker",
                                        RUNPOD_LOG_LEVEL="DEBUG", HF_TOKEN=self.HF_SECRET,
                                        **s3_server.env(bucket))
        try:
            linked = service.client.run_sync({"input": {**CAPITAL, "output_mode": "link"}},
                                             timeout=120)
            _, failed = call(service.endpoint, "POST", "runsync", {
                "input": {**CAPITAL, "output_mode": "link"},
                "s3Config": {"accessId": s3_server.access_key, "accessSecret": self.JOB_SECRET,
                             "bucketName": bucket, "endpointUrl": s3_server.endpoint}})
        finally:
            stop_service(service)
        assert "X-Amz-Signature=" in linked[0]["output_link"]["url"]   # the client gets it
        assert failed["status"] == "FAILED"
        printed = log.read_text()
        assert self.JOB_SECRET not in failed["error"]
        for secret in (self.HF_SECRET, self.JOB_SECRET, s3_server.secret_key):
            assert secret not in printed, f"a secret was printed: {secret[:4]}..."
        assert not re.search(r"X-Amz-Signature=[0-9a-f]{8}", printed)
        # At DEBUG the SDK prints every answer: the link was printed, with its signature masked.
        assert f"X-Amz-Signature={MASK}" in printed

"""What the image runs: start.py's choice, the image's command for real, and handler.py's test mode.

The slow tests run the real default model in subprocesses, as the container would: the image's
command (from the Dockerfile) answering ./test_input.json, a failing job exiting 1, and pod mode
serving RunPod's API over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from config import LaunchSettings
from errors import SettingsError
from start import launch_command, main
from tests.support.dockerfile import ROOT, image_command
from tests.support.s3 import free_port

PY = sys.executable


def _env(model_dir: Path, **extra: str) -> dict[str, str]:
    """This (cleaned) environment, serving the default model from ``model_dir``."""
    return {**os.environ, "MODEL_PATH": str(model_dir), "WORKER_BATCH_WAIT_MS": "0", **extra}


class TestLaunchCommand:
    def test_serverless_runs_the_worker_loop_unbuffered(self):
        settings = LaunchSettings.from_env({})
        assert settings.mode == "serverless"
        assert launch_command(settings, "py") == ["py", "-u", "handler.py"]

    def test_pod_runs_the_worker_behind_a_local_endpoint_on_all_interfaces(self):
        settings = LaunchSettings.from_env({"WORKER_MODE": "pod"})
        assert launch_command(settings, "py") == [
            "py", "-u", "local_endpoint.py", "--host", "0.0.0.0", "--port", "8000",
            "--", "py", "-u", "handler.py"]

    def test_pod_passes_the_port_and_the_key(self):
        settings = LaunchSettings.from_env({"WORKER_MODE": "POD", "WORKER_POD_PORT": "9001",
                                            "WORKER_POD_API_KEY": "k-123456"})
        command = launch_command(settings, "py")
        assert command[command.index("--port") + 1] == "9001"
        assert command[command.index("--api-key") + 1] == "k-123456"
        assert "k-123456" not in repr(settings)

    def test_an_unknown_mode_names_the_variable_and_the_choices(self):
        with pytest.raises(SettingsError, match=r"WORKER_MODE='lambda'.*serverless, pod"):
            LaunchSettings.from_env({"WORKER_MODE": "lambda"})

    def test_the_launcher_exits_1_on_a_bad_setting_before_loading_anything(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            main({"WORKER_POD_PORT": "99999"})
        assert exit_info.value.code == 1
        assert "WORKER_POD_PORT=99999 is out of range" in capsys.readouterr().err


@pytest.mark.slow
class TestImageCommand:
    def test_the_image_command_answers_test_input_json(self, default_model_dir):
        """`python -u start.py` in the project root, no RunPod variables: the SDK's local test."""
        command = [PY if part == "python" else part for part in image_command()]
        done = subprocess.run(command, cwd=ROOT, env=_env(default_model_dir),
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        assert "Paris" in answer["output"][0]["text"]

    def test_a_failing_test_input_exits_1_with_the_error(self, default_model_dir):
        bad = json.dumps({"input": {"prompt": "Hi", "temprature": 0.5}})
        done = subprocess.run([PY, "handler.py", "--test_input", bad], cwd=ROOT,
                              env=_env(default_model_dir), capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 1, done.stderr[-2000:]
        error = json.loads(done.stdout.strip().splitlines()[-1])["error"]
        assert error.startswith("input.temprature: unknown field")


def _post(url: str, body: dict, key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.slow
class TestPodMode:
    def test_pod_mode_serves_runpods_api_over_http_and_stops_on_sigterm(
            self, default_model_dir, tmp_path):
        port, key = free_port(), "pod-key-12345678"
        log = (tmp_path / "pod.log").open("w+")
        process = subprocess.Popen(
            [PY, "-u", "start.py"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=_env(default_model_dir, WORKER_MODE="pod", WORKER_POD_PORT=str(port),
                     WORKER_POD_API_KEY=key), start_new_session=True)
        url = f"http://127.0.0.1:{port}/v2/local/runsync"
        job = {"input": {"prompt": "The capital of France is", "max_new_tokens": 8}}
        try:
            deadline = time.monotonic() + 120
            while True:                         # until the endpoint listens
                try:
                    answer = _post(url, job, key, timeout=120)
                    break
                except urllib.error.URLError as err:
                    if isinstance(err, urllib.error.HTTPError) or time.monotonic() > deadline:
                        raise
                    assert process.poll() is None, log.seek(0) or log.read()[-3000:]
                    time.sleep(0.5)
            assert answer["status"] == "COMPLETED", answer
            assert answer["output"][0]["finish_reason"] in ("stop", "length")
            with pytest.raises(urllib.error.HTTPError) as refused:
                _post(url, job, None, timeout=10)
            assert refused.value.code == 401
        finally:
            process.send_signal(signal.SIGTERM)     # as `docker stop` does, to PID 1 only
            try:
                code = process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise
            log.close()
        assert code == 0

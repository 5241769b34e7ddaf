"""What the image runs: serving/launch.py's choice, the image's command for real, and
handler.py's test mode.

The slow tests run the real default model in subprocesses, as the container would: the image's
command (from the Dockerfile) answering ./test_input.json, a failing job exiting 1, and pod mode
serving RunPod's API over HTTP.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving import launch as start
from serving.config import LaunchSettings
from serving.errors import SettingsError
from serving.launch import launch_command, main
from tests.support.dockerfile import ROOT, image_command
from tests.support.s3 import free_port

PY = sys.executable
POD_KEY = "k-0123456789abcdef"       # 18 characters: pod keys need 16 at least


def _env(model_dir: Path, **extra: str) -> dict[str, str]:
    """This (cleaned) environment, serving the default model from ``model_dir``."""
    return {**os.environ, "MODEL_PATH": str(model_dir), "WORKER_BATCH_WAIT_MS": "0", **extra}


class TestLaunchCommand:
    def test_serverless_runs_the_worker_loop_unbuffered(self):
        settings = LaunchSettings.from_env({})
        assert settings.mode == "serverless"
        assert launch_command(settings, "py") == ["py", "-u", "handler.py"]

    def test_pod_runs_the_worker_behind_a_local_endpoint_on_all_interfaces(self):
        settings = LaunchSettings.from_env({"WORKER_MODE": "pod",
                                            "WORKER_POD_KEY_FILE": "/keys/pod"})
        assert launch_command(settings, "py") == [
            "py", "-u", "-m", "dev.local_endpoint", "--host", "0.0.0.0", "--port", "8000",
            "--key-file", "/keys/pod", "--read-timeout-s", "30",
            "--max-connections-per-peer", "256", "--", "py", "-u", "handler.py"]

    def test_pod_passes_its_connection_limits_to_the_endpoint(self):
        settings = LaunchSettings.from_env({"WORKER_MODE": "pod",
                                            "WORKER_POD_READ_TIMEOUT_S": "2.5",
                                            "WORKER_POD_MAX_CONNECTIONS_PER_PEER": "7"})
        command = launch_command(settings, "py")
        assert command[command.index("--read-timeout-s") + 1] == "2.5"
        assert command[command.index("--max-connections-per-peer") + 1] == "7"
        with pytest.raises(SettingsError, match="WORKER_POD_READ_TIMEOUT_S=0 is out of range"):
            LaunchSettings.from_env({"WORKER_POD_READ_TIMEOUT_S": "0"})

    def test_the_pod_key_travels_in_the_environment_never_on_the_command_line(self):
        env = {"WORKER_MODE": "POD", "WORKER_POD_PORT": "9001",
               "WORKER_POD_API_KEY": POD_KEY, "PATH": "/bin"}
        settings = LaunchSettings.from_env(env)
        command = launch_command(settings, "py")
        assert command[command.index("--port") + 1] == "9001"
        assert not any(POD_KEY in part for part in command)
        assert POD_KEY not in repr(settings)
        launched = start.launch_env(settings, env)
        assert launched["LOCAL_ENDPOINT_API_KEY"] == POD_KEY
        assert "WORKER_POD_API_KEY" not in launched    # the endpoint removes its own variable
        assert launched["PATH"] == "/bin"

    def test_pod_mode_without_a_key_has_the_endpoint_make_one_in_the_key_file(self):
        settings = LaunchSettings.from_env({"WORKER_MODE": "pod", "HOME": "/ignored"})
        assert settings.pod_api_key is None
        assert settings.pod_key_file == Path("~/.config/runpod-worker/pod-api-key").expanduser()
        command = launch_command(settings, "py")
        assert command[command.index("--key-file") + 1] == str(settings.pod_key_file)
        assert "LOCAL_ENDPOINT_API_KEY" not in start.launch_env(
            settings, {"LOCAL_ENDPOINT_API_KEY": "stale"})

    @pytest.mark.parametrize(("env", "mode"), [
        ({}, "serverless"),                                              # a laptop
        ({"RUNPOD_POD_ID": "abc123"}, "pod"),                            # a RunPod pod
        ({"RUNPOD_POD_ID": "abc123",                                     # a serverless worker
          "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/e/job-take/$ID"}, "serverless"),
        ({"RUNPOD_POD_ID": "abc123", "WORKER_MODE": "serverless"}, "serverless"),
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://x/job-take", "WORKER_MODE": "pod"}, "pod"),
        ({"WORKER_MODE": "auto"}, "serverless"),
    ], ids=["laptop", "pod", "serverless-worker", "explicit-serverless-on-a-pod",
            "explicit-pod", "explicit-auto"])
    def test_the_mode_defaults_to_pod_on_a_runpod_pod_and_an_explicit_one_wins(self, env, mode):
        assert LaunchSettings.from_env(env).mode == mode

    def test_an_unknown_mode_names_the_variable_and_the_choices(self):
        with pytest.raises(SettingsError, match=r"WORKER_MODE='lambda'.*auto, serverless, pod"):
            LaunchSettings.from_env({"WORKER_MODE": "lambda"})

    @pytest.mark.parametrize("key", ["Q", "k-123456789", "fifteen-chars-k"])
    def test_a_pod_key_shorter_than_16_characters_is_refused_naming_the_rule(
            self, key, capsys, monkeypatch):
        """Pins: a one-character WORKER_POD_API_KEY was served, and fell to 60 guesses."""
        def launched(*args: object) -> None:     # the process edge: never start the pod here
            raise AssertionError(f"pod mode started with a {len(key)}-character key")

        monkeypatch.setattr(os, "execve", launched)
        with pytest.raises(SystemExit) as exit_info:
            main({"WORKER_MODE": "pod", "WORKER_POD_API_KEY": key})
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key not in err
        assert f"WORKER_POD_API_KEY has {len(key)} characters; use at least 16" in err

    def test_a_pod_key_of_16_characters_is_accepted(self):
        settings = LaunchSettings.from_env({"WORKER_MODE": "pod", "WORKER_POD_API_KEY": "k" * 16})
        assert settings.pod_api_key == "k" * 16

    def test_the_launcher_exits_1_on_a_bad_setting_before_loading_anything(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            main({"WORKER_POD_PORT": "99999"})
        assert exit_info.value.code == 1
        assert "WORKER_POD_PORT=99999 is out of range" in capsys.readouterr().err


def _imported_by(code: str, env: dict[str, str] | None = None) -> list[str]:
    """The ``dev`` and ``aiohttp`` modules a fresh interpreter holds after running ``code``."""
    probe = (code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('dev', 'aiohttp'))))")
    done = subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class TestServerlessStartImports:
    """The serverless start never loads the local endpoint: dev/ and aiohttp (about 0.2 s)
    belong to pod mode only."""

    def test_choosing_the_serverless_command_imports_no_dev_module_nor_aiohttp(self):
        """Pins: serving/launch.py imported dev.local_endpoint, hence aiohttp, on every start."""
        code = ("from serving.config import LaunchSettings\n"
                "from serving.launch import launch_command, launch_env\n"
                "settings = LaunchSettings.from_env({})\n"
                "assert launch_command(settings)[-1] == 'handler.py'\n"
                "launch_env(settings, {})")
        assert _imported_by(code) == []

    @pytest.mark.slow
    def test_the_worker_loop_never_imports_dev(self, default_model_dir):
        """handler.py's worker loop: the model loaded and the SDK imported, no dev module."""
        code = ("import handler\n"
                "from serving import start, worker\n"
                "assert worker.build_worker(handler.parts()) is not None\n"
                "start.BackgroundImport().result()")
        env = {**os.environ, "MODEL_PATH": str(default_model_dir), "MODEL_WARMUP": "false",
               "RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/job-take/$ID"}
        assert [m for m in _imported_by(code, env) if m.split(".")[0] == "dev"] == []


@pytest.mark.slow
class TestImageCommand:
    def test_the_image_command_answers_test_input_json(self, default_model_dir):
        """`python -u -m serving.launch` in the project root, no RunPod variables: the SDK's
        local test."""
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


def _every_command_line() -> str:
    """What any user of the machine can read: every process's command line."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(found)


def _banner_request(log_path: Path, deadline: float) -> dict:
    """The body of the curl request the endpoint's banner prints, once it has printed it."""
    while True:
        for line in log_path.read_text().splitlines():
            if line.strip().startswith("curl -s -X POST"):
                words = shlex.split(line)
                return json.loads(words[words.index("-d") + 1])
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.slow
class TestPodMode:
    def test_on_a_runpod_pod_the_image_serves_runpods_api_only_with_a_key_it_made(
            self, default_model_dir, tmp_path):
        """No WORKER_MODE, no key: what a pod started from the image with defaults does."""
        port, key_file = free_port(), tmp_path / "keys" / "pod-api-key"
        log_path = tmp_path / "pod.log"
        log = log_path.open("w+")
        process = subprocess.Popen(
            [PY, "-u", "-m", "serving.launch"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=_env(default_model_dir, RUNPOD_POD_ID="podabc123", WORKER_POD_PORT=str(port),
                     WORKER_POD_KEY_FILE=str(key_file)), start_new_session=True)
        url = f"http://127.0.0.1:{port}/v2/local/runsync"
        job = {"input": {"prompt": "The capital of France is", "max_new_tokens": 8}}
        try:
            deadline = time.monotonic() + 120
            while True:                         # until the endpoint listens: refused, not open
                try:
                    _post(url, job, None, timeout=10)
                    raise AssertionError("pod mode without a key answered a keyless client")
                except urllib.error.HTTPError as err:
                    assert err.code == 401
                    break
                except urllib.error.URLError:
                    assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                    assert process.poll() is None, log_path.read_text()[-3000:]
                    time.sleep(0.5)
            key = key_file.read_text().strip()
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            for _ in range(2):                  # the worker keeps serving the endpoint's jobs
                answer = _post(url, job, key, timeout=120)
                assert answer["status"] == "COMPLETED", answer
                assert answer["output"][0]["finish_reason"] in ("stop", "length")
            # The banner's own request: the generate task's example (messages), answered.
            banner = _banner_request(log_path, time.monotonic() + 120)
            assert "messages" in banner["input"] and "prompt" not in banner["input"]
            answer = _post(url, banner, key, timeout=120)
            assert answer["status"] == "COMPLETED" and answer["output"][0]["text"], answer
            # Still running: the worker took jobs from the endpoint instead of answering
            # ./test_input.json and exiting, which a container restart policy would loop.
            assert process.poll() is None
            printed = log_path.read_text()
            assert not any(line.startswith('{"output"') for line in printed.splitlines())
            assert str(key_file) in printed and key not in printed
            assert key not in _every_command_line()
        finally:
            process.send_signal(signal.SIGTERM)     # as `docker stop` does, to PID 1 only
            try:
                code = process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise
            log.close()
        assert code == 0

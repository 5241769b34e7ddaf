"""A worker process run against a ``LocalEndpoint``: started with the environment RunPod gives a
worker, ready once it asks for jobs, stopped the way RunPod stops one (SIGTERM, drain, then
SIGKILL for it and its children).

SDK quirk: job-take, job-done, job-stream and job-stop send the ``api_key`` of the
``[default]`` profile in ``~/.runpod/config.toml`` instead of ``RUNPOD_AI_API_KEY`` when that
file has one (only the heartbeat always sends the variable); ``WorkerProcess`` reads the same
file (under the worker's ``HOME``) and lets the endpoint accept that key too, so a developer who
ran ``runpod config`` still gets a working worker.

Never imports runpod or torch, nor aiohttp: the endpoint is passed in.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dev.server import LocalEndpoint


def sdk_config_key(env: Mapping[str, str]) -> str | None:
    """The key the runpod SDK in a process with ``env`` sends on job-take, job-done, job-stream
    and job-stop instead of ``RUNPOD_AI_API_KEY``: the ``[default]`` profile's ``api_key`` in
    ``$HOME/.runpod/config.toml`` ("" if the profile has none); None when it sends the variable
    (no file, not TOML, no such profile). Mirrors ``runpod.http_client.get_auth_header``."""
    home = env.get("HOME") or os.path.expanduser("~")
    try:
        with open(Path(home) / ".runpod" / "config.toml", "rb") as f:
            profile = tomllib.load(f).get("default")
    except (OSError, ValueError):
        return None
    if not isinstance(profile, dict):
        return None
    return str(profile.get("api_key", ""))


class WorkerProcess:
    """A worker command (e.g. ``python handler.py``) run against a LocalEndpoint.

    The process gets ``base_env`` (default: this process's environment) plus the endpoint's
    ``worker_env`` plus ``extra_env``. Its output goes to ``output`` (default: inherited, so a
    terminal sees it). ``stop()`` ends it the way RunPod does: SIGTERM, after which the SDK
    takes no new job, lets in-flight jobs finish and post, and exits 0. Where the SDK would
    send a ``~/.runpod/config.toml`` key instead of the worker secret, the endpoint is told to
    accept it (a profile with an empty key is refused: the SDK would send nothing).
    """

    def __init__(self, endpoint: LocalEndpoint, command: Sequence[str],
                 worker_id: str = "local-worker", *, base_env: Mapping[str, str] | None = None,
                 extra_env: Mapping[str, str] | None = None, output: IO[Any] | None = None,
                 cwd: str | None = None) -> None:
        self.endpoint = endpoint
        self.command = list(command)
        self.worker_id = worker_id
        self.env = {**(os.environ if base_env is None else base_env),
                    "PYTHONUNBUFFERED": "1",
                    **endpoint.worker_env(worker_id), **(extra_env or {})}
        self.output = output
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        config_key = sdk_config_key(self.env)
        if config_key is not None:
            if not config_key.strip():
                raise ValueError("~/.runpod/config.toml has a [default] profile without an "
                                 "api_key: the runpod SDK would send an empty key to the "
                                 "endpoint; add the key or remove the profile")
            endpoint.accept_worker_key(config_key.strip())

    def start(self) -> WorkerProcess:
        self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd,
                                        stdout=self.output, stderr=self.output)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Return once the worker asks for jobs; raise RuntimeError if it exits or is too slow."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.endpoint.wait_for_worker(self.worker_id, timeout_s=0.2):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {shlex.join(self.command)!r} exited with code "
                                   f"{self.process.returncode} before taking jobs")
        raise RuntimeError(f"worker {shlex.join(self.command)!r} did not ask for jobs "
                           f"within {timeout_s} s")

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, let in-flight jobs drain, return the exit code (SIGKILL after ``timeout_s``)."""
        assert self.process is not None, "start() first"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            # Answer its waiting job-take and job-stop polls now, so it exits without waiting
            # out their hold, and so no job is handed to a worker that is going away.
            self.endpoint.drain_worker(self.worker_id)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Its children too: the SDK's heartbeat process would outlive it and ping on.
                for pid in [*descendants(self.process.pid), self.process.pid]:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, children first (from /proc; none where there is none)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (name) state ppid ...": the name may hold spaces and parentheses.
            parent = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat_file.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


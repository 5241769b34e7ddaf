"""Fixtures for local_endpoint tests: a LocalEndpoint on loopback with a real worker process.

``echo_service`` and ``stream_service`` (module scope: one worker process per test module) run
tests/workers/echo_worker.py in its two modes; ``fresh_service`` gives a test a worker of its own
(for tests that end it); ``bare_endpoint`` has no worker at all, so jobs stay queued. Every
endpoint requires ``API_KEY`` and has small payload limits so oversize tests stay cheap.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dev.local_endpoint import LocalEndpoint, WorkerProcess
from serving.config import PROJECT_ROOT
from tests.conftest import _ENV_PREFIXES

if TYPE_CHECKING:
    import runpod

API_KEY = "test-key"
RUN_LIMIT = 64 * 1024                 # bytes; /run body and result limit in these tests
RUNSYNC_LIMIT = 128 * 1024            # bytes; /runsync body and result limit
ECHO_WORKER = PROJECT_ROOT / "tests" / "workers" / "echo_worker.py"


def sdk_client(endpoint: LocalEndpoint, api_key: str = API_KEY) -> runpod.Endpoint:
    """The SDK's own client for ``endpoint``; it reads ``endpoint_url_base`` when made."""
    import runpod  # ~2 s and it configures logging: only for the tests that use it

    saved = runpod.endpoint_url_base
    runpod.endpoint_url_base = endpoint.base_url
    try:
        return runpod.Endpoint(endpoint.endpoint_id, api_key=api_key)
    finally:
        runpod.endpoint_url_base = saved


def call(endpoint: LocalEndpoint, method: str, route: str, body: Any = None,
         auth: str | None = f"Bearer {API_KEY}", timeout_s: float = 10.0) -> tuple[int, Any]:
    """Raw HTTP to ``{base_url}/{endpoint_id}/{route}``: (status, parsed JSON or None)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{endpoint.base_url}/{endpoint.endpoint_id}/{route}",
                                     data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    return status, json.loads(raw) if raw else None


@dataclass
class Service:
    """An endpoint, the worker process serving it, and the SDK client pointed at it."""

    endpoint: LocalEndpoint
    worker: WorkerProcess
    client: runpod.Endpoint
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def _clean_env() -> dict[str, str]:
    # Module fixtures start before the per-test clean_env, so strip user settings here too.
    return {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}


def _new_endpoint() -> LocalEndpoint:
    return LocalEndpoint(api_key=API_KEY, run_limit_bytes=RUN_LIMIT,
                         runsync_limit_bytes=RUNSYNC_LIMIT).start()


def start_service(mode: str, log: Path, worker_id: str = "test-worker") -> Service:
    """The echo worker in ``mode`` behind a new endpoint."""
    return start_worker_service([sys.executable, str(ECHO_WORKER)], log, worker_id,
                                extra_env={"ECHO_WORKER_MODE": mode})


def start_worker_service(command: list[str], log: Path, worker_id: str = "test-worker",
                         extra_env: dict[str, str] | None = None,
                         ready_timeout_s: float = 120, cwd: Path = PROJECT_ROOT) -> Service:
    """A worker ``command`` run in ``cwd`` behind a new endpoint, its output in ``log``; waits
    until it polls."""
    endpoint = _new_endpoint()
    out = log.open("wb")
    worker = WorkerProcess(endpoint, command, worker_id,
                           base_env=_clean_env(), output=out, cwd=str(cwd),
                           extra_env={"RUNPOD_LOG_LEVEL": "INFO", **(extra_env or {})})
    worker.start()
    out.close()  # the child holds its own copy
    service = Service(endpoint, worker, sdk_client(endpoint), log)
    try:
        worker.wait_ready(timeout_s=ready_timeout_s)
    except RuntimeError as err:
        stop_service(service)
        raise RuntimeError(f"{err}\n--- worker log ---\n{service.log_tail()}") from None
    return service


def start_handler_service(model_dir: Path, log: Path, worker_id: str,
                          **settings: str) -> Service:
    """The project's own ``python handler.py`` on ``model_dir`` behind a new endpoint."""
    return start_worker_service([sys.executable, "handler.py"], log, worker_id,
                                extra_env={"MODEL_PATH": str(model_dir), **settings})


def stop_service(service: Service) -> None:
    if service.worker.returncode is None:
        service.worker.stop(timeout_s=20)
    service.endpoint.stop()


@pytest.fixture(scope="module")
def echo_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The echo worker (async handler, 3 jobs at a time) behind a local endpoint."""
    service = start_service("echo", tmp_path_factory.mktemp("echo") / "worker.log")
    yield service
    stop_service(service)


@pytest.fixture(scope="module")
def stream_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The streaming worker (async generator, aggregated stream) behind a local endpoint."""
    service = start_service("stream", tmp_path_factory.mktemp("stream") / "worker.log")
    yield service
    stop_service(service)


@pytest.fixture
def fresh_service(tmp_path: Path) -> Iterator[Service]:
    """An echo worker of this test's own, for tests that stop it."""
    service = start_service("echo", tmp_path / "worker.log", worker_id="fresh-worker")
    yield service
    stop_service(service)


@pytest.fixture
def bare_endpoint() -> Iterator[LocalEndpoint]:
    """An endpoint no worker serves: submitted jobs stay IN_QUEUE."""
    endpoint = _new_endpoint()
    yield endpoint
    endpoint.stop()

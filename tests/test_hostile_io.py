"""Jobs as an attacker would send them, aimed at storage and downloads.

Each test sends the attack through the real job wiring (or the public download and storage
calls) and passes only when the worker refuses it cleanly: no connection where none is allowed,
no remote content echoed, no time or thread held past its limit, no generic internal error.

Nothing here leaves loopback. An audit hook (``connections``) records every socket connect while
a test runs and blocks any that is not to loopback, so an address that must be refused is never
sent a packet even when the code under test gets it wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest

from serving.config import DownloadSettings, StorageSettings
from serving.downloads import download_bytes, is_public_address
from serving.errors import DownloadError
from serving.s3config import storage_for_job
from serving.worker import Worker
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, free_port
from tests.support.spool import WatchedStorage, spool_files
from tests.support.worker import LoopThread, chat, configured

pytestmark = pytest.mark.slow

SHORT = chat("Say hi.", max_new_tokens=2)
DID_NOT_HANG_S = 30          # generous: every limit under test is 1 or 2 s
BUSY_MACHINE_S = 120         # two model jobs at once on a loaded CPU


# --------------------------------------------------------------------------------------------
# Helpers: one job's answer, the download pool's threads, and the loopback servers we need
# --------------------------------------------------------------------------------------------
def assert_download_pool_free(worker: Worker, threads: int) -> None:
    """All ``threads`` of the worker's download pool take work at once: none is still held."""
    everyone = threading.Barrier(threads + 1)
    held = [worker.downloads.submit(everyone.wait, 5) for _ in range(threads)]
    everyone.wait(5)
    assert all(future.result(5) is not None for future in held)


def answer(loop: LoopThread, worker: Worker, job_input: dict[str, Any],
           timeout: float = DID_NOT_HANG_S, **job_fields: Any) -> dict[str, Any]:
    async def run() -> list[Any]:
        job = {"id": "hostile-1", "input": job_input, **job_fields}
        return [item async for item in worker.handle(job)]

    items = loop.run(run(), timeout=timeout)
    assert len(items) == 1, items
    return items[0]


def s3_config(endpoint: str, bucket: str = "bucket") -> dict[str, str]:
    return {"accessId": ACCESS_KEY, "accessSecret": SECRET_KEY, "bucketName": bucket,
            "endpointUrl": endpoint}


def bucket_env(endpoint: str, bucket: str = "bucket", **extra: str) -> dict[str, str]:
    """The worker's own storage at ``endpoint``, retrying fast."""
    return {"BUCKET_ENDPOINT_URL": endpoint, "BUCKET_ACCESS_KEY_ID": ACCESS_KEY,
            "BUCKET_SECRET_ACCESS_KEY": SECRET_KEY, "BUCKET_NAME": bucket,
            "BUCKET_RETRY_ATTEMPTS": "3", "BUCKET_RETRY_DELAY_SECONDS": "0.01",
            "BUCKET_TIMEOUT_SECONDS": "5", **extra}


def put_object(server: Any, bucket: str, key: str, body: bytes) -> None:
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key)
    client.put_object(Bucket=bucket, Key=key, Body=body)
    client.close()


class _ConnectLog:
    """Every socket.connect while armed; a connect to anything but loopback is blocked."""

    def __init__(self) -> None:
        self.armed = False
        self.seen: list[Any] = []

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        if event == "socket.getaddrinfo":    # no name lookups that could leave the machine
            host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            if host != "localhost" and not _is_ip(host):
                raise socket.gaierror(socket.EAI_NONAME, f"test guard: no lookup of {host!r}")
        if event != "socket.connect":
            return
        address = args[1]
        self.seen.append(address)
        host = address[0] if isinstance(address, tuple) else str(address)
        if not (_is_ip(host) and ipaddress.ip_address(host.split("%", 1)[0]).is_loopback):
            raise PermissionError(f"test guard: no connection to {host} from the tests")

    def hosts(self) -> list[str]:
        return [a[0] if isinstance(a, tuple) else str(a) for a in self.seen]

    def ports(self) -> list[int]:
        return [a[1] for a in self.seen if isinstance(a, tuple)]

    def clear(self) -> None:
        """Forget the test's own setup (making buckets, putting objects)."""
        self.seen = []


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


_CONNECT_LOG = _ConnectLog()
_HOOKED = False


@pytest.fixture(autouse=True)
def connections() -> Iterator[_ConnectLog]:
    global _HOOKED
    if not _HOOKED:          # audit hooks cannot be removed: install one, arm it per test
        sys.addaudithook(_CONNECT_LOG.hook)
        _HOOKED = True
    _CONNECT_LOG.seen = []
    _CONNECT_LOG.armed = True
    yield _CONNECT_LOG
    _CONNECT_LOG.armed = False


HTTP_HEADER = (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a")
TLS_RECORD = (b"\x16\x03\x03\x40\x00", b"\x02")    # a 16 KiB handshake record, then its body


class Dribbler:
    """A TCP server on loopback that holds every connection it accepts.

    ``silent``: reads the request and never answers. Otherwise it sends ``greeting`` and then
    ``drip`` every 0.05 s, for as long as it runs (by default: a status line, then a header one
    byte at a time): every single read the client makes succeeds, so only a limit on the whole
    transfer ends it. ``arrived`` is set when a connection is accepted, ``hung_up`` when a
    client closed one.
    """

    def __init__(self, silent: bool = False,
                 greeting: tuple[bytes, bytes] = HTTP_HEADER) -> None:
        self.silent = silent
        self.greeting, self.drip = greeting
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.open = 0
        self.most_open = 0
        self.accepted = 0
        self.arrived = threading.Event()
        self.hung_up = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._clients.append(client)
                self.accepted += 1
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            self.arrived.set()
            threading.Thread(target=self._hold, args=(client,), daemon=True).start()

    def _hold(self, client: socket.socket) -> None:
        try:
            client.settimeout(1)
            with contextlib.suppress(TimeoutError):
                client.recv(65536)
            if not self.silent:
                client.sendall(self.greeting)
            while not self.stopping.wait(0.05):
                if not self.silent:
                    client.sendall(self.drip)
        except OSError:
            if not self.stopping.is_set():
                self.hung_up.set()
        finally:
            with self._lock:
                self.open -= 1
            with contextlib.suppress(OSError):
                client.close()

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def dribbler() -> Iterator[Dribbler]:
    server = Dribbler()
    yield server
    server.stop()


@pytest.fixture
def silent_server() -> Iterator[Dribbler]:
    server = Dribbler(silent=True)
    yield server
    server.stop()


class _FakeS3Handler(BaseHTTPRequestHandler):
    """Answers every request with the status and S3 error code set for its key, or a body."""

    server: Any

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, with_body: bool) -> None:
        key = self.path.split("?", 1)[0].split("/", 2)[-1]
        status, code, body = self.server.routes.get(key, (404, "NoSuchKey", b""))
        if code:
            body = (f"<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{code} "
                    f"message</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml" if code else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)

    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(True)


@pytest.fixture
def fake_s3() -> Iterator[Any]:
    """A loopback server speaking just enough S3 to answer chosen errors and bodies."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeS3Handler)
    server.daemon_threads = True
    server.routes = {}
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a daemon thread; the dict gets its "result" or "error"."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# --------------------------------------------------------------------------------------------
# 1. A job's s3Config obeys the address rule, for reads and for uploads
# --------------------------------------------------------------------------------------------
class TestJobStorageAddresses:
    def test_a_jobs_s3config_cannot_read_a_batch_from_loopback(
            self, loop, worker, s3_server, s3_bucket, connections) -> None:
        put_object(s3_server, s3_bucket, "in/batch.jsonl", json.dumps(SHORT).encode())
        connections.clear()
        out = answer(loop, worker, {"batch_url": f"s3://{s3_bucket}/in/batch.jsonl",
                                    "output_mode": "link"},
                     s3Config=s3_config(s3_server.endpoint, s3_bucket))
        assert out.get("error_code") == "invalid_input", out
        assert out["error"].startswith("s3Config.endpointUrl: ")
        assert "DOWNLOAD_ALLOW_PRIVATE" in out["error"]
        assert s3_server.port not in connections.ports()

    def test_a_jobs_s3config_cannot_receive_an_answer_on_loopback(
            self, loop, worker, s3_server, s3_bucket, connections) -> None:
        connections.clear()
        out = answer(loop, worker, {**SHORT, "output_mode": "link"},
                     s3Config=s3_config(s3_server.endpoint, s3_bucket))
        assert out.get("error_code") == "invalid_input", out
        assert out["error"].startswith("s3Config.endpointUrl: ")
        assert s3_server.port not in connections.ports()
        assert not [p for p in (s3_server.root / s3_bucket).rglob("*") if p.is_file()]

    def test_the_metadata_service_is_never_contacted(self, loop, worker, connections) -> None:
        out = answer(loop, worker, {"batch_url": "s3://latest/meta-data/iam/role",
                                    "output_mode": "link"},
                     s3Config=s3_config("http://169.254.169.254", "latest"))
        assert out.get("error_code") == "invalid_input", out
        assert out["error"].startswith("s3Config.endpointUrl: ")
        assert "169.254.169.254" not in connections.hosts()

    def test_an_open_and_a_closed_private_port_give_the_same_answer(
            self, loop, worker, s3_server, s3_bucket, connections) -> None:
        job = {"batch_url": f"s3://{s3_bucket}/in/batch.jsonl"}
        closed = free_port()
        connections.clear()
        errors = [answer(loop, worker, job, s3Config=s3_config(
                      f"http://127.0.0.1:{port}", s3_bucket)).get("error", "")
                  for port in (s3_server.port, closed)]
        assert errors[0] and errors[0].replace(str(s3_server.port), "PORT") == \
            errors[1].replace(str(closed), "PORT")
        assert s3_server.port not in connections.ports()

    @pytest.mark.parametrize("endpoint", ["http://x:99999", "http://[::1", "http://a b.example",
                                          "http://host:abc", "http://exa mple.com:9000",
                                          "http://[fe80::1%25eth0]:9000/"])
    def test_a_malformed_endpoint_is_an_input_error_naming_the_field(
            self, loop, worker, endpoint: str, connections) -> None:
        out = answer(loop, worker, {"batch_url": "s3://bucket/in.jsonl"},
                     s3Config=s3_config(endpoint))
        assert out.get("error_code") == "invalid_input", out
        assert out["error"].startswith("s3Config.endpointUrl: ")
        assert connections.seen == []

    def test_storage_errors_do_not_echo_what_the_server_said(self, loop, worker,
                                                              fake_s3) -> None:
        fake_s3.routes["in/a.jsonl"] = (400, "role-name-from-the-server", b"")
        fake_s3.routes["in/b.jsonl"] = (200, "", b'\n\n{"Code": "Success", "Token": "tok3n\n')
        allowed = configured(worker, DOWNLOAD_ALLOW_PRIVATE="true")
        for key in ("in/a.jsonl", "in/b.jsonl"):
            out = answer(loop, allowed, {"batch_url": f"s3://bucket/{key}"},
                         s3Config=s3_config(fake_s3.endpoint))
            assert out.get("error_code") in ("download_failed", "invalid_input"), out
            for remote in ("role-name-from-the-server", "tok3n", "Success", "column"):
                assert remote not in out["error"]


# --------------------------------------------------------------------------------------------
# 2. Time limits are total, and transfers cannot take the threads answers need
# --------------------------------------------------------------------------------------------
class TestTotalTimeLimits:
    def test_a_server_dribbling_headers_cannot_hold_a_download(self, dribbler) -> None:
        settings = DownloadSettings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "true",
                                              "DOWNLOAD_TIMEOUT_SECONDS": "1"})
        thread, out = in_thread(download_bytes, f"{dribbler.endpoint}/items.jsonl", settings)
        thread.join(DID_NOT_HANG_S)
        assert not thread.is_alive(), "the download outlived its time limit"
        assert isinstance(out.get("error"), DownloadError), out
        assert "DOWNLOAD_TIMEOUT_SECONDS" in str(out["error"])

    def test_a_server_dribbling_its_tls_handshake_cannot_hold_a_download(self) -> None:
        server = Dribbler(greeting=TLS_RECORD)
        try:
            settings = DownloadSettings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "true",
                                                  "DOWNLOAD_TIMEOUT_SECONDS": "1"})
            thread, out = in_thread(download_bytes, f"https://localhost:{server.port}/x",
                                    settings)
            thread.join(DID_NOT_HANG_S)
            assert not thread.is_alive(), "the handshake outlived the download's time limit"
            assert "DOWNLOAD_TIMEOUT_SECONDS" in str(out.get("error")), out
        finally:
            server.stop()

    def test_a_storage_dribbling_headers_cannot_hold_a_batch_read(self, loop, worker,
                                                                  dribbler) -> None:
        slow = configured(worker, DOWNLOAD_TIMEOUT_SECONDS="1", BATCH_URL_S3_PREFIX="in",
                          **bucket_env(dribbler.endpoint))
        out = answer(loop, slow, {"batch_url": "s3://bucket/in/batch.jsonl"})
        assert out.get("error_code") == "download_failed", out
        assert "DOWNLOAD_TIMEOUT_SECONDS" in out["error"]

    def test_a_storage_dribbling_headers_cannot_hold_an_upload(self, loop, worker,
                                                               dribbler) -> None:
        slow = configured(worker, BUCKET_UPLOAD_TIMEOUT_SECONDS="2",
                          **bucket_env(dribbler.endpoint))
        out = answer(loop, slow, {**SHORT, "output_mode": "link"})
        assert out.get("error_code") == "storage_failed", out
        assert "BUCKET_UPLOAD_TIMEOUT_SECONDS" in out["error"]

    def test_stalled_downloads_cannot_starve_an_inline_answer(self, worker,
                                                             silent_server) -> None:
        stalled = configured(worker, WORKER_CONCURRENCY="2", DOWNLOAD_ALLOW_PRIVATE="true",
                             DOWNLOAD_TIMEOUT_SECONDS="120")
        own_loop = LoopThread()      # a fresh default thread pool, as in a fresh worker
        try:
            hostile = [asyncio_job(own_loop, stalled, {
                "batch_url": f"{silent_server.endpoint}/stall-{i}.jsonl"}) for i in range(40)]
            deadline = time.monotonic() + DID_NOT_HANG_S
            while silent_server.accepted < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert silent_server.accepted >= 2
            inline = answer(own_loop, stalled, SHORT)
            assert inline.get("text"), inline
            assert silent_server.most_open <= 2    # downloads run in a pool of WORKER_CONCURRENCY
            silent_server.stop()
            for future in hostile:
                assert future.result(DID_NOT_HANG_S)[0]["error_code"] == "download_failed"
        finally:
            silent_server.stop()
            own_loop.close()


def asyncio_job(loop: LoopThread, worker: Worker, job_input: dict[str, Any]) -> Any:
    """Start one job on ``loop`` without waiting: a concurrent.futures.Future of its items."""
    async def run() -> list[Any]:
        return [item async for item in worker.handle({"id": "stall", "input": job_input})]

    return asyncio.run_coroutine_threadsafe(run(), loop.loop)


# --------------------------------------------------------------------------------------------
# 3. Limits before work on batch_url items
# --------------------------------------------------------------------------------------------
class TestBatchUrlItems:
    def test_an_item_over_the_input_limit_is_refused_before_it_runs(self, loop, worker,
                                                                   http_server) -> None:
        big = json.dumps({"prompt": "word " * 400, "max_new_tokens": 1})
        http_server.files["big"] = (json.dumps(SHORT) + "\n" + big + "\n").encode()
        small = configured(worker, DOWNLOAD_ALLOW_PRIVATE="true", WORKER_MAX_INPUT_BYTES="1024")
        out = answer(loop, small, {"batch_url": http_server.url("/jsonl/big")})
        assert out.get("error_code") == "payload_too_large", out
        assert "line 2" in out["error"] and "WORKER_MAX_INPUT_BYTES" in out["error"]

    def test_a_deeply_nested_item_is_an_input_error_naming_the_line(self, loop, worker,
                                                                   http_server) -> None:
        http_server.files["deep"] = b"{}\n" + b"[" * 5000 + b"]" * 5000 + b"\n"
        allowed = configured(worker, DOWNLOAD_ALLOW_PRIVATE="true")
        out = answer(loop, allowed, {"batch_url": http_server.url("/jsonl/deep")})
        assert out.get("error_code") == "invalid_input", out
        assert out["error"].startswith("input.batch_url: line 2 ")

    def test_a_non_ascii_path_is_fetched_percent_encoded(self, loop, worker,
                                                        http_server) -> None:
        http_server.files["d%C3%A4t%C3%A4%20%E2%9C%93.jsonl"] = json.dumps(SHORT).encode()
        allowed = configured(worker, DOWNLOAD_ALLOW_PRIVATE="true")
        out = answer(loop, allowed, {"batch_url": http_server.url("/jsonl/dätä ✓.jsonl")})
        assert out.get("failed") == 0, out

    @pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999/x", "https://a b/x",
                                     "http://127.0.0.1:abc/x", "s3://", "\x00http://x/"])
    def test_a_malformed_batch_url_is_a_clean_refusal(self, loop, worker, url: str,
                                                      connections) -> None:
        out = answer(loop, worker, {"batch_url": url})
        assert out.get("error_code") in ("download_failed", "invalid_input"), out


# --------------------------------------------------------------------------------------------
# 4. One client cannot read another's objects from the worker's bucket
# --------------------------------------------------------------------------------------------
class TestWorkerBucketReads:
    def test_another_jobs_answer_cannot_be_read_through_batch_url(
            self, loop, worker, s3_server, s3_bucket) -> None:
        own = configured(worker, **s3_server.env(s3_bucket))
        linked = answer(loop, own, {**SHORT, "output_mode": "link"})
        key = linked["output_link"]["key"]
        out = answer(loop, own, {"batch_url": f"s3://{s3_bucket}/{key}"})
        assert out.get("error_code") == "download_failed", out
        assert "BATCH_URL_S3_PREFIX" in out["error"]

    def test_only_keys_under_the_allowed_prefix_are_read(self, loop, worker, s3_server,
                                                         s3_bucket) -> None:
        put_object(s3_server, s3_bucket, "inputs/mine.jsonl", json.dumps(SHORT).encode())
        put_object(s3_server, s3_bucket, "inputs-other/x.jsonl", json.dumps(SHORT).encode())
        put_object(s3_server, s3_bucket, "outputs/x.jsonl", json.dumps(SHORT).encode())
        own = configured(worker, BATCH_URL_S3_PREFIX="inputs", **s3_server.env(s3_bucket))
        assert answer(loop, own, {"batch_url": f"s3://{s3_bucket}/inputs/mine.jsonl"}
                      ).get("failed") == 0
        for key in ("outputs/x.jsonl", "inputs/../outputs/x.jsonl", "inputs-other/x.jsonl",
                    "inputs//../outputs/x.jsonl"):
            out = answer(loop, own, {"batch_url": f"s3://{s3_bucket}/{key}"})
            assert out.get("error_code") == "download_failed", (key, out)

    def test_a_missing_and_a_forbidden_object_look_alike(self, loop, worker, fake_s3) -> None:
        fake_s3.routes["inputs/forbidden.jsonl"] = (403, "AccessDenied", b"")
        fake_s3.routes["inputs/missing.jsonl"] = (404, "NoSuchKey", b"")
        own = configured(worker, BATCH_URL_S3_PREFIX="inputs", **bucket_env(fake_s3.endpoint))
        errors = [answer(loop, own, {"batch_url": f"s3://bucket/inputs/{name}.jsonl"})
                  for name in ("forbidden", "missing")]
        assert errors[0].get("error_code") == errors[1].get("error_code") == "download_failed"
        assert errors[0]["error"].replace("forbidden", "NAME") == \
            errors[1]["error"].replace("missing", "NAME")


# --------------------------------------------------------------------------------------------
# 5. Addresses that embed a private IPv4 address, and site-local IPv6
# --------------------------------------------------------------------------------------------
class TestEmbeddedAddresses:
    @pytest.mark.parametrize("address", [
        "2002:7f00:1::1",                   # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",                # 6to4 of 169.254.169.254
        "fec0::1",                          # site-local
        "64:ff9b::7f00:1",                  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",               # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",                 # local-use NAT64
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    ])
    def test_an_address_embedding_a_private_one_is_not_public(self, address: str) -> None:
        assert not is_public_address(ipaddress.ip_address(address))

    def test_a_6to4_url_to_loopback_is_refused_before_connecting(self, connections) -> None:
        with pytest.raises(DownloadError, match="private or reserved"):
            download_bytes("http://[2002:7f00:1::1]:8080/x", DownloadSettings.from_env({}))
        assert connections.seen == []

    def test_a_site_local_s3config_is_refused_before_connecting(self, connections) -> None:
        job = {"id": "j", "s3Config": s3_config("http://[fec0::1]:9000")}
        with pytest.raises(Exception) as err:
            storage = storage_for_job(job, StorageSettings.from_env({}), None)
            storage.put("outputs/j/a.json", b"{}", "application/json")
        assert str(err.value).startswith("s3Config.endpointUrl: ")
        assert connections.seen == []


# --------------------------------------------------------------------------------------------
# 6. A storage server cannot make the worker hold what it sends
# --------------------------------------------------------------------------------------------
HUGE_REPLY_CAP = 64 * 1024 * 1024     # the impostor stops here, so the unbounded code fails
                                      # this test without exhausting the machine
MEMORY_BOUND = 16 * 1024 * 1024       # most the worker's Python heap may grow under the attack


class HugeReplies:
    """A loopback server posing as S3 that answers every request with a reply without end.

    ``mode``: ``ok`` answers 200 and a body until the client hangs up; ``error`` a 400 with an
    S3 error document that never closes; ``continue`` answers the request's 100-continue with a
    status line that never ends. Each stops at HUGE_REPLY_CAP. ``sent`` counts the bytes of
    replies; ``hung_up`` is set when the client closed a connection before the cap.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sent = 0
        self.hung_up = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            if self.mode == "continue":
                first, filler = b"HTTP/1.1 100 ", b"x" * 65536
            elif self.mode == "ok":
                first, filler = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b" " * 65536
            else:
                first = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\n"
                         b"Connection: close\r\n\r\n<Error><Code>SlowDown</Code><Message>")
                filler = b"a" * 65536
            try:
                client.sendall(first)
                while self.sent < HUGE_REPLY_CAP:
                    client.sendall(filler)
                    self.sent += len(filler)
            except OSError:
                self.hung_up.set()

    def stop(self) -> None:
        self.listener.close()


def under_tracemalloc(fn: Any) -> tuple[Any, int]:
    """``fn()`` and the most the traced Python heap grew while it ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


class TestOversizedStorageReplies:
    @pytest.mark.parametrize(("whose", "mode"), [("job", "ok"), ("job", "error"),
                                                 ("job", "continue"), ("worker", "ok")])
    def test_an_endless_reply_is_a_clean_storage_error_in_bounded_memory(
            self, loop, worker, mode: str, whose: str) -> None:
        """Pins: botocore read a reply to PutObject whole into memory (512 MB cost 3.3 GB)."""
        server = HugeReplies(mode)
        try:
            if whose == "job":
                hostile = configured(worker, DOWNLOAD_ALLOW_PRIVATE="true")
                fields = {"s3Config": s3_config(server.endpoint)}
            else:
                hostile = configured(worker, **bucket_env(server.endpoint))
                fields = {}

            async def concurrently() -> tuple[Any, Any]:
                async def run(job: dict[str, Any]) -> list[Any]:
                    return [item async for item in hostile.handle(job)]

                return await asyncio.gather(
                    run({"id": "hostile-1", "input": {**SHORT, "output_mode": "link"},
                         **fields}),
                    run({"id": "victim-1", "input": SHORT}))

            (attack, victim), grew = under_tracemalloc(
                lambda: loop.run(concurrently(), timeout=BUSY_MACHINE_S))
        finally:
            server.stop()
        assert grew < MEMORY_BOUND, f"the heap grew {grew:,} bytes under the attack"
        assert server.hung_up.wait(DID_NOT_HANG_S), "the worker read the reply to its end"
        assert server.sent < HUGE_REPLY_CAP // 2
        assert len(attack) == 1 and attack[0].get("error_code") == "storage_failed", attack
        assert "over 1,048,576 bytes" in attack[0]["error"]
        field = "s3Config.endpointUrl" if whose == "job" else "BUCKET_ENDPOINT_URL"
        assert field in attack[0]["error"]
        assert len(victim) == 1 and victim[0].get("text"), victim


# --------------------------------------------------------------------------------------------
# 7. A job's uploads end with the job
# --------------------------------------------------------------------------------------------
NO_MODEL_LINK = {"batch": [{}], "output_mode": "link"}   # its item fails parsing: no model work


def upload_threads_free(worker: Worker, within_s: float) -> bool:
    """True once every thread of the worker's upload pool is idle at the same time."""
    parties = worker.settings.concurrency
    barrier = threading.Barrier(parties + 1)
    for _ in range(parties):
        worker.uploads.submit(barrier.wait, within_s)
    try:
        barrier.wait(within_s)
        return True
    except threading.BrokenBarrierError:
        return False


def timed_link(loop: LoopThread, worker: Worker, s3_server: Any) -> float:
    """Seconds one model-free job takes to answer with a verified link to ``s3_server``."""
    start = time.monotonic()
    out = answer(loop, worker, NO_MODEL_LINK)
    took = time.monotonic() - start
    link = out["output_link"]
    assert link["url"].startswith(s3_server.endpoint), out
    return took


class TestUploadsEndWithTheirJob:
    @pytest.mark.parametrize("ending", ["timeout", "cancel"])
    def test_a_slow_storage_cannot_hold_an_upload_thread_past_its_job(
            self, loop, worker, dribbler, s3_server, s3_bucket, ending: str) -> None:
        """Pins: a timed-out job's upload held its thread BUCKET_UPLOAD_TIMEOUT_SECONDS a file."""
        one = configured(worker, WORKER_CONCURRENCY="1", WORKER_JOB_TIMEOUT_S="2",
                         DOWNLOAD_ALLOW_PRIVATE="true", BUCKET_UPLOAD_TIMEOUT_SECONDS="600",
                         **s3_server.env(s3_bucket))
        alone = sorted(timed_link(loop, one, s3_server) for _ in range(3))[1]

        async def hostile() -> list[Any]:
            job = {"id": "slow-1", "input": NO_MODEL_LINK,
                   "s3Config": s3_config(dribbler.endpoint)}
            return [item async for item in one.handle(job)]

        running = asyncio.run_coroutine_threadsafe(hostile(), loop.loop)
        assert dribbler.arrived.wait(DID_NOT_HANG_S), "the upload never reached the server"
        if ending == "timeout":
            items = running.result(DID_NOT_HANG_S)
            assert items[0].get("error_code") == "timeout", items
        else:
            running.cancel()
        freed = upload_threads_free(one, DID_NOT_HANG_S)
        assert freed, "the upload outlived its job"
        assert dribbler.hung_up.wait(DID_NOT_HANG_S), "the upload's connection stayed open"
        meanwhile = sorted(timed_link(loop, one, s3_server) for _ in range(3))[1]
        # 1.5x, plus 0.25 s for a loaded machine's scheduling: a held thread costs minutes.
        assert meanwhile <= 1.5 * alone + 0.25, (meanwhile, alone)


# --------------------------------------------------------------------------------------------
# 8. A job's downloads end with the job
# --------------------------------------------------------------------------------------------
class WatchedDribbler(Dribbler):
    """A Dribbler whose connection counts can be awaited (``wait_for``)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        super().__init__()

    def _hold(self, client: socket.socket) -> None:
        self._notify()
        try:
            super()._hold(client)
        finally:
            self._notify()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


class TestDownloadsEndWithTheirJob:
    def test_a_timed_out_jobs_dribbled_downloads_stop_and_free_their_pool_threads(
            self, loop, upscale_worker, http_server) -> None:
        """Pins downloads outliving their job: they held half the pool for 120 s after it."""
        from tests.support.images import image_bytes

        server = WatchedDribbler()
        worker = configured(upscale_worker, WORKER_CONCURRENCY="4", WORKER_JOB_TIMEOUT_S="2",
                            DOWNLOAD_ALLOW_PRIVATE="true", DOWNLOAD_TIMEOUT_SECONDS="120")
        http_server.files["victim.png"] = image_bytes(12, 10)
        try:
            hostile = asyncio_job(loop, worker, {"batch": [
                {"image": f"{server.endpoint}/cat-{i}.png"} for i in range(2)]})
            assert server.wait_for(lambda: server.open == 2, DID_NOT_HANG_S)
            # Half the pool is held: another job's download meanwhile is not delayed.
            victim = answer(loop, worker, {"image": http_server.url("/jsonl/victim.png")})
            assert (victim.get("width"), victim.get("height")) == (24, 20), victim
            timed_out = hostile.result(DID_NOT_HANG_S)
            assert [item.get("error_code") for item in timed_out] == ["timeout"], timed_out
            # The job has ended: its connections are closed and all 4 pool threads are free.
            assert server.wait_for(lambda: server.open == 0, 5), "the downloads outlived the job"
            assert_download_pool_free(worker, 4)
        finally:
            server.stop()

    def test_a_timed_out_jobs_dribbled_batch_url_stops_and_frees_its_pool_thread(
            self, loop, upscale_worker) -> None:
        """Pins a batch_url download outliving its job: it ran on to DOWNLOAD_TIMEOUT_SECONDS."""
        server = WatchedDribbler()
        worker = configured(upscale_worker, WORKER_CONCURRENCY="4", WORKER_JOB_TIMEOUT_S="2",
                            DOWNLOAD_ALLOW_PRIVATE="true", DOWNLOAD_TIMEOUT_SECONDS="120")
        try:
            hostile = asyncio_job(loop, worker, {"batch_url": f"{server.endpoint}/items.jsonl"})
            assert server.wait_for(lambda: server.open == 1, DID_NOT_HANG_S)
            timed_out = hostile.result(DID_NOT_HANG_S)
            assert [item.get("error_code") for item in timed_out] == ["timeout"], timed_out
            assert server.wait_for(lambda: server.open == 0, 5), "the download outlived the job"
            assert_download_pool_free(worker, 4)
        finally:
            server.stop()


# --------------------------------------------------------------------------------------------
# 9. A refusal does not tell an internal name from one that does not exist
# --------------------------------------------------------------------------------------------
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def netguard_log() -> Iterator[_Lines]:
    logger = logging.getLogger("worker.netguard")
    lines, level = _Lines(), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(lines)
    logger.setLevel(level)


class TestRefusalsDoNotMapInternalNames:
    """A job's URL or ``s3Config`` aimed at a name the worker's DNS knows as internal, and at
    one that does not exist, gets the same answer, so a job cannot map internal DNS names.

    "localhost" plays the internal name (it resolves to loopback); the audit hook makes any
    other name fail at the real resolver call, as NXDOMAIN does.
    """

    INTERNAL, MISSING = "localhost", "db-7.corp.internal"

    def test_a_download_from_a_private_and_an_unresolvable_host_is_refused_alike(
            self, loop, worker, connections, netguard_log) -> None:
        """Pins the leak: "resolves to a private address" against "does not resolve"."""
        errors = [answer(loop, worker, {"batch_url": f"http://{host}:8080/batch.jsonl"})
                  for host in (self.INTERNAL, self.MISSING)]
        assert errors[0].get("error_code") == errors[1].get("error_code") == "download_failed"
        assert errors[0]["error"].replace(self.INTERNAL, "HOST") == \
            errors[1]["error"].replace(self.MISSING, "HOST"), errors
        assert "DOWNLOAD_ALLOW_PRIVATE" in errors[0]["error"]
        assert connections.seen == []
        # The operator's DEBUG log keeps the difference.
        assert any("does not resolve" in line and self.MISSING in line
                   for line in netguard_log.lines), netguard_log.lines
        assert any("resolves to" in line and self.INTERNAL in line
                   for line in netguard_log.lines), netguard_log.lines

    def test_a_jobs_storage_at_a_private_and_an_unresolvable_host_is_refused_alike(
            self, loop, worker, connections) -> None:
        """Pins the leak: an input error for the internal name, retries and a storage error
        for the missing one."""
        errors = [answer(loop, worker, {"batch_url": "s3://bucket/in.jsonl"},
                         s3Config=s3_config(f"http://{host}:9000"))
                  for host in (self.INTERNAL, self.MISSING)]
        assert errors[0].get("error_code") == errors[1].get("error_code") == "invalid_input"
        assert errors[0]["error"].startswith("s3Config.endpointUrl: ")
        assert errors[0]["error"].replace(self.INTERNAL, "HOST") == \
            errors[1]["error"].replace(self.MISSING, "HOST"), errors
        assert connections.seen == []

    def test_an_unresolvable_host_still_says_so_where_private_addresses_are_allowed(
            self, connections) -> None:
        """With DOWNLOAD_ALLOW_PRIVATE there is nothing to hide: the real cause is shown."""
        allowed = DownloadSettings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "true"})
        with pytest.raises(DownloadError, match="the host name does not resolve"):
            download_bytes(f"http://{self.MISSING}/x", allowed)


# --------------------------------------------------------------------------------------------
# 10. A batch job is far larger in memory than on the wire: neither its items nor its answers
#    are ever held whole
# --------------------------------------------------------------------------------------------
EMBED_SLOW_S = 300           # the embedding jobs below run hundreds of texts on a shared CPU


def embed_texts(item: int, count: int = 8) -> dict[str, Any]:
    """An embedding batch item of ``count`` short texts that differ from every other item's."""
    return {"texts": [f"item {item} text {j}" for j in range(count)]}


def traced(fn: Any) -> tuple[Any, int, int]:
    """``fn()`` under tracemalloc, the traced memory in use when it started, and the peak."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        return fn(), base, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class TestBatchJobMemory:
    def test_a_large_batch_answer_is_spooled_as_items_finish(self, loop, embed_worker,
                                                             tmp_path) -> None:
        """Pins the answer bound: every item's answer was held until the last one ended (3 MB
        of embeddings as JSON held 12 MB until the upload)."""
        memory, items, gate = 128 * 1024, 48, 2
        own = configured(embed_worker, WORKER_MAX_TEXTS="64", WORKER_MAX_BATCH_SIZE=str(2 * gate),
                         BATCH_ANSWER_MEMORY_BYTES=str(memory))
        storage = WatchedStorage(tmp_path)
        own = dataclasses.replace(own, storage=storage)
        batch = [embed_texts(i) for i in range(items)]
        out, base, _ = traced(lambda: answer(loop, own, {"batch": batch},
                                             timeout=EMBED_SLOW_S))
        link = out["output_link"]
        held = storage.peaks[-1] - base          # the peak until the answer's upload began
        item_bytes = link["bytes"] // items
        # Python objects take up to twice their JSON; the items in flight (the gate) and the
        # one being kept come on top of what BATCH_ANSWER_MEMORY_BYTES holds.
        budget = 2 * memory + 2 * (gate + 1) * item_bytes + 512 * 1024
        assert link["bytes"] > 2 * budget, "too small an answer to tell a bound from none"
        assert held < budget, f"held {held:,} bytes for a {link['bytes']:,}-byte answer"
        assert out["count"] == items and out["failed"] == 0
        lines = Path(urlsplit(link["url"]).path).read_bytes().splitlines()
        assert len(lines) == items
        for index in (0, items - 1):            # in item order, whatever order they finished
            alone = answer(loop, own, batch[index], timeout=EMBED_SLOW_S)["embeddings"]
            spooled = json.loads(lines[index])["embeddings"]
            assert len(spooled) == len(alone) == 8
            for a, b in zip(spooled, alone, strict=True):
                assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.9999

    def test_a_batch_answer_past_its_cap_fails_naming_the_setting(self, loop, embed_worker,
                                                                  tmp_path) -> None:
        """Pins the hard cap: a batch's answer grew without limit, on disk or in memory."""
        own = configured(embed_worker, WORKER_MAX_TEXTS="64", BATCH_ANSWER_MEMORY_BYTES="0",
                         BATCH_MAX_ANSWER_BYTES="100000", BATCH_SPOOL_DIR=str(tmp_path))
        out = answer(loop, own, {"batch": [embed_texts(i) for i in range(16)]},
                     timeout=EMBED_SLOW_S)
        assert out.get("error_code") == "payload_too_large", out
        assert "100,000 bytes" in out["error"] and "BATCH_MAX_ANSWER_BYTES" in out["error"]
        assert spool_files(tmp_path) == []

    def test_a_batch_url_is_read_one_line_at_a_time(self, loop, embed_worker,
                                                    http_server) -> None:
        """Pins lazy reading: the whole file was parsed before any item ran, at about 26 times
        its size in memory."""
        # Lines of many small values (dearest to parse); not objects, so each item fails at
        # once and no model time is spent.
        line = json.dumps([f"w{k}" for k in range(2000)]).encode()
        body = b"\n".join([line] * 1000) + b"\n"
        http_server.files["wide"] = body
        own = configured(embed_worker, DOWNLOAD_ALLOW_PRIVATE="true", WORKER_MAX_TEXTS="64")
        url = http_server.url("/jsonl/wide")
        out, base, peak = traced(lambda: answer(loop, own, {"batch_url": url},
                                                timeout=EMBED_SLOW_S))
        assert out["failed"] == 1000, out.get("error")
        assert out["results"][999]["error"] == "input.batch.999: must be a JSON object"
        assert peak - base < len(body) / 4, f"{peak - base:,} bytes for a {len(body):,}-byte file"

    def test_a_lone_surrogate_in_a_batch_url_is_refused_as_it_is_inline(
            self, loop, embed_worker, http_server) -> None:
        """Pins the shared Unicode check: such an item reached the tokenizer and was answered
        'internal', where the same text inline is an input error."""
        http_server.files["surrogate"] = b'{"text": "fine"}\n{"text": "\\ud800"}\n'
        own = configured(embed_worker, DOWNLOAD_ALLOW_PRIVATE="true")
        inline = answer(loop, own, {"batch": [{"text": "fine"}, {"text": "\ud800"}]})
        by_url = answer(loop, own, {"batch_url": http_server.url("/jsonl/surrogate")})
        assert inline.get("error_code") == by_url.get("error_code") == "invalid_input", by_url
        assert by_url["error"].startswith("input.batch_url: line 2 holds text that is not "
                                          "valid Unicode")

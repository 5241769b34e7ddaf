"""A small HTTP server on loopback for download tests: routes that misbehave on purpose.

``http_server`` (one per session) serves:

- ``/data/<n>``: n bytes of a fixed pattern, with Content-Length
- ``/stream/<n>``: n bytes, chunked (no Content-Length: the cap must hold while reading)
- ``/lie/<n>``: declares 10 bytes, sends n (a lying Content-Length)
- ``/slow``: headers at once, then one byte every 0.2 s for 10 s
- ``/redirect?to=<url>``: 302 to ``url``; ``/loop``: redirects to itself
- ``/jsonl/<name>``: a body set by the test through ``server.files[name]``
- ``/status/<code>``: an empty answer with that status

``server.hosts`` records the Host header of each request.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

PATTERN = bytes(range(256))


def pattern(n: int) -> bytes:
    return (PATTERN * (n // 256 + 1))[:n]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", length: int | None = None,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may hang up first (size cap tests)
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self.server.hosts.append(self.headers.get("Host", ""))
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        try:
            if parts[0] == "data":
                self._send(200, pattern(int(parts[1])))
            elif parts[0] == "lie":
                self._send(200, pattern(int(parts[1])), length=10)
                self.close_connection = True
            elif parts[0] == "stream":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                left = int(parts[1])
                while left > 0:
                    piece = pattern(min(left, 65536))
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    left -= len(piece)
                self.wfile.write(b"0\r\n\r\n")
            elif parts[0] == "slow":
                self.send_response(200)
                self.send_header("Content-Length", "50")
                self.end_headers()
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif parts[0] == "redirect":
                self._send(302, headers={"Location": parse_qs(url.query)["to"][0]})
            elif parts[0] == "loop":
                self._send(302, headers={"Location": "/loop"})
            elif parts[0] == "jsonl":
                self._send(200, self.server.files[parts[1]])
            elif parts[0] == "status":
                self._send(int(parts[1]))
            else:
                self._send(404)
        except (OSError, KeyError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hosts: list[str]
    files: dict[str, bytes]

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="session")
def http_server() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.hosts = []
    server.files = {}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()

"""A Hugging Face Hub on loopback that speaks the routes huggingface_hub's download uses.

Routes (as huggingface_hub 2.4 calls them; a test failing here after an upgrade means the
client now uses another route):
    GET       /api/models/{org}/{name}/revision/{rev}     model_info: sha and siblings
    GET       /api/models/{org}/{name}/tree/{rev}         list_repo_tree (one page)
    HEAD, GET /{org}/{name}/resolve/{rev}/{path}          file metadata, then the bytes
Errors carry the ``X-Error-Code`` header the real Hub sends (RepoNotFound, GatedRepo,
RevisionNotFound), which is what huggingface_hub turns into its typed errors.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest


@dataclass
class FakeHub:
    """Repos (id -> {path: bytes}), gated repo ids, and a log of (method, path, auth header)."""

    url: str = ""
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            self._send(status, json.dumps({"error": code}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": code})

        def _route(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            api = path.startswith("/api/models/")
            parts = path.removeprefix("/api/models/" if api else "/").split("/")
            if len(parts) < 4:
                return self._error(404, "EntryNotFound")
            repo, verb, rev, rest = "/".join(parts[:2]), parts[2], parts[3], "/".join(parts[4:])
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound")
            if repo in hub.gated:
                return self._error(403, "GatedRepo")
            commit = hub.commit(repo)
            if rev not in ("main", commit):
                return self._error(404, "RevisionNotFound")
            files = hub.repos[repo]
            if api and verb == "revision":
                info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(files)]}
                return self._send(200, json.dumps(info).encode())
            if api and verb == "tree":
                tree = [{"type": "file", "path": name, "size": len(data),
                         "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()]
                return self._send(200, json.dumps(tree).encode())
            if not api and verb == "resolve" and rest in files:
                data = files[rest]
                return self._send(200, data, {"X-Repo-Commit": commit,
                                              "ETag": f'"{hashlib.sha256(data).hexdigest()}"'},
                                  content_type="application/octet-stream")
            return self._error(404, "EntryNotFound")

        do_GET = do_HEAD = _route

    return Handler


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    """A FakeHub serving on 127.0.0.1; point HF_ENDPOINT at ``hub.url``."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()

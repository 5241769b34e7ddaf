"""A TCP proxy on loopback in front of a real server, which misbehaves on request.

Network faults at the edge we cannot otherwise cause on one machine: a connection dropped in
the middle of an upload, a server that answers too slowly. Everything else is the real server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class FaultyProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``.

    ``drop_after_bytes``: close a connection once that many bytes went upstream on it (an upload
    cut mid-way); ``drop_connections``: how many connections to cut that way (None: all).
    ``delay_s``: wait this long before forwarding each chunk of an answer (a slow server).
    """

    target_port: int
    drop_after_bytes: int | None = None
    drop_connections: int | None = None
    delay_s: float = 0.0
    dropped: int = 0
    _listener: socket.socket = field(init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self) -> FaultyProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            cut = self.drop_after_bytes is not None and (
                self.drop_connections is None or self.dropped < self.drop_connections)
            if cut:
                self.dropped += 1
            threading.Thread(target=self._pump, args=(client, upstream, cut, 0.0),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, self.delay_s),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut: bool, delay_s: float) -> None:
        sent = 0
        try:
            while not self._stopping.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if delay_s:
                    time.sleep(delay_s)
                dst.sendall(data)
                sent += len(data)
                if cut and self.drop_after_bytes is not None and sent >= self.drop_after_bytes:
                    break
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

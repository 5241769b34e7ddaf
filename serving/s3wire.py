"""The connections the S3 client opens: the address rule, a time limit, a reply budget.

This module owns what happens below botocore, on each connection of one storage operation
(``s3.py`` makes one client per operation and guards it here):

- The address rule (netguard.py) is applied where the connection is made: the host is resolved
  once, every address checked, and the socket connected to a checked address, before anything
  is sent. ``allow_any_address`` for the worker's own bucket, the rule for a job's ``s3Config``.
- ``Limit`` is one operation's time limit, its own and its job's (``within``): either
  watchdog shuts the operation's sockets, so a server answering one byte at a time cannot hold
  it, and a job that ends frees its upload thread at once.
- Every reply is read under ``REPLY_BUDGET_BYTES`` (1 MiB: status line, headers, body, a
  100-continue; ``MAX_LINE`` a line) except a successful GET's body, which ``S3Storage.read_to``
  bounds itself. Past it the connection is closed with ``ReplyTooLarge``.

botocore has no public hook at the connection level, so ``guard_connections`` replaces its
session's pool classes and refuses to go on if a botocore release moves them. urllib3 and
botocore are imported with the first guarded client; never imports torch or runpod.
"""

from __future__ import annotations

import io
import socket
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from serving import patches
from serving.errors import StorageError
from serving.netguard import AddressPolicy, Deadline, resolve

# Most bytes one storage reply may bring outside a GetObject body: status line, headers, body
# (an error, an XML answer, a 100-continue). S3's own replies are a few KB; past this the
# connection is closed, so a server cannot make the worker hold what it sends.
REPLY_BUDGET_BYTES = 1024 * 1024
MAX_LINE = 65536                             # most bytes of one line of a reply, as http.client


class Limit:
    """The time limit of one operation: its own deadline and, when it serves a job, the job's
    (``within``), whichever ends first. Either watchdog shuts the operation's connections."""

    def __init__(self, own: Deadline, within: Deadline | None = None) -> None:
        self.own = own
        self.within = within
        self.seconds = own.seconds

    def passed(self) -> bool:
        return self.own.passed() or self.job_ended()

    def job_ended(self) -> bool:
        """The job this operation serves timed out or was cancelled."""
        return self.within is not None and self.within.passed()

    def remaining(self) -> float:
        left = self.own.remaining()
        return left if self.within is None else min(left, self.within.remaining())

    def watch(self, sock: socket.socket) -> None:
        self.own.watch(sock)
        if self.within is not None:
            self.within.watch(sock)

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less: a pause ends when the job does."""
        if self.within is not None:
            self.within.wait(seconds)
        else:
            time.sleep(seconds)


@dataclass(frozen=True)
class _Guard:
    allow_address: AddressPolicy
    deadline: Limit


class ReplyTooLarge(Exception):
    """A reply ran past REPLY_BUDGET_BYTES. Deliberately not an OSError: urllib3 and botocore
    would call that a network failure and retry it; this one closes the connection and reaches
    the caller as itself."""


class _ReplyMeter:
    """The bytes one connection has received of the reply to its current request."""

    def __init__(self) -> None:
        self.method = ""
        self.received = 0
        self.unmetered = False

    def start(self, method: str) -> None:
        """A new request on the connection: its reply gets the whole budget."""
        self.method, self.received, self.unmetered = method.upper(), 0, False

    def count(self, size: int) -> None:
        if self.unmetered:
            return
        self.received += size
        if self.received > REPLY_BUDGET_BYTES:
            raise ReplyTooLarge(f"a storage reply ran past {REPLY_BUDGET_BYTES:,} bytes")


class _MeteredReader(io.RawIOBase):
    """A socket's raw reader that counts every byte it returns against a reply meter."""

    def __init__(self, raw: io.RawIOBase, meter: _ReplyMeter) -> None:
        super().__init__()
        self._raw = raw
        self._meter = meter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        size = self._raw.readinto(buffer)
        if size:
            self._meter.count(size)
        return size

    def readline(self, size: int | None = -1) -> bytes:
        # botocore reads its 100-continue answer unbuffered, a byte at a time, a line at a
        # time, with no limit: a line gets what http.client allows one, no more.
        if size is not None and size >= 0:
            return super().readline(size)
        line = super().readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ReplyTooLarge(f"a line of a storage reply ran past {MAX_LINE:,} bytes")
        return line

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()       # the socket's own reader: its descriptor reference goes
        super().close()


class _MeteredSocket:
    """A connection's socket (plain or TLS) whose every read counts against the reply meter.

    http.client reads a reply (status line, headers, body) through ``makefile("rb")``, and
    botocore its 100-continue answer through ``makefile("rb", 0)``: both are metered here, on
    the real socket's own reader, so its descriptor stays open while a reader still needs it.
    Everything else is the socket's.
    """

    def __init__(self, sock: socket.socket, meter: _ReplyMeter) -> None:
        self._sock = sock
        self._meter = meter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def makefile(self, mode: str = "r", buffering: int | None = None,
                 **kwargs: Any) -> io.RawIOBase | io.BufferedReader:
        if mode != "rb" or kwargs:
            raise ValueError("a storage connection is only read as bytes")
        raw = _MeteredReader(self._sock.makefile("rb", 0), self._meter)
        if buffering == 0:
            return raw
        return io.BufferedReader(raw, buffering if buffering and buffering > 0
                                 else io.DEFAULT_BUFFER_SIZE)

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = self._sock.recv(size, flags)
        self._meter.count(len(data))
        return data

    def recv_into(self, buffer: Any, size: int = 0, flags: int = 0) -> int:
        received = self._sock.recv_into(buffer, size, flags)
        self._meter.count(received)
        return received


class _GuardedConnection:
    """Mixin for botocore's urllib3 connections: resolve the host once, refuse it unless every
    address passes ``guard.allow_address``, connect to a checked address (no second lookup),
    put the socket under ``guard.deadline``'s watchdog, and read each reply under
    REPLY_BUDGET_BYTES.

    The budget covers everything a reply brings except the body of a successful GET, which in
    the S3 client (s3.py) is always GetObject's, read by ``read_to`` under DOWNLOAD_MAX_BYTES.
    """

    guard: ClassVar[_Guard]
    _dns_host: str
    host: str
    port: int
    timeout: Any
    sock: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reply = _ReplyMeter()

    def connect(self) -> None:
        super().connect()             # type: ignore[misc]
        self.sock = _MeteredSocket(self.sock, self._reply)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        self._reply.start(method)
        super().request(method, url, *args, **kwargs)     # type: ignore[misc]

    def getresponse(self) -> Any:
        response = super().getresponse()                   # type: ignore[misc]
        if self._reply.method == "GET" and 200 <= response.status < 300:
            self._reply.unmetered = True    # GetObject's body: read_to bounds it
        return response

    def _new_conn(self) -> socket.socket:
        from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

        guard = self.guard
        if guard.deadline.passed():
            raise ConnectTimeoutError(self, "the operation's time limit is up")
        name = self._dns_host
        try:
            addresses = resolve(name, self.port, guard.allow_address)   # AddressRefused passes
        except socket.gaierror as err:
            raise NameResolutionError(self.host, self, err) from None  # type: ignore[arg-type]
        timeout = self.timeout
        if isinstance(timeout, int | float):
            self.timeout = max(0.001, min(timeout, guard.deadline.remaining()))
        sock: socket.socket | None = None
        last: Exception | None = None
        try:
            for address in addresses:
                self._dns_host = address          # urllib3 connects to exactly this address
                try:
                    sock = super()._new_conn()    # type: ignore[misc]
                    break
                except NewConnectionError as err:
                    last = err
        finally:
            self._dns_host, self.timeout = name, timeout
        if sock is None:
            raise last or NewConnectionError(self, "no address to connect to")  # type: ignore[arg-type]
        guard.deadline.watch(sock)
        return sock


def guard_connections(client: Any, allow_address: AddressPolicy, deadline: Limit) -> None:
    """Make every connection ``client`` opens a guarded one (see _GuardedConnection).

    botocore has no public hook at the connection level; ``serving/patches.py`` replaces its
    session's pool classes before the first request. If a botocore release moves them, this
    refuses to go on rather than connect unguarded.
    """
    if not patches.guard_botocore_pools(client, _GuardedConnection,
                                        {"guard": _Guard(allow_address, deadline)}):
        raise StorageError("this botocore version does not expose its connection pools; "
                           "storage is refused rather than used without its address and time "
                           "rules")

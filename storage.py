"""Where bytes go: an S3-compatible bucket, or a local directory for local runs.

This module owns uploads, object keys and download links. It never imports torch or runpod, and
it never decides *whether* an answer is stored (delivery.py does). boto3 and botocore are
imported with the first ``S3Storage`` (a bucket configured, or a job's ``s3Config``): a worker
without storage never loads them.

For forkers, one call stores any file and gives back the link object clients receive::

    from storage import store_output
    link = store_output(storage, job["id"], png_bytes, "image/png", filename="cat.png")
    # {"url": "https://...", "key": "outputs/<job id>/cat.png", "bytes": 51234,
    #  "sha256": "9f86...", "content_type": "image/png", "expires_at": "2026-11-29T15:04:05Z"}

``data`` may be ``bytes`` or a ``pathlib.Path`` (large files stream from disk). Get ``storage``
from ``storage_for_job(job, settings)``: the job's own ``s3Config`` wins over the worker's
``BUCKET_*`` settings. Calls block (network, disk): from async code run them in a thread.

Guarantees:

- Keys are ``<BUCKET_PREFIX>/<job id>/<filename>``: a retried job overwrites, never duplicates.
  Give each file of one job its own filename (``image-0.png``, ``image-1.png``).
- A link is only made after the object is checked: its size (HEAD) and the sha256 computed here
  and stored as object metadata ``sha256``. A failed check is retried like a network error.
- Transient failures (connection, timeout, 5xx, 429, a failed check) are retried with
  exponential backoff (``BUCKET_RETRY_ATTEMPTS``, ``BUCKET_RETRY_DELAY_SECONDS``); then, or at
  once for a permanent failure (credentials, missing bucket), ``StorageError`` says why.
- No secret appears in an error, a log line or a ``repr``: messages are composed here from the
  error code and the endpoint's scheme://host:port, never from botocore's text (which may hold
  signed URLs). Nor does anything the server sent: an error code outside the known S3 codes is
  shown as its HTTP status only. Reading a missing object and one the credentials may not read
  give the same error.
- Every operation (an upload with its retries and check, a link, a read) runs on connections
  of its own, under a total time limit (``BUCKET_UPLOAD_TIMEOUT_SECONDS``, or the caller's
  deadline for reads) that a watchdog enforces by shutting those connections: a server that
  answers one byte at a time cannot hold it longer, whatever the per-request timeout. An
  upload given its job's end (``within``) also stops there: when the job times out or is
  cancelled its connections are shut and its thread is free at once.
- Every reply is read under ``REPLY_BUDGET_BYTES`` (1 MiB: status line, headers, body, a
  100-continue; 64 KiB a line) except a GetObject body, which ``read_to`` bounds by its
  ``max_bytes``. Past it the connection is closed and the operation fails with StorageError,
  not retried: a server cannot make the worker hold an unbounded answer in memory. The
  worker's own bucket obeys the same budget (S3's own replies are a few KB).
- A job's own ``s3Config`` endpoint obeys the address rule of downloads (netguard.py): it must
  be public unless ``DOWNLOAD_ALLOW_PRIVATE=true``. The check is made where the connection is
  made: the name is resolved, every address checked, and the socket connected to a checked
  address, before anything is sent. A malformed endpoint is an InputError naming
  ``s3Config.endpointUrl``. The worker's own ``BUCKET_*`` endpoint is the operator's and exempt.
- ``LocalStorage`` links are ``file://`` URLs, valid only on the machine that ran the job, and
  carry ``expires_at: null``. Use it for local runs, never in production.

Provider notes: botocore >= 1.36 adds checksums by default that R2 and GCS reject; both
``request_checksum_calculation`` and ``response_checksum_validation`` are "when_required" here.
The region is explicit (``BUCKET_REGION``; ``auto`` for R2), never guessed from the URL, and
path-style addressing is the default because every S3-compatible server accepts it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import mimetypes
import os
import random
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, NoReturn, Protocol, TypedDict, TypeVar
from urllib.parse import urlsplit

from serving.config import StorageSettings
from serving.errors import InputError, StorageError
from serving.netguard import (
    AddressPolicy,
    AddressRefused,
    Deadline,
    address_policy,
    allow_any_address,
    ascii_host,
    parse_ip,
    resolve,
)

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024                     # read size for hashing and copying files
# Most bytes one storage reply may bring outside a GetObject body: status line, headers, body
# (an error, an XML answer, a 100-continue). S3's own replies are a few KB; past this the
# connection is closed, so a server cannot make the worker hold what it sends.
REPLY_BUDGET_BYTES = 1024 * 1024
_MAX_LINE = 65536                            # most bytes of one line of a reply, as http.client
_MAX_BACKOFF_S = 30.0                        # cap on one retry delay
_SHA256_META = "sha256"                      # x-amz-meta-sha256
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Error codes that no retry can fix: wrong credentials, missing bucket, no permission.
_PERMANENT_CODES = {
    "AccessDenied": "the storage refused access: check the credentials and bucket permissions",
    "InvalidAccessKeyId": "the storage does not know this access key id: check the credentials",
    "SignatureDoesNotMatch": "the storage refused the signature: check the secret access key "
                             "(and BUCKET_REGION)",
    "AuthorizationHeaderMalformed": "the storage refused the request signature: check "
                                    "BUCKET_REGION (auto for Cloudflare R2)",
    "NoSuchBucket": "the bucket does not exist at this endpoint",
    "InvalidBucketName": "the bucket name is not valid for this storage",
    "PermanentRedirect": "the bucket is in another region or needs another endpoint",
}
# Transient codes worth naming; any other code a server sends is shown as its HTTP status only
# (a code is the server's text, and a job's server may be anyone's).
_KNOWN_TRANSIENT_CODES = frozenset(("SlowDown", "RequestTimeout", "InternalError",
                                    "ServiceUnavailable", "RequestTimeTooSkewed"))
# Reading: "no such object" and "not yours to read" must look alike to the caller.
_UNREADABLE_CODES = frozenset(("NoSuchKey", "NotFound", "AccessDenied", "AllAccessDisabled"))
_UNREADABLE = "cannot be read: there is no such object, or no permission to read it"
_PRIVATE_ENDPOINT = ("the host is not, or does not resolve to, a public address; a job's "
                     "storage must be at a public address unless the worker sets "
                     "DOWNLOAD_ALLOW_PRIVATE=true")
_ENDPOINT_FIELD = "s3Config.endpointUrl"


class Link(TypedDict):
    """The link object clients receive for a stored file or answer."""

    url: str                 # presigned GET (s3) or file:// (local)
    key: str                 # object key inside the bucket / path under the local directory
    bytes: int               # object size
    sha256: str              # hex digest of the object's bytes
    content_type: str
    expires_at: str | None   # ISO 8601 UTC ("...Z"); None for file:// links


@dataclass(frozen=True)
class StoredObject:
    """A verified object and a link to it."""

    url: str
    key: str
    size: int
    sha256: str
    content_type: str
    expires_at: dt.datetime | None

    def to_link(self) -> Link:
        """The JSON-ready link object (see ``Link``)."""
        expires = None
        if self.expires_at is not None:
            expires = self.expires_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"url": self.url, "key": self.key, "bytes": self.size, "sha256": self.sha256,
                "content_type": self.content_type, "expires_at": expires}


class Storage(Protocol):
    """Somewhere to put bytes and link to them. Every method blocks."""

    kind: str                                # "s3" | "local"

    def key_for(self, job_id: str, filename: str) -> str:
        """The object key of ``filename`` for job ``job_id``: same inputs, same key."""
        ...

    def put(self, key: str, data: bytes | Path, content_type: str,
            within: Deadline | None = None) -> StoredObject:
        """Store ``data`` under ``key`` (overwriting), verify it, and return a link.

        ``within`` is the end of the job the file belongs to: the upload stops when it
        expires (the job timed out or was cancelled), whatever its own time limit.
        """
        ...

    def link(self, key: str) -> StoredObject:
        """A fresh link to an existing, verified object; StorageError if it is missing."""
        ...


def store_output(storage: Storage, job_id: str, data: bytes | Path, content_type: str,
                 filename: str | None = None, within: Deadline | None = None) -> Link:
    """Store one file of a job's output and return the link object for the answer.

    ``filename`` keeps the original name (sanitised to letters, digits, ``.``, ``-``, ``_``);
    without it the name is ``output`` plus an extension guessed from ``content_type``.
    ``within``: the job's end, which stops the upload (see ``Storage.put``).
    """
    if filename is None:
        filename = "output" + (mimetypes.guess_extension(content_type) or ".bin")
    key = storage.key_for(job_id, filename)
    return storage.put(key, data, content_type, within=within).to_link()


def safe_filename(name: str) -> str:
    """The last path component of ``name`` with unsafe characters replaced; never empty."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _SAFE_CHARS.sub("_", base).strip("._") or "output"
    if len(base) > 120:  # keep the extension, cut the stem
        stem, dot, ext = base.rpartition(".")
        base = (stem[: 120 - len(ext) - 1] + dot + ext) if dot and len(ext) <= 16 else base[:120]
    return base


def object_key(prefix: str, job_id: str, filename: str) -> str:
    """``<prefix>/<job id>/<filename>``, each part made safe for keys and paths."""
    job = _SAFE_CHARS.sub("_", job_id).strip("._")
    if not job:
        raise StorageError("the job has no usable id to name its outputs")
    parts = [p for p in (prefix.strip("/"), job[:200], safe_filename(filename)) if p]
    return "/".join(parts)


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageError(f"invalid object key {key!r}")
    return key


def _digest(data: bytes | Path) -> tuple[int, str]:
    """Size and sha256 of ``data``; a file is read once, in chunks."""
    if isinstance(data, bytes | bytearray | memoryview):
        return len(data), hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    size = 0
    with open(data, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _expiry(seconds: int) -> dt.datetime:
    # Taken before signing, so the stated expiry is never later than the link's own.
    return dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=seconds)


def endpoint_label(url: str) -> str:
    """scheme://host[:port] of an endpoint: what messages may show of it."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class _Transient(Exception):
    """An attempt failed in a way the next attempt may not (network, 5xx, failed check)."""


T = TypeVar("T")


class _Limit:
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


def _with_retries(what: str, attempts: int, delay_s: float, fn: Callable[[], T],
                  deadline: _Limit) -> T:
    """Run ``fn``; retry on _Transient with jittered exponential backoff; then StorageError.

    Nothing runs past ``deadline``: neither an attempt (its connections are shut) nor a pause.
    """
    for attempt in range(1, attempts + 1):
        try:
            if deadline.passed():
                raise _Transient("out of time")
            return fn()
        except _Transient as err:
            if deadline.job_ended():
                raise StorageError(f"{what} stopped: the job ended (WORKER_JOB_TIMEOUT_S, or "
                                   "a cancel)") from None
            if deadline.passed():
                raise StorageError(f"{what} did not finish within {deadline.seconds:g} s "
                                   "(BUCKET_UPLOAD_TIMEOUT_SECONDS)") from None
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempt"
                                   f"{'s' if attempts > 1 else ''}: {err}") from None
            pause = min(_MAX_BACKOFF_S, delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            pause = min(pause, deadline.remaining())
            log.warning("%s failed (%s); retry %d/%d in %.2f s",
                        what, err, attempt, attempts - 1, pause)
            deadline.pause(pause)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Connections: botocore's, with the address rule, the operation's deadline and a reply budget
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Guard:
    allow_address: AddressPolicy
    deadline: _Limit


class _ReplyTooLarge(Exception):
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
            raise _ReplyTooLarge(f"a storage reply ran past {REPLY_BUDGET_BYTES:,} bytes")


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
        line = super().readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _ReplyTooLarge(f"a line of a storage reply ran past {_MAX_LINE:,} bytes")
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
    this module is always GetObject's, read by ``read_to`` under DOWNLOAD_MAX_BYTES.
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


def _guard_connections(client: Any, allow_address: AddressPolicy, deadline: _Limit) -> None:
    """Make every connection ``client`` opens a guarded one (see _GuardedConnection).

    botocore has no public hook at the connection level, so its session's pool classes are
    replaced before the first request. If a botocore release moves them, this refuses to go on
    rather than connect unguarded.
    """
    from botocore.awsrequest import (
        AWSHTTPConnection,
        AWSHTTPConnectionPool,
        AWSHTTPSConnection,
        AWSHTTPSConnectionPool,
    )
    from botocore.httpsession import URLLib3Session
    from urllib3 import PoolManager

    http = getattr(getattr(client, "_endpoint", None), "http_session", None)
    manager = getattr(http, "_manager", None)
    if not isinstance(http, URLLib3Session) or not isinstance(manager, PoolManager) or \
            not hasattr(http, "_pool_classes_by_scheme"):
        raise StorageError("this botocore version does not expose its connection pools; "
                           "storage is refused rather than used without its address and time "
                           "rules")
    attrs = {"guard": _Guard(allow_address, deadline)}
    pools = {
        "http": type("GuardedHTTPConnectionPool", (AWSHTTPConnectionPool,), {
            "ConnectionCls": type("GuardedHTTPConnection",
                                  (_GuardedConnection, AWSHTTPConnection), attrs)}),
        "https": type("GuardedHTTPSConnectionPool", (AWSHTTPSConnectionPool,), {
            "ConnectionCls": type("GuardedHTTPSConnection",
                                  (_GuardedConnection, AWSHTTPSConnection), attrs)}),
    }
    http._pool_classes_by_scheme = pools
    manager.pool_classes_by_scheme = pools


def _find(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``err`` or the first exception of ``kind`` it wraps (causes, contexts, and botocore's
    ``error`` keyword), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        wrapped = getattr(current, "kwargs", None)
        todo += [current.__cause__, current.__context__,
                 wrapped.get("error") if isinstance(wrapped, dict) else None]
    return None


class S3Storage:
    """An S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, Backblaze B2, RunPod S3 API).

    ``allow_address`` is None for the worker's own bucket (the operator's endpoint: any address,
    environment proxies honoured) and the address rule for a job's own ``s3Config`` (no
    proxies: a proxy would resolve the name itself, past the rule).
    """

    kind = "s3"

    def __init__(self, *, endpoint_url: str, access_key_id: str, secret_access_key: str,
                 bucket: str, settings: StorageSettings,
                 allow_address: AddressPolicy | None = None) -> None:
        # boto3 loads here, with the first bucket, not with this module (see the docstring).
        import boto3
        import botocore.config
        from boto3.s3.transfer import TransferConfig

        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = settings.prefix
        self.link_expiry_s = settings.link_expiry_s
        self.retry_attempts = settings.retry_attempts
        self.retry_delay_s = settings.retry_delay_s
        self.transfer_timeout_s = settings.upload_timeout_s
        self._allow_address = allow_address
        self._endpoint = endpoint_label(endpoint_url)
        self._endpoint_field = "BUCKET_ENDPOINT_URL" if allow_address is None else _ENDPOINT_FIELD
        self._transfer = TransferConfig(
            multipart_threshold=settings.part_size_bytes,
            multipart_chunksize=settings.part_size_bytes,
            max_concurrency=settings.upload_concurrency,
            use_threads=True,
        )
        self._config = botocore.config.Config(
            region_name=settings.region,
            signature_version="s3v4",  # presigned links default to SigV2 on path-style otherwise
            s3={"addressing_style": settings.addressing_style},
            # R2/GCS reject botocore's default CRC checksums (SignatureDoesNotMatch).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Our own retry loop (configurable delays, clean messages) replaces botocore's.
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            max_pool_connections=max(10, settings.upload_concurrency + 2),
            proxies={} if allow_address is not None else None,
        )
        # A private session: no ~/.aws, AWS_* variables or profiles change what we sign with.
        self._session = boto3.session.Session(aws_access_key_id=access_key_id,
                                              aws_secret_access_key=secret_access_key,
                                              region_name=settings.region)
        self._session_lock = threading.Lock()   # boto3 sessions are not thread-safe
        self._new_client().close()   # a malformed endpoint fails here, not on first use

    def __repr__(self) -> str:
        return f"S3Storage(endpoint={self._endpoint!r}, bucket={self.bucket!r})"

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> S3Storage:
        """The worker's own bucket, from ``BUCKET_*``."""
        if settings.backend != "s3":
            raise StorageError("no S3 storage is configured: set BUCKET_ENDPOINT_URL, "
                               "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and BUCKET_NAME")
        assert settings.endpoint_url and settings.access_key_id and settings.bucket
        assert settings.secret_access_key
        return cls(endpoint_url=settings.endpoint_url, access_key_id=settings.access_key_id,
                   secret_access_key=settings.secret_access_key, bucket=settings.bucket,
                   settings=settings)

    def _new_client(self) -> Any:
        with self._session_lock:
            return self._session.client("s3", endpoint_url=self.endpoint_url,
                                        config=self._config)

    @contextmanager
    def _client(self, deadline: _Limit) -> Iterator[Any]:
        """A client for one operation: connections of its own, guarded, shut at ``deadline``.

        One client per operation (about 5 ms to make) is what lets the watchdog shut exactly
        that operation's connections, those of multipart worker threads included, and never a
        pooled connection another job is using.
        """
        client = self._new_client()
        try:
            _guard_connections(client, self._allow_address or allow_any_address, deadline)
            yield client
        finally:
            client.close()

    def key_for(self, job_id: str, filename: str) -> str:
        return object_key(self.prefix, job_id, filename)

    def put(self, key: str, data: bytes | Path, content_type: str,
            within: Deadline | None = None) -> StoredObject:
        _check_key(key)
        size, sha256 = _digest(data)
        extra = {"ContentType": content_type, "Metadata": {_SHA256_META: sha256}}

        with Deadline(self.transfer_timeout_s) as own:
            deadline = _Limit(own, within)

            def attempt() -> StoredObject:
                with self._client(deadline) as client:
                    try:
                        if isinstance(data, Path):
                            client.upload_file(str(data), self.bucket, key, ExtraArgs=extra,
                                               Config=self._transfer)
                        else:
                            client.upload_fileobj(io.BytesIO(data), self.bucket, key,
                                                  ExtraArgs=extra, Config=self._transfer)
                    except Exception as err:  # noqa: BLE001  (classified, never shown raw)
                        self._raise_classified(err, deadline)
                    return self._verified(client, deadline, key, size, sha256)

            return _with_retries(f"upload of {key!r} to bucket {self.bucket!r} at "
                                 f"{self._endpoint}", self.retry_attempts, self.retry_delay_s,
                                 attempt, deadline)

    def link(self, key: str) -> StoredObject:
        _check_key(key)
        with Deadline(self.transfer_timeout_s) as own:
            deadline = _Limit(own)

            def attempt() -> StoredObject:
                with self._client(deadline) as client:
                    return self._verified(client, deadline, key, None, None)

            return _with_retries(f"link to {key!r} in bucket {self.bucket!r} at "
                                 f"{self._endpoint}", self.retry_attempts, self.retry_delay_s,
                                 attempt, deadline)

    def read_to(self, key: str, out: BinaryIO, max_bytes: int,
                deadline: Deadline | None = None) -> int:
        """Copy object ``key`` into ``out``; StorageError if larger than ``max_bytes``.

        ``deadline`` bounds the whole read (default: ``BUCKET_UPLOAD_TIMEOUT_SECONDS`` from
        now). Returns the size. A missing object and a forbidden one give the same error.
        Used by downloads.py for ``s3://`` inputs, whose messages name DOWNLOAD_MAX_BYTES.
        """
        _check_key(key)
        own = Deadline(self.transfer_timeout_s) if deadline is None else None
        limit = _Limit(deadline or own)  # type: ignore[arg-type]
        try:
            with self._client(limit) as client:
                try:
                    obj = client.get_object(Bucket=self.bucket, Key=key)
                except Exception as err:  # noqa: BLE001
                    if _unreadable(err):
                        raise StorageError(_UNREADABLE) from None
                    try:
                        self._raise_classified(err, limit)
                    except _Transient as transient:
                        raise StorageError(f"reading failed: {transient}") from None
                return self._copy_body(obj, out, max_bytes, limit)
        finally:
            if own is not None:
                own.close()

    def _copy_body(self, obj: Mapping[str, Any], out: BinaryIO, max_bytes: int,
                   deadline: _Limit) -> int:
        from botocore.exceptions import BotoCoreError

        body = obj["Body"]
        too_large = StorageError(f"the object is over the download limit of {max_bytes:,} "
                                 "bytes (DOWNLOAD_MAX_BYTES)")
        try:
            if obj.get("ContentLength", 0) > max_bytes:
                raise too_large
            total = 0
            for chunk in body.iter_chunks(1024 * 1024):
                total += len(chunk)
                if total > max_bytes:
                    raise too_large
                out.write(chunk)
        except (BotoCoreError, OSError):
            if deadline.passed():
                raise StorageError("reading the object ran out of time") from None
            raise StorageError("reading the object was interrupted") from None
        finally:
            body.close()
        if deadline.passed():    # the watchdog may have ended the body early: not a success
            raise StorageError("reading the object ran out of time")
        return total

    def _verified(self, client: Any, deadline: _Limit, key: str, size: int | None,
                  sha256: str | None) -> StoredObject:
        """HEAD the object, compare size and sha256 metadata, and presign a GET."""
        try:
            head = client.head_object(Bucket=self.bucket, Key=key)
        except Exception as err:  # noqa: BLE001
            if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
                if size is None:
                    raise StorageError(f"no object {key!r} in bucket {self.bucket!r}") from None
                raise _Transient("the object was not found after upload") from None
            self._raise_classified(err, deadline)
        stored_size = int(head.get("ContentLength", -1))
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        stored_sha = meta.get(_SHA256_META, "")
        if size is not None and stored_size != size:
            raise _Transient(f"stored size {stored_size} differs from uploaded size {size}")
        if sha256 is not None and stored_sha != sha256:
            raise _Transient("stored sha256 metadata differs from the uploaded bytes")
        if size is None and not stored_sha:
            raise StorageError(f"object {key!r} has no sha256 metadata; it was not written "
                               "by this worker")
        expires = _expiry(self.link_expiry_s)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.link_expiry_s)
        return StoredObject(url=url, key=key, size=stored_size, sha256=stored_sha,
                            content_type=head.get("ContentType") or "application/octet-stream",
                            expires_at=expires)

    def _raise_classified(self, err: BaseException, deadline: _Limit) -> NoReturn:
        """Re-raise a boto error as _Transient (retry), StorageError (permanent), or
        InputError (a job's endpoint the address rule refuses), sanitised."""
        import botocore.exceptions

        if _find(err, AddressRefused) is not None:
            raise InputError(_PRIVATE_ENDPOINT, field=_ENDPOINT_FIELD) from None
        if _find(err, _ReplyTooLarge) is not None:
            # Not retried: a server that sent this much once will again.
            raise StorageError(f"the storage at {self._endpoint} sent a reply larger than S3 "
                               f"sends (over {REPLY_BUDGET_BYTES:,} bytes, or a line over "
                               f"{_MAX_LINE:,}), so the connection was closed; check "
                               f"{self._endpoint_field}") from None
        if deadline.passed():
            # Whatever broke, it broke because the watchdog shut the connection.
            raise _Transient("out of time") from None
        # boto3's upload_file wraps ClientError in S3UploadFailedError (implicit context).
        inner = _find(err, botocore.exceptions.ClientError)
        if isinstance(inner, botocore.exceptions.ClientError):
            code = _error_code(inner)
            status = inner.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _PERMANENT_CODES:
                raise StorageError(f"{_PERMANENT_CODES[code]} ({code} from {self._endpoint}, "
                                   f"bucket {self.bucket!r})") from None
            shown = code if code in _KNOWN_TRANSIENT_CODES else f"HTTP {status}"
            if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout"):
                raise _Transient(f"the storage answered {shown}") from None
            raise StorageError(f"the storage at {self._endpoint} answered {shown} "
                               f"for bucket {self.bucket!r}") from None
        if isinstance(err, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.
                      ReadTimeoutError):
            raise _Transient(f"no answer from {self._endpoint} in time") from None
        if isinstance(err, botocore.exceptions.EndpointConnectionError | botocore.exceptions.
                      ConnectionClosedError | botocore.exceptions.HTTPClientError):
            raise _Transient(f"could not connect to {self._endpoint}") from None
        if isinstance(err, botocore.exceptions.NoCredentialsError):
            raise StorageError("no credentials for the storage") from None
        if isinstance(err, OSError):
            raise _Transient(f"{type(err).__name__} talking to {self._endpoint}") from None
        log.error("unexpected storage failure at %s: %s", self._endpoint, type(err).__name__)
        raise StorageError(f"unexpected storage failure ({type(err).__name__}) at "
                           f"{self._endpoint}") from None


def _unreadable(err: BaseException) -> bool:
    """A read refused as missing or forbidden (told apart by neither code nor status)."""
    import botocore.exceptions

    if not isinstance(err, botocore.exceptions.ClientError):
        return False
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return _error_code(err) in _UNREADABLE_CODES or status in (403, 404)


def _error_code(err: BaseException) -> str:
    import botocore.exceptions

    if isinstance(err, botocore.exceptions.ClientError):
        return str(err.response.get("Error", {}).get("Code", ""))
    return ""


class LocalStorage:
    """A directory on this machine; links are ``file://`` URLs valid only here (local runs)."""

    kind = "local"

    def __init__(self, root: Path, prefix: str = "") -> None:
        self.root = root.resolve()
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r})"

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> LocalStorage:
        if settings.local_dir is None:
            raise StorageError("no local output directory is configured: set OUTPUT_LOCAL_DIR")
        return cls(settings.local_dir, settings.prefix)

    def key_for(self, job_id: str, filename: str) -> str:
        return object_key(self.prefix, job_id, filename)

    def put(self, key: str, data: bytes | Path, content_type: str,
            within: Deadline | None = None) -> StoredObject:
        target = self.root / _check_key(key)
        if within is not None and within.passed():
            raise StorageError(f"writing {key!r} stopped: the job ended (WORKER_JOB_TIMEOUT_S, "
                               "or a cancel)")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            size = 0
            # Write beside the target and rename: a reader never sees a partial file.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as out:
                    if isinstance(data, Path):
                        with open(data, "rb") as src:
                            while chunk := src.read(_CHUNK):
                                h.update(chunk)
                                size += len(chunk)
                                out.write(chunk)
                    else:
                        h.update(data)
                        size = len(data)
                        out.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            (target.parent / f".{target.name}.meta").write_text(f"{content_type}\n{h.hexdigest()}")
        except OSError as err:
            raise StorageError(f"writing {key!r} under OUTPUT_LOCAL_DIR failed: "
                               f"{err.strerror or type(err).__name__}") from None
        if target.stat().st_size != size:
            raise StorageError(f"stored size of {key!r} differs from the bytes written")
        return StoredObject(url=target.as_uri(), key=key, size=size, sha256=h.hexdigest(),
                            content_type=content_type, expires_at=None)

    def link(self, key: str) -> StoredObject:
        target = self.root / _check_key(key)
        meta = target.parent / f".{target.name}.meta"
        try:
            content_type, sha256 = meta.read_text().split("\n", 1)
            size, actual = _digest(target)
        except (OSError, ValueError):
            raise StorageError(f"no stored object {key!r}") from None
        if actual != sha256:
            raise StorageError(f"stored object {key!r} changed since it was written")
        return StoredObject(url=target.as_uri(), key=key, size=size, sha256=sha256,
                            content_type=content_type, expires_at=None)


def storage_from_settings(settings: StorageSettings) -> Storage | None:
    """The worker's default storage, or None when none is configured. Build once at startup."""
    if settings.backend == "s3":
        return S3Storage.from_settings(settings)
    if settings.backend == "local":
        return LocalStorage.from_settings(settings)
    return None


_S3CONFIG_FIELDS = ("accessId", "accessSecret", "bucketName", "endpointUrl")
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def storage_for_job(job: Mapping[str, Any], settings: StorageSettings,
                    default: Storage | None = None, *, allow_private: bool = False
                    ) -> Storage | None:
    """The storage for one job: its own ``s3Config`` if it sent one, else ``default``.

    ``default`` is the worker's storage built once at startup; when omitted it is built from
    ``settings`` (a new client per call). An ``s3Config`` that is not an object with the four
    string fields ``accessId``, ``accessSecret``, ``bucketName`` and ``endpointUrl`` is an
    InputError naming the field; values are never echoed. ``endpointUrl`` must be an http(s)
    URL with a valid host and port; its address must be public unless ``allow_private``
    (DOWNLOAD_ALLOW_PRIVATE): an IP address is checked here, a name where each connection is
    made. Region, prefix, link lifetime, part size, retries and time limits come from
    ``settings``.
    """
    cfg = job.get("s3Config")
    if cfg is None:
        return default if default is not None else storage_from_settings(settings)
    if not isinstance(cfg, Mapping):
        raise InputError("must be an object with accessId, accessSecret, bucketName and "
                         "endpointUrl", field="s3Config")
    for name in _S3CONFIG_FIELDS:
        value = cfg.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InputError("is missing or not a non-empty string", field=f"s3Config.{name}")
    for name in ("accessId", "accessSecret"):
        # Sent in a signed header: printable ASCII only (a newline would end the header).
        if not cfg[name].strip().isascii() or not cfg[name].strip().isprintable():
            raise InputError("must be printable ASCII", field=f"s3Config.{name}")
    bucket = cfg["bucketName"].strip()
    if not 3 <= len(bucket) <= 255 or not set(bucket) <= _BUCKET_CHARS:
        raise InputError("is not a bucket name; use 3..255 letters, digits, '.', '-' or '_'",
                         field="s3Config.bucketName")
    policy = address_policy(allow_private)
    endpoint = _job_endpoint(cfg["endpointUrl"], policy)
    try:
        return S3Storage(endpoint_url=endpoint, access_key_id=cfg["accessId"].strip(),
                         secret_access_key=cfg["accessSecret"].strip(), bucket=bucket,
                         settings=settings, allow_address=policy)
    except ValueError:   # botocore's own endpoint check, should ours ever let one through
        raise InputError("is not a valid endpoint URL", field=_ENDPOINT_FIELD) from None


def _job_endpoint(raw: str, policy: AddressPolicy) -> str:
    """A job's endpoint URL, checked: InputError naming s3Config.endpointUrl (never echoing
    it) for anything botocore or the address rule would not take."""
    endpoint = raw.strip().rstrip("/")
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise InputError("is not a valid URL; check the host and the port (1..65535)",
                         field=_ENDPOINT_FIELD) from None
    if parts.scheme not in ("http", "https") or not host:
        raise InputError("must be an http:// or https:// URL with a host",
                         field=_ENDPOINT_FIELD)
    if parts.username is not None or parts.password is not None or parts.query \
            or parts.fragment:
        raise InputError("must not carry credentials, a query or a fragment; send the keys in "
                         "accessId and accessSecret", field=_ENDPOINT_FIELD)
    if port == 0 or not endpoint.isascii() or not endpoint.isprintable() \
            or ascii_host(host) != host:
        raise InputError("has an invalid host or port; use an ASCII host name or IP address "
                         "and a port in 1..65535", field=_ENDPOINT_FIELD)
    ip = parse_ip(host)
    if ip is not None and not policy(ip):   # known now: refuse before the job does any work
        raise InputError(_PRIVATE_ENDPOINT, field=_ENDPOINT_FIELD)
    return endpoint

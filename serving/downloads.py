"""Safe downloads of inputs given by URL (e.g. a ``batch_url`` JSONL file), and a JSONL reader.

A job's URL is attacker-controlled: fetched naively it can reach cloud metadata
(169.254.169.254), the worker's own services, or exhaust memory, disk, time and threads. So:

- Schemes: ``http``, ``https``, and ``s3://<bucket>/<key>`` for the storage's own bucket only.
  Credentials in the URL are refused; a URL that does not parse, or whose host is not a valid
  host name or IP address, is refused before any lookup. Non-ASCII paths are percent-encoded.
- Addresses (netguard.py): the host is resolved once, every address must be public (IPv6 forms
  that embed a private IPv4 address count as private), and the connection is made to that
  validated address (pinned: no second lookup to rebind). TLS still checks the certificate
  against the host name. ``DOWNLOAD_ALLOW_PRIVATE=true`` lifts the address rule (local tests,
  same-VPC servers); every other rule still applies.
- ``s3://`` in the worker's own bucket (read with the worker's credentials, for any client) is
  limited to keys under ``BATCH_URL_S3_PREFIX`` and off when it is unset; in a job's own
  ``s3Config`` bucket (the job's credentials) any key may be read. A missing object and one
  the credentials may not read give the same answer.
- Redirects (at most 5) are followed by hand, each hop checked like the first.
- Size: ``DOWNLOAD_MAX_BYTES``, checked against Content-Length and while reading; a body that
  ends before its Content-Length is a failure, not a short success. Time:
  ``DOWNLOAD_TIMEOUT_SECONDS`` for the whole download, redirects included, enforced by a
  watchdog that shuts the connection at the deadline (a server dribbling its headers one byte
  at a time is cut off like any other). DNS lookups are bounded by the system resolver's own
  timeout.
- A job's downloads end with the job: ``download_to`` also stops at ``until`` (the job's
  deadline) and when its ``DownloadStop`` is stopped, which shuts the connection at once.
  ``run_download`` runs one in the worker's download pool and stops it when the awaiting job
  ends (its time limit, a cancel), so a server dribbling bytes holds a pool thread no longer
  than the job that asked for them.
- Environment proxies (HTTP_PROXY...) are not used: a proxy would resolve the name itself.
- JSON Lines: each line at most ``max_item_bytes`` (the worker passes WORKER_MAX_INPUT_BYTES),
  checked before the line is parsed; a line nested too deeply to parse, or holding an unpaired
  surrogate, is an input error naming the line, as the same item inline would be. Errors name
  the line but never echo the file's content or column positions. The worker reads a
  ``batch_url`` through ``batchfile.py``: spooled to disk, one line at a time.

Each refusal is a DownloadError whose message names the rule and the setting; messages show a
URL without its query (which may hold a signature). We do not reuse the SDK's ``rp_ssrf``: it
reads its switch from ``os.environ`` at call time rather than from our settings, and importing
runpod costs ~2 s and reconfigures logging. Its design (pin, re-check, cap) is the same.

Everything here blocks (network, disk): from async code run it in a thread of its own pool
(worker.py's download pool). Never imports torch.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from serving.config import DownloadSettings
from serving.errors import DownloadError, InputError, PayloadTooLarge, StorageError
from serving.netguard import (
    AddressPolicy,
    AddressRefused,
    Deadline,
    IPAddress,
    ascii_host,
    resolve,
)
from serving.netguard import address_policy as _policy_for
from serving.netguard import is_public_address as is_public_address  # re-exported: the one rule
from serving.s3 import S3Storage
from serving.validation import checked_json_size

if TYPE_CHECKING:
    from storage import Storage

T = TypeVar("T")
MAX_REDIRECTS = 5
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_CHUNK = 1024 * 1024
_REFUSED = ("the host is not, or does not resolve to, a public address (private or reserved "
            "addresses are refused unless DOWNLOAD_ALLOW_PRIVATE=true)")
_SHOWN_URL_CHARS = 200
# Characters a request target keeps as they are; everything else (spaces, non-ASCII, controls)
# is percent-encoded. "%" is kept so an already-encoded URL is not encoded twice.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"

__all__ = ["DownloadStop", "IPAddress", "address_policy", "display_url", "download_bytes",
           "download_to", "is_public_address", "load_jsonl_url", "read_jsonl", "run_download"]


def address_policy(settings: DownloadSettings) -> AddressPolicy:
    """Which resolved addresses may be connected to under ``settings``."""
    return _policy_for(settings.allow_private)


def display_url(url: str) -> str:
    """``url`` without query, fragment or credentials: what messages may show."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "the URL"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    shown = f"{parts.scheme}://{host}{port}{parts.path}"
    if len(shown) > _SHOWN_URL_CHARS:
        shown = shown[:_SHOWN_URL_CHARS] + "..."
    return shown


def _split(url: str, shown: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise DownloadError(f"{'the URL' if shown == 'the URL' else shown} does not parse; "
                            "check the host (an IPv6 address in brackets) and the port "
                            "(1..65535)") from None
    return parts


class _StoppableDeadline(Deadline):
    """A download's deadline that another thread can also bring forward to now."""

    def expire_now(self) -> None:
        self._expire()          # shuts every watched connection: blocked reads end at once


class DownloadStop:
    """Ends one download from another thread: ``stop()`` shuts its connection at once (and
    keeps one not yet made from starting), so the thread that runs it is free again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: _StoppableDeadline | None = None
        self.stopped = False

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            deadline = self._deadline
        if deadline is not None:
            deadline.expire_now()

    def _attach(self, deadline: _StoppableDeadline) -> None:
        with self._lock:
            self._deadline = deadline
            stopped = self.stopped
        if stopped:
            deadline.expire_now()


async def run_download(pool: Executor | None, fetch: Callable[[DownloadStop], T]) -> T:
    """``fetch(stop)`` in ``pool`` (the worker's download pool), ended with the job awaiting it.

    ``fetch`` passes ``stop`` to ``download_to`` or ``download_bytes``. When the awaiting task
    is cancelled (the job's time limit, a cancel), a download not yet started never starts and
    one in progress is stopped: its connection is shut and its pool thread is free at once.
    """
    stop = DownloadStop()
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fetch, stop)
    except asyncio.CancelledError:
        stop.stop()
        raise


def download_to(url: str, out: BinaryIO, settings: DownloadSettings, *,
                storage: Storage | None = None, job_storage: bool = False,
                allow_address: AddressPolicy | None = None, until: float | None = None,
                stop: DownloadStop | None = None) -> int:
    """Download ``url`` into the binary file ``out`` under every rule above; returns the size.

    ``storage`` is needed for ``s3://`` URLs and must be an S3Storage whose bucket the URL names;
    ``job_storage`` says it is the job's own (s3Config), whose every key may be read; otherwise
    it is the worker's bucket and only keys under BATCH_URL_S3_PREFIX are. ``allow_address``
    overrides the address rule from ``settings`` (tests use it to treat one loopback server as
    public). ``until`` (a ``time.monotonic()`` value: the job's deadline) ends the download
    sooner than DOWNLOAD_TIMEOUT_SECONDS would, and ``stop`` ends it from another thread.
    Raises DownloadError, or InputError for a job's storage the rules refuse.
    """
    seconds = settings.timeout_s
    if until is not None:
        seconds = min(seconds, until - time.monotonic())
    with _StoppableDeadline(seconds) as deadline:
        if stop is not None:
            stop._attach(deadline)
        if url[:5].lower() == "s3://":
            return _download_s3(url, out, settings, storage, job_storage, deadline)
        policy = allow_address or address_policy(settings)
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            location = _fetch_http(current, out, settings, policy, deadline)
            if location is None:
                return out.tell()
            try:
                current = urljoin(current, location)
            except ValueError:
                raise DownloadError(f"{display_url(current)}: redirected to an invalid "
                                    "URL") from None
        raise DownloadError(f"{display_url(url)} redirected more than {MAX_REDIRECTS} times")


def download_bytes(url: str, settings: DownloadSettings, *, storage: Storage | None = None,
                   job_storage: bool = False, allow_address: AddressPolicy | None = None,
                   until: float | None = None, stop: DownloadStop | None = None) -> bytes:
    """``download_to`` into memory: for inputs small enough to hold (the size cap applies)."""
    with tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024) as f:
        download_to(url, f, settings, storage=storage, job_storage=job_storage,  # type: ignore[arg-type]
                    allow_address=allow_address, until=until, stop=stop)
        f.seek(0)
        return f.read()


def load_jsonl_url(url: str, settings: DownloadSettings, *, storage: Storage | None = None,
                   job_storage: bool = False, field: str = "batch_url",
                   max_item_bytes: int | None = None,
                   allow_address: AddressPolicy | None = None) -> list[Any]:
    """Download a JSON Lines file (spooled to disk) and return its items, at most
    ``settings.max_items``, each line at most ``max_item_bytes``. DownloadError for the fetch,
    InputError naming ``field`` and the line for content. Holds every item at once: for small
    files; the worker reads a ``batch_url`` one item at a time (``batchfile.BatchFile``)."""
    with tempfile.TemporaryFile() as f:
        download_to(url, f, settings, storage=storage, job_storage=job_storage,
                    allow_address=allow_address)
        f.seek(0)
        return list(read_jsonl(f, max_items=settings.max_items, field=field,
                               max_item_bytes=max_item_bytes))


def read_jsonl(lines: Iterable[bytes], *, max_items: int, field: str = "batch_url",
               max_item_bytes: int | None = None) -> Iterator[Any]:
    """Parse JSON Lines: one JSON value per non-blank line, UTF-8 (a leading BOM is allowed).

    Yields each value. Raises PayloadTooLarge naming ``field`` and the 1-based line number for a
    line over ``max_item_bytes`` (before parsing it, and from a file object without reading
    more of it than that), InputError for a line that is not UTF-8, not JSON, nested too
    deeply to parse, or holding text that is not valid Unicode (an unpaired surrogate; the
    checks of inline input, ``validation.checked_json_size``), and PayloadTooLarge past
    ``max_items`` items (BATCH_MAX_ITEMS). Messages never quote the line: it may be someone
    else's content.
    """
    count = 0
    for number, raw in enumerate(_bounded_lines(lines, max_item_bytes), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if max_item_bytes is not None and len(raw.rstrip(b"\r\n")) > max_item_bytes:
            raise PayloadTooLarge(f"line {number} is over the limit of {max_item_bytes:,} "
                                  "bytes for one item (WORKER_MAX_INPUT_BYTES)", field=field)
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"line {number} is not UTF-8 text", field=field) from None
        try:
            item = json.loads(text)
        except json.JSONDecodeError:
            raise InputError(f"line {number} is not valid JSON", field=field) from None
        except RecursionError:
            raise InputError(f"line {number} is nested too deeply to read", field=field
                             ) from None
        if b"\\u" in raw:
            # Strict UTF-8 refuses encoded surrogates: only a "\ud800" escape makes a lone one.
            checked_json_size(item, field, f"line {number} ")
        count += 1
        if count > max_items:
            raise PayloadTooLarge(f"more than {max_items:,} items; the limit is "
                                  "BATCH_MAX_ITEMS", field=field)
        yield item


def _bounded_lines(lines: Iterable[bytes], limit: int | None) -> Iterator[bytes]:
    """Lines of a file object, read at most ``limit`` + 6 bytes at a time: enough for an
    accepted line with its BOM and CR LF, and for one byte more than a line may hold, so a line
    too long to accept is seen as such without being read whole into memory."""
    readline = getattr(lines, "readline", None)
    if limit is None or readline is None:
        yield from lines
        return
    while line := readline(limit + 6):
        yield line


# --------------------------------------------------------------------------------------------
# http(s): resolve, check, pin, fetch one hop
# --------------------------------------------------------------------------------------------
class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to a pre-validated address under the download's deadline; the Host header
    keeps the URL's host."""

    def __init__(self, host: str, port: int, address: str, deadline: Deadline,
                 timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._deadline = deadline
        self.pinned_sock: socket.socket | None = None

    def _connect_pinned(self) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self._deadline.watch(sock)      # from here on, the watchdog ends every wait at once
        return sock

    def connect(self) -> None:
        self.sock = self.pinned_sock = self._connect_pinned()


class _PinnedHTTPS(_PinnedHTTP, http.client.HTTPSConnection):
    """TLS to a pre-validated address; SNI and certificate check use the URL's host."""

    def __init__(self, host: str, port: int, address: str, deadline: Deadline,
                 timeout: float) -> None:
        http.client.HTTPSConnection.__init__(self, host, port, timeout=timeout,
                                             context=ssl.create_default_context())
        self._address = address
        self._deadline = deadline
        self.pinned_sock = None

    def connect(self) -> None:
        # The handshake runs on the watched connection: a dribbled handshake is cut off too.
        self.sock = self.pinned_sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self._connect_pinned(), server_hostname=self.host)


def _timed_out(settings: DownloadSettings, shown: str) -> DownloadError:
    return DownloadError(f"{shown}: the download took longer than {settings.timeout_s:g} s "
                         "(DOWNLOAD_TIMEOUT_SECONDS)")


def _remaining(deadline: Deadline, settings: DownloadSettings, shown: str) -> float:
    """Time left for one wait; DownloadError once there is none (never 0: that would make the
    socket non-blocking)."""
    left = deadline.remaining()
    if left <= 0:
        raise _timed_out(settings, shown)
    return left


def _fetch_http(url: str, out: BinaryIO, settings: DownloadSettings, policy: AddressPolicy,
                deadline: Deadline) -> str | None:
    """Fetch one hop into ``out``; return the redirect target, or None when done."""
    shown = display_url(url)
    parts = _split(url, shown)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"{shown}: only http, https and s3 URLs are accepted")
    if not parts.hostname:
        raise DownloadError(f"{shown}: the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise DownloadError(f"{shown}: URLs with credentials are refused")
    host = ascii_host(parts.hostname)
    if host is None:
        raise DownloadError(f"{shown}: the URL's host is not a valid host name or IP address")
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        addresses = resolve(host, port, policy)
    except AddressRefused:
        # One message for a private address and a name that does not resolve, and no address
        # shown: either would tell a job which internal names the worker's DNS knows.
        raise DownloadError(f"{shown}: {_REFUSED}") from None
    except OSError:
        # Only where every address is allowed (DOWNLOAD_ALLOW_PRIVATE): nothing to hide there.
        raise DownloadError(f"{shown}: the host name does not resolve") from None
    # http.client sends the target as ASCII: spaces and non-ASCII characters are escaped.
    target = quote(parts.path or "/", safe=_URL_SAFE) + (
        f"?{quote(parts.query, safe=_URL_SAFE)}" if parts.query else "")
    conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    last: BaseException | None = None
    for address in addresses:
        conn = conn_cls(host, port, address, deadline, _remaining(deadline, settings, shown))
        try:
            conn.request("GET", target, headers={"Accept-Encoding": "identity",
                                                 "User-Agent": "runpod-model-worker"})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            if deadline.passed():
                raise _timed_out(settings, shown) from None
            if isinstance(err, ssl.SSLError | ssl.CertificateError):
                raise DownloadError(f"{shown}: the TLS certificate or handshake failed"
                                    ) from None
            if isinstance(err, TimeoutError):
                raise DownloadError(f"{shown}: the server did not answer in time "
                                    "(DOWNLOAD_TIMEOUT_SECONDS)") from None
            last = err
            continue  # next validated address (dual-stack hosts)
        try:
            return _read_response(response, conn, out, settings, deadline, shown)
        finally:
            response.close()
            conn.close()
            if conn.pinned_sock is not None:
                conn.pinned_sock.close()
    raise DownloadError(f"{shown}: could not connect ({type(last).__name__})")


def _read_response(response: http.client.HTTPResponse, conn: _PinnedHTTP,
                   out: BinaryIO, settings: DownloadSettings, deadline: Deadline,
                   shown: str) -> str | None:
    # The watchdog may have cut the headers short: what was parsed is not an answer.
    if deadline.passed():
        raise _timed_out(settings, shown)
    if response.status in _REDIRECTS:
        location = response.getheader("Location")
        if not location:
            raise DownloadError(f"{shown}: a redirect without a Location")
        return location
    if response.status != 200:
        raise DownloadError(f"{shown}: the server answered HTTP {response.status}")
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_bytes:
        raise DownloadError(f"{shown}: {int(declared):,} bytes is over the download limit of "
                            f"{settings.max_bytes:,} bytes (DOWNLOAD_MAX_BYTES)")
    out.seek(0)
    out.truncate()
    total = 0
    try:
        while True:
            # conn.sock is None once a closing response owns the socket; ours is kept.
            assert conn.pinned_sock is not None
            conn.pinned_sock.settimeout(_remaining(deadline, settings, shown))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > settings.max_bytes:
                raise DownloadError(f"{shown}: over the download limit of "
                                    f"{settings.max_bytes:,} bytes (DOWNLOAD_MAX_BYTES)")
            out.write(chunk)
    except (OSError, http.client.HTTPException):
        if deadline.passed():
            raise _timed_out(settings, shown) from None
        raise DownloadError(f"{shown}: the connection broke during the download") from None
    if deadline.passed():
        raise _timed_out(settings, shown)
    if response.length:    # http.client ends a cut Content-Length body quietly: not a success
        raise DownloadError(f"{shown}: the connection broke during the download")
    return None


# --------------------------------------------------------------------------------------------
# s3://bucket/key in the storage's own bucket
# --------------------------------------------------------------------------------------------
def _download_s3(url: str, out: BinaryIO, settings: DownloadSettings, storage: Storage | None,
                 job_storage: bool, deadline: Deadline) -> int:
    # Split by hand: in an S3 key, "?", "#" and "%" are characters like any other.
    bucket, _, key = url[5:].partition("/")
    shown = display_url(f"s3://{bucket}/{key}")
    if not isinstance(storage, S3Storage):
        raise DownloadError("s3:// URLs need S3 storage on the worker (BUCKET_*) or in the "
                            "job's s3Config")
    if bucket != storage.bucket:
        raise DownloadError("s3:// URLs may only name the worker's own bucket; use an "
                            "https:// (e.g. presigned) URL for any other")
    if not _plain_key(key):
        raise DownloadError(f"{shown}: not an object key (empty, '.' or '..' parts, or a "
                            "leading '/')")
    if not job_storage:
        # The worker's credentials read for any client: only where the operator put inputs.
        prefix = settings.s3_prefix
        if prefix is None:
            raise DownloadError(f"{shown}: reading the worker's own bucket is off "
                                "(BATCH_URL_S3_PREFIX is unset); send a presigned https:// URL, "
                                "or the job's own s3Config")
        if not key.startswith(prefix + "/"):
            raise DownloadError(f"{shown}: only keys under {prefix}/ may be read from the "
                                "worker's bucket (BATCH_URL_S3_PREFIX)")
    try:
        return storage.read_to(key, out, settings.max_bytes, deadline)
    except StorageError as err:
        if deadline.passed():
            raise _timed_out(settings, shown) from None
        raise DownloadError(f"{shown}: {err}") from None


def _plain_key(key: str) -> bool:
    """A key with no empty, '.' or '..' parts: some servers map keys to paths."""
    return bool(key) and all(part not in ("", ".", "..") for part in key.split("/"))

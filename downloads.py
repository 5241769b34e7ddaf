"""Safe downloads of inputs given by URL (e.g. a ``batch_url`` JSONL file), and a JSONL reader.

A job's URL is attacker-controlled: fetched naively it can reach cloud metadata
(169.254.169.254), the worker's own services, or exhaust memory and disk. So:

- Schemes: ``http``, ``https``, and ``s3://<bucket>/<key>`` for the storage's own bucket only
  (read with the storage's credentials). Credentials in the URL are refused.
- Addresses: the host is resolved once, every address must be public (not private, loopback,
  link-local, CGNAT, reserved, multicast, unspecified, or an IPv4-mapped form of those), and the
  connection is made to that validated address (pinned: no second lookup to rebind). TLS still
  checks the certificate against the host name. ``DOWNLOAD_ALLOW_PRIVATE=true`` lifts the address
  rule (local tests, same-VPC servers); every other rule still applies.
- Redirects (at most 5) are followed by hand, each hop checked like the first.
- Size: ``DOWNLOAD_MAX_BYTES``, checked against Content-Length and while reading. Time:
  ``DOWNLOAD_TIMEOUT_SECONDS`` for the whole download, redirects included (DNS lookups aside).
- Environment proxies (HTTP_PROXY...) are not used: a proxy would resolve the name itself.

Each refusal is a DownloadError whose message names the rule and the setting; messages show a
URL without its query (which may hold a signature). We do not reuse the SDK's ``rp_ssrf``: it
reads its switch from ``os.environ`` at call time rather than from our settings, and importing
runpod costs ~2 s and reconfigures logging. Its design (pin, re-check, cap) is the same.

Everything here blocks (network, disk): from async code run it in a thread. Never imports torch.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

from config import DownloadSettings
from errors import DownloadError, InputError, PayloadTooLarge, StorageError
from storage import S3Storage, Storage

MAX_REDIRECTS = 5
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_CHUNK = 1024 * 1024
# CGNAT (RFC 6598): not is_private before CPython 3.12.4.
_EXTRA_BLOCKED = (ipaddress.ip_network("100.64.0.0/10"),)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]


def is_public_address(address: IPAddress) -> bool:
    """True only for a globally routable unicast address (IPv4-mapped IPv6 unwrapped)."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if any(address in net for net in _EXTRA_BLOCKED):
        return False
    return not (address.is_private or address.is_loopback or address.is_link_local
                or address.is_reserved or address.is_multicast or address.is_unspecified
                ) and address.is_global


def _any_address(address: IPAddress) -> bool:
    return True


def address_policy(settings: DownloadSettings) -> AddressPolicy:
    """Which resolved addresses may be connected to under ``settings``."""
    return _any_address if settings.allow_private else is_public_address


def display_url(url: str) -> str:
    """``url`` without query, fragment or credentials: what messages may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def download_to(url: str, out: BinaryIO, settings: DownloadSettings, *,
                storage: Storage | None = None,
                allow_address: AddressPolicy | None = None) -> int:
    """Download ``url`` into the binary file ``out`` under every rule above; returns the size.

    ``storage`` is needed for ``s3://`` URLs and must be an S3Storage whose bucket the URL names.
    ``allow_address`` overrides the address rule from ``settings`` (tests use it to treat one
    loopback server as public). Raises DownloadError.
    """
    deadline = time.monotonic() + settings.timeout_s
    scheme = urlsplit(url).scheme.lower()
    if scheme == "s3":
        return _download_s3(url, out, settings, storage, deadline)
    policy = allow_address or address_policy(settings)
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        location = _fetch_http(current, out, settings, policy, deadline)
        if location is None:
            return out.tell()
        current = urljoin(current, location)
    raise DownloadError(f"{display_url(url)} redirected more than {MAX_REDIRECTS} times")


def download_bytes(url: str, settings: DownloadSettings, *, storage: Storage | None = None,
                   allow_address: AddressPolicy | None = None) -> bytes:
    """``download_to`` into memory: for inputs small enough to hold (the size cap applies)."""
    with tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024) as f:
        download_to(url, f, settings, storage=storage, allow_address=allow_address)  # type: ignore[arg-type]
        f.seek(0)
        return f.read()


def load_jsonl_url(url: str, settings: DownloadSettings, *, storage: Storage | None = None,
                   field: str = "batch_url",
                   allow_address: AddressPolicy | None = None) -> list[Any]:
    """Download a JSON Lines file (spooled to disk) and return its items, at most
    ``settings.max_items``. DownloadError for the fetch, InputError naming ``field`` and the
    line for content."""
    with tempfile.TemporaryFile() as f:
        download_to(url, f, settings, storage=storage, allow_address=allow_address)
        f.seek(0)
        return list(read_jsonl(f, max_items=settings.max_items, field=field))


def read_jsonl(lines: Iterable[bytes], *, max_items: int, field: str = "batch_url"
               ) -> Iterator[Any]:
    """Parse JSON Lines: one JSON value per non-blank line, UTF-8 (a leading BOM is allowed).

    Yields each value. Raises InputError naming ``field`` and the 1-based line number for a line
    that is not UTF-8 or not JSON, and PayloadTooLarge past ``max_items`` items
    (BATCH_MAX_ITEMS).
    """
    count = 0
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"line {number} is not UTF-8 text", field=field) from None
        try:
            item = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"line {number} is not valid JSON ({err.msg} at column "
                             f"{err.colno})", field=field) from None
        count += 1
        if count > max_items:
            raise PayloadTooLarge(f"more than {max_items:,} items; the limit is "
                                  "BATCH_MAX_ITEMS", field=field)
        yield item


# --------------------------------------------------------------------------------------------
# http(s): resolve, check, pin, fetch one hop
# --------------------------------------------------------------------------------------------
class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to a pre-validated address; the Host header keeps the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self.pinned_sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.pinned_sock = socket.create_connection((self._address, self.port),
                                                                self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to a pre-validated address; SNI and certificate check use the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address
        self.pinned_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self.pinned_sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            sock, server_hostname=self.host)


def _resolve(host: str, port: int, policy: AddressPolicy, shown: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DownloadError(f"{shown}: the host name does not resolve") from None
    addresses: list[str] = []
    for info in infos:
        ip = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        if ip not in addresses:
            addresses.append(ip)
    for ip in addresses:
        # A host with any non-public address is refused whole (no picking the public one).
        if not policy(ipaddress.ip_address(ip)):
            raise DownloadError(f"{shown}: the host resolves to a private or reserved address "
                                f"({ip}); such URLs are refused unless DOWNLOAD_ALLOW_PRIVATE="
                                "true")
    if not addresses:
        raise DownloadError(f"{shown}: the host name does not resolve")
    return addresses


def _remaining(deadline: float, settings: DownloadSettings, shown: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadError(f"{shown}: the download took longer than {settings.timeout_s:g} s "
                            "(DOWNLOAD_TIMEOUT_SECONDS)")
    return left


def _fetch_http(url: str, out: BinaryIO, settings: DownloadSettings, policy: AddressPolicy,
                deadline: float) -> str | None:
    """Fetch one hop into ``out``; return the redirect target, or None when done."""
    shown = display_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"{shown}: only http, https and s3 URLs are accepted")
    if not parts.hostname:
        raise DownloadError(f"{shown}: the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise DownloadError(f"{shown}: URLs with credentials are refused")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise DownloadError(f"{shown}: the URL has an invalid port") from None
    addresses = _resolve(parts.hostname, port, policy, shown)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    last: OSError | None = None
    for address in addresses:
        conn = conn_cls(parts.hostname, port, address, _remaining(deadline, settings, shown))
        try:
            conn.request("GET", target, headers={"Accept-Encoding": "identity",
                                                 "User-Agent": "runpod-model-worker"})
            response = conn.getresponse()
        except ssl.SSLError:
            conn.close()
            raise DownloadError(f"{shown}: the TLS certificate or handshake failed") from None
        except TimeoutError:
            conn.close()
            _remaining(deadline, settings, shown)
            raise DownloadError(f"{shown}: the server did not answer in time "
                                "(DOWNLOAD_TIMEOUT_SECONDS)") from None
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            last = err if isinstance(err, OSError) else OSError(str(err))
            continue  # next validated address (dual-stack hosts)
        try:
            return _read_response(response, conn, out, settings, deadline, shown)
        finally:
            response.close()
            conn.close()
            if conn.pinned_sock is not None:
                conn.pinned_sock.close()
    raise DownloadError(f"{shown}: could not connect ({type(last).__name__})")


def _read_response(response: http.client.HTTPResponse, conn: _PinnedHTTP | _PinnedHTTPS,
                   out: BinaryIO, settings: DownloadSettings, deadline: float,
                   shown: str) -> str | None:
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
            chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > settings.max_bytes:
                raise DownloadError(f"{shown}: over the download limit of "
                                    f"{settings.max_bytes:,} bytes (DOWNLOAD_MAX_BYTES)")
            out.write(chunk)
    except TimeoutError:
        raise DownloadError(f"{shown}: the download took longer than {settings.timeout_s:g} s "
                            "(DOWNLOAD_TIMEOUT_SECONDS)") from None
    except (OSError, http.client.HTTPException):
        raise DownloadError(f"{shown}: the connection broke during the download") from None
    _remaining(deadline, settings, shown)
    return None


# --------------------------------------------------------------------------------------------
# s3://bucket/key in the storage's own bucket
# --------------------------------------------------------------------------------------------
def _download_s3(url: str, out: BinaryIO, settings: DownloadSettings, storage: Storage | None,
                 deadline: float) -> int:
    parts = urlsplit(url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not isinstance(storage, S3Storage):
        raise DownloadError("s3:// URLs need S3 storage on the worker (BUCKET_*) or in the "
                            "job's s3Config")
    if bucket != storage.bucket:
        raise DownloadError("s3:// URLs may only name the worker's own bucket; use an "
                            "https:// (e.g. presigned) URL for any other")
    if not key:
        raise DownloadError("the s3:// URL names no object key")
    try:
        return storage.read_to(key, out, settings.max_bytes, deadline)
    except StorageError as err:
        raise DownloadError(f"s3://{bucket}/{key}: {err} (DOWNLOAD_MAX_BYTES, "
                            "DOWNLOAD_TIMEOUT_SECONDS)") from None

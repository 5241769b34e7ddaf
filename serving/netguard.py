"""The rules for every connection a job directs: which addresses it may reach, and for how long.

Both ``batch_url`` downloads (downloads.py) and a job's own ``s3Config`` storage (s3config.py,
s3wire.py) connect where the job says; this module is what keeps those connections honest.

- Addresses (``is_public_address``): only globally routable unicast addresses. Private,
  loopback, link-local, site-local (fec0::/10), CGNAT, reserved, multicast and unspecified
  addresses are refused, and so is any IPv6 address that embeds a non-public IPv4 address:
  IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002::/16), Teredo (2001::/32, server and client), NAT64
  (64:ff9b::/96) and local-use NAT64 (64:ff9b:1::/48). The IANA special-purpose blocks are
  listed here (``_SPECIAL_V4``, ``_SPECIAL_V6``) rather than left to ``ipaddress``, whose tables
  differ between CPython releases (3.11.7 counts 192.0.0.8 as global, 3.13.0 counts
  2001:20::1 as global; neither knows 3fff::/20). ``DOWNLOAD_ALLOW_PRIVATE=true`` lifts the
  rule (local tests, same-VPC servers).
- Resolution (``resolve``): a host name is resolved once and every address it has is checked
  before anything is sent; the caller then connects to one of those checked addresses, never to
  the name, so DNS cannot answer differently between the check and the connection. A refusal
  (``AddressRefused``) therefore says nothing about the remote port: open, closed or filtered
  look the same. Nor does it say whether the name resolved: under the address rule a name that
  does not resolve is refused with the same message as one that resolves to a private
  address, so a job cannot map the worker's internal DNS names (the difference is logged at
  DEBUG, for the operator).
- Time (``Deadline``): a total limit on one transfer. Its watchdog shuts down every socket
  ``watch``ed for it when the time is up, which ends a blocked read or write at once, so no
  server holds a transfer past its limit by answering one byte at a time. Per-read timeouts
  alone cannot do that: each byte restarts them.

Never imports boto3, torch or runpod.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]

# IANA's special-purpose address registries, the blocks not globally reachable (and the few
# reachable ones no download has business with), so the rule is the same on every CPython:
# ``ipaddress``'s own tables change between patch releases. Python's flags are checked too.
_SPECIAL_V4 = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",            # this network
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",    # private use
    "100.64.0.0/10",        # shared address space (CGNAT): not is_private before 3.12.4
    "127.0.0.0/8", "169.254.0.0/16",                    # loopback, link-local
    "192.0.0.0/24",         # IETF protocol assignments, the anycast .9 and .10 too: 3.11.7
                            # counts 192.0.0.8 and up as global
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",   # documentation
    "192.88.99.0/24",       # 6to4 relay anycast (deprecated by RFC 7526): relays anywhere
    "198.18.0.0/15",        # benchmarking
    "224.0.0.0/4", "240.0.0.0/4",                       # multicast, reserved (and broadcast)
))
_SPECIAL_V6 = tuple(ipaddress.ip_network(n) for n in (
    "::/127",               # unspecified, loopback
    "::ffff:0:0/96",        # IPv4-mapped: judged by its IPv4 address before this table
    "64:ff9b:1::/48",       # local-use NAT64
    "100::/64", "100:0:0:1::/64",                       # discard-only, dummy prefix
    "2001::/23",            # IETF protocol assignments (Teredo, benchmarking, ORCHID, AMT,
                            # anycast): 3.12.4+ counts parts of it as global
    "2001:db8::/32", "3fff::/20",                       # documentation (3fff:: in no CPython)
    "5f00::/16",            # segment routing SIDs
    "fc00::/7", "fe80::/10", "fec0::/10",               # unique-local, link-local, site-local
    "ff00::/8",             # multicast
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")

log = logging.getLogger("worker.netguard")


REFUSED = "the host is not, or does not resolve to, a public address"


class AddressRefused(Exception):
    """A connection the address rule refused, before anything was sent.

    Deliberately not an OSError: HTTP libraries turn OSErrors into "could not connect" and
    retry; this one must reach the caller as itself.
    """


def _is_public_ip(address: IPAddress) -> bool:
    blocked = _SPECIAL_V4 if address.version == 4 else _SPECIAL_V6
    if any(address in net for net in blocked):
        return False
    return not (address.is_private or address.is_loopback or address.is_link_local
                or address.is_reserved or address.is_multicast or address.is_unspecified
                ) and address.is_global


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a transition form of ``address`` would deliver to."""
    found: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_public_address(address: IPAddress) -> bool:
    """True only for a globally routable unicast address that embeds no non-public one."""
    if address.version == 6:
        mapped = address.ipv4_mapped       # ::ffff:a.b.c.d is the IPv4 address itself
        if mapped is not None:
            return _is_public_ip(mapped)
        if not all(_is_public_ip(v4) for v4 in _embedded_ipv4(address)):
            return False
    return _is_public_ip(address)


def allow_any_address(address: IPAddress) -> bool:
    """The policy when private addresses are allowed."""
    return True


def address_policy(allow_private: bool) -> AddressPolicy:
    """Which resolved addresses may be connected to."""
    return allow_any_address if allow_private else is_public_address


def parse_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address (brackets and an IPv6 zone id dropped), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def ascii_host(host: str) -> str | None:
    """``host`` (as ``urlsplit`` gives it, without brackets) as the ASCII name or address to
    connect to, or None when it is neither an IP address (without a zone id) nor a DNS name.

    An internationalised name is IDNA-encoded. Checked before any lookup, so a malformed host
    (spaces, control characters, an empty label) never reaches the resolver.
    """
    if "%" in host:
        return None
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    bare = name[:-1] if name.endswith(".") else name
    if not bare or len(bare) > 253 or not all(_LABEL.match(label) for label in bare.split(".")):
        return None
    return name


def resolve(host: str, port: int, policy: AddressPolicy) -> list[str]:
    """Every address ``host`` resolves to, in resolver order, once all are checked.

    Raises AddressRefused when any address is not allowed (a host with one private address is
    refused whole, rather than picking its public one). A name that does not resolve raises
    socket.gaierror only under ``allow_any_address``; under any other policy it raises the same
    AddressRefused as a private one, so the caller cannot tell "internal name" from "no such
    name" (the cause goes to the DEBUG log). Connect to the returned addresses, never to
    ``host`` again.
    """
    try:
        addresses = _lookup(host, port)
    except OSError as err:
        if policy is allow_any_address:
            raise
        log.debug("address rule: %r refused: it does not resolve (%s)", host, err)
        raise AddressRefused(REFUSED) from None
    for ip in addresses:
        if not policy(ipaddress.ip_address(ip)):
            log.debug("address rule: %r refused: it resolves to %s", host, ip)
            raise AddressRefused(REFUSED)
    return addresses


def _lookup(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:
        raise socket.gaierror(socket.EAI_NONAME, "not a host name") from None
    addresses: list[str] = []
    for info in infos:
        ip = str(info[4][0]).split("%", 1)[0]     # drop an IPv6 zone id
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, "no address")
    return addresses


class Deadline:
    """A total time limit for one transfer, and the watchdog that enforces it.

    ``remaining()`` gives the time left (for connect and per-read timeouts); ``watch(sock)``
    registers a socket, which is shut down (both directions) when the time is up, or at once if
    it already is. A watched socket is kept as a duplicate descriptor, so the watchdog still
    reaches the connection after a TLS wrapper took over the original object. ``expire()`` ends
    the time early (the job the transfer serves ended). Use as a context manager, or call
    ``close()`` when the transfer ends: it stops the timer and releases the duplicates.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._expired = False
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._ended = threading.Event()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    @classmethod
    def until(cls, at: float) -> Deadline:
        """A deadline at the ``time.monotonic()`` value ``at``."""
        return cls(at - time.monotonic())

    def remaining(self) -> float:
        """Seconds left; 0 once the time is up."""
        return 0.0 if self._expired else max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return self._expired or time.monotonic() >= self.at

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down when the time is up."""
        dup = sock.dup()
        with self._lock:
            if not self._expired:
                self._watched.append(dup)
                return
        _shut(dup)

    def expire(self) -> None:
        """End the time now, before the limit (the transfer's job ended): every watched
        connection is shut at once, and any watched later is shut as it is made."""
        self._timer.cancel()
        self._expire()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking as soon as the time is up; True if it is."""
        return self._ended.wait(max(0.0, seconds)) or self.passed()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            watched, self._watched = self._watched, []
        self._ended.set()
        for sock in watched:
            _shut(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            watched, self._watched = self._watched, []
        for sock in watched:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _shut(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked on this connection (close() alone would not).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()

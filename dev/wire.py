"""What both sides of the local endpoint share on the wire: JSON errors, capped and timed body
reads, the key check, and the cap on connections per peer address.

Never imports runpod or torch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Sequence

from aiohttp import web

MIB = 1024 * 1024


def error(status: int, message: str) -> web.Response:
    """The JSON error answer RunPod gives: ``{"error": message}``."""
    return web.json_response({"error": message}, status=status)


def size(n: int) -> str:
    """Bytes as a person reads them: ``10 MiB (10485760 bytes)``, ``512 bytes``."""
    return f"{n / MIB:g} MiB ({n} bytes)" if n >= MIB else f"{n} bytes"


async def read_capped(request: web.Request, limit: int, timeout_s: float) -> bytes | None:
    """The request body, or None as soon as it is known to be over ``limit`` bytes.

    A body that has not arrived whole ``timeout_s`` seconds after the read began is answered
    408 (``web.HTTPRequestTimeout``) and its connection is not kept: a caller that trickles a
    body must not hold a connection, and the memory of what it sent so far, for ever.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    data = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_chunked(256 * 1024):
                data += chunk
                if len(data) > limit:
                    return None
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            reason=f"request body not received within {timeout_s:g} s; send it at once",
            headers={"Connection": "close"}) from None
    return bytes(data)


def key_matches(request: web.Request, keys: Sequence[str]) -> bool:
    """Whether the request's ``Authorization`` (raw, as the SDK's worker sends it, or
    ``Bearer <key>``) is one of ``keys``. Every key is compared, in constant time."""
    given = request.headers.get("Authorization", "").strip()
    if given[:7].lower() == "bearer ":
        given = given[7:].strip()
    found = False
    for key in keys:
        found |= secrets.compare_digest(given.encode(), key.encode())
    return found and bool(given)


# -------------------------------------------------------------------- connections per peer
_TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class PeerGate(asyncio.Protocol):
    """One connection: counted against its peer address, and handed to aiohttp's own protocol
    only if the address holds fewer than the cap; otherwise answered 429 and closed unread."""

    def __init__(self, make: Callable[[], asyncio.Protocol], peers: dict[str, int],
                 cap: int) -> None:
        self._make, self._peers, self._cap = make, peers, cap
        self._peer: str | None = None
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        if self._peers.get(peer, 0) >= self._cap:
            body = json.dumps({"error": f"too many connections from {peer} (at most "
                                        f"{self._cap} at once); close some and retry"}).encode()
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_TOO_MANY % (len(body), body))
            transport.close()
            return
        self._peer = peer
        self._peers[peer] = self._peers.get(peer, 0) + 1
        self._inner = self._make()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer is not None:
            left = self._peers.get(self._peer, 1) - 1
            if left > 0:
                self._peers[self._peer] = left
            else:
                self._peers.pop(self._peer, None)
            self._peer = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def peer_gate_factory(make: Callable[[], asyncio.Protocol], peers: dict[str, int],
                      cap: int) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for ``loop.create_server``: ``make``'s protocols (aiohttp's server),
    each behind a ``PeerGate`` counting in ``peers`` (address -> open connections)."""
    return lambda: PeerGate(make, peers, cap)

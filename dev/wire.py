"""What both sides of the local endpoint share on the wire: JSON errors, capped and timed body
reads, and the key check.

Never imports runpod or torch.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence

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

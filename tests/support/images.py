"""Real image bytes for the image tests, hostile ones included, made with Pillow and by hand.

- ``image_bytes``: noise of a given size in any format Pillow writes; ``picture``: the same as a
  Pillow image, and ``image_uri`` a Pillow image as a PNG data: URI.
- ``jpeg_scan_bomb``: a progressive JPEG whose last refinement scan (12 bytes, covering every
  luma block) is repeated: each copy is another pass of the decoder over the whole image.
- ``png_chunks``: a PNG with extra chunks before its image data (``iccp_bomb``: many colour
  profiles, each inflating to 1 MB while Pillow reads the header).
- ``animation``: an animated PNG or WebP of n frames.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib

import numpy as np
from PIL import Image

_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0, **save: object
                ) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **save)
    return out.getvalue()


def data_uri(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def picture(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """Noise of ``size`` (width, height) as an RGB Pillow image, the same for the same seed."""
    return Image.open(io.BytesIO(image_bytes(*size, seed=seed))).convert("RGB")


def image_uri(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return data_uri(out.getvalue())


def jpeg_scans(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG: its SOS segment and its entropy-coded data."""
    scans, pos = [], 2
    while raw[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
        if raw[pos + 1] == 0xDA:
            found = _MARKER.search(raw, end)
            assert found is not None
            end = found.start()
            scans.append((pos, end))
        pos = end
    return scans


def jpeg_scan_bomb(size: int = 1024, extra_scans: int = 3000) -> bytes:
    """A ``size`` x ``size`` progressive JPEG of one grey with ``extra_scans`` more copies of
    its last scan (a luma AC refinement): about 12 bytes and 0.7 ms of decoding each at
    1024x1024 (3,000 copies: 42 KB, 2 s)."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(out, "JPEG", progressive=True)
    raw = out.getvalue()
    start, end = jpeg_scans(raw)[-1]
    eoi = raw.rindex(b"\xff\xd9")
    return raw[:eoi] + raw[start:end] * extra_scans + raw[eoi:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_chunks(chunks: list[tuple[bytes, bytes]], width: int = 8, height: int = 8) -> bytes:
    """A ``width`` x ``height`` PNG with ``chunks`` (type, data) right after its header."""
    raw = image_bytes(width, height)
    after_ihdr = 8 + 25
    return raw[:after_ihdr] + b"".join(png_chunk(k, d) for k, d in chunks) + raw[after_ihdr:]


def iccp_bomb(profiles: int = 1000) -> bytes:
    """A PNG with ``profiles`` iCCP chunks, each 1 KB that inflates to 1 MB (Pillow's cap)."""
    profile = b"p\x00\x00" + zlib.compress(b"\x00" * 1_000_000, 9)
    return png_chunks([(b"iCCP", profile)] * profiles)


def animation(frames: int, fmt: str = "PNG", size: int = 4) -> bytes:
    """An animated PNG or WebP of ``frames`` frames, each a different colour."""
    images = [Image.new("RGB", (size, size), (i % 256, i // 256 % 256, 7))
              for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format=fmt, save_all=True, append_images=images[1:], duration=10,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()

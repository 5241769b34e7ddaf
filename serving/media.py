"""Images from untrusted bytes: structural limits first, then decoding in a pool of its own.

A compressed image can cost far more to decode than its size or its pixel count suggests: a
1024x1024 progressive JPEG whose thousands of 12-byte refinement scans each cover every block
costs 2 s of CPU per 42 KB (measured), minutes for a file within the download limit; a PNG
with a thousand 1 KB ``iCCP`` chunks makes Pillow inflate a gigabyte while it reads the header.
The native decoder cannot be interrupted once it runs, so what it may do is bounded before it
starts:

- Format: PNG, JPEG and WebP only, recognised by their signatures; Pillow opens nothing else.
- Structure (``check_structure``), read from the raw bytes before Pillow parses anything. It is
  linear in the bytes and stops at the first limit passed:

  ==============  ============================================================================
  JPEG            at most ``max_jpeg_scans`` scans (SOS segments; a baseline JPEG has 1 to 3, a
                  standard progressive one about 10) and ``max_jpeg_segments`` other segments
  PNG             at most ``max_png_chunks_before_data`` chunks before the first ``IDAT``,
                  ``max_png_ancillary`` ancillary chunks in all (one ``iCCP``, as the PNG
                  specification says), each at most ``max_png_ancillary_bytes``, and
                  ``max_png_chunks`` chunks of any kind
  WebP            at most ``max_webp_chunks`` chunks besides the frames
  animations      at most ``max_frames`` frames (APNG ``fcTL``, WebP ``ANMF``); only the first
                  frame is decoded, but the container is parsed whole
  ==============  ============================================================================

- Size: width x height from the header, at most ``max_pixels``, and the caller's own check
  (``check``: a task's padding, its output format's limits) before any pixel is decoded.

Every refusal is an InputError naming the field, that says what to send instead.

Decoding, and the rest of a task's CPU work on images (preparing tensors, encoding the
answer), runs in ``DECODE_POOL`` (``DECODE_THREADS`` threads, named ``decode``): never on the
event loop, never in the default executor that every answer's delivery needs, never on the
device thread. Work waits there under its job's deadline and cancel flag: work of a job that
has ended is dropped before it starts, and started work stops between steps (check, header,
pixels); a step in progress runs to its end, bounded by the limits above.

Never imports torch, runpod or boto3.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from serving.errors import InputError, JobTimeout

T = TypeVar("T")

INPUT_FORMATS = ["PNG", "JPEG", "WEBP"]          # what Pillow may open; nothing else is tried
# The largest side each output format can hold, in pixels (libwebp: 16,383; JPEG's header
# holds 16 bits; PNG 2^31 - 1).
OUTPUT_MAX_SIDE = {"PNG": 2**31 - 1, "JPEG": 65_535, "WEBP": 16_383}

# Half the cores, 2 to 8: image work is short and bounded, and must leave cores to the device
# thread's host work and the event loop.
DECODE_THREADS = max(2, min(8, (os.cpu_count() or 2) // 2))
DECODE_POOL = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A JPEG marker: 0xFF and a code that is not stuffing (00), fill (FF) or a restart (D0-D7).
# One byte class, no repetition: the search is linear even over a run of 0xFF.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))     # TEM, RST0..7: no length
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_PNG_FRAME_CHUNKS = frozenset((b"fcTL", b"fdAT"))


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may hold. The defaults leave room above every common encoder."""

    max_pixels: int                              # width x height, WORKER_MAX_IMAGE_PIXELS
    max_jpeg_scans: int = 48
    max_jpeg_segments: int = 256                 # headers, tables, comments, metadata parts
    max_png_chunks_before_data: int = 256     # unknown ones are skipped one by one
    max_png_ancillary: int = 64
    max_png_ancillary_bytes: int = 1024 * 1024   # each; Pillow inflates up to 1 MB from one
    max_png_chunks: int = 16_384                 # IDAT included: Pillow reads each in Python
    max_webp_chunks: int = 64
    max_frames: int = 1_000


# ----------------------------------------------------------------------------------------------
# Structure: what the bytes hold, before Pillow reads them
# ----------------------------------------------------------------------------------------------
def check_structure(raw: bytes, limits: ImageLimits, field: str = "input.image") -> str:
    """The format of ``raw`` ("PNG", "JPEG" or "WEBP") once its structure is within ``limits``.

    Raises InputError naming ``field`` for another format or a structure past a limit. Reads
    the container only: a truncated or corrupt file passes here and fails when decoded.
    """
    if raw.startswith(_PNG_SIGNATURE):
        _check_png(raw, limits, field)
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        _check_jpeg(raw, limits, field)
        return "JPEG"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        _check_webp(raw, limits, field)
        return "WEBP"
    raise InputError("is not a PNG, JPEG or WebP image", field=field)


def _check_jpeg(raw: bytes, limits: ImageLimits, field: str) -> None:
    scans = segments = 0
    pos, end = 2, len(raw)
    while pos + 1 < end:
        if raw[pos] != 0xFF or raw[pos + 1] == 0xFF:
            # Fill bytes, or garbage between segments: the decoder skips to the next marker too.
            found = _JPEG_MARKER.search(raw, pos)
            if found is None:
                return
            pos = found.start()
        marker = raw[pos + 1]
        if marker == _JPEG_EOI:
            return                          # the decoder reads nothing after the image's end
        if marker not in _JPEG_STANDALONE and pos + 4 > end:
            return
        if marker != _JPEG_SOS:        # one loop a marker: each is counted, so the walk is bounded
            segments += 1
            if segments > limits.max_jpeg_segments:
                raise InputError(f"is a JPEG of more than {limits.max_jpeg_segments} header and "
                                 "metadata segments; re-encode it, or strip its metadata",
                                 field=field)
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        after = pos + 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
        if marker == _JPEG_SOS:
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise InputError(
                    f"is a JPEG of more than {limits.max_jpeg_scans} scans (a standard "
                    "progressive JPEG has about 10); each scan is another pass over the whole "
                    "image. Re-encode it as a baseline or standard progressive JPEG",
                    field=field)
            # The scan's entropy-coded data runs to the next marker.
            found = _JPEG_MARKER.search(raw, after)
            pos = found.start() if found is not None else end
            continue
        pos = after


def _check_png(raw: bytes, limits: ImageLimits, field: str) -> None:
    pos, end = len(_PNG_SIGNATURE), len(raw)
    chunks = ancillary = iccp = frames = 0
    in_data = False

    def refuse(what: str) -> InputError:
        return InputError(f"is a PNG with {what}; re-encode it, or strip its metadata",
                          field=field)

    while pos + 8 <= end:
        length = int.from_bytes(raw[pos:pos + 4], "big")
        kind = raw[pos + 4:pos + 8]
        if kind == b"IEND":
            return
        chunks += 1
        if chunks > limits.max_png_chunks:
            raise refuse(f"more than {limits.max_png_chunks:,} chunks")
        if kind == b"IDAT":
            in_data = True
        elif not in_data and chunks > limits.max_png_chunks_before_data:
            raise refuse(f"more than {limits.max_png_chunks_before_data} chunks before its "
                         "image data")
        if kind == b"fcTL":
            frames += 1
            if frames > limits.max_frames:
                raise InputError(f"is an animated PNG of more than {limits.max_frames:,} "
                                 "frames; send a single frame", field=field)
        elif kind[0] & 0x20 and kind not in _PNG_FRAME_CHUNKS:   # lower-case first letter
            ancillary += 1
            if ancillary > limits.max_png_ancillary:
                raise refuse(f"more than {limits.max_png_ancillary} metadata (ancillary) "
                             "chunks")
            if length > limits.max_png_ancillary_bytes:
                raise refuse(f"a {kind.decode('latin-1')!r} metadata chunk of {length:,} "
                             f"bytes, over the limit of {limits.max_png_ancillary_bytes:,}")
            if kind == b"iCCP":
                iccp += 1
                if iccp > 1:
                    raise refuse("more than one colour profile (iCCP chunk)")
        pos += 12 + length                  # length, type, data, CRC


def _check_webp(raw: bytes, limits: ImageLimits, field: str) -> None:
    pos, end = 12, min(len(raw), 8 + int.from_bytes(raw[4:8], "little"))
    frames = others = 0
    while pos + 8 <= end:
        kind = raw[pos:pos + 4]
        length = int.from_bytes(raw[pos + 4:pos + 8], "little")
        if kind == b"ANMF":
            frames += 1
            if frames > limits.max_frames:
                raise InputError(f"is an animated WebP of more than {limits.max_frames:,} "
                                 "frames; send a single frame", field=field)
        else:
            others += 1
            if others > limits.max_webp_chunks:
                raise InputError(f"is a WebP of more than {limits.max_webp_chunks} chunks; "
                                 "re-encode it, or strip its metadata", field=field)
        pos += 8 + length + (length & 1)    # chunks are padded to an even size


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
def open_image(raw: bytes, limits: ImageLimits, field: str = "input.image", *,
               check: Callable[[int, int], None] | None = None,
               step: Callable[[], None] | None = None) -> Image.Image:
    """Decode ``raw`` as an RGB image; InputError naming ``field`` for anything else.

    In order: the structure (``check_structure``), the header, its size against
    ``limits.max_pixels``, then ``check(width, height)`` (the caller's own rules, which raise
    InputError), and only then the pixels. ``step()`` is called between steps: it raises to
    stop work whose job has ended. Blocking: from async code use ``decode_image``.
    """
    run_step = step or (lambda: None)
    check_structure(raw, limits, field)
    run_step()
    try:
        image = Image.open(io.BytesIO(raw), formats=INPUT_FORMATS)
    except Image.DecompressionBombError:       # Pillow's own guard, far above ours
        raise InputError(f"claims a size over the limit of {limits.max_pixels:,} pixels "
                         "(WORKER_MAX_IMAGE_PIXELS)", field=field) from None
    except UnidentifiedImageError:
        raise InputError("is not a PNG, JPEG or WebP image", field=field) from None
    except Exception:  # noqa: BLE001 - a malformed header is the caller's input
        raise InputError("has an unreadable image header", field=field) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("is an empty image", field=field)
    if width * height > limits.max_pixels:
        raise InputError(f"is {width}x{height} ({width * height:,} pixels), over the limit of "
                         f"{limits.max_pixels:,} (WORKER_MAX_IMAGE_PIXELS)", field=field)
    if check is not None:
        check(width, height)
    run_step()
    try:
        image.load()
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - truncated or corrupt pixel data
        raise InputError("could not be decoded: the image data is truncated or corrupt",
                         field=field) from None


def check_output_size(width: int, height: int, pil_format: str, field: str) -> None:
    """InputError naming ``field`` when ``pil_format`` cannot hold a ``width`` x ``height``
    image (WebP's sides end at 16,383 pixels, JPEG's at 65,535)."""
    side = OUTPUT_MAX_SIDE[pil_format]
    if width > side or height > side:
        name = "jpeg" if pil_format == "JPEG" else pil_format.lower()
        raise InputError(f"the output would be {width}x{height}, and {name} images are at "
                         f"most {side:,} pixels a side; choose png, or send a smaller image",
                         field=field)


def encode_image(pixels: Any, pil_format: str) -> bytes:
    """``pixels`` (an (H, W, 3) uint8 array) as ``pil_format`` bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=pil_format)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# The pool, under the job's deadline and cancel flag
# ----------------------------------------------------------------------------------------------
class _Abandoned(Exception):
    """The job that asked for this work has ended; nobody awaits the result."""


async def in_decode_pool(fn: Callable[..., T], *args: Any, deadline: float | None = None,
                         cancelled: threading.Event | None = None,
                         pass_step: bool = False) -> T:
    """``fn(*args)`` in ``DECODE_POOL`` under a job's ``deadline`` (``time.monotonic()``) and
    ``cancelled`` flag.

    Work whose job has ended (deadline passed, flag set, or this coroutine cancelled) is
    dropped before it starts; with ``pass_step`` ``fn`` is given ``step=``, a callable to call
    between its steps, which raises once the job has ended. JobTimeout when the deadline
    passed first.
    """
    abandoned = threading.Event()

    def step() -> None:
        if abandoned.is_set():
            raise _Abandoned
        if ((cancelled is not None and cancelled.is_set())
                or (deadline is not None and time.monotonic() >= deadline)):
            raise JobTimeout("the job reached its time limit (WORKER_JOB_TIMEOUT_S) before "
                             "its image work was done; send a smaller image")

    def run() -> T:
        step()
        return fn(*args, step=step) if pass_step else fn(*args)

    try:
        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, run)
    except asyncio.CancelledError:
        abandoned.set()        # queued work is dropped by the pool; running work stops early
        raise


async def decode_image(raw: bytes, limits: ImageLimits, *, field: str = "input.image",
                       deadline: float | None = None, cancelled: threading.Event | None = None,
                       check: Callable[[int, int], None] | None = None) -> Image.Image:
    """``open_image`` in the decode pool, under the job's deadline and cancel flag."""
    def work(*, step: Callable[[], None]) -> Image.Image:
        return open_image(raw, limits, field, check=check, step=step)

    return await in_decode_pool(work, deadline=deadline, cancelled=cancelled, pass_step=True)

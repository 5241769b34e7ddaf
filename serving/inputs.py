"""Media fields of a task's input: Image, Audio and File, fetched and decoded by the worker.

A task's input model declares ``image: Image`` (or ``Audio``, ``File``); a caller sends an
``https://`` or ``s3://`` URL, or a ``data:<type>;base64,<data>`` URI. Validation (on the event
loop, cheap) checks only the form of the reference and keeps a ``MediaRef``; before the task
runs, ``resolve_media`` fetches each reference under the download rules (``JobContext.download``:
public addresses only, size and time limits; ``s3://`` from the job's storage) and decodes it::

    Image   an RGB ``PIL.Image.Image``; its structure and its header's size are checked
            against the limits before any pixel is decoded (``serving/media.py``, the one
            place images are decoded, in the decode pool under the job's deadline)
    File    the bytes, up to DOWNLOAD_MAX_BYTES
    Audio   ``AudioBytes(data, content_type)``: the bytes as sent; the content type is the
            data URI's, or the URL's suffix. ``serving.audio.decode_audio`` turns them into
            samples at the model's rate, within WORKER_MAX_AUDIO_SECONDS

Errors name the field (``input.image``, ``input.batch.3.image``). Never imports torch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import PIL.Image
from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

from serving.errors import InputError
from serving.media import ImageLimits, decode_image

if TYPE_CHECKING:
    from serving.job import JobContext

# A compressed image is smaller than its pixels: a file larger than this for the pixel limit is
# refused before it is read whole (4 bytes a pixel, plus room for metadata).
BYTES_PER_PIXEL = 4
HEADER_ROOM = 1024 * 1024
_DATA_URI = re.compile(r"data:([A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)?;base64,", re.ASCII)
_SCHEMES = ("https://", "http://", "s3://")


@dataclass(frozen=True)
class MediaRef:
    """A checked reference to media, not yet fetched: what validation leaves in the field."""

    kind: str                    # "image" | "audio" | "file"
    url: str


@dataclass(frozen=True)
class AudioBytes:
    """An audio input as sent: its bytes and content type (``audio/wav``, ...), not decoded."""

    data: bytes
    content_type: str


@dataclass(frozen=True)
class _Media:
    """The pydantic side of a media field: a string that must be a URL or a data URI."""

    kind: str

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, core_schema.str_schema())

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        data_type = "application/octet-stream" if self.kind == "file" else f"{self.kind}/..."
        return {"type": "string", "format": "uri", "x-media": self.kind,
                "description": f"an https:// or s3:// URL, or a data:{data_type};base64,... URI"}

    def check(self, value: str) -> MediaRef:
        head = _DATA_URI.match(value[:128])
        if value[:8].lower().startswith(_SCHEMES) or (
                head and (self.kind == "file" or (head.group(1) or "").startswith(self.kind))):
            return MediaRef(self.kind, value)
        data_type = "<type>" if self.kind == "file" else f"{self.kind}/<type>"
        raise ValueError(f"must be an https:// or s3:// URL, or a data:{data_type};base64,<data> "
                         "URI")


Image = Annotated[PIL.Image.Image, _Media("image")]
Audio = Annotated[AudioBytes, _Media("audio")]
File = Annotated[bytes, _Media("file")]


async def resolve_media(data: BaseModel, job: JobContext, where: str, max_image_pixels: int
                        ) -> BaseModel:
    """``data`` with each media field (top-level, or a list of them) fetched and decoded."""
    for name in type(data).model_fields:
        value = getattr(data, name)
        if isinstance(value, MediaRef):
            setattr(data, name, await resolve_ref(value, job, f"{where}.{name}", max_image_pixels))
        elif isinstance(value, list) and any(isinstance(v, MediaRef) for v in value):
            setattr(data, name, list(await asyncio.gather(*(
                resolve_ref(v, job, f"{where}.{name}.{i}", max_image_pixels)
                if isinstance(v, MediaRef) else _same(v) for i, v in enumerate(value)))))
    return data


async def _same(value: Any) -> Any:
    return value


def media_ref(kind: str, value: Any, field: str) -> MediaRef:
    """``value`` checked as a reference to ``kind`` media (what an ``Image``, ``Audio`` or
    ``File`` field accepts), for code that reads media outside an input model; InputError
    naming ``field`` otherwise."""
    try:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return _Media(kind).check(value)
    except ValueError as exc:
        raise InputError(str(exc), field=field) from None


async def resolve_ref(ref: MediaRef, job: JobContext, field: str, max_image_pixels: int
                      ) -> Any:
    """The media ``ref`` points at, fetched (a data URI, or a URL under the download rules)
    and, for an image, decoded: a PIL image, ``AudioBytes`` or the file's bytes."""
    if ref.kind == "image":
        max_bytes = max_image_pixels * BYTES_PER_PIXEL + HEADER_ROOM
        limit = f"for an image of at most WORKER_MAX_IMAGE_PIXELS={max_image_pixels:,} pixels"
    else:
        max_bytes, limit = job.downloads.max_bytes, "DOWNLOAD_MAX_BYTES"
    head = _DATA_URI.match(ref.url[:128])
    if head is not None:
        raw = decode_data_uri(ref.url, head, field, max_bytes, limit)
    else:
        raw = await job.download(ref.url, field=field, max_bytes=max_bytes, limit=limit)
    if ref.kind == "image":
        # The structure first, then the header's size, then the pixels, in the decode pool,
        # dropped once the job has ended (serving/media.py: the one place images decode).
        return await decode_image(raw, ImageLimits(max_image_pixels), field=field,
                                  deadline=job.deadline, cancelled=job.cancelled)
    if ref.kind == "audio":
        guessed = mimetypes.guess_type(ref.url.split("?")[0])[0] if head is None else None
        return AudioBytes(raw, (head.group(1) if head else guessed) or "application/octet-stream")
    return raw


def decode_data_uri(uri: str, head: re.Match[str], field: str, max_bytes: int,
                    limit: str) -> bytes:
    """The bytes of a ``data:...;base64,`` URI, refused past ``max_bytes`` before decoding."""
    payload = uri[head.end():]
    if len(payload) > 4 * (max_bytes // 3) + 4:
        raise InputError(f"holds more than {max_bytes:,} bytes ({limit})", field=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("is not valid base64 after 'data:...;base64,'", field=field) from None

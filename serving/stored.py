"""What a stored object is and how it is named, for every storage backend.

This module owns the ``Link`` clients receive, the ``StoredObject`` a backend returns, object
keys (``<prefix>/<job id>/<filename>``, each part made safe) and their check, and the size and
sha256 of the bytes stored. ``storage.py`` (the forker's backends) and ``s3.py`` (the S3
client) both build on it; it does no I/O but reading a file to hash it, and never imports
boto3, torch or runpod.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from serving.errors import StorageError

CHUNK = 8 * 1024 * 1024                      # read size for hashing and copying files
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


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


def check_key(key: str) -> str:
    """``key`` itself, or StorageError if it is empty, absolute or has '', '.' or '..' parts."""
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageError(f"invalid object key {key!r}")
    return key


def digest(data: bytes | Path) -> tuple[int, str]:
    """Size and sha256 of ``data``; a file is read once, in chunks."""
    if isinstance(data, bytes | bytearray | memoryview):
        return len(data), hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    size = 0
    with open(data, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()

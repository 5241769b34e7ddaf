"""Where bytes go: an S3-compatible bucket, or a local directory for local runs.

This module is the forker's: the ``Storage`` interface every backend implements, the local
backend, ``store_output`` and the factory ``storage_from_settings`` that picks the worker's
storage at startup. Another backend is one class with ``kind``, ``key_for``, ``put`` and
``link``, and one line in the factory. The S3 client and its safety rules (checked uploads,
retries, time limits, reply budgets, the address rule for a job's ``s3Config``) are serving
internals: ``serving/s3.py``, ``serving/s3wire.py``, ``serving/s3config.py``; object keys and the
link object are ``serving/stored.py``. This module never imports torch or runpod, and never
decides *whether* an answer is stored (``serving/delivery.py`` does). boto3 loads with the
first ``S3Storage``: a worker without a bucket never imports it.

One call stores any file and gives back the link object clients receive::

    from storage import store_output
    link = store_output(storage, job["id"], png_bytes, "image/png", filename="cat.png")
    # {"url": "https://...", "key": "outputs/<job id>/cat.png", "bytes": 51234,
    #  "sha256": "9f86...", "content_type": "image/png", "expires_at": "2026-11-29T15:04:05Z"}

``data`` may be ``bytes`` or a ``pathlib.Path`` (large files stream from disk). A task is
handed its job's storage (the job's own ``s3Config`` wins over the worker's ``BUCKET_*``
settings). Calls block (network, disk): from async code run them in a thread.

Guarantees, for every backend here:

- Keys are ``<BUCKET_PREFIX>/<job id>/<filename>`` (``object_key``): a retried job overwrites,
  never duplicates. Give each file of one job its own filename (``image-0.png``,
  ``image-1.png``).
- A link is only made after the object is checked: its size and sha256. A failure is a
  ``StorageError`` whose message is safe to show and never holds a secret.
- An upload given its job's end (``within``) does not start, or stops, once the job has ended.
- ``LocalStorage`` links are ``file://`` URLs, valid only on the machine that ran the job, and
  carry ``expires_at: null``. Use it for local runs, never in production.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
from pathlib import Path
from typing import Protocol

from serving.config import StorageSettings
from serving.errors import StorageError
from serving.netguard import Deadline
from serving.s3 import S3Storage
from serving.stored import CHUNK, Link, StoredObject, check_key, digest, object_key, safe_filename

__all__ = ["Link", "LocalStorage", "Storage", "StoredObject", "object_key", "safe_filename",
           "storage_from_settings", "store_output"]


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
        target = self.root / check_key(key)
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
                            while chunk := src.read(CHUNK):
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
        target = self.root / check_key(key)
        meta = target.parent / f".{target.name}.meta"
        try:
            content_type, sha256 = meta.read_text().split("\n", 1)
            size, actual = digest(target)
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


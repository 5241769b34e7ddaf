"""One job as a task sees it: ``JobContext``, made by the worker for each job it answers.

Owns what a task can do with its job: its id, its deadline and cancel flag, its progress
reports, its safe downloads (``downloads.py``), and where its files go (``store``: delivery
makes each inline or a link). ``tasks.base`` re-exports it, the one import a forker uses.
Never imports boto3: the job's storage is handed in as a function that builds it on first use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from serving.config import DownloadSettings
from serving.delivery import Artefact
from serving.downloads import DownloadStop, download_bytes, run_download
from serving.errors import DownloadError, InputError, JobTimeout

if TYPE_CHECKING:
    from storage import Storage

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class JobContext:
    """One job as a task sees it. Made by the worker; a batch item gets its own (``for_item``)."""

    job_id: str
    deadline: float                                    # time.monotonic() when the job must end
    timeout_s: float                                   # the limit the deadline came from
    downloads: DownloadSettings
    storage: Callable[[], Storage | None]              # the job's s3Config, else the worker's
    progress: ProgressFn | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    own_storage: bool = False                          # the job sent s3Config (read any key)
    transfers: Executor | None = None                  # the worker's download pool

    def store(self, data: bytes, content_type: str, name: str) -> Artefact:
        """A file for the answer: put the result where the file belongs in the answer dict.

        Delivery makes it ``{"data": <base64>, "bytes", "sha256", "content_type"}`` when the
        answer fits inline, else uploads it as its own object (this content type, key
        ``<prefix>/<job id>/<name>``; a batch item's name gets its index, ``3-<name>``) and puts
        the link object there.
        """
        return Artefact(data, content_type, name)

    async def download(self, url: str, *, field: str, max_bytes: int | None = None,
                       limit: str = "DOWNLOAD_MAX_BYTES") -> bytes:
        """The bytes at an ``https://`` or ``s3://`` URL, fetched under the download rules
        (public addresses only, size and time limits; ``s3://`` from this job's storage).
        ``max_bytes`` lowers the size limit for this field; ``limit`` names it in the error.
        Raises DownloadError or InputError naming ``field``."""
        settings = self.downloads
        if max_bytes is not None and max_bytes < settings.max_bytes:
            settings = replace(settings, max_bytes=max_bytes)
        else:
            limit = "DOWNLOAD_MAX_BYTES"

        def fetch(stop: DownloadStop) -> bytes:
            storage = self.storage() if url.lower().startswith("s3://") else None
            return download_bytes(url, settings, storage=storage, job_storage=self.own_storage,
                                  until=self.deadline, stop=stop)

        if not isinstance(url, str) or "://" not in url:
            raise InputError("must be an https:// or s3:// URL", field=field)
        try:
            # Downloads wait on the network: never in the default pool, which delivers answers.
            # They end with the job (its deadline, a cancel), freeing their pool thread at once.
            return await run_download(self.transfers, fetch)
        except DownloadError as exc:
            raise DownloadError(f"{field}: {str(exc).replace('(DOWNLOAD_MAX_BYTES)', f'({limit})')}"
                                ) from None

    def report(self, progress: dict[str, Any]) -> None:
        """Send a progress update (shown by /status while the job runs); never fails the job."""
        if self.progress is not None:
            self.progress(progress)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise JobTimeout once the deadline has passed; call between steps of long work."""
        if self.remaining_s() <= 0:
            self.cancelled.set()
            raise JobTimeout(f"the job ran past {self.timeout_s:g}s (WORKER_JOB_TIMEOUT_S)")

    def for_item(self, index: int) -> JobContext:
        """The context of item ``index`` of a batch job: same job, no progress of its own."""
        return replace(self, progress=None)

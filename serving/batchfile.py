"""A batch job's temporary files: its ``batch_url`` items, read one at a time, and its answers,
spooled to disk as items finish once they are too large to hold.

A batch job can be far larger in memory than on the wire: parsed JSON takes tens of bytes per
small value, and an embedding is a few kilobytes of numbers per text. So neither the items nor
the answers of a batch are ever held whole:

- ``BatchFile``: the ``batch_url`` file is downloaded into a temporary file (the download rules
  of downloads.py), then checked one line at a time (``downloads.read_jsonl``: each line at most
  WORKER_MAX_INPUT_BYTES before it is parsed, UTF-8, JSON, not nested too deeply, valid
  Unicode: the checks inline input passes) and counted, parsing one line and dropping it before
  the next. A bad line fails the job before any item runs. The worker then reads the items one
  at a time, as each starts.
- ``BatchAnswers``: the items' answers are held in memory while their JSON is at most
  ``memory_bytes`` (BATCH_ANSWER_MEMORY_BYTES); once over, every held answer and each later one
  is written to a temporary file as it finishes (in whatever order items finish, each with its
  offset), so memory holds at most that much plus the answers of the items in flight. The
  answer as a whole is delivered from a JSON Lines file written in item order. Past
  ``max_bytes`` (BATCH_MAX_ANSWER_BYTES) the job fails with PayloadTooLarge naming the setting.

Every file is a temporary file in ``spool_dir`` (BATCH_SPOOL_DIR; default the system's), unnamed
where the system allows it, so a killed worker leaves nothing behind; the one that is uploaded
has a name only while it exists. ``close`` removes them: the worker calls it when the job ends,
however it ends (answered, failed, timed out, cancelled), also while a thread still reads or
writes them (that thread's next read or write then fails; the job has ended).

Everything here blocks (disk, and the uploads a spooled answer's files need): from async code
call it in a thread. Never imports torch or runpod.
"""

from __future__ import annotations

import json
import tempfile
import threading
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from serving.config import DownloadSettings
from serving.delivery import inline_size, serialise_answer
from serving.downloads import DownloadStop, download_to, read_jsonl
from serving.errors import InputError, PayloadTooLarge
from serving.netguard import AddressPolicy

if TYPE_CHECKING:
    from storage import Storage

Result = dict[str, Any]


class BatchFile:
    """The items of a ``batch_url``: downloaded to a temporary file, checked, read one by one."""

    def __init__(self, spool_dir: str | None = None) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
            dir=spool_dir, prefix="batch-items-")
        self._items: Iterator[Any] = iter(())
        self.total = 0

    def fetch(self, url: str, settings: DownloadSettings, *, field: str,
              max_item_bytes: int | None, storage: Storage | None = None,
              job_storage: bool = False, allow_address: AddressPolicy | None = None,
              until: float | None = None, stop: DownloadStop | None = None) -> int:
        """Download ``url`` and check every line; returns the number of items. The download
        ends at ``until`` (the job's deadline) or when ``stop`` is set (the job ended).

        DownloadError for the fetch; InputError naming ``field`` and the line for content, or
        for a file with no items; PayloadTooLarge for a line over ``max_item_bytes`` or more
        than ``settings.max_items`` items (BATCH_MAX_ITEMS).
        """
        download_to(url, self._file, settings, storage=storage, job_storage=job_storage,
                    allow_address=allow_address, until=until, stop=stop)

        def lines() -> Iterator[Any]:
            self._file.seek(0)
            return read_jsonl(self._file, max_items=settings.max_items, field=field,
                              max_item_bytes=max_item_bytes)

        total = sum(1 for _ in lines())       # one parsed line at a time, each dropped
        if not total:
            raise InputError("holds no items", field=field)
        self.total = total
        self._items = lines()
        return total

    def next_item(self) -> Any:
        """The next item, in file order (the file is already checked: this only parses)."""
        return next(self._items)

    def close(self) -> None:
        """Remove the file (a read in another thread then fails)."""
        self._file.close()

    def __enter__(self) -> BatchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchAnswers:
    """The answers of one batch job's ``total`` items: in memory while small, else on disk.

    ``add`` is called once per item, as it finishes, one call at a time; ``prepare`` turns an
    answer that is about to be spooled into what the file holds (the worker uploads its files
    as links there: a spooled answer is never sent inline with them).
    """

    def __init__(self, total: int, *, memory_bytes: int, max_bytes: int,
                 spool_dir: str | None = None,
                 prepare: Callable[[Result], Result] = lambda result: result) -> None:
        self.total = total
        self.memory_bytes = memory_bytes
        self.max_bytes = max_bytes
        self.failed = 0
        self.usage: dict[str, int] = {}
        self.spooled_bytes = 0               # compact JSON Lines bytes written so far
        self._spool_dir = spool_dir
        self._prepare = prepare
        self._held: dict[int, Result] = {}
        self._held_bytes = 0                 # JSON bytes of the held answers, as posted
        self._done = 0
        self._spool: IO[bytes] | None = None
        self._ordered: IO[bytes] | None = None
        self._offsets = array("q")
        self._lengths = array("q")
        self._lock = threading.Lock()        # the files against ``close`` from another thread
        self._closed = False

    @property
    def spooled(self) -> bool:
        """True once the answers are on disk rather than in memory."""
        return self._spool is not None

    def add(self, index: int, result: Result) -> None:
        """Keep item ``index``'s answer. PayloadTooLarge once the answers are over
        ``max_bytes``; StorageError when ``prepare`` fails to upload a file."""
        self._done += 1
        if "error" in result:
            self.failed += 1
        _add_usage(self.usage, result)
        if self._spool is None:
            self._held_bytes += inline_size(result)
            self._check_total(self._held_bytes)
            self._held[index] = result
            if self._held_bytes <= self.memory_bytes:
                return
            held, self._held, self._held_bytes = self._held, {}, 0
            self._open_spool()
            for number in sorted(held):
                self._write(number, held.pop(number))
        else:
            self._write(index, result)

    def results(self) -> list[Result]:
        """Every answer, in item order, in memory: for an answer small enough to send inline."""
        if self._spool is None:
            return [self._held[index] for index in range(self.total)]
        return [json.loads(line) for line in self._lines_in_order()]

    def write_ordered(self) -> Path:
        """The answers as a JSON Lines file in item order (one compact JSON answer a line),
        named until ``close``: what is uploaded when the answer goes out as a link."""
        if self._spool is None:
            raise RuntimeError("write_ordered is for spooled answers; use results()")
        with self._lock:
            self._check_open()
            self._ordered = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by close()
                dir=self._spool_dir, prefix="batch-answer-", suffix=".jsonl")
        for line in self._lines_in_order():
            with self._lock:
                self._check_open()
                self._ordered.write(line)
        with self._lock:
            self._check_open()
            self._ordered.flush()
            return Path(self._ordered.name)

    def close(self) -> None:
        """Remove every file and drop the held answers; a write in another thread then fails."""
        with self._lock:
            self._closed = True
            for file in (self._spool, self._ordered):
                if file is not None:
                    file.close()
            self._held = {}

    def __enter__(self) -> BatchAnswers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    def _check_total(self, size: int) -> None:
        if size > self.max_bytes:
            raise PayloadTooLarge(
                f"the batch's answer grew past {self.max_bytes:,} bytes of JSON after "
                f"{self._done:,} of {self.total:,} items (BATCH_MAX_ANSWER_BYTES); send fewer "
                "items per job, or ask less of each (fewer texts, smaller dimensions, fewer "
                "tokens)")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the batch job has ended; its files are gone")

    def _open_spool(self) -> None:
        with self._lock:
            self._check_open()
            self._spool = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
                dir=self._spool_dir, prefix="batch-answers-")
        self._offsets = array("q", [-1]) * self.total
        self._lengths = array("q", [0]) * self.total

    def _write(self, index: int, result: Result) -> None:
        line = serialise_answer(self._prepare(result)) + b"\n"
        del result
        self._check_total(self.spooled_bytes + len(line))
        with self._lock:
            self._check_open()
            assert self._spool is not None
            self._spool.seek(self.spooled_bytes)
            self._spool.write(line)
        self._offsets[index] = self.spooled_bytes
        self._lengths[index] = len(line)
        self.spooled_bytes += len(line)

    def _lines_in_order(self) -> Iterator[bytes]:
        for index in range(self.total):
            with self._lock:
                self._check_open()
                assert self._spool is not None
                self._spool.seek(self._offsets[index])
                line = self._spool.read(self._lengths[index])
            yield line


def _add_usage(total: dict[str, int], result: Result) -> None:
    """Add each numeric ``usage`` field of one item's answer to the batch's ``total``."""
    usage = result.get("usage")
    if isinstance(usage, dict):
        for key, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value

"""Watching a batch job's temporary files and memory from a test.

``spool_files`` lists what a spool directory holds, unnamed temporary files included (they exist
only as files this process holds open). ``WatchedStorage`` is the real local storage that, as
each upload starts, notes tracemalloc's peak so far (what the job held before its answer went
out) and the spool directory's files (what existed while the job ran).
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

from serving.netguard import Deadline
from storage import LocalStorage, StoredObject


def spool_files(directory: Path) -> list[str]:
    """The files in ``directory`` and those there this process holds open (Linux /proc), each
    once: an unnamed temporary file is only an open one."""
    present = {str(path) for path in directory.iterdir()}
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:          # closed since it was listed
            continue
        if target.startswith(f"{directory}/"):
            held.add(target)
    return sorted(present | held)


class WatchedStorage(LocalStorage):
    """Local storage under ``root`` that notes, as each upload starts, the traced memory peak
    and the files of ``spool`` (when given)."""

    def __init__(self, root: Path, spool: Path | None = None) -> None:
        super().__init__(root)
        self.spool = spool
        self.peaks: list[int] = []
        self.spool_seen: list[list[str]] = []

    def put(self, key: str, data: bytes | Path, content_type: str,
            within: Deadline | None = None) -> StoredObject:
        if tracemalloc.is_tracing():
            self.peaks.append(tracemalloc.get_traced_memory()[1])
        if self.spool is not None:
            self.spool_seen.append(spool_files(self.spool))
        return super().put(key, data, content_type, within=within)

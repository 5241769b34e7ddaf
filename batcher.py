"""Micro-batching: work from many concurrent jobs run together in one forward pass.

Owns the queue between the asyncio side (jobs) and the engine thread (the device). The first
item to arrive waits up to ``wait_ms`` for others; up to ``max_batch_size`` run together. One
batch runs at a time on one dedicated thread, so the event loop stays free for job intake,
cancel signals and the heartbeat. Every job's future is completed; a failing batch fails only its
own jobs, and out of memory splits the batch and retries the halves.

It knows items only through two small protocols: an ``Engine`` with ``run(items)`` that writes
results into the items (``engine.Engine`` decodes ``engine.Sequence``s; ``tasks/embed.py``'s
engine embeds texts), and an ``Item`` with a ``cancelled`` event and ``reset_for_retry()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from errors import OutOfMemory
from model_loader import is_out_of_memory, release_memory

log = logging.getLogger("worker.batcher")


class Item(Protocol):
    """One unit of batched work: a sequence to decode, a text to embed."""

    cancelled: threading.Event

    def reset_for_retry(self) -> bool:
        """Forget partial results before a retry; False if it cannot be retried (it streamed)."""
        ...


class BatchEngine(Protocol):
    def run(self, items: list[Any]) -> None:
        """Run one batch on the device (engine thread); results are written into the items."""
        ...


@dataclass(eq=False)
class _Entry:
    seq: Item
    done: asyncio.Future[None]
    arrived: float


class Batcher:
    """Gathers items from concurrent jobs into batches for one engine."""

    def __init__(self, engine: BatchEngine, max_batch_size: int, wait_ms: int) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self._pending: list[_Entry] = []
        self._arrival: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.batches_run = 0            # counters for tests and benchmarks
        self.largest_batch = 0
        self.running = 0                # items on the device right now

    async def submit(self, seq: Item) -> None:
        """Run ``seq`` with whatever else is in flight; returns when it has finished.

        Cancelling the awaiting task (RunPod's cancel) sets ``seq.cancelled``: a sequence stops
        at its next token, an item not yet on the device is skipped.
        """
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done() or self._runner.get_loop() is not loop:
            self._arrival = asyncio.Event()
            self._runner = loop.create_task(self._run_forever(), name="batcher")
        entry = _Entry(seq, loop.create_future(), time.monotonic())
        self._pending.append(entry)
        assert self._arrival is not None
        self._arrival.set()
        try:
            await asyncio.shield(entry.done)
        except asyncio.CancelledError:
            seq.cancelled.set()
            raise

    async def _run_forever(self) -> None:
        assert self._arrival is not None
        while True:
            await self._arrival.wait()
            self._arrival.clear()
            if not self._pending:
                continue
            # Wait for batch-mates: until the batch is full or the first one waited wait_s.
            deadline = self._pending[0].arrived + self.wait_s
            while len(self._pending) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                    self._arrival.clear()
                except TimeoutError:
                    break
            batch = self._pending[: self.max_batch_size]
            del self._pending[: len(batch)]
            if self._pending:
                self._arrival.set()
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        self.running = len(batch)
        try:
            await loop.run_in_executor(self._device, self.engine.run, [e.seq for e in batch])
        except Exception as exc:  # noqa: BLE001 - every job's future must be completed
            if is_out_of_memory(exc):
                await loop.run_in_executor(self._device, release_memory)
                await self._after_oom(batch)
                return
            log.exception("batch of %d failed", len(batch))
            for e in batch:
                if not e.done.done():
                    e.done.set_exception(exc)
            return
        finally:
            self.running = 0
        for e in batch:
            if not e.done.done():
                e.done.set_result(None)

    async def _after_oom(self, batch: list[_Entry]) -> None:
        """Retry in halves; an item that already streamed, or runs alone, fails."""
        retry = []
        for e in batch:
            if len(batch) == 1 or not e.seq.reset_for_retry():
                e.done.set_exception(OutOfMemory(
                    "the device ran out of memory for this job; send a shorter input or "
                    "ask for less output (memory was released; the worker keeps serving)"))
            else:
                retry.append(e)
        if retry:
            log.warning("out of memory on a batch of %d; retrying as %d and %d", len(batch),
                        len(retry) // 2 + len(retry) % 2, len(retry) // 2)
        half = (len(retry) + 1) // 2
        for part in (retry[:half], retry[half:]):
            if part:
                await self._run_batch(part)

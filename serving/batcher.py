"""Micro-batching: work from many concurrent jobs run together in one forward pass.

Owns the queue between the asyncio side (jobs) and the engine thread (the device). When the
device is idle, the first sequence to arrive waits up to ``wait_ms`` for others; while a batch
decodes, new arrivals join it between steps (continuous batching), up to ``max_batch_size``
rows. One dedicated thread runs the device, so the event loop stays free for job intake, cancel
signals and the heartbeat. Each job is answered as soon as its own sequence finishes.

A failure is charged to the item that causes it, never to its batch-mates: out of memory halves
the batch and retries; any other failure (not a device fault) retries every item of the batch
alone, each in a batch of its own, so only an item that still fails alone fails. A retried
sequence resumes from the tokens it has (``engine.Sequence.reset_for_retry``). A device fault
fails everything and marks the worker for replacement. Whatever goes wrong, even in this
module's own handling of a failure, every job the batcher holds is answered and it serves on.

It knows its work only through two small protocols. An engine's ``run(items, admit, max_rows)``
writes results into the items; an engine with ``continuous = True`` (``engine.Engine``, which
decodes ``engine.Sequence``s) calls ``admit`` between steps to take in new arrivals and each
item's ``on_done`` as it finishes; any other engine (``runner.PredictEngine``, which runs a
task's ``predict_batch``) runs the batch it was given. An
item has a ``cancelled`` event, an ``on_done`` callback slot and ``reset_for_retry()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from serving.device import DEVICE_THREAD, is_device_fault, is_out_of_memory, release_memory
from serving.errors import DeviceFault, OutOfMemory

log = logging.getLogger("worker.batcher")


class Item(Protocol):
    """One unit of batched work: a sequence to decode, a text to embed."""

    cancelled: threading.Event
    on_done: Callable[[], None] | None

    def reset_for_retry(self) -> bool:
        """Get ready to run again after its batch failed; False if it cannot be retried."""
        ...


class BatchEngine(Protocol):
    def run(self, items: list[Any], /) -> None:
        """Run items on the device (engine thread); results are written into the items. An
        engine with ``continuous = True`` also takes ``admit`` and ``max_rows`` (engine.Engine)."""
        ...


@dataclass(eq=False)
class _Entry:
    seq: Item
    done: asyncio.Future[None]
    arrived: float
    alone: bool = False         # retried in a batch of its own after its batch failed


class Batcher:
    """Gathers items from concurrent jobs into batches for one engine."""

    def __init__(self, engine: BatchEngine, max_batch_size: int, wait_ms: int) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self._capacity = max_batch_size         # lowered after out of memory, until a success
        self._lock = threading.Lock()           # guards _queue and _in_flight (two threads)
        self._queue: deque[_Entry] = deque()
        self._in_flight: list[_Entry] = []
        self._arrival: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._device = DEVICE_THREAD        # the one thread that runs torch (model_loader)
        self.batches_run = 0            # counters for tests and benchmarks
        self.largest_batch = 0
        self.oom_retries = 0            # batches split after running out of memory
        self.isolated = 0               # items retried alone after their batch failed
        self.device_fault: str | None = None   # set once the device is unusable
        self._solo = False              # the device runs one isolated item: admit no others

    @property
    def running(self) -> int:
        """Items on the device right now."""
        with self._lock:
            return len(self._in_flight)

    async def submit(self, seq: Item) -> None:
        """Run ``seq`` with whatever else is in flight; returns when it has finished.

        Cancelling the awaiting task (RunPod's cancel) sets ``seq.cancelled``: a sequence stops
        at its next token, an item not yet on the device is skipped.
        """
        if self.device_fault is not None:
            raise DeviceFault(self.device_fault)
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done() or self._runner.get_loop() is not loop:
            self._arrival = asyncio.Event()
            self._runner = loop.create_task(self._run_forever(), name="batcher")
        entry = _Entry(seq, loop.create_future(), time.monotonic())

        def done() -> None:
            loop.call_soon_threadsafe(self._resolve, entry, None)

        seq.on_done = done
        with self._lock:
            self._queue.append(entry)
        assert self._arrival is not None
        self._arrival.set()
        try:
            await asyncio.shield(entry.done)
        except asyncio.CancelledError:
            seq.cancelled.set()
            raise

    def _resolve(self, entry: _Entry, error: BaseException | None) -> None:
        """Complete a job's future (on the event loop) and forget the entry."""
        with self._lock:
            if entry in self._in_flight:
                self._in_flight.remove(entry)
        if entry.done.done():
            return
        if error is None:
            entry.done.set_result(None)
        else:
            entry.done.set_exception(error)

    def _take(self, n: int) -> list[_Entry]:
        """Up to ``n`` entries from the head of the queue, in order.

        An item to be retried alone is taken only onto an idle device, and by itself; until
        then nothing behind it is taken either (first come, first served), so the running
        batch drains and the isolated item cannot starve under load.
        """
        with self._lock:
            taken: list[_Entry] = []
            if self._queue and self._queue[0].alone:
                if not self._in_flight and n > 0:
                    taken.append(self._queue.popleft())
            else:
                while self._queue and len(taken) < n and not self._queue[0].alone:
                    taken.append(self._queue.popleft())
            self._in_flight.extend(taken)
            self.largest_batch = max(self.largest_batch, len(self._in_flight))
        return taken

    def _admit(self, free: int) -> list[Any]:
        """Called by the engine between steps (engine thread): arrivals that may join."""
        if self._solo:
            return []
        return [e.seq for e in self._take(min(free, self._capacity))]

    async def _run_forever(self) -> None:
        assert self._arrival is not None
        while True:
            await self._arrival.wait()
            self._arrival.clear()
            try:
                await self._serve()
            except Exception as exc:  # noqa: BLE001 - the batcher must outlive any failure
                log.exception("the batcher failed; failing the jobs it held and serving on")
                with self._lock:
                    held, self._in_flight = list(self._in_flight), []
                for e in held:
                    self._resolve(e, exc)
                if self._queue:
                    self._arrival.set()
            finally:
                self._solo = False

    async def _serve(self) -> None:
        """Run one batch when there is work: gather batch-mates, then decode."""
        assert self._arrival is not None
        if not self._queue:
            return
        # The device is idle: give batch-mates until the batch is full or wait_s passed.
        deadline = self._queue[0].arrived + self.wait_s
        while len(self._queue) < self._capacity and not self._queue[0].alone:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
                self._arrival.clear()
            except TimeoutError:
                break
        batch = self._take(self._capacity)
        if not batch:
            return
        self._solo = batch[0].alone
        await self._run_batch(batch)

    async def _run_batch(self, first: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        self.batches_run += 1
        continuous = getattr(self.engine, "continuous", False)
        try:
            if continuous:
                run_continuous: Callable[..., None] = self.engine.run
                await loop.run_in_executor(self._device, run_continuous,
                                           [e.seq for e in first], self._admit, self._capacity)
            else:
                await loop.run_in_executor(self._device, self.engine.run, [e.seq for e in first])
        except Exception as exc:  # noqa: BLE001 - every job's future must be completed
            with self._lock:
                failed, self._in_flight = list(self._in_flight), []
            try:
                await self._after_failure(exc, failed)
            except Exception:  # noqa: BLE001 - handling the failure failed: answer every job
                log.exception("handling a failed batch of %d failed; failing its jobs",
                              len(failed))
                with self._lock:
                    for e in failed:
                        if e in self._queue:
                            self._queue.remove(e)
                for e in failed:
                    self._resolve(e, exc)
        else:
            self._capacity = self.max_batch_size
            with self._lock:
                finished, self._in_flight = list(self._in_flight), []
            for e in finished:          # an engine that does not call on_done
                self._resolve(e, None)
        if self._queue:
            assert self._arrival is not None
            self._arrival.set()

    async def _after_failure(self, exc: Exception, failed: list[_Entry]) -> None:
        """Answer or retry every entry of a batch that raised ``exc``."""
        loop = asyncio.get_running_loop()
        if is_out_of_memory(exc):
            try:
                await loop.run_in_executor(self._device, release_memory)
            except Exception as release_exc:  # noqa: BLE001 - the jobs still need answers
                if is_device_fault(release_exc):
                    self._fail_device(release_exc, failed)
                    return
                log.warning("releasing memory after running out of it failed: %s",
                            release_exc, exc_info=release_exc)
            self._after_oom(failed)
        elif is_device_fault(exc):
            self._fail_device(exc, failed)
        else:
            self._isolate(exc, failed)

    def _fail_device(self, exc: BaseException, failed: list[_Entry]) -> None:
        """Every later job would fail the same way: fail them all and ask for a new worker
        (handler.py sets refresh_worker) instead of failing jobs forever."""
        log.error("device fault, this worker must be replaced: %s", exc)
        self.device_fault = ("the GPU of this worker failed and it is being replaced; "
                             "send the job again")
        with self._lock:
            failed = failed + list(self._queue)
            self._queue.clear()
        for e in failed:
            self._resolve(e, DeviceFault(self.device_fault))

    def _isolate(self, exc: Exception, failed: list[_Entry]) -> None:
        """Retry each item of a failed batch alone; an item that failed alone fails."""
        pending = [e for e in failed if not e.done.done()]
        if len(pending) <= 1 or any(e.alone for e in pending):
            log.error("a batch item failed on its own", exc_info=exc)
            for e in pending:
                self._resolve(e, exc)
            return
        retry = []
        for e in pending:
            if e.seq.reset_for_retry():
                e.alone = True
                retry.append(e)
            else:
                self._resolve(e, exc)
        self.isolated += len(retry)
        log.warning("a batch of %d failed (%s); retrying each item alone to find the one that "
                    "fails", len(pending), type(exc).__name__)
        with self._lock:
            self._queue.extendleft(reversed(retry))

    def _after_oom(self, batch: list[_Entry]) -> None:
        """Retry with half the rows; an item that cannot be retried, or ran alone, fails."""
        retry = []
        for e in batch:
            if e.done.done():
                continue
            if len(batch) == 1 or not e.seq.reset_for_retry():
                self._resolve(e, OutOfMemory(
                    "the device ran out of memory for this job; send a shorter input or "
                    "ask for less output (memory was released; the worker keeps serving)"))
            else:
                retry.append(e)
        self._capacity = max(1, len(batch) // 2)
        if retry:
            self.oom_retries += 1
            log.warning("out of memory on a batch of %d; retrying %d at most %d at a time",
                        len(batch), len(retry), self._capacity)
        with self._lock:
            self._queue.extendleft(reversed(retry))

"""Job → task → answer: the wiring between RunPod's job and the model, without the SDK loop.

Owns what happens to one job: the input checks every job passes, the choice of streamed, whole or
batch answer, size-aware delivery (inline, or a link through storage), and the conversion of
every failure into an ``{"error": ...}`` answer (through ``errors.error_response``, the one
place that builds one). Never imports boto3 or runpod, so it is tested in-process;
``handler.py`` builds one ``Worker`` at import and hands it RunPod's jobs.

Every job is answered by an async generator (RunPod streams only from generator handlers): a
streamed job yields its chunks, any other job yields exactly one item, its answer. With
``return_aggregate_stream`` the job's final output is the list of what was yielded.

Fields every job may carry beside the task's own::

    output_mode   "auto" (default): inline up to OUTPUT_INLINE_LIMIT_BYTES, else a link;
                  "inline": never a link (fails when too large); "link": always a link
    batch         a list of task inputs, answered in order in "results"
    batch_url     https:// or s3:// URL of a JSON Lines file of task inputs (for large batches)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model_loader import LoadedModel, load_task
from serving.config import DownloadSettings, ModelSettings, StorageSettings, WorkerSettings
from serving.delivery import (
    check_output_mode,
    deliver_files,
    deliver_output,
    inline_size,
    measure_answer,
)
from serving.downloads import load_jsonl_url
from serving.errors import InputError, JobTimeout, PayloadTooLarge, WorkerError, error_response
from serving.netguard import Deadline
from serving.runner import rename_files
from serving.validation import check_job_input
from storage import Storage, storage_for_job, storage_from_settings
from tasks import TASKS, JobContext, Task

if TYPE_CHECKING:
    from serving.openai_compat import OpenAIRoutes

log = logging.getLogger("worker")

ProgressFn = Callable[[dict[str, Any], Any], None]   # (job, progress) -> None; RunPod's shape
PROGRESS_INTERVAL_S = 1.0                            # at most one progress update a second


def configure_logging(level: int = logging.INFO) -> None:
    """Our own log lines, one per event, to stderr; independent of the SDK's logger."""
    root = logging.getLogger("worker")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


@dataclass
class Worker:
    """A loaded model and its task, ready to answer jobs."""

    settings: WorkerSettings
    storage_settings: StorageSettings
    download_settings: DownloadSettings
    storage: Storage | None          # the worker's own storage; a job's s3Config overrides it
    task: Task
    openai: OpenAIRoutes | None = None   # made by the first OpenAI job: openai_compat loads then
    # Downloads and uploads wait on the network, up to their time limits: each kind has its own
    # pool, one thread per job in flight, so they never hold the default pool's threads, which
    # every inline answer needs to be delivered.
    downloads: ThreadPoolExecutor = field(init=False, repr=False)
    uploads: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.downloads = ThreadPoolExecutor(self.settings.concurrency, "download")
        self.uploads = ThreadPoolExecutor(self.settings.concurrency, "upload")

    @property
    def loaded(self) -> LoadedModel:
        return self.task.loaded

    async def handle(self, job: Any, progress: ProgressFn | None = None
                     ) -> AsyncIterator[dict[str, Any] | str]:
        """Answer one RunPod job: yields stream chunks, or one answer, or one error answer.

        The whole job (tokenizing, every batch item, delivery) ends at WORKER_JOB_TIMEOUT_S:
        what it awaits then is cancelled (its sequences leave the device) and it answers
        JobTimeout. The limit is checked while the job works, not while a chunk is delivered.
        """
        answers = self._handle(job, progress)
        deadline = asyncio.get_running_loop().time() + self.settings.job_timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await anext(answers)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    timeout = JobTimeout(
                        f"the job ran past {self.settings.job_timeout_s:g}s "
                        "(WORKER_JOB_TIMEOUT_S); send less work per job (fewer items, texts or "
                        "max_new_tokens)")
                    log.info("job %s failed: %s", job.get("id") if isinstance(job, dict)
                             else "job", timeout)
                    yield dict(error_response(timeout, openai=is_openai_job(job)))
                    return
                yield item
        finally:
            await answers.aclose()

    async def _handle(self, job: Any, progress: ProgressFn | None
                      ) -> AsyncIterator[dict[str, Any] | str]:
        job_id = str(job.get("id", "job")) if isinstance(job, dict) else "job"
        openai = is_openai_job(job)
        try:
            if isinstance(job, Mapping) and "output_mode" in job:
                raise InputError("belongs inside the input: send {\"input\": {..., "
                                 "\"output_mode\": ...}}", field="output_mode")
            job_input = dict(check_job_input(job, self.settings.max_input_bytes))
            if openai:  # RunPod's OpenAI-compatible routes (openai_compat.py)
                async for item in self._openai_routes().handle(job_input):
                    # OpenAI clients cannot follow a link: too large fails, never half-delivers.
                    size = measure_answer(item)
                    if size > self.storage_settings.inline_limit_bytes:
                        raise PayloadTooLarge(
                            f"the answer is {size:,} bytes, over the inline limit of "
                            f"{self.storage_settings.inline_limit_bytes:,} bytes "
                            "(OUTPUT_INLINE_LIMIT_BYTES); send fewer inputs per request, or "
                            "use the worker's own input format with output_mode 'link'")
                    yield item
                return
            mode = check_output_mode(job_input.pop("output_mode", None))
            context = self._context(job, job_id, progress)
            if "batch" in job_input or "batch_url" in job_input:
                answer = await self._batch(job, job_input, context)
                yield await self._delivered(self._deliver_batch, answer, job, mode,
                                            context.deadline)
                return
            request = self.task.parse(job_input)
            if getattr(request, "stream", False):
                if mode == "link":
                    raise InputError("'link' cannot be used with stream; streamed chunks are "
                                     "always small and sent inline", field="input.output_mode")
                async for chunk in self.task.stream(request, context):
                    yield chunk
                return
            answer = await self.task.answer(request, context)
            # An object, or a list where a task answers in the Hugging Face API's shape.
            answer = answer if isinstance(answer, list) else dict(answer)
            yield await self._delivered(self._deliver, answer, job, mode, context.deadline)
        except Exception as exc:  # noqa: BLE001 - the job boundary: every failure is answered
            answer = error_response(exc, openai=openai)
            if answer["error_code"] == "internal":
                log.exception("job %s failed unexpectedly", job_id)
            else:
                log.info("job %s failed: %s", job_id, answer["error"])
            yield dict(answer)

    def _openai_routes(self) -> OpenAIRoutes:
        if self.openai is None:
            from serving.openai_compat import OpenAIRoutes
            self.openai = OpenAIRoutes(self.task, self.loaded.served_name)
        return self.openai

    def _context(self, job: Any, job_id: str, progress: ProgressFn | None) -> JobContext:
        """What the task knows of this job (tasks/base.py)."""
        def report(value: dict[str, Any]) -> None:
            if progress is None:
                return
            try:
                progress(dict(job), value)
            except Exception:  # noqa: BLE001 - a lost progress update never fails a job
                log.warning("progress update for job %s failed", job_id, exc_info=True)

        return JobContext(
            job_id=job_id,
            deadline=time.monotonic() + self.settings.job_timeout_s,
            timeout_s=self.settings.job_timeout_s,
            downloads=self.download_settings,
            storage=lambda: self._storage_for(job),
            progress=report,
            own_storage=isinstance(job, Mapping) and job.get("s3Config") is not None,
            transfers=self.downloads)

    @property
    def needs_refresh(self) -> bool:
        """True once the device is unusable: RunPod should replace this worker."""
        return self.task.device_fault is not None

    def concurrency(self, current: int = 1) -> int:
        """RunPod's concurrency_modifier: a constant (a change stops intake until jobs drain)."""
        return self.settings.concurrency

    # ------------------------------------------------------------------------------------------
    # Delivery: blocking (uploads), so called in a thread
    # ------------------------------------------------------------------------------------------
    async def _delivered(self, deliver: Callable[[Any, Mapping[str, Any], str, Deadline | None],
                                                 Any],
                         answer: Any, job: Mapping[str, Any], mode: str, end: float) -> Any:
        """``deliver(answer, job, mode, within)`` in a thread: of the upload pool when it
        uploads, else of the default pool, where no upload can keep it waiting.

        The uploads end with the job: at its deadline ``end`` (``time.monotonic()``), or at once
        when the job times out or is cancelled; their connections are shut and the upload
        thread is free for the next job.
        """
        loop = asyncio.get_running_loop()
        if not await asyncio.to_thread(self._uploads, answer, mode):
            return await loop.run_in_executor(None, deliver, answer, job, mode, None)
        with Deadline.until(end) as within:
            try:
                return await loop.run_in_executor(self.uploads, deliver, answer, job, mode,
                                                  within)
            except BaseException:   # the job timed out or was cancelled: so do its uploads
                within.expire()
                raise

    def _uploads(self, answer: Any, mode: str) -> bool:
        """Whether delivering ``answer`` in ``mode`` uploads it (measuring it is CPU work)."""
        return mode == "link" or (mode == "auto" and inline_size(answer)
                                  > self.storage_settings.inline_limit_bytes)

    def _storage_for(self, job: Mapping[str, Any]) -> Storage | None:
        return storage_for_job(job, self.storage_settings, self.storage,
                               allow_private=self.download_settings.allow_private)

    def _deliver(self, answer: Any, job: Mapping[str, Any], mode: str,
                 within: Deadline | None) -> Any:
        # The storage is built only when something is uploaded (a job's s3Config builds a client).
        return deliver_output(answer, job_id=str(job["id"]), storage=lambda: self._storage_for(job),
                              inline_limit_bytes=self.storage_settings.inline_limit_bytes,
                              mode=mode, within=within)

    def _deliver_batch(self, answer: dict[str, Any], job: Mapping[str, Any], mode: str,
                       within: Deadline | None) -> Any:
        """A batch answer too large to send inline goes out with its results as JSON Lines."""
        limit = self.storage_settings.inline_limit_bytes
        answer, mode = deliver_files(answer, job_id=str(job["id"]),
                                     storage=lambda: self._storage_for(job),
                                     inline_limit_bytes=limit, mode=mode,  # type: ignore[arg-type]
                                     within=within)
        if mode == "inline" or (mode == "auto" and measure_answer(answer) <= limit):
            return self._deliver(answer, job, mode, within)
        link = deliver_output(answer["results"], job_id=str(job["id"]),
                              storage=lambda: self._storage_for(job), inline_limit_bytes=limit,
                              mode="link", within=within)
        return {**link, "count": len(answer["results"]), "usage": answer["usage"],
                "model": answer["model"]}

    # ------------------------------------------------------------------------------------------
    # Batch jobs: many task inputs, answered in order, per-item errors
    # ------------------------------------------------------------------------------------------
    async def _batch(self, job: Mapping[str, Any], job_input: dict[str, Any],
                     context: JobContext) -> dict[str, Any]:
        items = await self._batch_items(job, job_input)
        total, done = len(items), 0
        last_report = time.monotonic()
        # At most half the decode rows in flight, so one large batch job leaves room for others.
        gate = asyncio.Semaphore(max(1, self.settings.max_batch_size // 2))

        async def run_item(index: int, item: Any) -> dict[str, Any]:
            nonlocal done, last_report
            async with gate:
                try:
                    if not isinstance(item, dict):
                        raise InputError("must be a JSON object", field=f"input.batch.{index}")
                    request = self.task.parse(item, where=f"input.batch.{index}")
                    if getattr(request, "stream", False):
                        raise InputError("stream is not available for batch items",
                                         field=f"input.batch.{index}.stream")
                    answer = await self.task.answer(request, context.for_item(index))
                    answer = {"result": answer} if isinstance(answer, list) else dict(answer)
                    # Each item's files get its index, so two items' image.png differ.
                    result: dict[str, Any] = rename_files(answer, f"{index}-")
                except Exception as exc:  # noqa: BLE001 - one item's failure is its own answer
                    if not isinstance(exc, WorkerError):
                        log.exception("batch item %d of job %s failed", index, job.get("id"))
                    result = {**error_response(exc), "index": index}
            done += 1
            if done < total and time.monotonic() - last_report >= PROGRESS_INTERVAL_S:
                last_report = time.monotonic()
                context.report({"done": done, "total": total})
            return result

        results = await asyncio.gather(*(run_item(i, item) for i, item in enumerate(items)))
        failed = sum(1 for r in results if "error" in r)
        return {"results": list(results), "failed": failed, "usage": sum_usage(results),
                "model": self.loaded.served_name}

    async def _batch_items(self, job: Mapping[str, Any], job_input: dict[str, Any]) -> list[Any]:
        extra = sorted(set(job_input) - {"batch", "batch_url"})
        if extra:
            raise InputError(f"unknown field beside a batch: {', '.join(extra)}; put task fields "
                             "in each batch item", field=f"input.{extra[0]}")
        if "batch" in job_input and "batch_url" in job_input:
            raise InputError("send exactly one of 'batch' and 'batch_url'", field="input")
        limit = self.download_settings.max_items
        if "batch" in job_input:
            items = job_input["batch"]
            if not isinstance(items, list) or not items:
                raise InputError("must be a non-empty list of task inputs", field="input.batch")
        else:
            url = job_input["batch_url"]
            if not isinstance(url, str):
                raise InputError("must be an https:// or s3:// URL", field="input.batch_url")
            storage = await asyncio.to_thread(self._storage_for, job)
            items = await asyncio.get_running_loop().run_in_executor(
                self.downloads, functools.partial(
                    load_jsonl_url, url, self.download_settings, storage=storage,
                    job_storage=job.get("s3Config") is not None, field="input.batch_url",
                    max_item_bytes=self.settings.max_input_bytes))
            if not items:
                raise InputError("holds no items", field="input.batch_url")
        if len(items) > limit:
            raise InputError(f"has {len(items)} items, over the limit of {limit} "
                             "(BATCH_MAX_ITEMS)", field="input.batch")
        return items


def is_openai_job(job: Any) -> bool:
    """True for a job RunPod forwarded from its OpenAI-compatible endpoint (openai_compat.py)."""
    return (isinstance(job, dict) and isinstance(job.get("input"), dict)
            and "openai_route" in job["input"])


def sum_usage(results: list[dict[str, Any]]) -> dict[str, int]:
    """The batch's usage: each numeric ``usage`` field of the items' answers, summed."""
    total: dict[str, int] = {}
    for result in results:
        usage = result.get("usage")
        if isinstance(usage, dict):
            for key, value in usage.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
    return total


def build_worker(env: Mapping[str, str] | None = None) -> Worker:
    """Read settings, pick the model's task, load and warm it up. Raises WorkerError."""
    settings = WorkerSettings.from_env(env)
    storage_settings = StorageSettings.from_env(env)
    download_settings = DownloadSettings.from_env(env)
    storage = storage_from_settings(storage_settings)   # builds a client; no network
    task = load_task(ModelSettings.from_env(env), settings, TASKS, env=env)
    return Worker(settings=settings, storage_settings=storage_settings,
                  download_settings=download_settings, storage=storage, task=task)

"""Job → task → answer: the wiring between RunPod's job and the model, without the SDK loop.

Owns what happens to one job: the input checks every job passes, the choice of streamed, whole or
batch answer, size-aware delivery (inline, or a link through storage), and the conversion of
every failure into an ``{"error": ...}`` answer (through ``errors.error_response``, the one
place that builds one). Never imports boto3 or runpod, so it is tested in-process, nor the
project's own modules: ``handler.py`` hands in their pieces (``Parts``: the task registry,
``model_loader.find_model``, the storage functions) and ``serving/start.py`` builds one
``Worker`` and hands it RunPod's jobs.

Every job is answered by an async generator (RunPod streams only from generator handlers): a
streamed job yields its chunks, any other job yields exactly one item, its answer. With
``return_aggregate_stream`` the job's final output is the list of what was yielded.

Fields every job may carry beside the task's own::

    output_mode   "auto" (default): inline up to OUTPUT_INLINE_LIMIT_BYTES, else a link;
                  "inline": never a link (fails when too large); "link": always a link
    batch         a list of task inputs, answered in order in "results"
    batch_url     https:// or s3:// URL of a JSON Lines file of task inputs (for large batches)

A batch job holds neither its whole ``batch_url`` file nor its whole answer in memory: the file
is read one line at a time and answers past BATCH_ANSWER_MEMORY_BYTES are spooled to disk as
items finish (``batchfile.py``); its temporary files go when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.batchfile import BatchAnswers, BatchFile
from serving.config import DownloadSettings, ModelSettings, StorageSettings, WorkerSettings
from serving.delivery import (
    Artefact,
    OutputMode,
    check_output_mode,
    deliver_files,
    deliver_lines_file,
    deliver_output,
    find_artefacts,
    inline_size,
    is_small,
    measure_answer,
    replace_artefacts,
)
from serving.downloads import run_download
from serving.errors import (
    DownloadError,
    InputError,
    JobTimeout,
    PayloadTooLarge,
    WorkerError,
    error_response,
)
from serving.job import JobContext
from serving.loading import load_task
from serving.netguard import Deadline
from serving.parts import Parts
from serving.runner import rename_files
from serving.s3config import storage_for_job
from serving.validation import check_job_input

if TYPE_CHECKING:
    from serving.openai_compat import OpenAIRoutes
    from serving.placement import LoadedModel
    from storage import Storage
    from tasks.base import Task

log = logging.getLogger("worker")
_UPLOADS = object()          # _delivered: this answer is uploaded, in the upload pool

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
                      ) -> AsyncGenerator[dict[str, Any] | str]:
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
                yield await self._batch(job, job_input, context, mode)
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
            failure = error_response(exc, openai=openai)
            if failure["error_code"] == "internal":
                log.exception("job %s failed unexpectedly", job_id)
            else:
                log.info("job %s failed: %s", job_id, failure["error"])
            yield dict(failure)

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
        # A small answer (bounded work on the loop, no thread hop) with no file, within the
        # inline limit, is delivered as it is: what ``deliver`` would return, measured once.
        if (mode != "link" and is_small(answer)
                and measure_answer(answer) <= self.storage_settings.inline_limit_bytes):
            return answer

        def inline() -> Any:      # measuring and delivering in one hop: most answers are small
            return _UPLOADS if self._uploads(answer, mode) else deliver(answer, job, mode, None)

        delivered = await loop.run_in_executor(None, inline)
        if delivered is not _UPLOADS:
            return delivered
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

    # ------------------------------------------------------------------------------------------
    # Batch jobs: many task inputs, answered in order, per-item errors
    # ------------------------------------------------------------------------------------------
    async def _batch(self, job: Mapping[str, Any], job_input: dict[str, Any],
                     context: JobContext, mode: OutputMode) -> Any:
        """Run a batch job's items and deliver its answer. Neither its items (a ``batch_url``
        is read one line at a time) nor its answers (spooled to disk past
        BATCH_ANSWER_MEMORY_BYTES) are held whole; its temporary files are removed when it
        ends, however it ends (batchfile.py)."""
        with contextlib.ExitStack() as files:
            # Every upload of this job (spooled items' files, the answer) ends with the job:
            # its deadline, or at once when it times out or is cancelled.
            within = files.enter_context(Deadline.until(context.deadline))
            try:
                items = await self._batch_items(job, job_input, files, context.deadline)
                total = len(items) if isinstance(items, list) else items.total
                answers = files.enter_context(BatchAnswers(
                    total, memory_bytes=self.settings.answer_memory_bytes,
                    max_bytes=self.settings.max_answer_bytes, spool_dir=self.settings.spool_dir,
                    prepare=functools.partial(self._spooled_files, context.job_id, mode,
                                              functools.cache(lambda: self._storage_for(job)),
                                              within)))
                await self._run_items(items, answers, job, context)
                summary = {"failed": answers.failed, "usage": answers.usage,
                           "model": self.loaded.served_name}
                if not answers.spooled:
                    answer = {"results": answers.results(), **summary}
                    return await self._delivered(self._deliver_batch, answer, job, mode,
                                                 context.deadline)
                return await asyncio.get_running_loop().run_in_executor(
                    self.uploads, self._deliver_spooled, answers, summary, job, mode, within)
            except BaseException:
                within.expire()
                raise

    async def _run_items(self, items: list[Any] | BatchFile, answers: BatchAnswers,
                         job: Mapping[str, Any], context: JobContext) -> None:
        """Every item through the task, at most half the decode rows at once, each answer kept
        by ``answers`` as it finishes. An item is read only when a row is free for it."""
        loop = asyncio.get_running_loop()
        total, done = answers.total, 0
        last_report = time.monotonic()
        # At most half the decode rows in flight, so one large batch job leaves room for others.
        gate = asyncio.Semaphore(max(1, self.settings.max_batch_size // 2))
        keeping = asyncio.Lock()       # one answer kept at a time: one upload thread per job

        async def run_item(index: int, item: Any) -> None:
            nonlocal done, last_report
            try:
                result = await self._batch_item(index, item, job, context)
                del item
                async with keeping:
                    await loop.run_in_executor(self.uploads, answers.add, index, result)
            finally:
                gate.release()
            done += 1
            if done < total and time.monotonic() - last_report >= PROGRESS_INTERVAL_S:
                last_report = time.monotonic()
                context.report({"done": done, "total": total})

        try:
            async with asyncio.TaskGroup() as group:
                for index in range(total):
                    await gate.acquire()
                    if isinstance(items, list):
                        item = items[index]
                    else:     # parsing a line of up to WORKER_MAX_INPUT_BYTES: not on the loop
                        item = await loop.run_in_executor(self.downloads, items.next_item)
                    group.create_task(run_item(index, item))
                    del item
        except BaseExceptionGroup as failed:   # answers.add refused: the job fails
            raise failed.exceptions[0] from None

    async def _batch_item(self, index: int, item: Any, job: Mapping[str, Any],
                          context: JobContext) -> dict[str, Any]:
        """One item's answer, or its error answer: one item's failure never fails the rest."""
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
            return rename_files(answer, f"{index}-")
        except Exception as exc:  # noqa: BLE001 - one item's failure is its own answer
            if not isinstance(exc, WorkerError):
                log.exception("batch item %d of job %s failed", index, job.get("id"))
            return {**error_response(exc), "index": index}

    async def _batch_items(self, job: Mapping[str, Any], job_input: dict[str, Any],
                           files: contextlib.ExitStack, until: float) -> list[Any] | BatchFile:
        """The inline ``batch`` list, or the checked ``batch_url`` file (closed with ``files``)."""
        extra = sorted(set(job_input) - {"batch", "batch_url"})
        if extra:
            raise InputError(f"unknown field beside a batch: {', '.join(extra)}; put task fields "
                             "in each batch item", field=f"input.{extra[0]}")
        if "batch" in job_input and "batch_url" in job_input:
            raise InputError("send exactly one of 'batch' and 'batch_url'", field="input")
        if "batch_url" in job_input:
            url = job_input["batch_url"]
            if not isinstance(url, str):
                raise InputError("must be an https:// or s3:// URL", field="input.batch_url")
            storage = await asyncio.to_thread(self._storage_for, job)
            source = files.enter_context(BatchFile(self.settings.spool_dir))
            # The download ends with the job (its deadline, a cancel), freeing its pool thread.
            try:
                await run_download(self.downloads, lambda stop: source.fetch(
                    url, self.download_settings, storage=storage,
                    job_storage=job.get("s3Config") is not None, field="input.batch_url",
                    max_item_bytes=self.settings.max_input_bytes, until=until, stop=stop))
            except DownloadError as exc:           # the field, as every download error names
                raise DownloadError(f"input.batch_url: {exc}") from None
            return source
        items = job_input["batch"]
        if not isinstance(items, list) or not items:
            raise InputError("must be a non-empty list of task inputs", field="input.batch")
        limit = self.download_settings.max_items
        if len(items) > limit:
            raise InputError(f"has {len(items)} items, over the limit of {limit} "
                             "(BATCH_MAX_ITEMS)", field="input.batch")
        return items

    @staticmethod
    def _spooled_files(job_id: str, mode: str, storage: Callable[[], Storage | None],
                       within: Deadline, result: dict[str, Any]) -> dict[str, Any]:
        """An item's answer as a spooled answer holds it: its files as links (the answer is too
        large to send them inline), or inline for output_mode 'inline' or without storage
        (delivery then fails the job, or sends the answer inline if it fits after all)."""
        if not any(True for _ in find_artefacts(result)):
            return result
        if mode == "inline" or storage() is None:
            return replace_artefacts(result, Artefact.inline)
        linked, _ = deliver_files(result, job_id=job_id, storage=storage, inline_limit_bytes=0,
                                  mode="link", within=within)
        return linked

    def _deliver_batch(self, answer: dict[str, Any], job: Mapping[str, Any], mode: str,
                       within: Deadline | None) -> Any:
        """A batch answer held in memory; too large to send inline, its results go out as
        JSON Lines."""
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
        return {**link, "count": len(answer["results"]), "failed": answer["failed"],
                "usage": answer["usage"], "model": answer["model"]}

    def _deliver_spooled(self, answers: BatchAnswers, summary: dict[str, Any],
                         job: Mapping[str, Any], mode: str, within: Deadline | None) -> Any:
        """A batch answer spooled to disk: read back when it fits inline after all (its JSON
        Lines are at most the inline limit), else a link to its JSON Lines in item order."""
        limit = self.storage_settings.inline_limit_bytes
        if mode != "link" and answers.spooled_bytes <= limit:
            answer = {"results": answers.results(), **summary}
            if measure_answer(answer) <= limit:
                return answer
        link = deliver_lines_file(answers.write_ordered, size=answers.spooled_bytes,
                                  job_id=str(job["id"]), storage=lambda: self._storage_for(job),
                                  inline_limit_bytes=limit, mode=mode, within=within)
        return {**link, "count": answers.total, **summary}


def is_openai_job(job: Any) -> bool:
    """True for a job RunPod forwarded from its OpenAI-compatible endpoint (openai_compat.py)."""
    return (isinstance(job, dict) and isinstance(job.get("input"), dict)
            and "openai_route" in job["input"])


def build_worker(parts: Parts, env: Mapping[str, str] | None = None) -> Worker:
    """Read settings, find the model, pick its task, load and warm it up. Raises WorkerError."""
    settings = WorkerSettings.from_env(env)
    storage_settings = StorageSettings.from_env(env)
    download_settings = DownloadSettings.from_env(env)
    storage = parts.storage_from_settings(storage_settings)   # builds a client; no network
    task = load_task(ModelSettings.from_env(env), settings, parts.tasks, parts.find_model,
                     env=env)
    return Worker(settings=settings, storage_settings=storage_settings,
                  download_settings=download_settings, storage=storage, task=task)

"""The seam between the worker and a model: what a task is, and what each job gives it.

A task is one class in one file of ``tasks/`` that owns everything particular to its models,
and nothing else (Cog's ``setup()``/``predict()``, with detection and the contract added)::

    name            the task's name: WORKER_TASK, the startup line, error messages
    serves(model)   its detection rule: does this model directory hold one of its models?
    load(model, settings)
                    loading, on the device thread: the model class, tokenizer or processor,
                    dtype. ``model_loader.place_model`` finds the weights' device and dtype and
                    places them (no host copy); the task adds what else it needs
    warm_up()       one small run at startup, on the device thread, so the first job pays no
                    kernel or allocator start-up
    parse(job_input, where)
                    validates the job input with its pydantic model (the contract: fields,
                    limits, error messages) and returns a request; errors name the field
    answer(request, job)
                    the answer, a JSON-ready dict; files it produces go in as
                    ``job.store(data, content_type, name)``
    stream(request, job)
                    optional: chunks as they are produced, for requests with ``stream`` true
    openai_routes   the OpenAI-compatible routes it serves (none by default)
    example_input   a small valid job input, shown by the local endpoint's banner

The worker owns the rest, the same for every task: the job envelope and its size, output_mode,
batch jobs (``batch``, ``batch_url``), the whole-job time limit, cancel, delivery (inline or a
link) and the error boundary. A task never imports runpod or boto3.

``JobContext`` is what a task knows of the job it answers: its id, its deadline and cancel
flag, its progress reports, its safe downloads, and where its files go.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from model_loader import LoadedModel, ModelFiles
from serving.config import DownloadSettings, ModelSettings, WorkerSettings
from serving.delivery import Artefact
from serving.device import DEVICE_THREAD, is_device_fault, is_out_of_memory, release_memory
from serving.downloads import DownloadStop, download_bytes, run_download
from serving.errors import DeviceFault, InputError, JobTimeout, OutOfMemory

if TYPE_CHECKING:
    from storage import Storage

log = logging.getLogger("worker.task")
ProgressFn = Callable[[dict[str, Any]], None]
T = TypeVar("T")


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
    name_prefix: str = ""                              # batch items: "3-", so names differ
    own_storage: bool = False                          # the job sent s3Config (read any key)
    transfers: Executor | None = None                  # the worker's download pool

    def store(self, data: bytes, content_type: str, name: str) -> Artefact:
        """A file for the answer: put the result where the file belongs in the answer dict.

        Delivery makes it ``{"data": <base64>, "bytes", "sha256", "content_type"}`` when the
        answer fits inline, else uploads it as its own object (this content type, key
        ``<prefix>/<job id>/<name>``) and puts the link object there.
        """
        return Artefact(data, content_type, self.name_prefix + name)

    async def download(self, url: str, *, field: str, max_bytes: int | None = None) -> bytes:
        """The bytes at an ``https://`` or ``s3://`` URL, fetched under the download rules
        (public addresses only, size and time limits; ``s3://`` from this job's storage).
        Raises DownloadError or InputError naming ``field``."""
        settings = self.downloads
        if max_bytes is not None and max_bytes < settings.max_bytes:
            settings = replace(settings, max_bytes=max_bytes)

        def fetch(stop: DownloadStop) -> bytes:
            storage = self.storage() if url.lower().startswith("s3://") else None
            return download_bytes(url, settings, storage=storage, job_storage=self.own_storage,
                                  until=self.deadline, stop=stop)

        if not isinstance(url, str) or "://" not in url:
            raise InputError("must be an https:// or s3:// URL", field=field)
        # Downloads wait on the network: never in the default pool, which delivers answers.
        # They end with the job (its deadline, a cancel), freeing their pool thread at once.
        return await run_download(self.transfers, fetch)

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
        """The context of item ``index`` of a batch job: same job, its own file names."""
        return replace(self, progress=None, name_prefix=f"{self.name_prefix}{index}-")


class Task:
    """Base of every task; see the module docstring for what a subclass defines."""

    name: ClassVar[str] = ""
    openai_routes: ClassVar[tuple[str, ...]] = ()   # e.g. ("/v1/chat/completions",)
    # The kinds of model it serves, as pipeline task names ("text-generation", ...; the list is
    # serving.detect.KINDS): WORKER_TASK=auto gives it every model whose config reads as one.
    pipeline_tasks: ClassVar[tuple[str, ...]] = ()
    example_input: ClassVar[dict[str, Any]] = {}    # a small valid job input, for the banner

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self._device_fault: str | None = None

    @classmethod
    def serves(cls, model: ModelFiles) -> bool:
        """True when ``model`` holds a model of this task beyond ``pipeline_tasks``: a task's
        own detection rule (WORKER_TASK=auto asks each task)."""
        return False

    @classmethod
    def example(cls, model: ModelFiles, setting: str = "auto") -> dict[str, Any]:
        """A small valid job input for ``model`` (``example_input`` unless a task serves
        several kinds, each with its own input); WORKER_TASK is ``setting``."""
        return cls.example_input

    @classmethod
    def load(cls, model: ModelFiles, settings: ModelSettings) -> LoadedModel:
        """Load ``model`` for this task. Runs on the device thread, once per worker."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """One small run before the first job. Runs on the device thread."""

    def parse(self, job_input: dict[str, Any], where: str = "input") -> Any:
        """The request for ``job_input``; InputError naming the field (under ``where``)."""
        raise NotImplementedError

    async def answer(self, request: Any, job: JobContext) -> dict[str, Any]:
        raise NotImplementedError

    async def stream(self, request: Any, job: JobContext) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a streamed answer; by default the whole answer as one chunk."""
        yield await self.answer(request, job)

    async def on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the device thread, where all torch work runs (unbatched; see
        ``batcher.py`` to share forward passes across jobs). Out of memory becomes
        OutOfMemory after the memory is released; a broken device becomes DeviceFault and the
        worker asks to be replaced."""
        loop = asyncio.get_running_loop()
        if self._device_fault is not None:
            raise DeviceFault(self._device_fault)
        try:
            return await loop.run_in_executor(DEVICE_THREAD, fn, *args)
        except Exception as exc:
            if is_out_of_memory(exc):
                await loop.run_in_executor(DEVICE_THREAD, release_memory)
                raise OutOfMemory("the device ran out of memory for this job; send a smaller "
                                  "input (memory was released; the worker keeps serving)"
                                  ) from None
            if is_device_fault(exc):
                log.error("device fault, this worker must be replaced: %s", exc)
                self._device_fault = ("the GPU of this worker failed and it is being replaced; "
                                      "send the job again")
                raise DeviceFault(self._device_fault) from None
            raise

    @property
    def device_fault(self) -> str | None:
        """Why the device is unusable, once it is; the worker is then replaced."""
        return self._device_fault

"""The seam between the worker and a model: a forker's one import, ``from tasks.base import ...``.

A task is one class in one file of ``tasks/``. It declares; the worker does the rest::

    class ClassifyInput(Input):                  # the job contract: a pydantic model
        text: str = Field(min_length=1)

    class ClassifyTask(Task):
        name = "classify"                        # WORKER_TASK, the startup line, errors
        input = ClassifyInput                    # parsed and validated by the worker
        example = {"text": "I loved it"}         # warm-up and the contract test send it
        architectures = ("ForSequenceClassification",)   # serves(): which models are its own
        model_class = AutoModelForSequenceClassification # load(): how its weights load

        def setup(self) -> None: ...             # what else it needs, once (device thread)
        def predict(self, input, job) -> dict: ...        # one job, on the device thread

The parts, each with a default a task overrides only when it must::

    input, example  the input model (``Input``: unknown fields refused, errors name the field)
                    and one small valid input; ``Image``, ``Audio`` and ``File`` fields arrive
                    fetched and decoded (``serving/inputs.py``: URLs under the download rules,
                    data: URIs); ``Field`` sets limits
    serves(model)   detection: an architecture ending in one of ``architectures``; built-in
                    tasks declare ``pipeline_tasks`` instead, the kinds (``text-generation``,
                    ...) a model's config is read as exactly (``serving/detect.py``)
    load(model, settings)
                    ``serving.placement.place_model`` with ``model_class`` (device, dtype, no host
                    copy); override it to load something else
    setup()         after loading, on the device thread: a tokenizer, a processor
    warm_up()       by default answers ``example`` once, so the first job pays no start-up
    predict(input, job)
                    the answer, a JSON-ready dict, run on the device thread under
                    ``torch.inference_mode()`` (``predict(input)`` also works; ``"model"``, the
                    served name, is added when left out); ``async def predict`` runs on the
                    event loop instead (await ``self.on_device(fn, ...)`` for the model)
    max_batch_size, batch_wait_ms, predict_batch(inputs)
                    batching across concurrent jobs, declared: with ``max_batch_size`` (capped
                    by WORKER_MAX_BATCH_SIZE; ``batch_size()`` says so) the worker gathers
                    inputs and calls ``predict_batch`` with a list; it returns one output per
                    input, in order. An ``async def predict`` is called instead, and batches the
                    pieces it chooses (the texts of one job, say) with ``await
                    self.batched(pieces, job)``: each piece is one item of ``predict_batch``
    predict_stream(input, job)
                    optional, for an input whose ``stream`` field is true: an async generator
                    of the answer's chunks (dicts), run on the event loop; without it a
                    streamed job gets the whole answer as one chunk
    check(input, where)
                    optional: refuse an input before it reaches the device (its media already
                    fetched and decoded), raising InputError naming the field under ``where``
    respond(output, input)
                    optional: turns an output into the answer in a thread off the device (CPU
                    work such as encoding an image), so the device thread moves on
    Settings        a ``TaskSettings`` class of the task's own limits, read from the environment
                    with its ``env_prefix``; the task reads ``self.options``
    openai_routes   the OpenAI-compatible routes it serves (none by default)

Files in an answer: ``job.store(data, content_type, name)``, or ``OutputFile(...)`` from
``predict_batch``; delivery makes each inline or a link. An InputError that ``predict`` (or
``predict_batch``, ``predict_stream``) raises names the field as in a single job
(``input.prompt``); in a batch job the worker moves it under the item (``input.batch.3.prompt``).
The worker calls ``parse(job_input, where)``, ``answer(request, job)`` and ``stream(request,
job)``, built from the parts above; a task overrides them only for an input that no declared
model can say (``tasks/pipeline.py``: the Hugging Face API's envelope beside its own fields).

The worker owns the rest, the same for every task: the job envelope and its size, output_mode,
batch jobs (``batch``, ``batch_url``), the whole-job time limit, cancel, the batcher and its
out-of-memory split, the device-fault state, media downloads, delivery and the error boundary.
A task never imports runpod or boto3.

``JobContext`` is what a task knows of the job it answers: its id, its deadline and cancel
flag, its progress reports, its safe downloads, and where its files go.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, Field

from serving.batcher import Batcher
from serving.config import DownloadSettings, ModelSettings, WorkerSettings
from serving.delivery import Artefact
from serving.device import DEVICE_THREAD, is_device_fault, is_out_of_memory, release_memory
from serving.errors import DeviceFault, JobTimeout, OutOfMemory
from serving.inputs import Audio, AudioBytes, File, Image, resolve_media
from serving.job import JobContext
from serving.media import in_decode_pool
from serving.placement import LoadedModel, ModelFiles, place_model
from serving.runner import (
    PredictEngine,
    PredictItem,
    Request,
    TaskSettings,
    checked_answer,
    inference,
    placed_errors,
    takes_job,
)
from serving.validation import StrictInput, parse_input

__all__ = ["Audio", "AudioBytes", "Field", "File", "Image", "Input", "JobContext", "LoadedModel",
           "ModelFiles", "OutputFile", "Task", "TaskSettings"]

log = logging.getLogger("worker.task")
ProgressFn = Callable[[dict[str, Any]], None]
T = TypeVar("T")
Input = StrictInput                 # base of a task's input model
OutputFile = Artefact               # a file in an answer: OutputFile(data, content_type, name)


class Task:
    """Base of every task; the module docstring says what a subclass declares."""

    name: ClassVar[str] = ""
    input: ClassVar[type[BaseModel] | None] = None
    example: ClassVar[dict[str, Any]] = {}
    architectures: ClassVar[tuple[str, ...]] = ()   # suffixes: ("ForSequenceClassification",)
    model_class: ClassVar[Any] = None               # a transformers Auto class
    max_batch_size: ClassVar[int] = 0               # 0: one job at a time through predict
    batch_wait_ms: ClassVar[int | None] = None      # None: WORKER_BATCH_WAIT_MS
    Settings: ClassVar[type[TaskSettings] | None] = None
    openai_routes: ClassVar[tuple[str, ...]] = ()   # e.g. ("/v1/chat/completions",)
    # The kinds of model it serves, as pipeline task names ("text-generation", ...; the list is
    # serving.detect.KINDS): WORKER_TASK=auto gives it every model whose config reads as one.
    pipeline_tasks: ClassVar[tuple[str, ...]] = ()

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings,
                 env: Mapping[str, str] | None = None) -> None:
        self.loaded = loaded
        self.settings = settings
        self.model = loaded.model
        self.device = loaded.device
        self.options = self.Settings.from_env(env) if self.Settings is not None else None
        self._device_fault: str | None = None
        self._predict_takes_job = takes_job(self.predict)
        self._async_predict = inspect.iscoroutinefunction(self.predict)
        if self.max_batch_size:
            wait = settings.batch_wait_ms if self.batch_wait_ms is None else self.batch_wait_ms
            self.batcher = Batcher(PredictEngine(self), self.batch_size(), wait)
        self.setup()

    @classmethod
    def serves(cls, model: ModelFiles) -> bool:
        """True when ``model`` holds a model of this task by the task's own rule, beyond its
        ``pipeline_tasks`` (read exactly from the config): an architecture ending in one of
        ``architectures``. WORKER_TASK=auto asks each task; a task's own rule beats a kind."""
        return bool(cls.architectures) and any(
            a.endswith(cls.architectures) for a in model.architectures)

    @classmethod
    def example_for(cls, model: ModelFiles, setting: str = "auto") -> dict[str, Any]:
        """A small valid job input for ``model`` (the local endpoint's banner prints it):
        ``example``, unless a task serves several kinds, each with its own input; WORKER_TASK
        is ``setting``."""
        return cls.example

    @classmethod
    def load(cls, model: ModelFiles, settings: ModelSettings) -> LoadedModel:
        """Load ``model`` for this task. Runs on the device thread, once per worker."""
        if cls.model_class is None:
            raise NotImplementedError(f"{cls.__name__} sets no model_class and no load()")
        return place_model(model, settings, cls.model_class)

    def setup(self) -> None:
        """What else the task needs after loading (a tokenizer, a processor); device thread."""

    def batch_size(self) -> int:
        """Most items in one ``predict_batch`` call: ``max_batch_size``, capped by
        WORKER_MAX_BATCH_SIZE. Override it to be capped by a setting of another unit."""
        return min(self.max_batch_size, self.settings.max_batch_size)

    def predict(self, input: Any, job: JobContext) -> Any:
        """The answer to one job's input, a dict (device thread, unless ``async def``)."""
        raise NotImplementedError(f"{type(self).__name__} defines no predict or predict_batch")

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        """One output per input, in order (device thread); used when max_batch_size is set."""
        raise NotImplementedError(f"{type(self).__name__} sets max_batch_size but defines no "
                                  "predict_batch")

    async def predict_stream(self, input: Any, job: JobContext
                             ) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streamed answer (event loop), for an input whose ``stream`` field is
        true; the last chunk ends the answer. Without it the whole answer is one chunk."""
        raise NotImplementedError(f"{type(self).__name__} defines no predict_stream")
        yield {}                                              # an async generator, as overrides

    async def batched(self, pieces: list[Any], job: JobContext) -> list[Any]:
        """``predict_batch``'s output for each of ``pieces``, in order: for an async ``predict``
        that splits its input (one job's texts), each piece an item of the worker's batches,
        shared with other jobs' pieces. A failed piece fails the job, and its other pieces not
        yet on the device are skipped; so is every piece once the job's time is up."""
        items = [PredictItem(piece) for piece in pieces]
        waits = [asyncio.ensure_future(self.batcher.submit(item)) for item in items]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), max(0.0, job.remaining_s()))
        except TimeoutError:
            raise JobTimeout(f"the job ran past {job.timeout_s:g}s (WORKER_JOB_TIMEOUT_S); "
                             "send a smaller input") from None
        finally:
            for wait in waits:               # cancelled: the item is skipped, not run
                wait.cancel()
        return [item.output for item in items]

    def check(self, input: Any, where: str) -> None:
        """Refuse ``input`` before the device, raising InputError naming a field under
        ``where``; its media are fetched and decoded. By default every input passes."""

    def respond(self, output: Any, input: Any) -> dict[str, Any]:
        """The answer for ``predict``'s (or ``predict_batch``'s) ``output``, in a thread off the
        device: CPU work such as encoding an image. By default the output is the answer."""
        return output

    def warm_up(self) -> None:
        """One small run before the first job (device thread): by default, ``example``."""
        if not self.example or self.input is None or self._async_predict:
            return                           # an async predict warms up in its own warm_up
        job = self._own_job("warm-up")
        request = self.parse(dict(self.example), where="example")
        data = asyncio.run(resolve_media(request.input, job, request.where,
                                         self.settings.max_image_pixels))
        if self.max_batch_size:
            (output,) = inference(self.predict_batch, [data])
        else:
            output = inference(self.predict, *((data, job) if self._predict_takes_job else (data,)))
        self.respond(output, data)

    # ------------------------------------------------------------------------------------------
    # What the worker calls; a task overrides these only for what declarations cannot say.
    # ------------------------------------------------------------------------------------------
    def parse(self, job_input: dict[str, Any], where: str = "input") -> Any:
        """The request for ``job_input``: checked against ``input``; InputError names the field.
        Limits from settings reach validators as ``info.context["limits"]`` (WorkerSettings)
        and ``info.context["options"]`` (the task's own ``Settings``)."""
        if self.input is None:
            raise NotImplementedError(f"{type(self).__name__} declares no input model")
        context = {"limits": self.settings, "options": self.options}
        return Request(parse_input(self.input, job_input, context, prefix=where), where)

    async def answer(self, request: Any, job: JobContext | None = None) -> dict[str, Any]:
        """Fetch and decode the request's media and ``check`` it, then ``predict`` (async on
        the loop, else on the device thread) or a batched ``predict_batch``, then ``respond``
        in a thread. Without ``job`` (a direct call) the request gets a job of its own."""
        job = job or self._own_job("job")
        data = await self._checked(request, job)
        with placed_errors(request.where):
            if self._async_predict:
                output = await self.predict(*((data, job) if self._predict_takes_job else (data,)))
            elif self.max_batch_size:
                (output,) = await self.batched([data], job)
            else:
                args = (data, job) if self._predict_takes_job else (data,)
                output = await self.on_device(inference, self.predict, *args)
        if type(self).respond is not Task.respond:    # CPU work: the decode pool, as decoding
            output = await in_decode_pool(self.respond, output, data, deadline=job.deadline,
                                          cancelled=job.cancelled)
        return checked_answer(self, output)

    async def stream(self, request: Any, job: JobContext | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a streamed answer: ``predict_stream``'s, else the whole answer as one."""
        if type(self).predict_stream is Task.predict_stream:
            yield await self.answer(request, job)
            return
        job = job or self._own_job("job")
        data = await self._checked(request, job)
        with placed_errors(request.where):
            async for chunk in self.predict_stream(data, job):
                yield chunk

    async def _checked(self, request: Any, job: JobContext) -> Any:
        """The request's input with its media fetched and decoded, passed by ``check``."""
        data = await resolve_media(request.input, job, request.where,
                                   self.settings.max_image_pixels)
        self.check(data, request.where)
        return data

    def _own_job(self, job_id: str) -> JobContext:
        """A job for work no job sent (warm-up, a direct call): the worker's time limit."""
        return JobContext(job_id, time.monotonic() + self.settings.job_timeout_s,
                          self.settings.job_timeout_s, DownloadSettings.from_env({}),
                          lambda: None)

    async def on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the device thread, where all torch work runs (unbatched). Out of
        memory becomes OutOfMemory after the memory is released; a broken device becomes
        DeviceFault and the worker asks to be replaced."""
        loop = asyncio.get_running_loop()
        if self.device_fault is not None:
            raise DeviceFault(self.device_fault)
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
        """Why the device is unusable, once it is; the worker is then replaced. Watches
        ``on_device`` and every ``Batcher`` the task holds, so no task has to report it."""
        if self._device_fault is not None:
            return self._device_fault
        for value in vars(self).values():
            if isinstance(value, Batcher) and value.device_fault is not None:
                return value.device_fault
        return None

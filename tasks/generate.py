"""The text-generation task: chat messages or a raw prompt in, text (or a stream of it) out.

Owns the job contract for causal language models: the input fields and their limits, the
defaults taken from the model's generation config, and the answer and stream-chunk shapes. The
decoding itself is ``engine.py``'s, the batching across jobs ``batcher.py``'s.

Input (``job["input"]``)::

    messages | prompt      exactly one: [{"role": "system"|"user"|"assistant", "content": str}]
                           rendered with the model's chat template, or raw text
    max_new_tokens         1..WORKER_MAX_NEW_TOKENS   (default WORKER_DEFAULT_MAX_NEW_TOKENS)
    temperature            0..2; 0 is greedy and deterministic   (default: generation config)
    top_p, top_k           (0, 1], 0..1000 (0: off)              (default: generation config)
    repetition_penalty     (0, 10]; 1 is off                     (default: generation config)
    seed                   0..2**63-1: same seed and input give the same text
    stop                   a string or up to WORKER_MAX_STOP strings, cut from the output
    stream                 true: yield {"text": delta} chunks as tokens are produced

Answer: ``{"text", "finish_reason": "stop"|"length", "usage": {"prompt_tokens",
"completion_tokens"}, "model"}``. A stream's last chunk carries ``finish_reason``, ``usage``
and ``model`` too. ``completion_tokens`` counts every token the model produced, end token included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import torch
import transformers
from pydantic import Field, ValidationInfo, field_validator, model_validator
from transformers import AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from batcher import Batcher
from config import ModelSettings, WorkerSettings
from engine import Engine, SamplingParams, Sequence
from errors import InputError, JobTimeout
from model_loader import LoadedModel, ModelFiles, place_model
from tasks.base import JobContext, Task
from validation import StrictInput, parse_input

MAX_STOP_CHARS = 256


class Message(StrictInput):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateInput(StrictInput):
    """The fields of a generation job. Limits that depend on settings come from the context."""

    messages: list[Message] | None = None
    prompt: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] | str | None = None
    stream: bool = False

    @field_validator("messages")
    @classmethod
    def _messages_within_limit(cls, value: list[Message] | None,
                               info: ValidationInfo) -> list[Message] | None:
        limit = info.context["limits"].max_messages
        if value is not None and not value:
            raise ValueError("is empty; send at least one message")
        if value is not None and len(value) > limit:
            raise ValueError(f"has {len(value)} messages, over the limit of {limit} "
                             "(WORKER_MAX_MESSAGES)")
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _tokens_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = info.context["limits"].max_new_tokens
        if value is not None and value > limit:
            raise ValueError(f"{value} is over the limit of {limit} (WORKER_MAX_NEW_TOKENS)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_within_limit(cls, value: list[str] | str | None,
                           info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        limit = info.context["limits"].max_stop
        if len(stops) > limit:
            raise ValueError(f"has {len(stops)} strings, over the limit of {limit} "
                             "(WORKER_MAX_STOP)")
        for stop in stops:
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                raise ValueError(f"each stop string must be 1..{MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _one_of_messages_or_prompt(self) -> GenerateInput:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("send exactly one of 'messages' (a chat) or 'prompt' (raw text)")
        return self


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int


class GenerateAnswer(TypedDict):
    text: str
    finish_reason: str
    usage: Usage
    model: str


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool


_DONE = object()


_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class GenerateTask(Task):
    """Generation jobs on a causal language model, batched across concurrent jobs."""

    name = "generate"
    openai_routes = ("/v1/chat/completions", "/v1/completions")

    @classmethod
    def serves(cls, model: ModelFiles) -> bool:
        """Causal language models: an architecture ``AutoModelForCausalLM`` loads."""
        if model.architectures:
            return any(a in _CAUSAL_LM_CLASSES for a in model.architectures)
        return getattr(model.config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    @classmethod
    def load(cls, model: ModelFiles, settings: ModelSettings) -> LoadedModel:
        loaded = place_model(model, settings, transformers.AutoModelForCausalLM)
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"       # decoder-only batches pad on the left
        try:
            generation_config = GenerationConfig.from_pretrained(model.path)
        except OSError:
            generation_config = GenerationConfig.from_model_config(model.config)
        loaded.tokenizer = tokenizer
        loaded.generation_config = generation_config
        return loaded

    def warm_up(self) -> None:
        """One short greedy generation: the first job pays no kernel or allocator start-up."""
        inputs = self.tokenizer("Hello", return_tensors="pt").to(self.loaded.device)
        with torch.inference_mode():
            self.loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings) -> None:
        super().__init__(loaded, settings)
        self.tokenizer = loaded.tokenizer
        self.batcher = Batcher(Engine(loaded), settings.max_batch_size, settings.batch_wait_ms)
        gc = loaded.generation_config or GenerationConfig()
        sampling = bool(getattr(gc, "do_sample", False))
        # Defaults from the model's generation config; greedy when it does not ask to sample.
        self.defaults = {
            "temperature": float(gc.temperature or 1.0) if sampling else 0.0,
            "top_p": float(gc.top_p) if sampling and gc.top_p is not None else 1.0,
            "top_k": int(gc.top_k) if sampling and gc.top_k is not None else 0,
            "repetition_penalty": float(gc.repetition_penalty or 1.0),
        }

    # ------------------------------------------------------------------------------------------
    def parse(self, job_input: dict[str, Any], where: str = "input") -> GenerateRequest:
        """Validate and tokenize; raises InputError naming the field (under ``where``)."""
        data = parse_input(GenerateInput, job_input, {"limits": self.settings}, prefix=where)
        if data.messages is not None:
            if not self.tokenizer.chat_template:
                raise InputError("this model has no chat template; send 'prompt' instead",
                                 field=f"{where}.messages")
            ids = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in data.messages], add_generation_prompt=True,
                tokenize=True, return_dict=True)["input_ids"]
            field = f"{where}.messages"
        else:
            ids = self.tokenizer(data.prompt)["input_ids"]
            field = f"{where}.prompt"
        if not ids:
            raise InputError("is empty after tokenization", field=field)
        if len(ids) > self.settings.max_prompt_tokens:
            raise InputError(f"is {len(ids)} tokens, over the limit of "
                             f"{self.settings.max_prompt_tokens} (WORKER_MAX_PROMPT_TOKENS)",
                             field=field)
        d = self.defaults
        params = SamplingParams(
            max_new_tokens=data.max_new_tokens or self.settings.default_max_new_tokens,
            temperature=d["temperature"] if data.temperature is None else data.temperature,
            top_p=d["top_p"] if data.top_p is None else data.top_p,
            top_k=d["top_k"] if data.top_k is None else data.top_k,
            repetition_penalty=(d["repetition_penalty"] if data.repetition_penalty is None
                                else data.repetition_penalty),
            seed=data.seed,
            stop=tuple(data.stop or ()),
        )
        return GenerateRequest(list(ids), params, data.stream)

    @property
    def device_fault(self) -> str | None:
        return self.batcher.device_fault

    def _sequence(self, request: GenerateRequest, job: JobContext | None) -> Sequence:
        deadline = job.deadline if job is not None else (
            time.monotonic() + self.settings.job_timeout_s)
        return Sequence(request.prompt_ids, request.params, deadline=deadline)

    def _answer(self, seq: Sequence) -> GenerateAnswer:
        if seq.finish_reason == "timeout":
            raise JobTimeout(f"the job ran past {self.settings.job_timeout_s:g}s "
                             "(WORKER_JOB_TIMEOUT_S); ask for fewer max_new_tokens")
        return {
            "text": seq.text,
            "finish_reason": seq.finish_reason or "stop",
            "usage": {"prompt_tokens": len(seq.prompt_ids),
                      "completion_tokens": len(seq.generated)},
            "model": self.loaded.served_name,
        }

    async def answer(self, request: GenerateRequest,  # type: ignore[override]
                     job: JobContext | None = None) -> GenerateAnswer:
        """Generate the whole text, batched with whatever else is in flight."""
        seq = self._sequence(request, job)
        await self.batcher.submit(seq)
        return self._answer(seq)

    async def stream(self, request: GenerateRequest,  # type: ignore[override]
                     job: JobContext | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"text": delta}`` chunks as tokens arrive; the last carries usage too.

        Deltas that arrive while a chunk is being delivered are joined into the next chunk, so a
        slow stream endpoint gets fewer, larger chunks instead of falling behind.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        seq = self._sequence(request, job)
        seq.on_text = lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta)
        task = asyncio.ensure_future(self.batcher.submit(seq))
        task.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            finished = False
            while not finished:
                parts = [await queue.get()]
                while not queue.empty():
                    parts.append(queue.get_nowait())
                finished = parts[-1] is _DONE
                text = "".join(p for p in parts if isinstance(p, str))
                if text and not finished:
                    yield {"text": text}
            await task
            final = self._answer(seq)
            yield {"text": text, "finish_reason": final["finish_reason"],
                   "usage": final["usage"], "model": final["model"]}
        finally:
            if not task.done():
                seq.cancelled.set()
                task.cancel()

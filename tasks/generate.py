"""The text-generation task: chat messages or a raw prompt in, text (or a stream of it) out.

Owns the job contract for causal language models: the input fields and their limits, the
defaults taken from the model's generation config, and the answer and stream-chunk shapes. The
decoding itself is ``serving/engine.py``'s (or ``serving/graphs.py``'s compiled one, as
WORKER_DECODE picks), the batching across jobs ``serving/batcher.py``'s.

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

It is a task on the seam (``tasks/base.py``): the worker parses ``GenerateInput``; ``predict``
answers a job whole and ``predict_stream`` streams it, both on the event loop, each handing its
``engine.Sequence`` to the task's own ``batcher.Batcher``, whose engine admits new sequences
between decoding steps (continuous batching, which ``predict_batch``'s one call per batch
cannot do). The batcher still owns cancel, the out-of-memory split and device faults.

Costs are bounded before they are paid, and a refusal never reaches a batch: the worker (on the
event loop) checks the fields, and ``check`` the prompt's length in characters
(``PROMPT_CHARS_PER_TOKEN`` per token of the prompt limit); ``prepare`` tokenizes in the
tokenizer thread (``validation.in_tokenizer_thread``) and checks the prompt's tokens against
WORKER_MAX_PROMPT_TOKENS and prompt + max_new_tokens against the model's context
(``model_context``). An explicit max_new_tokens the context cannot hold is refused; the default
shrinks to what the context leaves. A chat template that refuses the messages (jinja's
``raise_exception``) is an input error naming the messages field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal, TypedDict

import transformers
from jinja2 import TemplateError
from pydantic import Field, ValidationInfo, field_validator, model_validator
from transformers import AutoTokenizer, GenerationConfig

from serving.batcher import Batcher
from serving.config import PROMPT_CHARS_PER_TOKEN, ModelSettings
from serving.engine import Engine, SamplingParams, Sequence
from serving.errors import InputError, JobTimeout, excerpt
from serving.graphs import SwitchingEngine, choose_engine
from serving.placement import LoadedModel, ModelFiles, place_model
from serving.validation import StrictInput, in_tokenizer_thread, limits_of
from tasks.base import JobContext, Task

MAX_STOP_CHARS = 256
log = logging.getLogger("worker.generate")


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
        limit = limits_of(info).max_messages
        if value is not None and not value:
            raise ValueError("is empty; send at least one message")
        if value is not None and len(value) > limit:
            raise ValueError(f"has {len(value)} messages, over the limit of {limit} "
                             "(WORKER_MAX_MESSAGES)")
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _tokens_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = limits_of(info).max_new_tokens
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
        limit = limits_of(info).max_stop
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


_DONE = object()


def model_context(loaded: LoadedModel) -> int | None:
    """Most tokens (prompt and generated together) the model has positions for, if it says.

    ``max_position_embeddings`` (``n_positions`` for GPT-2 style configs, which transformers
    maps to it). With absolute positions it is a hard limit: one more position indexes past the
    embedding table and fails the whole forward pass (a device-side assert on CUDA). Rotary
    models have no table, but they were trained up to it and their quality falls apart beyond
    it, so the same limit is applied to them too (as vLLM's max_model_len does).
    """
    config = loaded.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class GenerateTask(Task):
    """Generation jobs on a causal language model, batched across concurrent jobs."""

    name = "generate"
    pipeline_tasks = ("text-generation",)     # causal language models
    input = GenerateInput
    example = {"messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 16}
    openai_routes = ("/v1/chat/completions", "/v1/completions")

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
        """Short greedy runs through the engine jobs use, so the first job pays no start-up.

        On CUDA one row and a full batch (the allocator grows, the kernels for both shapes
        load); on a CPU one row, since there is nothing to grow or load. The compiled path then
        sizes its static cache from what the device has left and starts compiling off the job
        path (``graphs.SwitchingEngine``): jobs are answered eagerly until it switches.
        """
        ids = list(self.tokenizer("Hello")["input_ids"])
        engine = self.batcher.engine
        rows = (1, self.settings.max_batch_size) if self.loaded.device.type == "cuda" else (1,)
        if isinstance(engine, SwitchingEngine):
            self.loaded.stats.note = engine.warm_up(ids, rows)
            return
        params = SamplingParams(max_new_tokens=4)
        for n in rows:
            engine.run([Sequence(list(ids), params) for _ in range(n)])

    def setup(self) -> None:
        loaded, settings = self.loaded, self.settings
        self.tokenizer = loaded.tokenizer
        self.context = model_context(loaded)
        self._use(*choose_engine(loaded, settings, self.context))
        prompt_tokens = min(settings.max_prompt_tokens, self.context or settings.max_prompt_tokens)
        self.max_prompt_chars = prompt_tokens * PROMPT_CHARS_PER_TOKEN
        gc = loaded.generation_config or GenerationConfig()
        sampling = bool(getattr(gc, "do_sample", False))
        # Defaults from the model's generation config; greedy when it does not ask to sample.
        self.defaults: dict[str, Any] = {
            "temperature": float(gc.temperature or 1.0) if sampling else 0.0,
            "top_p": float(gc.top_p) if sampling and gc.top_p is not None else 1.0,
            "top_k": int(gc.top_k) if sampling and gc.top_k is not None else 0,
            "repetition_penalty": float(gc.repetition_penalty or 1.0),
        }

    def _use(self, engine: Engine, note: str) -> None:
        self.batcher = Batcher(engine, self.settings.max_batch_size, self.settings.batch_wait_ms)
        self.loaded.stats.note = note          # the startup line says which decode path runs

    # ------------------------------------------------------------------------------------------
    def check(self, input: GenerateInput, where: str) -> None:
        """Before tokenizing (on the event loop, so cheap): a chat needs the model's chat
        template, and the prompt's length in characters is bounded; InputError names the
        field."""
        if input.messages is not None:
            if not self.tokenizer.chat_template:
                raise InputError("this model has no chat template; send 'prompt' instead",
                                 field=f"{where}.messages")
            chars, field = sum(len(m.content) for m in input.messages), f"{where}.messages"
        else:
            chars, field = len(input.prompt or ""), f"{where}.prompt"
        if chars > self.max_prompt_chars:
            raise InputError(
                f"is {chars:,} characters, over the limit of {self.max_prompt_chars:,} "
                f"({PROMPT_CHARS_PER_TOKEN} per token of the prompt's token limit, "
                "WORKER_MAX_PROMPT_TOKENS or the model's context); shorten it", field=field)

    def _params(self, input: GenerateInput) -> SamplingParams:
        """The sampling parameters asked for, the model's defaults for the rest."""
        d = self.defaults
        return SamplingParams(
            max_new_tokens=input.max_new_tokens or self.settings.default_max_new_tokens,
            temperature=d["temperature"] if input.temperature is None else input.temperature,
            top_p=d["top_p"] if input.top_p is None else input.top_p,
            top_k=d["top_k"] if input.top_k is None else input.top_k,
            repetition_penalty=(d["repetition_penalty"] if input.repetition_penalty is None
                                else input.repetition_penalty),
            seed=input.seed,
            stop=tuple(input.stop or ()),
        )

    async def prepare(self, input: GenerateInput, job: JobContext) -> Sequence:
        """Tokenize (in the tokenizer thread) and check the input against the model's limits.

        Every refusal here happens before the sequence is admitted to a batch, so it can never
        fail the jobs it would have been batched with.
        """
        ids = await in_tokenizer_thread(self._tokenize, input)
        field = _prompt_field(input)
        if not ids:
            raise InputError("is empty after tokenization", field=field)
        if len(ids) > self.settings.max_prompt_tokens:
            raise InputError(f"is {len(ids)} tokens, over the limit of "
                             f"{self.settings.max_prompt_tokens} (WORKER_MAX_PROMPT_TOKENS)",
                             field=field)
        params = self._params(input)
        max_new = self._fit_context(len(ids), params.max_new_tokens, input)
        if max_new != params.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=max_new)
        return Sequence(list(ids), params, deadline=job.deadline)

    def _tokenize(self, input: GenerateInput) -> list[int]:
        """The prompt's token ids (runs in the tokenizer thread)."""
        if input.messages is None:
            return list(self.tokenizer(input.prompt)["input_ids"])
        try:
            return list(self.tokenizer.apply_chat_template(
                [m.model_dump() for m in input.messages], add_generation_prompt=True,
                tokenize=True, return_dict=True)["input_ids"])
        except TemplateError as exc:
            # The template's own refusal (raise_exception: roles must alternate, ...) is about
            # these messages, not the worker; its text is the model author's, cut short.
            raise InputError(f"the model's chat template refused these messages: "
                             f"{excerpt(str(exc), 200)}", field=_prompt_field(input)) from None

    def _fit_context(self, prompt_tokens: int, asked: int, input: GenerateInput) -> int:
        """max_new_tokens for this prompt within the model's context, or an InputError."""
        field = _prompt_field(input)
        if self.context is None:
            return asked
        room = self.context - prompt_tokens
        if room < 1:
            raise InputError(
                f"is {prompt_tokens:,} tokens, and the model's context of {self.context:,} "
                "tokens (max_position_embeddings) must hold the prompt and at least one new "
                "token; shorten it", field=field)
        if asked <= room:
            return asked
        if input.max_new_tokens is None:
            return room         # the default gives way to the context; an explicit ask does not
        raise InputError(
            f"{asked} is more than the model's context leaves: the prompt is "
            f"{prompt_tokens:,} tokens and the context of {self.context:,} tokens "
            f"(max_position_embeddings) holds {room:,} more; ask for at most {room:,} or "
            f"shorten the {field.removeprefix('input.')}", field="input.max_new_tokens")

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

    async def predict(self, input: GenerateInput, job: JobContext) -> GenerateAnswer:
        """Generate the whole text, batched with whatever else is in flight."""
        seq = await self.prepare(input, job)
        await self.batcher.submit(seq)
        return self._answer(seq)

    async def predict_stream(self, input: GenerateInput,
                             job: JobContext) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"text": delta}`` chunks as tokens arrive; the last carries usage too.

        Deltas that arrive while a chunk is being delivered are joined into the next chunk, so a
        slow stream endpoint gets fewer, larger chunks instead of falling behind.
        """
        seq = await self.prepare(input, job)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def on_text(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        seq.on_text = on_text
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


def _prompt_field(input: GenerateInput) -> str:
    """The field that holds the prompt, as a single job names it."""
    return "input.messages" if input.messages is not None else "input.prompt"

"""OpenAI-compatible routes: OpenAI requests in, OpenAI response objects (or SSE chunks) out.

RunPod's OpenAI endpoint (``https://api.runpod.ai/v2/{endpoint_id}/openai/v1``) forwards a
request to the worker as ``job["input"] = {"openai_route": "/v1/chat/completions",
"openai_input": {...the request body...}}``. This module owns the translation both ways and
nothing else: it checks the OpenAI fields, maps them onto the task's own input, and calls the
task's ``parse``/``answer``/``stream`` (``tasks/generate.py``, ``tasks/embed.py``). It never
touches the model, and never builds an error answer (``errors.error_response(openai=True)`` does).

Routes::

    /v1/chat/completions   generate task; "stream": true answers server-sent events
    /v1/completions        generate task; one prompt per request
    /v1/embeddings         embed task; encoding_format float or base64 (the openai client's default)
    /v1/models             the one model this worker serves

Parameter mapping (generation): ``max_completion_tokens`` or ``max_tokens`` → max_new_tokens
(not both); ``temperature``, ``top_p``, ``seed``, ``stop`` → the same; ``top_k`` and
``repetition_penalty`` are accepted as extensions (vLLM accepts them too); ``user`` is accepted
and ignored (an end-user id for abuse monitoring). ``presence_penalty`` and
``frequency_penalty`` are refused unless 0: our repetition penalty has other semantics and a
silent approximation would change results. Every other OpenAI parameter that would change the
answer (``n`` > 1, ``logprobs``, ``tools``, ``response_format``, ...) is refused by name; unknown
ones too. ``model`` is required and must be the served name (MODEL_SERVED_NAME, default
MODEL_NAME).

Streams: like worker-vllm (``RAW_OPENAI_OUTPUT``, its default), each yielded item is a string of
server-sent events, ``"data: {chunk json}\\n\\n"``, the last one ending in ``"data: [DONE]\\n\\n"``;
RunPod's proxy writes them to the HTTP response as they arrive. Whole answers are one dict.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from serving.errors import InputError, UnknownModel, excerpt
from serving.validation import StrictInput, parse_input

if TYPE_CHECKING:
    from tasks.base import Task

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")
OWNER = "runpod-model-worker"

# OpenAI parameters we do not implement, and the values that mean "off" (accepted as no-ops).
_UNSUPPORTED_GENERATION: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},), "audio": (),
    "modalities": (["text"],), "prediction": (), "reasoning_effort": (), "verbosity": (),
    "web_search_options": (), "store": (False,), "metadata": (), "service_tier": ("auto",),
    "best_of": (1,), "echo": (False,), "suffix": ("",),
}


class _Part(StrictInput):
    type: Literal["text"]
    text: str


class _Message(StrictInput):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part]
    name: str | None = None            # accepted; chat templates have no place for it


class _StreamOptions(StrictInput):
    include_usage: bool = False


class _Generation(StrictInput):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                       # extension (vLLM has it too)
    repetition_penalty: float | None = None        # extension (vLLM has it too)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None


class ChatRequest(_Generation):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: str | list[str]


class EmbeddingRequest(StrictInput):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class OpenAIRoutes:
    """Answers RunPod's OpenAI-style jobs with the worker's task."""

    def __init__(self, task: Task, served_name: str) -> None:
        self.task = task
        self.served_name = served_name
        self.created = int(time.time())

    async def handle(self, job_input: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
        """Yield one OpenAI response object, or a stream's SSE strings. Raises WorkerError."""
        route = job_input.get("openai_route")
        body = job_input.get("openai_input")
        extra = sorted(set(job_input) - {"openai_route", "openai_input"})
        if extra:
            raise InputError(f"unknown field beside openai_route and openai_input: "
                             f"{_names(extra)}", field="input")
        if route not in ROUTES:
            raise InputError(f"{excerpt(route)} is not served; routes: {', '.join(ROUTES)}",
                             field="openai_route")
        if route == "/v1/models":
            yield self.models()
            return
        if not isinstance(body, dict):
            raise InputError("must be the OpenAI request body, a JSON object",
                             field="openai_input")
        self._check_task(route)
        if route == "/v1/embeddings":
            yield await self.embeddings(body)
            return
        chat = route == "/v1/chat/completions"
        request: ChatRequest | CompletionRequest
        if chat:
            request = parse_input(ChatRequest, _without_unsupported(body), {}, prefix="")
        else:
            request = parse_input(CompletionRequest, _without_unsupported(body), {}, prefix="")
        self._check_model(request.model)
        native = self._native_input(request, chat)
        # The task's errors (from parsing, and from tokenizing before any output) name its own
        # fields; a client knows them by the names it sent.
        try:
            parsed = self.task.parse(native)
            if request.stream:
                include_usage = bool(request.stream_options
                                     and request.stream_options.include_usage)
                async for event in self._stream(parsed, chat, include_usage):
                    yield event
            else:
                yield self._whole(await self.task.answer(parsed), chat)
        except InputError as exc:
            max_name = ("max_completion_tokens" if request.max_completion_tokens is not None
                        else "max_tokens")
            raise _renamed(exc, {"input.max_new_tokens": max_name}) from None

    # ------------------------------------------------------------------------------- checks
    def _check_task(self, route: str) -> None:
        if route in self.task.openai_routes:
            return
        if self.task.openai_routes:
            use = f"use {', '.join(self.task.openai_routes)}"
        else:
            use = ("it has no OpenAI-compatible route; send the task's own input to /run or "
                   "/runsync")
        raise InputError(f"this worker's model serves the {self.task.name} task, which "
                         f"{route} does not fit; {use}", field="openai_route")

    def _check_model(self, model: str) -> None:
        if model != self.served_name:
            raise UnknownModel(f"the model {excerpt(model)} is not served here; this worker "
                               f"serves {self.served_name!r} (MODEL_SERVED_NAME)", field="model")

    # ----------------------------------------------------------------------------- /v1/models
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.served_name, "object": "model",
                                            "created": self.created, "owned_by": OWNER}]}

    # ------------------------------------------------------------------------ /v1/embeddings
    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse_input(EmbeddingRequest, body, {}, prefix="")
        self._check_model(request.model)
        texts = [request.input] if isinstance(request.input, str) else request.input
        limit = self.task.settings.max_texts
        if not texts or len(texts) > limit:
            raise InputError(f"has {len(texts)} texts; send 1..{limit} (WORKER_MAX_TEXTS)",
                             field="input")
        native: dict[str, Any] = {"texts": texts}
        if request.dimensions is not None:
            native["dimensions"] = request.dimensions
        try:
            answer = await self.task.answer(self.task.parse(native))
        except InputError as exc:     # named as the client sent them: input[1], dimensions
            raise _renamed(exc, {"input.texts": "input"}) from None
        tokens = answer["usage"]["prompt_tokens"]
        rows: list[Any] = answer["embeddings"]
        if request.encoding_format == "base64":
            # The openai client's default: little-endian float32 bytes, base64-encoded.
            rows = [base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()
                    for row in rows]
        return {"object": "list", "model": self.served_name,
                "data": [{"object": "embedding", "index": i, "embedding": row}
                         for i, row in enumerate(rows)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ------------------------------------------------------------ chat and text completions
    def _native_input(self, request: ChatRequest | CompletionRequest,
                      chat: bool) -> dict[str, Any]:
        """The generate task's own input for an OpenAI request."""
        if request.max_tokens is not None and request.max_completion_tokens is not None:
            raise InputError("send max_completion_tokens or max_tokens, not both",
                             field="max_tokens")
        native: dict[str, Any] = {"stream": request.stream}
        if isinstance(request, ChatRequest):
            native["messages"] = [
                {"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str)
                 else "".join(p.text for p in m.content)}
                for m in request.messages]
        else:
            prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            if len(prompts) != 1:
                raise InputError(f"has {len(prompts)} prompts; send one prompt per request",
                                 field="prompt")
            native["prompt"] = prompts[0]
        max_new = (request.max_completion_tokens if request.max_completion_tokens is not None
                   else request.max_tokens)
        for key, value in (("max_new_tokens", max_new), ("temperature", request.temperature),
                           ("top_p", request.top_p), ("top_k", request.top_k),
                           ("repetition_penalty", request.repetition_penalty),
                           ("seed", request.seed), ("stop", request.stop)):
            if value is not None:
                native[key] = value
        return native

    def _whole(self, answer: Any, chat: bool) -> dict[str, Any]:
        usage = _usage(answer["usage"])
        if chat:
            choice: dict[str, Any] = {
                "index": 0, "finish_reason": answer["finish_reason"], "logprobs": None,
                "message": {"role": "assistant", "content": answer["text"]}}
            return {"id": _id("chatcmpl"), "object": "chat.completion", "created": _now(),
                    "model": self.served_name, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": answer["text"], "finish_reason": answer["finish_reason"],
                  "logprobs": None}
        return {"id": _id("cmpl"), "object": "text_completion", "created": _now(),
                "model": self.served_name, "choices": [choice], "usage": usage}

    async def _stream(self, parsed: Any, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        head = {"id": _id("chatcmpl" if chat else "cmpl"),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": _now(), "model": self.served_name}
        first = True

        def event(text: str, finish_reason: str | None) -> str:
            nonlocal first
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None,
                          "finish_reason": finish_reason}
            first = False
            return _sse({**head, "choices": [choice]})

        async for chunk in self.task.stream(parsed):
            if "finish_reason" not in chunk:
                yield event(chunk["text"], None)
                continue
            last = event(chunk["text"], chunk["finish_reason"])
            if include_usage:
                last += _sse({**head, "choices": [], "usage": _usage(chunk["usage"])})
            yield last + "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------ helpers
def _without_unsupported(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` less the unimplemented parameters sent with their "off" value; any other value
    of one is refused by name. Unknown fields stay, for the request model to refuse."""
    for name, off in _UNSUPPORTED_GENERATION.items():
        if name in body and body[name] is not None and body[name] not in off:
            raise InputError(f"is not supported by this worker (got {excerpt(body[name])}); "
                             "remove it", field=name)
    return {k: v for k, v in body.items() if k not in _UNSUPPORTED_GENERATION}


def _names(names: list[str]) -> str:
    """Field names the caller sent, for a message: a few, each an excerpt, and a count."""
    shown = ", ".join(excerpt(name) for name in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _renamed(exc: InputError, names: dict[str, str]) -> InputError:
    """The task's error, with its field named as the OpenAI request names it: ``names`` maps
    the task's fields that the request calls otherwise; the rest lose ``input.``."""
    text, field = str(exc), exc.field or ""
    for ours, theirs in names.items():
        text, field = text.replace(ours, theirs), field.replace(ours, theirs)
    text, field = text.replace("input.", ""), field.replace("input.", "")
    renamed = InputError(text)
    renamed.field = field or None
    return renamed


def _usage(usage: dict[str, int]) -> dict[str, int]:
    return {"prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())

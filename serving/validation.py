"""Untrusted job input → typed request, with errors that name the field and the fix.

Owns the checks every job passes before any task sees it (an object, not empty, not absurdly
large, not nested beyond reason, valid Unicode) and the conversion of pydantic's errors into one
``InputError`` message. Task modules declare their own pydantic models; they call
``parse_input`` and never format errors themselves. A message quotes the caller's input only
as ``errors.excerpt`` does (short, escaped), and lists at most ``MAX_LISTED_PROBLEMS`` problems.

Also owns where tokenizing runs: ``in_tokenizer_thread`` (see ``TOKENIZER_THREAD``), never on
the event loop. Never imports torch, runpod or boto3.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

from serving.errors import EXCERPT_CHARS, InputError, PayloadTooLarge, cut, field_part

if TYPE_CHECKING:
    from serving.config import WorkerSettings

Model = TypeVar("Model", bound=BaseModel)
Result = TypeVar("Result")

MAX_LISTED_PROBLEMS = 5        # problems named in one message; the rest are counted

# Tokenizing and chat-template rendering run on this thread. Not on the event loop: a prompt of
# megabytes takes seconds to tokenize, and meanwhile no job could be taken, streamed or
# cancelled. Not on model_loader.DEVICE_THREAD: that thread must be free for the model, and
# tokenizers are Rust (they release the GIL and create no torch thread pool, so a second thread
# costs the device thread nothing). One thread, so that a tokenizer's truncation setting, which
# transformers sets on the shared Rust tokenizer per call, never changes under a concurrent call.
TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")


async def in_tokenizer_thread(fn: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """``fn(*args, **kwargs)`` on TOKENIZER_THREAD, awaited from the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(TOKENIZER_THREAD, functools.partial(fn, *args, **kwargs))


class StrictInput(BaseModel):
    """Base of every task input model: unknown fields are refused by name, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


def check_job_input(job: Any, max_bytes: int) -> dict[str, Any]:
    """The job's ``input`` if it is a non-empty object within ``max_bytes`` as JSON."""
    if not isinstance(job, dict) or "input" not in job:
        raise InputError("the job has no 'input'; send {\"input\": {...}}")
    job_input = job["input"]
    if not isinstance(job_input, dict):
        kind = type(job_input).__name__ if job_input is not None else "null"
        raise InputError(f"must be a JSON object, got {kind}; send {{\"input\": {{...}}}}",
                         field="input")
    if not job_input:
        raise InputError("is empty; see the README for the fields a job takes", field="input")
    size = checked_json_size(job_input, "input")
    if size > max_bytes:
        raise PayloadTooLarge(
            f"is {size} bytes, over the limit of {max_bytes} (WORKER_MAX_INPUT_BYTES); "
            "send large inputs by URL instead", field="input")
    return job_input


def checked_json_size(value: Any, field: str, what: str = "") -> int:
    """Bytes of ``value`` as JSON in UTF-8 (the SDK's separators), after the checks every input
    passes, inline or read from a ``batch_url`` line: InputError naming ``field`` for text that
    is not valid Unicode, nesting too deep to serialise, or a value JSON cannot hold. ``what``
    starts the message (``"line 3 "``)."""
    try:
        return len(json.dumps(value, ensure_ascii=False).encode())
    except UnicodeEncodeError:
        # JSON's "\ud800" escape parses to a lone surrogate, which no tokenizer can take.
        raise InputError(f"{what}holds text that is not valid Unicode (an unpaired surrogate "
                         "such as \\ud800); send UTF-8 text", field=field) from None
    except RecursionError:
        raise InputError(f"{what}is nested too deeply; no field of a job is nested more than a "
                         "few levels", field=field) from None
    except (TypeError, ValueError):
        raise InputError(f"{what}is not valid JSON", field=field) from None


def parse_input(model: type[Model], data: dict[str, Any], context: dict[str, Any],
                prefix: str = "input") -> Model:
    """Validate ``data`` with ``model``; every problem is reported with its field path."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        listed = [_describe(err, prefix, model) for err in problems[:MAX_LISTED_PROBLEMS]]
        more = len(problems) - len(listed)
        if more:
            listed.append(f"and {more} more problems")
        raise InputError("; ".join(listed)) from None
    except RecursionError:
        raise InputError("is nested too deeply", field=prefix or None) from None


def _describe(err: Any, prefix: str, model: type[BaseModel]) -> str:
    path = ".".join([*([prefix] if prefix else []), *(field_part(part) for part in err["loc"])])
    path = cut(path, 4 * EXCERPT_CHARS)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(model.model_fields)) if len(err["loc"]) == 1 else None
        hint = f"; allowed fields: {allowed}" if allowed else ""
        return f"{path}: unknown field{hint}"
    if kind == "missing":
        return f"{path}: is required"
    message = cut(err["msg"].removeprefix("Value error, "), 4 * EXCERPT_CHARS)
    if kind.endswith("_type") or kind.endswith("_parsing"):
        message += f", got {_json_type(err.get('input'))}"
    return f"{path}: {message[0].lower()}{message[1:]}"


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages a caller understands."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def limits_of(info: ValidationInfo) -> WorkerSettings:
    """The worker's settings, which a task's validators read their limits from: the worker
    validates every input with them as ``info.context["limits"]`` (``tasks/base.py``)."""
    if info.context is None:
        raise RuntimeError("validated without the worker's context: use Task.parse")
    limits: WorkerSettings = info.context["limits"]
    return limits

"""The worker's errors, and the one place they become a job answer.

Every failure a caller can see is one of these. ``str(err)`` is always safe to show the caller
(no secrets, no file paths, no traceback) and says what to do next. The tree::

    WorkerError                      code             when
    ├── InputError                   invalid_input    the job's input is wrong; names the field
    │   ├── PayloadTooLarge          payload_too_large input or answer over a size limit
    │   └── UnknownModel             model_not_found  an OpenAI request names another model
    ├── SettingsError                invalid_setting  an environment variable is wrong (startup)
    ├── ModelNotFound                model_not_found  no weights where we looked (startup)
    │   └── UnsupportedModel         unsupported_model no task serves (or loads) the model
    ├── StorageError                 storage_failed   an upload or link could not be made
    ├── DownloadError                download_failed  an input URL could not be fetched safely
    ├── JobTimeout                   timeout          a job ran past its time limit
    ├── OutOfMemory                  out_of_memory    the device ran out of memory for this job
    └── DeviceFault                  device_fault     the device is unusable; the worker is replaced

``error_response`` converts any exception into the job answer; nothing else in the project
builds an ``{"error": ...}`` dict. An error answer is always small, whatever the input: a
message is cut to ``MAX_ERROR_CHARS`` (RunPod drops a result over its payload limit, and a
dropped error would read as success), and a message that quotes the caller's input quotes only
``excerpt(value)``, a short escaped cut. For OpenAI-compatible routes (``openai=True``) the error
string is OpenAI's error object as JSON, ``{"error": {"message", "type", "param", "code"}}``:
the job still FAILS (RunPod fails a job only on a string ``error``, and a generator handler's
answer keeps nothing but that string), and a proxy or client can parse it back. Unexpected
exceptions are logged with their traceback by the caller and answered with a generic message
that leaks nothing.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any, TypedDict

EXCERPT_CHARS = 40          # most characters of an input value an error message quotes
MAX_FIELD_CHARS = 120       # most characters of a field path (paths hold the caller's keys)
MAX_ERROR_CHARS = 1000      # most characters of any error message; as JSON under 16 KB


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 2, 3, 3, 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = EXCERPT_CHARS


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` as an error message may quote it: on one line, quoted, at most ``limit`` chars.

    Strings are quoted and escaped as Python's repr does (a newline cannot split the message);
    a longer string is cut and says how long it was. Other values are shown by ``reprlib``,
    which never descends more than two levels, so a deeply nested or huge value costs nothing.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = _REPR.repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "..."


def cut(text: str, limit: int) -> str:
    """``text`` on one line and at most ``limit`` characters, saying so when it was cut.

    Characters that are not printable (newlines, controls) are escaped, so a caller's key or
    value quoted in a message can never split or forge the one-line error.
    """
    flat = text[:limit]
    if not flat.isprintable():
        flat = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                       for c in flat)
    if len(text) <= limit and len(flat) <= limit:
        return flat
    note = f"... (cut; {len(text):,} characters in all)"
    return flat[:max(0, limit - len(note))] + note


def field_part(name: object) -> str:
    """One part of a field path: a short printable key as is, any other key as an excerpt."""
    text = str(name) if isinstance(name, str | int) else excerpt(name)
    if len(text) <= EXCERPT_CHARS and text.isprintable() and "." not in text:
        return text
    return excerpt(name, EXCERPT_CHARS)


class ErrorAnswer(TypedDict, total=False):
    """What a failed job returns: RunPod marks a job FAILED when ``error`` is a truthy string."""

    error: str
    error_code: str
    refresh_worker: bool


class WorkerError(Exception):
    """Base of every error the worker answers on purpose."""

    code = "worker_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(WorkerError):
    """The job's input is wrong. ``field`` is the dotted path of the offending field, if any."""

    code = "invalid_input"

    def __init__(self, message: str, field: str | None = None) -> None:
        # Paths carry the caller's keys: a 200 KB key must not become a 200 KB message.
        field = cut(field, MAX_FIELD_CHARS) if field else field
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class PayloadTooLarge(InputError):
    """An input or an answer is larger than a limit; the message names the limit and setting."""

    code = "payload_too_large"


class UnknownModel(InputError):
    """An OpenAI-style request names a model this worker does not serve."""

    code = "model_not_found"


class SettingsError(WorkerError):
    """An environment variable has a value we cannot use. Raised at startup, before any job."""

    code = "invalid_setting"


class ModelNotFound(WorkerError):
    """No model weights were found in any place we looked. Raised at startup."""

    code = "model_not_found"


class UnsupportedModel(ModelNotFound):
    """The model was found, but no task serves it or its task could not load it (startup)."""

    code = "unsupported_model"


class StorageError(WorkerError):
    """An answer could not be stored or linked (after retries)."""

    code = "storage_failed"


class DownloadError(WorkerError):
    """An input URL could not be downloaded safely."""

    code = "download_failed"


class JobTimeout(WorkerError):
    """A job ran longer than its time limit."""

    code = "timeout"


class OutOfMemory(WorkerError):
    """The device ran out of memory for this job; memory was released and the worker serves on."""

    code = "out_of_memory"


class DeviceFault(WorkerError):
    """The device is in a state no later job can use (a poisoned CUDA context)."""

    code = "device_fault"


GENERIC_MESSAGE = "internal error while running the job; it has been logged on the worker"


def error_response(exc: BaseException, openai: bool = False) -> ErrorAnswer:
    """Turn any exception into the job's ``{"error": ...}`` answer.

    Known errors answer their own safe message and code. Anything else answers a generic message:
    the caller must log the traceback, since the exception text may hold paths or secrets.
    With ``openai``, ``error`` holds OpenAI's error object as JSON text (see the docstring above).
    Every message is cut to MAX_ERROR_CHARS, so no error answer can exceed a payload limit.
    """
    if isinstance(exc, WorkerError):
        answer: ErrorAnswer = {"error": cut(str(exc), MAX_ERROR_CHARS), "error_code": exc.code}
        if isinstance(exc, DeviceFault):
            # Asks RunPod to replace this worker instead of failing every later job on it.
            answer["refresh_worker"] = True
    else:
        answer = {"error": GENERIC_MESSAGE, "error_code": "internal"}
    if openai:
        answer["error"] = json.dumps({"error": openai_error(exc, answer["error"])})
    return answer


def openai_error(exc: BaseException, message: str) -> dict[str, Any]:
    """OpenAI's error object for ``exc``: its type says whose fault, ``param`` names the field."""
    if isinstance(exc, InputError):
        param = cut(exc.field, MAX_FIELD_CHARS) if exc.field else None
        return {"message": message, "type": "invalid_request_error", "param": param,
                "code": exc.code if isinstance(exc, UnknownModel) else None}
    code = exc.code if isinstance(exc, WorkerError) else "internal"
    return {"message": message, "type": "server_error", "param": None, "code": code}

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
builds an ``{"error": ...}`` dict. For OpenAI-compatible routes (``openai=True``) the error
string is OpenAI's error object as JSON, ``{"error": {"message", "type", "param", "code"}}``:
the job still FAILS (RunPod fails a job only on a string ``error``, and a generator handler's
answer keeps nothing but that string), and a proxy or client can parse it back. Unexpected
exceptions are logged with their traceback by the caller and answered with a generic message
that leaks nothing.
"""

from __future__ import annotations

import json
from typing import Any, TypedDict


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
    """
    if isinstance(exc, WorkerError):
        answer: ErrorAnswer = {"error": str(exc), "error_code": exc.code}
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
        return {"message": message, "type": "invalid_request_error", "param": exc.field,
                "code": exc.code if isinstance(exc, UnknownModel) else None}
    code = exc.code if isinstance(exc, WorkerError) else "internal"
    return {"message": message, "type": "server_error", "param": None, "code": code}

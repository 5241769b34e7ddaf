"""Size-aware delivery of a job's answer: inline when it fits, else a link to the stored answer.

RunPod drops answers over its payload limit (``/run`` 10 MB, ``/runsync`` 20 MB, 2 MB in older
docs) and the client sees COMPLETED with no output. So the answer is serialised and measured
here, before it is returned, and anything over ``OUTPUT_INLINE_LIMIT_BYTES`` (default 1 MB,
half the smallest documented limit, leaving room for the platform's own envelope) is uploaded.

What a client receives:

- inline: the answer itself, unchanged.
- link: ``{"output_link": {"url", "key", "bytes", "sha256", "content_type", "expires_at"}}``.
  One reserved top-level key, rather than the bare link object, so a client tells the two
  apart with one lookup even when an inline answer happens to have a ``url`` field. The linked
  object holds the full answer as compact UTF-8 JSON (``application/json``), or, when the
  answer is a list, one compact JSON item per line (``application/x-ndjson``, ``.jsonl``) so
  large per-item results can be read as a stream.

``output_mode`` (from the job input): ``auto`` (default) as above; ``inline`` never uploads and
fails with PayloadTooLarge over the limit; ``link`` always uploads.

The size counted is the byte length of the answer as the RunPod SDK will post it
(``json.dumps(answer, ensure_ascii=False)`` in UTF-8, i.e. with its ", " and ": " separators),
so the limit means what it says on the wire. NaN and infinities are refused: they are not JSON.
An answer that cannot be serialised raises TypeError (a bug in the task: logged, answered with
the generic error) instead of reaching the SDK, where it would hang the job.

This module never imports torch, runpod or boto3; uploads go through a ``storage.Storage``.
``deliver_output`` blocks while it uploads: from async code run it in a thread.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypedDict

from errors import InputError, PayloadTooLarge
from storage import Link, Storage

OutputMode = Literal["inline", "link", "auto"]
OUTPUT_MODES: tuple[str, ...] = ("inline", "link", "auto")
ANSWER_FILENAME = "answer.json"
ANSWER_LINES_FILENAME = "answer.jsonl"
JSON_TYPE = "application/json"
JSONL_TYPE = "application/x-ndjson"
STORAGE_SETTINGS_HINT = ("set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY "
                         "and BUCKET_NAME on the worker, or send s3Config with the job")


class LinkAnswer(TypedDict):
    """The answer returned in place of one too large to send inline."""

    output_link: Link


def measure_answer(answer: Any) -> int:
    """Bytes of ``answer`` as the RunPod SDK will post it; TypeError if it is not JSON."""
    return len(_dumps(answer, compact=False))


def serialise_answer(answer: Any) -> bytes:
    """Compact UTF-8 JSON of ``answer`` (what a link points to); TypeError if it is not JSON."""
    return _dumps(answer, compact=True)


def serialise_lines(items: list[Any]) -> bytes:
    """JSON Lines: one compact UTF-8 JSON value per line, newline-terminated."""
    return b"".join(_dumps(item, compact=True) + b"\n" for item in items)


def _dumps(value: Any, compact: bool) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":") if compact else None)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as err:
        # ValueError: NaN/inf, circular reference, lone surrogate (UnicodeEncodeError).
        raise TypeError(f"the answer is not JSON-serialisable: {err}") from None


def check_output_mode(mode: Any) -> OutputMode:
    """``mode`` if it is a known output mode (None means auto), else InputError."""
    if mode is None:
        return "auto"
    if mode not in OUTPUT_MODES:
        raise InputError(f"must be one of {', '.join(OUTPUT_MODES)}", field="input.output_mode")
    return mode


def deliver_output(answer: Any, *, job_id: str, storage: Storage | None,
                   inline_limit_bytes: int, mode: str | None = "auto") -> Any:
    """What the handler returns for ``answer``: the answer itself, or a ``LinkAnswer``.

    Blocks while uploading. Raises InputError for an unknown ``mode`` or ``link`` without
    storage, PayloadTooLarge when the answer is over the limit and cannot (or may not) be
    uploaded, StorageError when the upload fails, TypeError when the answer is not JSON.
    """
    chosen = check_output_mode(mode)
    size = measure_answer(answer)
    if chosen == "auto" and size <= inline_limit_bytes:
        return answer
    if chosen == "inline":
        if size <= inline_limit_bytes:
            return answer
        raise PayloadTooLarge(
            f"the answer is {size:,} bytes of JSON, over the inline limit of "
            f"{inline_limit_bytes:,} bytes (OUTPUT_INLINE_LIMIT_BYTES); ask for output_mode "
            "'auto' or 'link' to receive a download link instead", field="input.output_mode")
    if storage is None:
        if chosen == "link":
            raise InputError(f"'link' needs storage, and none is configured: "
                             f"{STORAGE_SETTINGS_HINT}", field="input.output_mode")
        raise PayloadTooLarge(
            f"the answer is {size:,} bytes of JSON, over the inline limit of "
            f"{inline_limit_bytes:,} bytes (OUTPUT_INLINE_LIMIT_BYTES), and no storage is "
            f"configured to send it as a link: {STORAGE_SETTINGS_HINT}")
    if isinstance(answer, list):
        data, filename, content_type = serialise_lines(answer), ANSWER_LINES_FILENAME, JSONL_TYPE
    else:
        data, filename, content_type = serialise_answer(answer), ANSWER_FILENAME, JSON_TYPE
    stored = storage.put(storage.key_for(job_id, filename), data, content_type)
    return LinkAnswer(output_link=stored.to_link())

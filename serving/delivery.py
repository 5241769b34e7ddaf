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

Files a task produces (an image, audio) are ``Artefact`` objects in its answer, made by
``JobContext.store`` (tasks/base.py). Delivery turns each into one of two objects:

- inline: ``{"data": <base64>, "bytes", "sha256", "content_type"}``, when ``output_mode`` is
  ``inline``, or ``auto`` and the whole answer with every file inline fits the limit;
- link: the ``Link`` object of the file stored as its own object with its own content type
  (``image/png``, never wrapped in JSON), when ``output_mode`` is ``link``, or ``auto`` and
  the answer would not fit. If the answer is still too large with its files linked, the rule
  above applies to the rest (an ``output_link`` to the JSON).

The size counted is the byte length of the answer as the RunPod SDK will post it
(``json.dumps(answer, ensure_ascii=False)`` in UTF-8, i.e. with its ", " and ": " separators),
so the limit means what it says on the wire. NaN and infinities are refused: they are not JSON.
An answer that cannot be serialised raises TypeError (a bug in the task: logged, answered with
the generic error) instead of reaching the SDK, where it would hang the job.

This module never imports torch, runpod or boto3; uploads go through a ``storage.Storage``.
``deliver_output`` blocks while it uploads: from async code run it in a thread, and pass the
job's end as ``within`` (a ``netguard.Deadline``): each upload stops when it expires, so no
upload outlives the job it belongs to.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from serving.errors import InputError, PayloadTooLarge
from serving.netguard import Deadline
from serving.stored import Link

if TYPE_CHECKING:
    from storage import Storage

OutputMode = Literal["inline", "link", "auto"]
OUTPUT_MODES: tuple[str, ...] = ("inline", "link", "auto")
ANSWER_FILENAME = "answer.json"
ANSWER_LINES_FILENAME = "answer.jsonl"
JSON_TYPE = "application/json"
JSONL_TYPE = "application/x-ndjson"
STORAGE_SETTINGS_HINT = ("set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY "
                         "and BUCKET_NAME on the worker, or send s3Config with the job")


class InlineFile(TypedDict):
    """A file returned inside the answer: its bytes base64-encoded, with what a link carries."""

    data: str
    bytes: int
    sha256: str
    content_type: str


@dataclass(eq=False)
class Artefact:
    """A file a task produced, placed in its answer; delivery makes it inline or a link.

    ``name`` is the file's name under the job's key (``image.png`` becomes
    ``<prefix>/<job id>/image.png``); give each file of one answer its own name.
    """

    data: bytes
    content_type: str
    name: str
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    def inline(self) -> InlineFile:
        return {"data": base64.b64encode(self.data).decode("ascii"), "bytes": len(self.data),
                "sha256": self.sha256, "content_type": self.content_type}

    def inline_size(self) -> int:
        """Bytes the inline object adds to the answer's JSON, without encoding it."""
        stub = {"data": "", "bytes": len(self.data), "sha256": self.sha256,
                "content_type": self.content_type}
        return measure_answer(stub) + 4 * ((len(self.data) + 2) // 3)


def find_artefacts(value: Any) -> Iterator[Artefact]:
    """Every Artefact inside ``value`` (dicts and lists, any depth), in order."""
    if isinstance(value, Artefact):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from find_artefacts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from find_artefacts(item)


def replace_artefacts(value: Any, make: Callable[[Artefact], Any]) -> Any:
    """``value`` with every Artefact replaced by ``make(artefact)``; other values kept."""
    if isinstance(value, Artefact):
        return make(value)
    if isinstance(value, dict):
        return {k: replace_artefacts(v, make) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [replace_artefacts(v, make) for v in value]
    return value


def inline_size(answer: Any) -> int:
    """Bytes of ``answer`` as posted with every Artefact inline (measured, not encoded)."""
    files = list(find_artefacts(answer))
    if not files:
        return measure_answer(answer)
    stubbed = replace_artefacts(answer, lambda a: "")
    # Each file replaces a 2-byte "" with its inline object.
    return measure_answer(stubbed) + sum(a.inline_size() - 2 for a in files)


class LinkAnswer(TypedDict):
    """The answer returned in place of one too large to send inline."""

    output_link: Link


def is_small(answer: Any, max_values: int = 512, max_chars: int = 65_536) -> bool:
    """Whether ``answer`` is plainly small: no file in it, at most ``max_values`` values and
    ``max_chars`` characters of text. Stops as soon as either is passed, so it costs at most
    that much however large the answer: what is small may be measured on the event loop."""
    stack, values, chars = [answer], 0, 0
    while stack:
        value = stack.pop()
        values += 1
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, dict | list | tuple):
            if values + len(stack) + len(value) > max_values:
                return False                   # before copying a large container's values
            if isinstance(value, dict):
                chars += sum(len(k) if isinstance(k, str) else 32 for k in value)
                stack.extend(value.values())
            else:
                stack.extend(value)
        elif isinstance(value, Artefact):
            return False
        if chars > max_chars:
            return False
    return True


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


StorageGetter = Callable[[], "Storage | None"]


def deliver_output(answer: Any, *, job_id: str, storage: Storage | StorageGetter | None,
                   inline_limit_bytes: int, mode: str | None = "auto",
                   within: Deadline | None = None) -> Any:
    """What the handler returns for ``answer``: the answer itself, or a ``LinkAnswer``.

    ``storage`` may be a function that returns it, called only when something is uploaded (a
    job's own ``s3Config`` builds a client). Blocks while uploading; every upload stops when
    ``within`` (the job's end) expires. Raises InputError for an
    unknown ``mode`` or ``link`` without storage, PayloadTooLarge when the answer is over the
    limit and cannot (or may not) be uploaded, StorageError when the upload fails, TypeError
    when the answer is not JSON.
    """
    chosen = check_output_mode(mode)
    get_storage: StorageGetter
    if callable(storage):
        get_storage = storage
    else:
        fixed = storage
        get_storage = lambda: fixed  # noqa: E731 - the same getter shape either way
    answer, chosen = deliver_files(answer, job_id=job_id, storage=get_storage,
                                   inline_limit_bytes=inline_limit_bytes, mode=chosen,
                                   within=within)
    size = measure_answer(answer)
    if chosen == "auto" and size <= inline_limit_bytes:
        return answer
    if chosen == "inline":
        if size <= inline_limit_bytes:
            return answer
        raise _inline_only(f"the answer is {size:,}", inline_limit_bytes, "a download link")
    store = get_storage()
    if store is None:
        raise _no_storage(chosen, f"the answer is {size:,}", inline_limit_bytes, "it as a link")
    if isinstance(answer, list):
        data, filename, content_type = serialise_lines(answer), ANSWER_LINES_FILENAME, JSONL_TYPE
    else:
        data, filename, content_type = serialise_answer(answer), ANSWER_FILENAME, JSON_TYPE
    stored = store.put(store.key_for(job_id, filename), data, content_type, within=within)
    return LinkAnswer(output_link=stored.to_link())


def deliver_lines_file(write: Callable[[], Path], *, size: int, job_id: str,
                       storage: StorageGetter, inline_limit_bytes: int,
                       mode: str | None = "auto", within: Deadline | None = None) -> LinkAnswer:
    """An answer spooled to disk as JSON Lines (``size`` bytes, too large to send inline), as
    a link: ``write()`` makes the file, called only once it is certain to be uploaded. Raises
    as ``deliver_output`` does for ``inline`` and for no storage."""
    chosen = check_output_mode(mode)
    what = f"the answer is {size:,}"
    if chosen == "inline":
        raise _inline_only(what, inline_limit_bytes, "a download link")
    target = storage()
    if target is None:
        raise _no_storage(chosen, what, inline_limit_bytes, "it as a link")
    stored = target.put(target.key_for(job_id, ANSWER_LINES_FILENAME), write(), JSONL_TYPE,
                        within=within)
    return LinkAnswer(output_link=stored.to_link())


def deliver_files(answer: Any, *, job_id: str, storage: StorageGetter, inline_limit_bytes: int,
                  mode: OutputMode, within: Deadline | None = None) -> tuple[Any, OutputMode]:
    """``answer`` with its Artefacts inline or uploaded as their own objects (see above), and
    the output mode for the rest of it: ``link`` becomes ``auto`` once the files are links.
    The files upload one after another, all of them within ``within`` (the job's end)."""
    try:
        if not any(True for _ in find_artefacts(answer)):
            return answer, mode
    except RecursionError:                 # circular, or too deep to be JSON
        raise TypeError("the answer is not JSON-serialisable: it nests too deep") from None
    limit = inline_limit_bytes
    size = inline_size(answer)
    what = f"the answer with its files inline is {size:,}"
    if mode == "inline" or (mode == "auto" and size <= limit):
        if size > limit:
            raise _inline_only(what, limit, "download links")
        return replace_artefacts(answer, Artefact.inline), mode
    target = storage()
    if target is None:
        raise _no_storage(mode, what, limit, "the files as links")
    linked = replace_artefacts(answer, lambda a: target.put(
        target.key_for(job_id, a.name), a.data, a.content_type, within=within).to_link())
    return linked, "auto"


def _over_limit(what: str, limit: int) -> str:
    return (f"{what} bytes of JSON, over the inline limit of {limit:,} bytes "
            "(OUTPUT_INLINE_LIMIT_BYTES)")


def _inline_only(what: str, limit: int, links: str) -> PayloadTooLarge:
    """The error for an answer over the limit when the job asked for output_mode 'inline'."""
    return PayloadTooLarge(f"{_over_limit(what, limit)}; ask for output_mode 'auto' or 'link' "
                           f"to receive {links} instead", field="input.output_mode")


def _no_storage(mode: str, what: str, limit: int, sending: str) -> InputError | PayloadTooLarge:
    """The error for an answer that must be uploaded when there is nowhere to upload it."""
    if mode == "link":
        return InputError(f"'link' needs storage, and none is configured: {STORAGE_SETTINGS_HINT}",
                          field="input.output_mode")
    return PayloadTooLarge(f"{_over_limit(what, limit)}, and no storage is configured to send "
                           f"{sending}: {STORAGE_SETTINGS_HINT}")

"""What the worker does for a task that declares its input and a ``predict``: the task's side of
the seam stays declarations (``tasks/base.py``), the machinery is here.

Owns, the same for every declared task: the parsed request (``Request``), the items and engine
that put ``predict_batch`` behind a ``batcher.Batcher`` (so cancel, the out-of-memory split, the
isolation of a failing item and the device-fault state are the batcher's, never the task's),
calling ``predict`` on the device thread, the field paths of ``predict``'s input errors in a
batch job (``placed_errors``), and a task's own settings read from the environment
(``TaskSettings``). Never imports runpod or boto3.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from builder.settings import describe, problem
from serving.delivery import Artefact
from serving.errors import InputError, SettingsError

if TYPE_CHECKING:
    from tasks.base import Task


@dataclass(frozen=True)
class Request:
    """A job input checked against the task's input model, its media not yet fetched."""

    input: BaseModel
    where: str = "input"               # field prefix for errors ("input.batch.3")

    @property
    def stream(self) -> bool:
        """True when the input has a ``stream`` field set (only a task that streams has one)."""
        return getattr(self.input, "stream", False) is True


@dataclass(eq=False)
class PredictItem:
    """One job's input (or one piece of it) while it waits for and goes through
    ``predict_batch``."""

    input: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    output: Any = None
    done: bool = False
    on_done: Callable[[], None] | None = None   # set by the batcher

    def reset_for_retry(self) -> bool:
        self.output, self.done = None, False
        return True


class PredictEngine:
    """The batcher's engine for a task: one ``predict_batch`` call per batch (device thread)."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def run(self, items: list[PredictItem]) -> None:
        active = [i for i in items if not i.cancelled.is_set()]
        if not active:
            return
        outputs = list(inference(self.task.predict_batch, [i.input for i in active]))
        if len(outputs) != len(active):
            raise RuntimeError(f"{type(self.task).__name__}.predict_batch returned "
                               f"{len(outputs)} answers for {len(active)} inputs")
        for item, output in zip(active, outputs, strict=True):
            item.output, item.done = output, True


def takes_job(predict: Callable[..., Any]) -> bool:
    """Whether ``predict`` is ``predict(input, job)`` rather than ``predict(input)``."""
    return len(inspect.signature(predict).parameters) >= 2


def inference(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` without autograd: ``predict`` and ``predict_batch`` run this way."""
    with torch.inference_mode():
        return fn(*args)


def checked_answer(task: Task, answer: Any) -> dict[str, Any]:
    """``predict``'s answer as the job's answer: a mapping, or a pydantic model's fields, with
    ``model`` (the served name) added when the task left it out."""
    if isinstance(answer, BaseModel):
        answer = dict(answer)       # shallow: OutputFile values stay files for delivery
    if not isinstance(answer, Mapping):
        raise TypeError(f"{type(task).__name__}.predict must return a dict, "
                        f"not {type(answer).__name__}")
    return {**answer, "model": answer.get("model", task.loaded.served_name)}


@contextmanager
def placed_errors(where: str) -> Iterator[None]:
    """An InputError raised inside, naming its field as a single job's input would
    (``input.prompt``), named under ``where`` instead: a batch item's ``input.batch.3.prompt``.
    ``predict`` never sees where its input sits in the job; its errors still point there."""
    try:
        yield
    except InputError as exc:
        field = exc.field or ""
        if where == "input" or not (field == "input" or field.startswith(("input.", "input["))):
            raise
        message = str(exc).removeprefix(f"{field}: ")
        raise type(exc)(message, field=where + field.removeprefix("input")) from None


def rename_files(answer: Any, prefix: str) -> Any:
    """``answer`` with every file in it named ``prefix + name`` (batch items: ``3-image.png``)."""
    if isinstance(answer, Artefact):
        return Artefact(answer.data, answer.content_type, prefix + answer.name)
    if isinstance(answer, dict):
        return {k: rename_files(v, prefix) for k, v in answer.items()}
    if isinstance(answer, list):
        return [rename_files(v, prefix) for v in answer]
    return answer


class TaskSettings(BaseModel):
    """A task's own settings, read from the environment as ``<env_prefix><FIELD NAME>``.

    Declare fields with their defaults and ranges (``Field(10_000, ge=1)``) and set
    ``env_prefix``; the task then reads them as ``self.options``. An invalid value stops the
    worker at startup, naming the variable and the legal values, as every setting does.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    env_prefix: ClassVar[str] = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TaskSettings:
        env = os.environ if env is None else env
        names = {name: f"{cls.env_prefix}{name.upper()}" for name in cls.model_fields}
        given = {name: env[var].strip() for name, var in names.items()
                 if env.get(var, "").strip()}
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            # The same one line as the worker's own settings (builder/settings.py).
            err = exc.errors(include_url=False)[0]
            field_name = str(err["loc"][0]) if err["loc"] else ""
            if field_name not in names:
                raise SettingsError(f"{cls.env_prefix}*: "
                                    f"{err['msg'].removeprefix('Value error, ')}") from None
            info = cls.model_fields[field_name]
            bounds = {k: next((getattr(m, k) for m in info.metadata if hasattr(m, k)), None)
                      for k in ("ge", "le")}
            declared = describe("task", field_name, info.annotation, info.default,
                                {"env": names[field_name], **bounds})
            raise SettingsError(problem(declared, given.get(field_name), err["type"],
                                        err["msg"])) from None

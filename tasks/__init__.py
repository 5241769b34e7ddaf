"""The tasks a worker can serve, one module each, and the one place they are registered.

A task is a class made with ``(loaded_model, worker_settings)`` that has ``name``,
``auto_model`` (the transformers Auto class name that loads its models),
``parse(job_input, where="input") -> request`` (raises InputError naming the field under
``where``), ``async answer(request) -> dict`` and
``stream(request) -> async iterator of dicts``; a request has a ``stream`` flag. The model's
``task`` (``WORKER_TASK``, or detected from its config by ``model_loader.detect_task``) picks the
class here. To add a task: write ``tasks/<name>.py`` with such a class and add one line to
``TASKS`` below (and, if a model can be recognised as one, a rule in ``detect_task``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from tasks.embed import EmbedTask
from tasks.generate import GenerateTask


class Task(Protocol):
    name: str
    auto_model: str

    def parse(self, job_input: dict[str, Any], where: str = "input") -> Any: ...

    async def answer(self, request: Any) -> Any: ...

    def stream(self, request: Any) -> AsyncIterator[dict[str, Any]]: ...


TASKS: dict[str, type[Task]] = {
    "generate": GenerateTask,
    "embed": EmbedTask,
}

"""The tasks a worker can serve, one module each, and the one place they are registered.

A task is a class with ``name``; ``parse(job_input, where="input") -> request``, which raises
InputError naming the field under ``where``; ``async answer(request) -> dict``; and
``stream(request) -> async iterator of dicts``. A request has a ``stream`` flag.
To add a task: write ``tasks/<name>.py`` with such a class and add one
line to ``TASKS`` below.
"""

from __future__ import annotations

from tasks.generate import GenerateTask

TASKS = {
    "generate": GenerateTask,
}

"""The tasks a worker can serve, one module each, and the one place they are registered.

A task is a ``tasks.base.Task`` subclass in its own module: it recognises its models, loads them,
declares its input contract and answers jobs (``tasks/base.py`` says what each part does).
``WORKER_TASK=auto`` gives the model to the task whose ``pipeline_tasks`` holds the kind its
config reads as (``serving/detect.py``), or whose own ``Task.serves`` rule claims it; the order
below does not matter, and two tasks claiming one model stop the start. ``WORKER_TASK=<name>``
(or a kind) picks another task that fits the model.

To add a task: write ``tasks/<name>.py`` (``tasks/upscale.py`` is a complete example that
returns files) and add one line to ``TASKS``. Nothing else in the worker names a task.

The plugin seam: the worker's own modules (``worker.py``, ``model_loader.py``,
``openai_compat.py``) reach tasks only through ``TASKS`` and the ``Task`` interface; a task
imports the worker's helpers (``model_loader``, ``validation``, ``batcher``, ``tasks.base``),
never the other way round.
"""

from __future__ import annotations

from tasks.base import JobContext, Task
from tasks.embed import EmbedTask
from tasks.generate import GenerateTask
from tasks.pipeline import PipelineTask
from tasks.upscale import UpscaleTask

TASKS: dict[str, type[Task]] = {
    "generate": GenerateTask,
    "embed": EmbedTask,
    "upscale": UpscaleTask,
    "pipeline": PipelineTask,
}

__all__ = ["TASKS", "JobContext", "Task"]

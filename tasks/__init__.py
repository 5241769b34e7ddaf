"""The tasks a worker can serve, one module each, and the one place they are registered.

A task is a ``tasks.base.Task`` subclass in its own module: it declares its input model, the
models it serves and how they load, and writes ``predict`` (``tasks/base.py`` says what each
part does; docs/tasks.md how to write and test one). ``WORKER_TASK=auto`` gives the model to
the task whose ``pipeline_tasks`` holds the kind its config reads as (``serving/detect.py``),
or whose own ``Task.serves`` rule claims it (a rule beats a kind); the order below does not
matter, and two tasks claiming one model stop the start. ``WORKER_TASK=<name>`` (or a kind)
picks another task that fits the model.

To add a task: write ``tasks/<name>.py`` (the README's classifier is a whole one;
``tasks/upscale.py`` a batched one whose answers are image files) and add one line to
``TASKS``. Nothing else in the worker names a task. ``generate`` and ``embed`` are on the same
seam: generate streams (``predict_stream``) and batches token by token in its own engine, embed
batches each text of a job on its own (``Task.batched``) and serves the OpenAI embeddings route.

The plugin seam: the worker reaches tasks only through ``TASKS``, which ``handler.py`` hands
to it, and the ``Task`` interface; a task imports the worker's helpers through ``tasks.base``,
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

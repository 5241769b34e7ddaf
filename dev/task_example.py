"""``python -m dev.task_example``: the example job input of the task this project's worker
serves with this environment, printed as one JSON line ``{"task": name, "input": {...}}``.

It finds the model and picks its task exactly as the worker does (``handler.parts``: the
project's ``model_loader`` finds the directory by MODEL_PATH, the baked model or the caches;
``serving.loading.pick_task`` the task by WORKER_TASK or each task's rule), reads only the
model's config, and never downloads (MODEL_ALLOW_DOWNLOAD is ignored). The input is the task's
own ``Task.example_for`` (its ``example``, or one per kind). It exits 1 with one line on stderr
when no model is found or no task serves it.

The local endpoint's CLI runs it to print an example request for the task its worker serves.
It imports the project's tasks, hence torch and transformers: run it in a process of its own,
never in the endpoint's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping


def main(env: Mapping[str, str] | None = None) -> int:
    from handler import parts
    from serving.config import ModelSettings
    from serving.errors import WorkerError
    from serving.loading import pick_task

    project = parts()
    try:
        settings = dataclasses.replace(ModelSettings.from_env(env), allow_download=False)
        model = project.find_model(settings)
        task = pick_task(model, settings.task, project.tasks)
    except WorkerError as err:
        print(f"task_example: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    example = task.example_for(model, settings.task)
    print(json.dumps({"task": task.name, "input": example}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

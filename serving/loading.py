"""The load itself: which task serves the model, its weights placed, warmed up, one startup line.

Owns ``load_task``, which a worker calls once: the project's ``find_model`` (``model_loader``:
where the weights come from) hands it a ``ModelFiles``, ``pick_task`` chooses the task from the
registry it is handed (``tasks.TASKS``), the task loads its model (``Task.load``, by default
``placement.place_model``), and the warm-up runs on the device thread.

Which task serves a model comes from its config (``serving/detect.py`` reads its architecture in
transformers' own auto-class tables as pipeline kinds, its default first) and each task's
``pipeline_tasks`` (or its own ``serves`` rule), whatever the registry's order; a model no task
serves, a WORKER_TASK that does not fit it, or two tasks claiming it stop the worker with one
line naming its architecture, before any weight is read.

Never imports the project's modules: the registry and ``find_model`` are handed in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from serving.config import ModelSettings, WorkerSettings
from serving.detect import describe
from serving.device import DEVICE_THREAD
from serving.errors import ModelNotFound, SettingsError, UnsupportedModel
from serving.placement import ModelFiles, first_line, peak_bytes

if TYPE_CHECKING:
    from tasks.base import Task

log = logging.getLogger("worker.model")

FindModel = Callable[[ModelSettings], ModelFiles]   # the project's model_loader.find_model


def pick_task(model: ModelFiles, setting: str, tasks: Mapping[str, type[Task]]) -> type[Task]:
    """The task for ``model``, whatever the registry's order.

    The model's kinds come from its config (``serving.detect``: transformers' own auto-class
    tables), its default first. ``WORKER_TASK=auto`` takes the task that serves the default kind
    (``Task.pipeline_tasks``), or whose own ``serves`` rule claims the model; ``WORKER_TASK``
    names a task, or a kind, to pick another fit. A task's own rule beats a kind. A model no
    task fits, a forced task that does not fit it, or two tasks that both claim it (two rules,
    or two kinds) stop the worker with one line."""
    kinds = model.kinds
    arch = describe(model.config)
    if setting != "auto":
        by_kind = {kind: task for task in tasks.values() for kind in task.pipeline_tasks}
        task = tasks.get(setting) or by_kind.get(setting)
        if task is None:
            raise SettingsError(f"WORKER_TASK={setting!r} is not allowed; use one of "
                                f"auto, {', '.join(tasks)}"
                                + (f", or a kind: {', '.join(sorted(by_kind))}" if by_kind else ""))
        if task.serves(model) or (set(task.pipeline_tasks) & set(kinds)) or (
                not task.pipeline_tasks and not kinds):
            return task
        raise UnsupportedModel(
            f"WORKER_TASK={setting} cannot serve the model in {model.path} ({arch}: "
            f"{_kinds_text(kinds)}); {_fits_text(model, kinds, tasks)}")
    # A task's own rule (a fork's classifier, say) is more specific than a kind, and wins.
    claims = [task for task in tasks.values() if task.serves(model)] or [
        task for task in tasks.values() if kinds and kinds[0] in task.pipeline_tasks]
    if len(claims) == 1:
        return claims[0]
    if claims:
        names = ", ".join(task.name for task in claims)
        raise UnsupportedModel(
            f"tasks {names} all serve the model in {model.path} ({arch}); set WORKER_TASK to "
            "the one that should")
    raise UnsupportedModel(
        f"no task serves the model in {model.path} ({arch}: {_kinds_text(kinds)}); "
        f"{_fits_text(model, kinds, tasks)}")


def _kinds_text(kinds: tuple[str, ...]) -> str:
    if not kinds:
        return "a kind of model this version of transformers does not know"
    return f"read as {kinds[0]}" + (f", also {', '.join(kinds[1:])}" if kinds[1:] else "")


def _fits_text(model: ModelFiles, kinds: tuple[str, ...], tasks: Mapping[str, type[Task]]) -> str:
    """Which WORKER_TASK would serve the model, or how to add a task."""
    fits = [task.name for task in tasks.values()
            if task.serves(model) or set(task.pipeline_tasks) & set(kinds)]
    if fits:
        return f"tasks that fit it: {', '.join(fits)} (set WORKER_TASK to one)"
    return (f"no task here serves it (tasks: {', '.join(tasks)}); add one for it (README: "
            "Fork it, add a task)")


def load_task(settings: ModelSettings, worker_settings: WorkerSettings,
              tasks: Mapping[str, type[Task]], find_model: FindModel,
              warmup: bool | None = None, env: Mapping[str, str] | None = None) -> Task:
    """Find the model (``find_model``), pick its task from ``tasks``, load and warm it up on the
    device thread, and log one startup line. ``env`` is where the task's own settings are read
    (default: os.environ). Call once per worker. Raises WorkerError (one line, no traceback)."""
    return DEVICE_THREAD.submit(_load_task, settings, worker_settings, tasks, find_model,
                                warmup, env).result()


def _load_task(settings: ModelSettings, worker_settings: WorkerSettings,
               tasks: Mapping[str, type[Task]], find_model: FindModel,
               warmup: bool | None, env: Mapping[str, str] | None) -> Task:
    model = find_model(settings)
    task_class = pick_task(model, settings.task, tasks)
    try:
        loaded = task_class.load(model, settings)
        loaded.task = task_class.name
        loaded.stats.task = task_class.name
        task = task_class(loaded, worker_settings, env)
        if settings.warmup if warmup is None else warmup:
            start = time.perf_counter()
            task.warm_up()
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            loaded.stats.warmup_s = time.perf_counter() - start
    except UnsupportedModel as exc:
        raise _cannot_load(task_class, model, str(exc)) from None
    except (ModelNotFound, SettingsError):
        raise
    except Exception as exc:  # noqa: BLE001 - a model the task cannot load: one line
        log.debug("loading %s failed", model.path, exc_info=True)
        raise _cannot_load(task_class, model, first_line(exc)) from None
    loaded.stats.peak_bytes = peak_bytes(str(loaded.device))
    log.info(loaded.stats.line(model.source, loaded.served_name))
    return task


def _cannot_load(task_class: type[Task], model: ModelFiles, reason: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"the {task_class.name} task could not load the model in {model.path} "
        f"({', '.join(model.architectures) or 'no architectures'}: {reason}); set WORKER_TASK "
        "to a task that serves it, or add one (README: Fork it, add a task)")

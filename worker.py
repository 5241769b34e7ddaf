"""Job → task → answer: the wiring between RunPod's job and the model, without the SDK loop.

Owns what happens to one job: the input checks every job passes, the choice of streamed or whole
answer, and the conversion of every failure into an ``{"error": ...}`` answer (through
``errors.error_response``, the one place that builds one). Never imports boto3 or runpod, so it
is tested in-process; ``handler.py`` builds one ``Worker`` at import and hands it RunPod's jobs.

Every job is answered by an async generator (RunPod streams only from generator handlers): a
streamed job yields its chunks, any other job yields exactly one item, its answer. With
``return_aggregate_stream`` the job's final output is the list of what was yielded.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from config import ModelSettings, WorkerSettings
from errors import error_response
from model_loader import LoadedModel, load_model
from openai_compat import OpenAIRoutes, is_openai_job
from tasks import TASKS, Task
from validation import check_job_input

log = logging.getLogger("worker")


def configure_logging(level: int = logging.INFO) -> None:
    """Our own log lines, one per event, to stderr; independent of the SDK's logger."""
    root = logging.getLogger("worker")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


@dataclass
class Worker:
    """A loaded model and its task, ready to answer jobs."""

    settings: WorkerSettings
    loaded: LoadedModel
    task: Task
    openai: OpenAIRoutes

    async def handle(self, job: Any) -> AsyncIterator[dict[str, Any] | str]:
        """Answer one RunPod job: yields stream chunks, or one answer, or one error answer."""
        job_id = job.get("id", "?") if isinstance(job, dict) else "?"
        openai = is_openai_job(job)
        try:
            job_input = check_job_input(job, self.settings.max_input_bytes)
            if openai:  # RunPod's OpenAI-compatible routes (openai_compat.py)
                async for item in self.openai.handle(job_input):
                    yield item
                return
            request = self.task.parse(job_input)
            if request.stream:
                async for chunk in self.task.stream(request):
                    yield chunk
            else:
                yield dict(await self.task.answer(request))
        except Exception as exc:  # noqa: BLE001 - the job boundary: every failure is answered
            answer = error_response(exc, openai=openai)
            if answer["error_code"] == "internal":
                log.exception("job %s failed unexpectedly", job_id)
            else:
                log.info("job %s failed: %s", job_id, answer["error"])
            yield dict(answer)

    def concurrency(self, current: int = 1) -> int:
        """RunPod's concurrency_modifier: a constant (a change stops intake until jobs drain)."""
        return self.settings.concurrency


def build_worker(env: Mapping[str, str] | None = None) -> Worker:
    """Read settings, load and warm up the model, and pick its task. Raises WorkerError."""
    settings = WorkerSettings.from_env(env)
    loaded = load_model(ModelSettings.from_env(env),
                        model_classes={name: task.auto_model for name, task in TASKS.items()})
    task = TASKS[loaded.task](loaded, settings)
    return Worker(settings=settings, loaded=loaded, task=task,
                  openai=OpenAIRoutes(task, loaded.served_name))

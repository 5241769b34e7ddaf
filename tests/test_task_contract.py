"""Every registered task keeps the seam's contract: a schema, a warm-up, bad input, batch jobs.

Runs over ``tasks.TASKS``, so a task added to the registry is checked as soon as it has a
model: give it a worker fixture in ``TASK_WORKERS`` (``tests/support/worker.py`` shows how).
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from serving.device import DEVICE_THREAD
from tasks import TASKS
from tests.support.worker import collect

# The session fixture that serves each registered task on a real (small) model.
TASK_WORKERS = {"generate": "worker", "embed": "embed_worker", "upscale": "upscale_worker",
                "pipeline": "pipeline_worker"}


@pytest.fixture(params=list(TASKS))
def served(request: pytest.FixtureRequest) -> Any:
    name = request.param
    assert name in TASK_WORKERS, (f"task {name!r} has no worker fixture: add one to "
                                  "TASK_WORKERS in tests/test_task_contract.py")
    worker = request.getfixturevalue(TASK_WORKERS[name])
    assert worker.task.name == name
    return worker


class TestEveryRegisteredTask:
    def test_declares_an_input_model_with_a_schema_and_a_valid_example(self, served):
        task = served.task
        assert isinstance(task.input, type) and issubclass(task.input, BaseModel)
        schema = task.input.model_json_schema()
        assert schema["type"] == "object" and schema["properties"]
        assert task.example, "an example input is what warm-up and this test send"
        assert set(task.example) <= set(schema["properties"])
        task.parse(dict(task.example))          # raises InputError if the example is invalid

    def test_warms_up_on_the_device_thread(self, served):
        DEVICE_THREAD.submit(served.task.warm_up).result(timeout=120)

    def test_answers_its_example_naming_the_model(self, loop, served):
        (out,) = loop.run(collect(served, dict(served.task.example)))
        assert "error" not in out, out
        assert out["model"] == served.loaded.served_name

    def test_an_unknown_field_is_refused_by_name(self, loop, served):
        (out,) = loop.run(collect(served, {**served.task.example, "no_such_field": 1}))
        assert out["error_code"] == "invalid_input"
        assert out["error"].startswith("input.no_such_field: unknown field")

    def test_a_batch_job_answers_each_item_and_fails_only_the_bad_one(self, loop, served):
        example = dict(served.task.example)
        (out,) = loop.run(collect(served, {"batch": [example, {**example, "no_such_field": 1},
                                                          example]}))
        assert out["failed"] == 1
        assert "error" not in out["results"][0] and "error" not in out["results"][2]
        assert out["results"][1]["index"] == 1
        assert out["results"][1]["error"].startswith("input.batch.1.no_such_field")

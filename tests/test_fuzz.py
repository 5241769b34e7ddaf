"""Thousands of arbitrary and near-miss inputs: every one gets a clean answer, never a crash.

The property: whatever JSON a caller sends as ``input``, the worker yields answers whose errors
are non-empty strings naming the problem (never a traceback, never the generic internal error,
which would mean an unexpected exception), and a valid job afterwards still succeeds.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.generate import GenerateTask
from tests.support.worker import chat, collect

pytestmark = pytest.mark.slow

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["messages", "prompt", "max_new_tokens", "temperature", "top_p", "top_k",
          "repetition_penalty", "seed", "stop", "stream", "output_mode", "batch", "batch_url",
          "openai_route", "openai_input", "texts", "role", "content"]
near_miss = st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=4)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                 "content": st.text(max_size=24)})
near_valid = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=0, max_size=3)},
    optional={"max_new_tokens": st.integers(-2, 4), "temperature": st.floats(-1, 3),
              "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-1, 2000),
              "seed": st.integers(-1, 2**64), "stop": st.lists(st.text(max_size=4), max_size=3),
              "stream": st.booleans(), "output_mode": st.sampled_from(["auto", "link", "x"])})
openai_like = st.fixed_dictionaries(
    {"openai_route": st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                      "/v1/models", "/v1/embeddings", "/v2/nope"]),
     "openai_input": json_values | st.fixed_dictionaries(
         {"model": st.text(max_size=8), "messages": st.lists(message, max_size=2)},
         optional={"max_tokens": st.integers(-1, 3), "stream": st.booleans(),
                   "n": st.integers(0, 3)})})
job_inputs = json_values | near_miss | near_valid | openai_like


def test_arbitrary_input_always_gets_a_clean_answer_and_the_worker_serves_on(loop, worker):
    limits = dataclasses.replace(worker.settings, max_new_tokens=4, default_max_new_tokens=4,
                                 job_timeout_s=30)
    # openai=None: the OpenAI routes are built again, for the small task, by the first such job
    small = dataclasses.replace(worker, settings=limits, task=GenerateTask(worker.loaded, limits),
                                openai=None)

    @settings(max_examples=2000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(job_inputs)
    def clean_answer(job_input):
        items = loop.run(collect(small, job_input), timeout=60)
        assert items, "no answer at all"
        for item in items:
            assert isinstance(item, dict | str)
            if isinstance(item, dict) and "error" in item:
                assert isinstance(item["error"], str) and item["error"]
                assert "Traceback" not in item["error"] and 'File "' not in item["error"]
                assert item.get("error_code") != "internal", item

    clean_answer()
    after = loop.run(collect(small, chat("What is the capital of France?")))[0]
    assert after["text"].startswith("The capital of France"), after

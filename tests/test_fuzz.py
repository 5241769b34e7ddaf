"""Thousands of arbitrary, near-miss and hostile inputs: every one gets a clean, short answer.

The property: whatever JSON a caller sends as ``input`` (and as the job's ``s3Config``), the
worker yields answers whose errors are non-empty strings naming the problem (never a traceback,
never the generic internal error, which would mean an unexpected exception), no error is longer
than ``errors.MAX_ERROR_CHARS``, and a valid job afterwards still succeeds. Hostile shapes
include deep nesting, megabyte and odd strings (control characters, unpaired surrogates), long
unknown field names, URLs that aim at private addresses or are malformed, and malformed
``s3Config`` endpoints. No generated URL needs a DNS lookup: hosts are IP literals (refused
before any connection, since private addresses are not allowed here) or malformed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.config import StorageSettings
from serving.errors import MAX_ERROR_CHARS
from serving.worker import Worker
from tasks.generate import GenerateTask
from tests.support.worker import chat

pytestmark = pytest.mark.slow

CAPITAL = "What is the capital of France?"

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def nested(depth: int, kind: str) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


deep = st.builds(nested, st.sampled_from([50, 900, 5000]), st.sampled_from(["list", "dict"]))
odd_chars = ["x", "word ", "\x00", "\ud800", "\u202e", "\n", "\U0001f642", "é", "<|im_end|>"]
huge = st.builds(lambda c, n: c * n, st.sampled_from(odd_chars),
                 st.sampled_from([1, 300, 3000, 70_000, 1_000_000]))
strings = st.text(max_size=12) | huge
long_names = st.builds(lambda c, n: c * n, st.sampled_from(["z", "\n", "\ud800", "é"]),
                       st.sampled_from([300, 200_000]))
odd_urls = st.sampled_from([
    "", "file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/", "http://",
    "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:1/x.jsonl", "http://[::1]/x",
    "http://[::ffff:127.0.0.1]/x", "http://10.0.0.1/a.jsonl", "http://0x7f000001/x",
    "http://2130706433/x", "https://user:secret@127.0.0.1/x", "http://[::1", "http://127.0.0.1:99999/",
    "http://[fe80::1%25eth0]/x", "s3://", "s3://bucket", "s3:///key", "s3://b/k?x=1",
    "http://10.0.0.1/" + "a" * 100_000, "HTTP://127.0.0.1/\x00",
]) | strings | json_values
odd_endpoints = st.sampled_from([
    "", " ", "not a url", "ftp://127.0.0.1", "http://", "http://[::1", "http://user:pw@127.0.0.1",
    "http://127.0.0.1/?a=b", "//127.0.0.1", "http://\ud800",
]) | json_values
s3_configs = st.none() | json_values | st.fixed_dictionaries({
    "accessId": st.sampled_from(["key", ""]) | json_values,
    "accessSecret": st.sampled_from(["secret"]) | json_values,
    "bucketName": st.sampled_from(["bucket", "", "a" * 1000]) | json_values,
    "endpointUrl": odd_endpoints})

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

# Hostile shapes: mostly refused before the model runs, so many examples stay cheap.
hostile_miss = st.dictionaries(st.sampled_from(FIELDS) | long_names, json_values | deep | strings,
                               min_size=1, max_size=4)
hostile_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot"]),
                                         "content": strings})
hostile_chat = st.fixed_dictionaries(
    {"messages": st.lists(hostile_message, max_size=3) | deep},
    optional={"stop": st.lists(strings, max_size=3) | strings})
hostile_prompt = st.fixed_dictionaries({"prompt": strings},
                                       optional={"output_mode": st.sampled_from(["link", "x"])})
hostile_batch = st.fixed_dictionaries(
    {"batch": st.lists(hostile_chat | hostile_prompt | json_values, max_size=3) | deep}) | \
    st.fixed_dictionaries({"batch_url": odd_urls})
hostile_openai = st.fixed_dictionaries(
    {"openai_route": st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                      "/v1/embeddings"]) | strings,
     "openai_input": deep | st.fixed_dictionaries(
         {"model": strings, "messages": st.lists(hostile_message, max_size=2)},
         optional={"tools": json_values | huge, "prompt": strings, "stop": strings})
     | st.dictionaries(st.sampled_from(["model", "messages", "prompt"]) | long_names,
                       strings | json_values, max_size=3)})
hostile_inputs = deep | hostile_miss | hostile_chat | hostile_prompt | hostile_batch | \
    hostile_openai


def error_message(item: dict) -> str:
    """The error's text; for an OpenAI route, the message inside its JSON error object."""
    try:
        body = json.loads(item["error"])
    except ValueError:
        return item["error"]
    return body["error"]["message"] if isinstance(body, dict) and "error" in body else \
        item["error"]


@pytest.fixture(scope="module")
def small(worker) -> Worker:
    """The real model with tiny limits (4 new tokens, 64 prompt tokens) and one-try storage."""
    limits = dataclasses.replace(worker.settings, max_new_tokens=4, default_max_new_tokens=4,
                                 max_prompt_tokens=64, job_timeout_s=30)
    storage = StorageSettings.from_env({"BUCKET_RETRY_ATTEMPTS": "1",
                                        "BUCKET_TIMEOUT_SECONDS": "2"})
    task = GenerateTask(worker.loaded, limits)
    # openai=None: the OpenAI routes are built again, for the small task, by the first such job
    return dataclasses.replace(worker, settings=limits, storage_settings=storage, task=task,
                               openai=None)


def check_clean(loop, small: Worker, job: dict) -> None:
    """Every answer is clean: an error is a short one-line string, never the internal error."""
    items = loop.run(answers(small, job), timeout=60)
    assert items, "no answer at all"
    for item in items:
        assert isinstance(item, dict | str | list)   # a list: the Hugging Face shape's answer
        if isinstance(item, dict) and "error" in item:
            assert isinstance(item["error"], str) and item["error"]
            assert "Traceback" not in item["error"] and 'File "' not in item["error"]
            assert item.get("error_code") != "internal", item
            message = error_message(item)
            assert len(message) <= MAX_ERROR_CHARS and "\n" not in message, message[:200]


async def answers(worker: Worker, job: dict) -> list:
    return [item async for item in worker.handle(job)]


FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def test_arbitrary_input_always_gets_a_clean_answer_and_the_worker_serves_on(loop, small):
    @settings(FUZZ, max_examples=2000)
    @given(job_inputs)
    def clean_answer(job_input):
        check_clean(loop, small, {"id": "fuzz", "input": job_input})

    clean_answer()
    after = loop.run(answers(small, {"id": "after", "input": chat(CAPITAL)}))[0]
    assert after["text"].startswith("The capital of France"), after


def test_hostile_input_always_gets_a_short_clean_answer_and_the_worker_serves_on(loop, small):
    @settings(FUZZ, max_examples=400)
    @given(hostile_inputs, s3_configs)
    def clean_answer(job_input, s3_config):
        job = {"id": "hostile", "input": job_input}
        if s3_config is not None:
            job["s3Config"] = s3_config
        check_clean(loop, small, job)

    clean_answer()
    after = loop.run(answers(small, {"id": "after", "input": chat(CAPITAL)}))[0]
    assert after["text"].startswith("The capital of France"), after


# ---------------------------------------------------------------------------------------------
# Media and the model kinds served with no code: hostile images, audio and the API's shape
# ---------------------------------------------------------------------------------------------
def _media_values() -> list[str]:
    """Hostile media as data URIs, made once: bombs past each structural limit, truncated and
    mislabelled files, bytes that are no media at all."""
    import base64

    from tests.support import images
    from tests.test_audio_families import tone, wav_bytes

    png = images.image_bytes(16, 12)
    wav = wav_bytes(tone(0.2))
    raws = {
        "png": [png, png[: len(png) // 2], images.iccp_bomb(80), images.animation(1100),
                images.png_chunks([(b"tEXt", b"k\0v")] * 300)],
        "jpeg": [images.jpeg_scan_bomb(64, 120), images.image_bytes(16, 12, "JPEG")[:100]],
        "wav": [wav, wav[:60], b"RIFF" + b"\xff" * 40, b"\0" * 500],
    }
    return [f"data:{'audio' if kind == 'wav' else 'image'}/{kind};base64,"
            + base64.b64encode(raw).decode() for kind, group in raws.items() for raw in group]


media = st.sampled_from(_media_values()) | odd_urls
media_inputs = st.one_of(
    st.fixed_dictionaries({"image": media}, optional={"output_format": strings | json_values}),
    st.fixed_dictionaries({"inputs": media | st.lists(media, max_size=3) | json_values},
                          optional={"parameters": json_values}),
    st.fixed_dictionaries({"text": strings}, optional={"top_k": json_values,
                                                       "function_to_apply": json_values}),
    st.fixed_dictionaries({"inputs": strings | st.lists(strings, max_size=3)},
                          optional={"parameters": st.dictionaries(
                              st.sampled_from(["top_k", "function_to_apply", "x"]),
                              json_values, max_size=3)}),
    json_values,
)
media_jobs = media_inputs | st.fixed_dictionaries({"batch": st.lists(media_inputs, min_size=1,
                                                                       max_size=3)})


@pytest.mark.parametrize("served", ["upscale_worker", "pipeline_worker"])
def test_hostile_media_and_api_shapes_get_a_clean_answer_and_the_worker_serves_on(
        loop, served, request):
    """Decode bombs, truncated and mislabelled media, the Hugging Face API's shape with
    arbitrary parameters, for an image task and a model kind served with no code."""
    worker = request.getfixturevalue(served)

    @settings(FUZZ, max_examples=150)
    @given(media_jobs)
    def clean_answer(job_input):
        check_clean(loop, worker, {"id": "media", "input": job_input})

    clean_answer()
    after = loop.run(answers(worker, {"id": "after", "input": dict(worker.task.example)}))[0]
    assert "error" not in after, after

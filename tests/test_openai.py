"""OpenAI-compatible routes through the job wiring (in-process), checked with openai's own types.

Jobs look as RunPod's OpenAI endpoint sends them: ``{"openai_route", "openai_input"}``.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serving.worker import Worker
from tests.support.worker import MINILM_NAME, LoopThread, collect

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def route(path: str, body: dict | None = None) -> dict:
    return {"openai_route": path, "openai_input": body if body is not None else {}}


def chat(worker: Worker, **fields) -> dict:
    return {"model": worker.loaded.served_name, "messages": CAPITAL, "max_tokens": 12,
            **fields}


def one(loop: LoopThread, worker: Worker, job_input: dict) -> dict:
    items = loop.run(collect(worker, job_input))
    assert len(items) == 1, items
    return items[0]


def openai_error(answer: dict) -> dict:
    """The OpenAI error object a failed OpenAI job carries as its (string) error."""
    assert isinstance(answer["error"], str), "a non-string error would not fail the job"
    body = json.loads(answer["error"])
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def sse_events(items: list) -> list[str]:
    """The data of every server-sent event in a stream's yielded strings."""
    assert all(isinstance(i, str) for i in items), items
    text = "".join(items)
    assert text.endswith("data: [DONE]\n\n")
    return [block.removeprefix("data: ") for block in text.split("\n\n") if block]


class TestChatCompletions:
    def test_answer_is_a_chat_completion_with_paris(self, loop, worker):
        out = ChatCompletion.model_validate(one(loop, worker, route(
            "/v1/chat/completions", chat(worker))))
        assert out.object == "chat.completion" and out.model == worker.loaded.served_name
        assert out.choices[0].message.role == "assistant"
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    def test_stream_is_sse_chunks_that_join_to_the_whole_answer(self, loop, worker):
        whole = one(loop, worker, route("/v1/chat/completions", chat(worker)))
        items = loop.run(collect(worker, route("/v1/chat/completions", chat(
            worker, stream=True, stream_options={"include_usage": True}))))
        events = sse_events(items)
        assert events[-1] == "[DONE]"
        chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole["choices"][0]["message"]["content"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage.model_dump(exclude_none=True) == whole["usage"]
        assert len({c.id for c in chunks}) == 1

    def test_max_completion_tokens_limits_the_answer(self, loop, worker):
        out = ChatCompletion.model_validate(one(loop, worker, route(
            "/v1/chat/completions", {**chat(worker), "max_tokens": None,
                                     "max_completion_tokens": 3})))
        assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"

    def test_text_parts_and_developer_role_read_as_text_and_system(self, loop, worker):
        messages = [{"role": "developer", "content": "Answer in one word."},
                    {"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                 {"type": "text", "text": "France?"}]}]
        out = one(loop, worker, route("/v1/chat/completions", {
            **chat(worker), "messages": messages, "n": 1, "logprobs": False}))
        native = one(loop, worker, {"max_new_tokens": 12, "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"}]})
        assert ChatCompletion.model_validate(out).choices[0].message.content == native["text"]


class TestCompletions:
    def test_answer_is_a_text_completion(self, loop, worker):
        out = Completion.model_validate(one(loop, worker, route("/v1/completions", {
            "model": worker.loaded.served_name, "prompt": "Once upon a time", "max_tokens": 5,
            "temperature": 0})))
        assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
        assert out.choices[0].text and out.usage.completion_tokens == 5

    def test_stream_chunks_validate_as_completions(self, loop, worker):
        items = loop.run(collect(worker, route("/v1/completions", {
            "model": worker.loaded.served_name, "prompt": "Once upon a time", "max_tokens": 5,
            "stream": True})))
        events = [json.loads(e) for e in sse_events(items)[:-1]]
        assert Completion.model_validate(events[-1]).choices[0].finish_reason == "length"
        # OpenAI's type declares finish_reason non-null, yet the API streams null until the
        # end (the client builds stream chunks without validating): check the rest as typed.
        for event in events[:-1]:
            assert event["choices"][0]["finish_reason"] is None
            event["choices"][0]["finish_reason"] = "length"
            Completion.model_validate(event)


class TestModels:
    def test_models_lists_the_served_model(self, loop, worker):
        out = one(loop, worker, route("/v1/models"))
        assert out["object"] == "list"
        models = [Model.model_validate(m) for m in out["data"]]
        assert [m.id for m in models] == [worker.loaded.served_name]


class TestEmbeddings:
    def test_floats_match_the_native_embed_answer(self, loop, embed_worker):
        texts = ["The cat sits on the mat.", "Vectors for text."]
        native = one(loop, embed_worker, {"texts": texts})
        out = CreateEmbeddingResponse.model_validate(one(loop, embed_worker, route(
            "/v1/embeddings", {"model": MINILM_NAME, "input": texts})))
        assert [d.index for d in out.data] == [0, 1]
        assert np.allclose([d.embedding for d in out.data], native["embeddings"], atol=1e-6)
        assert out.usage.prompt_tokens == native["usage"]["prompt_tokens"]

    def test_base64_is_little_endian_float32_as_the_openai_client_decodes_it(
            self, loop, embed_worker):
        floats = one(loop, embed_worker, route("/v1/embeddings", {
            "model": MINILM_NAME, "input": "hello", "dimensions": 16}))
        packed = one(loop, embed_worker, route("/v1/embeddings", {
            "model": MINILM_NAME, "input": "hello", "dimensions": 16,
            "encoding_format": "base64"}))
        decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(decoded, floats["data"][0]["embedding"], atol=1e-7)
        assert len(decoded) == 16

    def test_chat_route_on_an_embedding_worker_names_the_right_route(self, loop, embed_worker):
        error = openai_error(one(loop, embed_worker, route("/v1/chat/completions", {
            "model": MINILM_NAME, "messages": CAPITAL})))
        assert error["param"] == "openai_route" and "use /v1/embeddings" in error["message"]


class TestErrors:
    def test_another_model_name_fails_with_openais_model_not_found(self, loop, worker):
        answer = one(loop, worker, route("/v1/chat/completions", {**chat(worker),
                                                                   "model": "gpt-4o"}))
        error = openai_error(answer)
        assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
        assert error["param"] == "model"
        assert "'gpt-4o' is not served here" in error["message"]
        assert worker.loaded.served_name in error["message"]

    @pytest.mark.parametrize(("name", "value"), [
        ("n", 2), ("logprobs", True), ("tools", [{"type": "function"}]),
        ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
        ("frequency_penalty", 1.0)])
    def test_unsupported_parameters_are_refused_by_name(self, loop, worker, name, value):
        error = openai_error(one(loop, worker, route("/v1/chat/completions",
                                                      {**chat(worker), name: value})))
        assert error["param"] == name
        assert error["message"].startswith(f"{name}: is not supported by this worker")

    def test_unknown_parameter_is_refused_by_name(self, loop, worker):
        error = openai_error(one(loop, worker, route("/v1/chat/completions",
                                                      {**chat(worker), "temprature": 0})))
        assert error["message"].startswith("temprature: unknown field")

    def test_max_tokens_over_the_limit_is_named_as_the_client_sent_it(self, loop, worker):
        error = openai_error(one(loop, worker, route("/v1/chat/completions",
                                                      {**chat(worker), "max_tokens": 99999})))
        assert error["message"] == ("max_tokens: 99999 is over the limit of 1024 "
                                    "(WORKER_MAX_NEW_TOKENS)")

    def test_unknown_route_lists_the_routes(self, loop, worker):
        error = openai_error(one(loop, worker, route("/v1/images/generations", {})))
        assert error["param"] == "openai_route" and "/v1/chat/completions" in error["message"]

    def test_a_huge_model_name_comes_back_as_a_short_excerpt(self, loop, worker):
        answer = one(loop, worker, route("/v1/chat/completions", {**chat(worker),
                                                                   "model": "m" * 200_000}))
        assert len(answer["error"]) < 2000, len(answer["error"])
        assert openai_error(answer)["code"] == "model_not_found"

    def test_huge_values_of_refused_parameters_are_not_echoed(self, loop, worker):
        answer = one(loop, worker, route("/v1/chat/completions", {
            **chat(worker), "tools": [{"type": "function", "x": "y" * 200_000}],
            "z" * 100_000: 1}))
        assert len(answer["error"]) < 2000, len(answer["error"])
        assert openai_error(answer)["param"] == "tools"
        answer = one(loop, worker, {"openai_route": "/v1/" + "r" * 100_000, "openai_input": {}})
        assert len(answer["error"]) < 2000, len(answer["error"])

    def test_a_prompt_over_the_bound_is_named_as_the_client_sent_it(self, loop, worker):
        error = openai_error(one(loop, worker, route("/v1/completions", {
            "model": worker.loaded.served_name, "prompt": "word " * 800_000})))
        assert error["param"] == "prompt"
        assert error["message"].startswith("prompt: is 4,000,000 characters"), error["message"]

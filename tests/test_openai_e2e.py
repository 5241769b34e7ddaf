"""The openai client against the local endpoint's OpenAI base URL, the real worker loop behind it.

``openai.OpenAI(base_url=".../v2/{endpoint}/openai/v1")`` as against RunPod: each request becomes
an ``openai_route``/``openai_input`` job that ``python handler.py`` takes, answers and posts back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.endpoint import API_KEY, Service, start_handler_service, stop_service

pytestmark = pytest.mark.slow

SERVED = "local-smol"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def service(default_model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("openai-worker") / "worker.log"
    service = start_handler_service(
        default_model_dir, log, "openai-worker", MODEL_SERVED_NAME=SERVED)
    yield service
    stop_service(service)


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[openai.OpenAI]:
    endpoint = service.endpoint
    with openai.OpenAI(base_url=f"{endpoint.base_url}/{endpoint.endpoint_id}/openai/v1",
                       api_key=API_KEY, max_retries=0, timeout=120) as client:
        yield client


class TestOpenAIClient:
    def test_chat_completion_answers_paris(self, client):
        out = client.chat.completions.create(model=SERVED, messages=CAPITAL, max_tokens=12)
        assert "Paris" in out.choices[0].message.content
        assert out.model == SERVED and out.choices[0].finish_reason == "stop"

    def test_streamed_chat_joins_to_the_whole_answer(self, client):
        whole = client.chat.completions.create(model=SERVED, messages=CAPITAL, max_tokens=12)
        stream = client.chat.completions.create(model=SERVED, messages=CAPITAL, max_tokens=12,
                                                stream=True)
        chunks = list(stream)
        assert len(chunks) >= 2
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"

    def test_completion_and_model_list(self, client):
        out = client.completions.create(model=SERVED, prompt="Once upon a time", max_tokens=4)
        assert out.usage.completion_tokens == 4
        assert [m.id for m in client.models.list()] == [SERVED]

    def test_another_model_raises_not_found_with_openais_error_body(self, client):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=CAPITAL, max_tokens=4)
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
        assert f"this worker serves '{SERVED}'" in caught.value.message

    def test_unsupported_parameter_raises_bad_request_naming_it(self, client):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=SERVED, messages=CAPITAL, n=2)
        assert caught.value.param == "n"

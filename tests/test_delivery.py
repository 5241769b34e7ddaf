"""delivery.py: inline up to the limit, a verified link above it, clear errors otherwise."""

from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest

from serving.config import StorageSettings
from serving.delivery import Artefact, deliver_output, is_small, measure_answer
from serving.errors import InputError, PayloadTooLarge, error_response
from storage import LocalStorage, storage_from_settings


def answer_of_size(n: int) -> dict[str, str]:
    """A dict whose SDK-form JSON is exactly ``n`` bytes (non-ASCII counts as UTF-8 bytes)."""
    base = measure_answer({"text": "é"})  # 2 bytes of UTF-8 for one character
    answer = {"text": "é" + "x" * (n - base)}
    assert measure_answer(answer) == n
    return answer


@pytest.fixture
def s3(s3_settings_env):
    return storage_from_settings(StorageSettings.from_env(s3_settings_env))


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


class TestBoundary:
    def test_exactly_the_limit_is_inline_and_one_byte_more_is_a_link(self, s3) -> None:
        limit = 5000
        at = answer_of_size(limit)
        assert deliver_output(at, job_id="j1", storage=s3, inline_limit_bytes=limit) is at
        over = answer_of_size(limit + 1)
        answer = deliver_output(over, job_id="j1", storage=s3, inline_limit_bytes=limit)
        link = answer["output_link"]
        body = download(link["url"])
        assert json.loads(body) == over
        assert (link["bytes"], link["sha256"], link["content_type"]) == (
            len(body), hashlib.sha256(body).hexdigest(), "application/json")
        assert link["key"].endswith("/j1/answer.json")

    def test_the_size_counted_is_what_the_sdk_posts(self) -> None:
        # The SDK posts json.dumps(..., ensure_ascii=False): ", " and ": " separators, UTF-8.
        answer = {"a": [1, 2], "b": "日本"}
        assert measure_answer(answer) == len(
            json.dumps(answer, ensure_ascii=False).encode("utf-8"))


class TestIsSmall:
    """What the worker measures on its event loop, with no thread hop: only what is plainly
    small, and finding out costs at most the bound, however large the answer."""

    def test_a_typical_answer_is_small(self) -> None:
        answer = {"result": [{"token_str": "capital", "score": 0.5, "token": 7}] * 5,
                  "model": "m"}
        assert is_small(answer)

    def test_a_file_many_values_or_long_text_is_not(self) -> None:
        file = Artefact(b"\x89PNG", "image/png", "a.png")
        assert not is_small({"result": {"mask": file}})
        assert not is_small({"result": list(range(600))})
        assert not is_small({"result": "x" * 70_000})
        assert not is_small({"k" * 70_000: 1})

    def test_a_large_container_is_refused_before_its_values_are_read(self) -> None:
        class Unread(list):
            def __iter__(self):
                raise AssertionError("read a container over the bound")

        assert not is_small({"result": Unread(range(10_000))})


class TestModes:
    def test_a_large_list_is_uploaded_as_json_lines(self, s3) -> None:
        items = [{"index": i, "embedding": [0.5] * 20} for i in range(200)]
        link = deliver_output(items, job_id="j2", storage=s3, inline_limit_bytes=1000,
                              mode=None)["output_link"]
        lines = download(link["url"]).decode().splitlines()
        assert [json.loads(line) for line in lines] == items
        assert (link["content_type"], link["key"].rsplit("/", 1)[1]) == (
            "application/x-ndjson", "answer.jsonl")

    def test_link_mode_uploads_even_a_small_answer(self, s3) -> None:
        link = deliver_output({"ok": True}, job_id="j3", storage=s3, inline_limit_bytes=10**6,
                              mode="link")["output_link"]
        assert json.loads(download(link["url"])) == {"ok": True}

    def test_inline_mode_over_the_limit_names_the_limit(self, s3) -> None:
        with pytest.raises(PayloadTooLarge) as err:
            deliver_output(answer_of_size(101), job_id="j4", storage=s3,
                           inline_limit_bytes=100, mode="inline")
        assert "101 bytes" in str(err.value) and "100 bytes" in str(err.value)
        assert "OUTPUT_INLINE_LIMIT_BYTES" in str(err.value)

    def test_an_unknown_mode_names_the_field(self) -> None:
        with pytest.raises(InputError) as err:
            deliver_output({}, job_id="j5", storage=None, inline_limit_bytes=10, mode="zip")
        assert err.value.field == "input.output_mode"

    def test_local_storage_answers_a_file_link(self, tmp_path) -> None:
        link = deliver_output(answer_of_size(50), job_id="j6", storage=LocalStorage(tmp_path),
                              inline_limit_bytes=10)["output_link"]
        assert link["url"].startswith("file://") and link["expires_at"] is None


class TestNoStorage:
    def test_too_large_without_storage_says_size_limit_and_settings(self) -> None:
        with pytest.raises(PayloadTooLarge) as err:
            deliver_output(answer_of_size(2_000_001), job_id="j7", storage=None,
                           inline_limit_bytes=1_000_000)
        msg = str(err.value)
        for part in ("2,000,001 bytes", "1,000,000 bytes", "OUTPUT_INLINE_LIMIT_BYTES",
                     "BUCKET_ENDPOINT_URL", "s3Config"):
            assert part in msg
        assert error_response(err.value)["error_code"] == "payload_too_large"

    def test_link_mode_without_storage_is_an_input_error(self) -> None:
        with pytest.raises(InputError, match="needs storage"):
            deliver_output({}, job_id="j8", storage=None, inline_limit_bytes=10, mode="link")


class TestNotJson:
    @pytest.mark.parametrize("answer", [{"x": {1, 2}}, {"x": float("nan")}, {"x": b"raw"},
                                        {"x": "\ud800"}])
    def test_a_non_json_answer_raises_instead_of_hanging(self, answer) -> None:
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            deliver_output(answer, job_id="j9", storage=None, inline_limit_bytes=10**6)

    def test_a_circular_answer_raises(self) -> None:
        loop: list = []
        loop.append(loop)
        with pytest.raises(TypeError):
            deliver_output(loop, job_id="j10", storage=None, inline_limit_bytes=10**6)

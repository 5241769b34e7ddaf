"""Job input checks and the generation fields: every error names the field and the fix."""

from __future__ import annotations

import json

import pytest

from serving.config import WorkerSettings
from serving.errors import (
    MAX_ERROR_CHARS,
    DownloadError,
    InputError,
    JobTimeout,
    PayloadTooLarge,
    StorageError,
    error_response,
    excerpt,
)
from serving.validation import check_job_input, checked_json_size, parse_input
from tasks.generate import GenerateInput

LIMITS = WorkerSettings.from_env({})


def parse(data: dict) -> GenerateInput:
    return parse_input(GenerateInput, data, {"limits": LIMITS})


def error_of(data: dict) -> str:
    with pytest.raises(InputError) as err:
        parse(data)
    return str(err.value)


class TestJobShape:
    @pytest.mark.parametrize("value, kind", [(None, "null"), ([1], "list"), ("hi", "str"),
                                             (3, "int")])
    def test_input_that_is_not_an_object_is_refused(self, value, kind):
        with pytest.raises(InputError, match=f"^input: must be a JSON object, got {kind}"):
            check_job_input({"id": "j", "input": value}, 1000)

    def test_empty_input_is_refused(self):
        with pytest.raises(InputError, match="^input: is empty"):
            check_job_input({"id": "j", "input": {}}, 1000)

    def test_job_without_input_is_refused(self):
        with pytest.raises(InputError, match="no 'input'"):
            check_job_input({"id": "j"}, 1000)

    def test_oversized_input_names_the_limit_and_setting(self):
        with pytest.raises(PayloadTooLarge, match="over the limit of 1024.*WORKER_MAX_INPUT_BYTES"):
            check_job_input({"id": "j", "input": {"prompt": "x" * 2000}}, 1024)


class TestGenerateFields:
    def test_a_chat_is_accepted(self):
        data = parse({"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
        assert data.messages[0].content == "hi"

    def test_unknown_field_is_refused_by_name_with_the_allowed_ones(self):
        message = error_of({"prompt": "x", "temprature": 1})
        assert message.startswith("input.temprature: unknown field; allowed fields:")
        assert "temperature" in message

    def test_both_or_neither_of_messages_and_prompt_is_refused(self):
        assert "exactly one of 'messages'" in error_of({"prompt": "x", "messages": [
            {"role": "user", "content": "y"}]})
        assert "exactly one of 'messages'" in error_of({"max_new_tokens": 3})

    def test_wrong_role_names_the_message_index(self):
        assert error_of({"messages": [{"role": "bot", "content": "x"}]}).startswith(
            "input.messages.0.role: input should be 'system', 'user' or 'assistant'")

    def test_wrong_type_says_what_was_sent(self):
        assert error_of({"prompt": "x", "temperature": "hot"}) == (
            "input.temperature: input should be a valid number, got a string")

    def test_out_of_range_values_are_refused(self):
        assert error_of({"prompt": "x", "temperature": 3}).startswith("input.temperature:")
        assert error_of({"prompt": "x", "top_p": 0}).startswith("input.top_p:")
        assert error_of({"prompt": "x", "max_new_tokens": 0}).startswith("input.max_new_tokens:")

    def test_limits_from_settings_name_the_setting(self):
        assert "WORKER_MAX_NEW_TOKENS" in error_of({"prompt": "x", "max_new_tokens": 10**6})
        assert "WORKER_MAX_STOP" in error_of({"prompt": "x", "stop": ["a"] * 100})
        small = WorkerSettings.from_env({"WORKER_MAX_MESSAGES": "1"})
        with pytest.raises(InputError, match="WORKER_MAX_MESSAGES"):
            parse_input(GenerateInput, {"messages": [{"role": "user", "content": "a"}] * 2},
                        {"limits": small})

    def test_every_problem_is_reported_at_once(self):
        message = error_of({"prompt": 1, "seed": -1})
        assert "input.prompt:" in message and "input.seed:" in message

    def test_a_single_stop_string_is_accepted(self):
        assert parse({"prompt": "x", "stop": "\n"}).stop == ["\n"]


class TestErrorsEchoOnlyAnExcerpt:
    """An attacker's input comes back, if at all, as a short cut excerpt; never in full."""

    def test_an_unknown_field_name_of_200_kb_comes_back_cut(self):
        name = "x" * 200_000
        message = error_of({"prompt": "hi", name: 1})
        assert len(message) < 600, len(message)
        assert message.startswith("input.'xxxx")
        assert "(200,000 characters): unknown field" in message

    def test_a_field_name_with_a_newline_cannot_split_the_error_line(self):
        message = error_of({"prompt": "hi", "a\nb": 1})
        assert "\n" not in message

    def test_thousands_of_bad_items_list_a_few_problems_and_count_the_rest(self):
        message = error_of({"messages": [{"role": "bot", "content": 1}] * 2000})
        assert len(message) < 1500, len(message)
        assert "more problems" in message

    def test_excerpt_cuts_quotes_and_escapes(self):
        assert excerpt("gpt-4o") == "'gpt-4o'"
        cut = excerpt("a" * 10_000)
        assert cut.startswith("'aaaa") and len(cut) < 100 and "10,000 characters" in cut
        assert "\n" not in excerpt("one\ntwo")
        deep: list = []
        for _ in range(5000):
            deep = [deep]
        assert len(excerpt(deep)) < 100
        assert len(excerpt({"k" * 10_000: ["v" * 10_000] * 10_000})) < 100


class TestErrorAnswersAreAlwaysSmall:
    def test_an_error_of_10_mb_is_answered_cut_to_the_bound(self):
        answer = error_response(InputError("y" * 10_000_000, field="input.prompt"))
        assert answer["error_code"] == "invalid_input"
        assert answer["error"].startswith("input.prompt: yyy")
        assert len(answer["error"]) <= MAX_ERROR_CHARS

    def test_the_openai_error_object_stays_valid_json_and_small(self):
        answer = error_response(InputError("\u2603" * 1_000_000, field="m" * 100_000),
                                openai=True)
        body = json.loads(answer["error"])["error"]
        assert len(body["message"]) <= MAX_ERROR_CHARS
        assert len(body["param"]) < 200
        assert len(json.dumps(answer)) < 16_000

    def test_every_kind_of_error_is_bounded(self):
        for exc in (StorageError("s" * 100_000), DownloadError("d" * 100_000),
                    JobTimeout("t" * 100_000), RuntimeError("r" * 100_000)):
            assert len(json.dumps(error_response(exc))) < 16_000


class TestHostileJobShapes:
    def test_an_unpaired_surrogate_is_an_input_error_that_says_so(self):
        with pytest.raises(InputError, match="^input: holds text that is not valid Unicode"):
            check_job_input({"id": "j", "input": {"prompt": "\ud800"}}, 10_000)

    def test_the_same_unicode_check_names_a_batch_url_line(self):
        """One check for inline input and each line of a batch file (a line's surrogate was
        answered 'internal' before)."""
        assert checked_json_size({"text": "fine ✓"}, "input") == len('{"text": "fine ✓"}'.encode())
        with pytest.raises(InputError, match=r"^input.batch_url: line 7 holds text that is not "
                                             r"valid Unicode .*\\ud800"):
            checked_json_size({"texts": ["ok", "\udc00"]}, "input.batch_url", "line 7 ")

    def test_deep_nesting_is_an_input_error_not_a_crash(self):
        deep: list = []
        for _ in range(100_000):
            deep = [deep]
        with pytest.raises(InputError, match="^input: is nested too deeply"):
            check_job_input({"id": "j", "input": {"prompt": deep}}, 10_000_000)

    def test_an_error_is_always_one_line(self):
        answer = error_response(InputError("bad\nforged: line", field="input.a\nb"))
        assert "\n" not in answer["error"]
        assert answer["error"] == "input.a\\nb: bad\\nforged: line"

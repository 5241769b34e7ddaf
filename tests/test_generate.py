"""Generation through the job wiring on the real default model (in-process, no SDK loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from serving.device import DEVICE_THREAD
from serving.engine import FLUSH_TOKENS
from serving.worker import Worker
from tasks.generate import GenerateTask
from tests.support.worker import LoopThread, build_worker, chat, collect

pytestmark = pytest.mark.slow

CAPITAL = "What is the capital of France?"


def answer(loop: LoopThread, worker: Worker, job_input: dict) -> dict:
    items = loop.run(collect(worker, job_input))
    assert len(items) == 1, items
    return items[0]


class TestAnswers:
    def test_chat_question_is_answered_with_paris(self, loop, worker):
        out = answer(loop, worker, chat(CAPITAL, max_new_tokens=20))
        assert "Paris" in out["text"]
        assert out["finish_reason"] == "stop"
        assert out["model"] == worker.loaded.served_name
        assert out["usage"]["prompt_tokens"] > 5
        assert 1 <= out["usage"]["completion_tokens"] <= 20

    def test_greedy_text_equals_model_generate_on_the_same_weights(self, loop, worker):
        tok, model = worker.loaded.tokenizer, worker.loaded.model
        ids = tok.apply_chat_template([{"role": "user", "content": "Name three fruits."}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        got = answer(loop, worker, chat("Name three fruits.", max_new_tokens=24, temperature=0))
        assert got["text"] == expected

    def test_raw_prompt_runs_to_the_token_limit(self, loop, worker):
        out = answer(loop, worker, {"prompt": "Once upon a time", "max_new_tokens": 7})
        assert out["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 7
        assert out["text"]

    def test_stop_string_is_cut_from_the_text(self, loop, worker):
        out = answer(loop, worker, chat(CAPITAL, max_new_tokens=20, stop=["Paris"]))
        assert out["finish_reason"] == "stop"
        assert "Paris" not in out["text"]
        assert out["text"].startswith("The capital of France")


class TestSampling:
    def test_same_seed_gives_the_same_text(self, loop, worker):
        job = chat("Write a line about the sea.", max_new_tokens=16, temperature=1.0, seed=42)
        assert answer(loop, worker, job)["text"] == answer(loop, worker, job)["text"]

    def test_different_seeds_give_different_texts(self, loop, worker):
        texts = {answer(loop, worker, chat("Write a line about the sea.", max_new_tokens=16,
                                            temperature=1.2, seed=s))["text"] for s in range(4)}
        assert len(texts) > 1


class TestStreaming:
    def test_chunks_join_to_the_greedy_answer(self, loop, worker):
        whole = answer(loop, worker, chat("Name three colors.", max_new_tokens=24))
        chunks = loop.run(collect(worker, chat("Name three colors.", max_new_tokens=24,
                                               stream=True)))
        assert len(chunks) > 2
        assert "".join(c["text"] for c in chunks) == whole["text"]
        assert chunks[-1]["finish_reason"] == whole["finish_reason"]
        assert chunks[-1]["usage"] == whole["usage"]
        assert all(set(c) == {"text"} for c in chunks[:-1])

    def test_stop_string_never_reaches_the_stream(self, loop, worker):
        chunks = loop.run(collect(worker, chat(CAPITAL, max_new_tokens=20, stop=["Paris"],
                                               stream=True)))
        assert "Paris" not in "".join(c["text"] for c in chunks)


class TestBatching:
    def test_concurrent_greedy_jobs_match_the_same_jobs_run_alone(self, loop, worker):
        questions = ["Name three colors.", CAPITAL, "What is 2 plus 2?", "Say hello."]
        alone = [answer(loop, worker, chat(q, max_new_tokens=16))["text"] for q in questions]
        before = worker.task.batcher.largest_batch

        async def together():
            return await asyncio.gather(*(collect(worker, chat(q, max_new_tokens=16))
                                          for q in questions))

        batched = [items[0]["text"] for items in loop.run(together())]
        assert batched == alone
        assert worker.task.batcher.largest_batch >= max(before, 2)


class TestLimits:
    def test_prompt_over_the_token_limit_names_the_setting(self, loop, worker):
        out = answer(loop, worker, {"prompt": "word " * 5000})
        assert out["error"].startswith("input.prompt: is ")
        assert "WORKER_MAX_PROMPT_TOKENS" in out["error"]

    def test_cancelled_job_stops_and_the_next_job_still_runs(self, loop, worker):
        async def cancel_midway():
            task = asyncio.ensure_future(collect(worker, {"prompt": "Count:", "max_new_tokens":
                                                          1000, "temperature": 0}))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # 1000 tokens take tens of seconds here; a cancelled job leaves the device at once.
            for _ in range(50):
                if not worker.task.batcher.running:
                    return True
                await asyncio.sleep(0.1)
            return False

        assert loop.run(cancel_midway()), "the cancelled job kept the device busy"

        assert "Paris" in answer(loop, worker, chat(CAPITAL, max_new_tokens=20))["text"]


class TestContinuousBatching:
    def test_a_job_arriving_mid_batch_joins_it_and_answers_before_the_long_job(
            self, loop, worker):
        short = chat("Say hello.", max_new_tokens=8)
        alone = answer(loop, worker, short)["text"]
        engine = worker.task.batcher.engine
        joins_before = engine.joins

        async def long_then_short():
            finished = []

            async def run(name, job_input):
                items = await collect(worker, job_input)
                finished.append(name)
                return items[0]

            long_job = asyncio.ensure_future(run("long", {"prompt": "List numbers:",
                                                          "max_new_tokens": 120}))
            await asyncio.sleep(0.5)            # the long job is decoding by now
            short_answer = await run("short", short)
            await long_job
            return finished, short_answer

        finished, short_answer = loop.run(long_then_short())
        assert finished == ["short", "long"]
        assert engine.joins > joins_before
        assert short_answer["text"] == alone

    def test_repetition_penalty_in_a_batch_matches_the_job_alone(self, loop, worker):
        jobs = [chat(q, max_new_tokens=16, repetition_penalty=1.3)
                for q in ("Name three colors.", "Say hello.")]
        alone = [answer(loop, worker, j)["text"] for j in jobs]

        async def together():
            return await asyncio.gather(*(collect(worker, j) for j in jobs))

        assert [items[0]["text"] for items in loop.run(together())] == alone


class TestOutOfMemory:
    """Out of memory is injected at the device edge: a hook on the real model's forward."""

    @staticmethod
    def oom_when(worker, too_many_rows):
        def hook(module, args, kwargs):
            if too_many_rows(kwargs["input_ids"].shape[0]):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return worker.loaded.model.register_forward_pre_hook(hook, with_kwargs=True)

    def test_a_batch_too_large_for_memory_is_split_and_every_job_answers(self, loop, worker):
        questions = ["Name three colors.", "Say hello.", "What is 2 plus 2?",
                     "What is the capital of France?"]
        alone = [answer(loop, worker, chat(q, max_new_tokens=10))["text"] for q in questions]
        handle = self.oom_when(worker, lambda rows: rows > 2)
        try:
            async def together():
                return await asyncio.gather(*(collect(worker, chat(q, max_new_tokens=10))
                                              for q in questions))
            results = loop.run(together())
        finally:
            handle.remove()
        assert [items[0].get("text") for items in results] == alone

    def test_a_job_that_cannot_fit_fails_alone_and_the_worker_serves_on(self, loop, worker):
        handle = self.oom_when(worker, lambda rows: True)
        try:
            out = answer(loop, worker, chat("Say hello.", max_new_tokens=5))
        finally:
            handle.remove()
        assert out["error_code"] == "out_of_memory"
        assert "send a shorter input" in out["error"]
        assert "Paris" in answer(loop, worker, chat(CAPITAL, max_new_tokens=20))["text"]


class TestSamplingEdges:
    def test_a_vanishing_temperature_is_greedy_instead_of_failing_the_batch(self, loop, worker):
        """Found by the fuzz test: temperature 1e-300 overflowed to NaN probabilities."""
        greedy = answer(loop, worker, chat(CAPITAL, max_new_tokens=12))
        tiny = answer(loop, worker, chat(CAPITAL, max_new_tokens=12, temperature=1e-300))
        assert tiny["text"] == greedy["text"]


# ----------------------------------------------------------------------------------------------
# Every cost of a job is bounded before it is paid, and one job never hurts another
# ----------------------------------------------------------------------------------------------
def fresh_worker(worker: Worker, loaded=None, **limits) -> Worker:
    """The same model with its own task and batcher (and settings), so a fault stays here."""
    settings = dataclasses.replace(worker.settings, **limits)
    loaded = loaded or worker.loaded
    task = GenerateTask(loaded, settings)
    return dataclasses.replace(worker, settings=settings, task=task,
                               openai=None)


class RecordingTokenizer:
    """The real tokenizer, noting the thread of every tokenize and chat-template call."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.threads: list[threading.Thread] = []

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread())
        return self._inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.threads.append(threading.current_thread())
        return self._inner.apply_chat_template(*args, **kwargs)


class CountingTokenizer(RecordingTokenizer):
    """The real tokenizer, noting how many tokens each decode call is given."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.decoded: list[int] = []

    def decode(self, ids, *args, **kwargs):
        self.decoded.append(len(ids))
        return self._inner.decode(ids, *args, **kwargs)


def force_tokens(model, tokens: list[int]):
    """A hook on the real model's forward that makes its i-th pass pick ``tokens[i]``."""
    script = iter(tokens)

    def hook(module, args, kwargs, output):
        token = next(script, None)
        if token is not None:
            output.logits.fill_(-1e4)
            output.logits[..., token] = 0.0
        return output
    return model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def tiny_gpt2_long(default_model_dir, tmp_path_factory) -> Worker:
    """A tiny GPT-2 with a 1024-token context, for long outputs at little cost."""
    return build_tiny_gpt2(default_model_dir, tmp_path_factory.mktemp("tiny-gpt2-long"), 1024)


class TestStopStringCost:
    """The real tokenizer; the model is a tiny one whose choices a forward hook dictates."""

    def test_a_long_run_of_partial_characters_decodes_a_bounded_span_per_token(
            self, loop, tiny_gpt2_long):
        """Pins the stop check decoding the whole output at every token (2-8 ms per token per
        stream once the output was long and ended in half a character)."""
        worker = tiny_gpt2_long
        tok = worker.loaded.tokenizer
        vocab, to_char = tok.get_vocab(), bytes_to_unicode()

        def byte_tokens(data: bytes) -> list[int]:
            return [vocab[to_char[b]] for b in data]

        script = (byte_tokens("😀".encode() * 60)        # ends in part of an emoji 3 steps in 4
                  + byte_tokens(b"\xf0" * 120)          # a start byte never completed: a run
                  + tok.encode(" done. END and more"))   # of U+FFFD, every step ending in one
        expected = tok.decode(script, skip_special_tokens=True)
        expected = expected[:expected.index("END")]
        counting = CountingTokenizer(tok)
        own = fresh_worker(worker, dataclasses.replace(worker.loaded, tokenizer=counting))
        handle = force_tokens(own.loaded.model, script)
        try:
            chunks = loop.run(collect(own, {"prompt": "Say it.", "stream": True, "stop": "END",
                                            "max_new_tokens": len(script)}))
        finally:
            handle.remove()
        assert "".join(c["text"] for c in chunks) == expected
        assert chunks[-1]["finish_reason"] == "stop"
        steps = chunks[-1]["usage"]["completion_tokens"]
        assert steps > 180, steps
        # The old check decoded every token so far, at every step: up to ~190 tokens here.
        assert max(counting.decoded) <= 2 * FLUSH_TOKENS, max(counting.decoded)
        assert len(counting.decoded) <= 3 * steps, (len(counting.decoded), steps)


class TestInputCosts:
    def test_a_4_mb_prompt_is_refused_by_its_length_before_it_is_tokenized(self, loop, worker):
        out = answer(loop, worker, {"prompt": "word " * 800_000})
        assert out["error_code"] == "invalid_input"
        assert out["error"].startswith(
            "input.prompt: is 4,000,000 characters, over the limit of 131,072"), out["error"]
        assert "WORKER_MAX_PROMPT_TOKENS" in out["error"]

    def test_many_long_messages_count_together_against_the_same_bound(self, loop, worker):
        messages = [{"role": "user", "content": "x" * 50_000}] * 3
        out = answer(loop, worker, {"messages": messages})
        assert out["error"].startswith("input.messages: is 150,000 characters"), out["error"]

    def test_tokenizing_runs_off_the_event_loop_and_off_the_device_thread(self, loop, worker):
        recording = RecordingTokenizer(worker.loaded.tokenizer)
        spied = fresh_worker(worker, dataclasses.replace(worker.loaded, tokenizer=recording))
        assert "Paris" in answer(loop, spied, chat(CAPITAL, max_new_tokens=12))["text"]
        assert answer(loop, spied, {"prompt": "Once upon a time", "max_new_tokens": 2})["text"]
        names = [t.name for t in recording.threads]
        assert len(names) >= 2, names
        assert loop.thread not in recording.threads, names
        assert not any(name.startswith("device") for name in names), names


STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if m['content'].startswith('!') %}{{ raise_exception('refused: ' + m['content']) }}"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def strict(worker, default_model_dir) -> Worker:
    """The default model with a chat template that refuses some conversations."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.chat_template = STRICT_TEMPLATE
    return fresh_worker(worker, dataclasses.replace(worker.loaded, tokenizer=tokenizer))


class TestChatTemplates:
    def test_a_template_that_refuses_the_roles_is_an_input_error_naming_messages(
            self, loop, strict):
        out = answer(loop, strict, {"messages": [{"role": "user", "content": "a"},
                                                 {"role": "user", "content": "b"}],
                                    "max_new_tokens": 2})
        assert out["error_code"] == "invalid_input", out
        assert out["error"].startswith("input.messages: the model's chat template refused")
        assert "roles must alternate" in out["error"]

    def test_the_templates_own_message_is_cut_short(self, loop, strict):
        out = answer(loop, strict, {"messages": [{"role": "user", "content": "!" * 100_000}]})
        assert out["error_code"] == "invalid_input"
        assert "refused: !!!" in out["error"] and len(out["error"]) < 600

    def test_messages_the_template_accepts_are_answered(self, loop, strict):
        assert "Paris" in answer(loop, strict, chat(CAPITAL, max_new_tokens=12))["text"]


def build_tiny_gpt2(default_model_dir, out, context: int) -> Worker:
    """A random GPT-2 with absolute positions and the default model's tokenizer, saved as
    safetensors: decoding costs next to nothing."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, out / name)
    vocab = len(AutoTokenizer.from_pretrained(out))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    return build_worker({"MODEL_PATH": str(out), "MODEL_NAME": "tiny/gpt2",
                         "WORKER_BATCH_WAIT_MS": "50"})


@pytest.fixture(scope="module")
def tiny_gpt2(default_model_dir, tmp_path_factory) -> Worker:
    """A tiny GPT-2 with a 64-token context."""
    return build_tiny_gpt2(default_model_dir, tmp_path_factory.mktemp("tiny-gpt2"), 64)


class TestModelContext:
    def test_a_prompt_plus_max_new_tokens_over_the_context_is_refused_and_a_neighbour_runs(
            self, loop, tiny_gpt2):
        long_job = {"prompt": "word " * 40, "max_new_tokens": 40}
        short_job = {"prompt": "Hello there", "max_new_tokens": 5}

        async def together():
            return await asyncio.gather(collect(tiny_gpt2, long_job),
                                        collect(tiny_gpt2, short_job))

        (long_out,), (short_out,) = loop.run(together())
        assert long_out["error_code"] == "invalid_input", long_out
        assert long_out["error"].startswith("input.max_new_tokens: "), long_out["error"]
        assert "context of 64 tokens" in long_out["error"] and "40" in long_out["error"]
        assert "error" not in short_out, short_out
        assert short_out["usage"]["completion_tokens"] >= 1

    def test_a_prompt_longer_than_the_context_names_the_prompt(self, loop, tiny_gpt2):
        out = answer(loop, tiny_gpt2, {"prompt": "word " * 100, "max_new_tokens": 1})
        assert out["error"].startswith("input.prompt: is 10"), out["error"]
        assert "context of 64 tokens" in out["error"]
        out = answer(loop, tiny_gpt2, {"messages": [{"role": "user", "content": "word " * 100}]})
        assert out["error"].startswith("input.messages: is "), out["error"]

    def test_without_max_new_tokens_the_answer_ends_where_the_context_does(self, loop, tiny_gpt2):
        out = answer(loop, tiny_gpt2, {"prompt": "word " * 50})
        assert "error" not in out, out
        assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] <= 64


class TestBatchFailures:
    """A failure inside a batch is charged to the row that causes it, never to its neighbours.

    The fault is raised at the device edge: a hook on the real model's forward that fails any
    pass fed the token <gh_stars> (id 7), as an out-of-range lookup would.
    """

    POISON = "Once upon a time <gh_stars>"

    @staticmethod
    def poison_hook(model):
        def hook(module, args, kwargs):
            if bool((kwargs["input_ids"] == 7).any()):
                raise RuntimeError("index 7 is out of bounds for dimension 0")
        return model.register_forward_pre_hook(hook, with_kwargs=True)

    def test_a_row_that_breaks_its_batch_fails_alone(self, loop, worker):
        own = fresh_worker(worker)
        clean = {"prompt": "Once upon a time", "max_new_tokens": 8}
        alone = answer(loop, own, clean)["text"]
        handle = self.poison_hook(own.loaded.model)
        try:
            async def together():
                return await asyncio.gather(
                    collect(own, {"prompt": self.POISON, "max_new_tokens": 8}),
                    collect(own, clean))
            (bad,), (good,) = loop.run(together())
        finally:
            handle.remove()
        assert bad["error_code"] == "internal", bad
        assert good.get("text") == alone, good
        assert own.task.batcher.isolated >= 2

    def test_a_streaming_neighbour_resumes_where_it_was_and_loses_nothing(self, loop, worker):
        own = fresh_worker(worker)
        job = {"prompt": "Count: 1, 2, 3,", "max_new_tokens": 80}
        alone = answer(loop, own, job)["text"]
        handle = self.poison_hook(own.loaded.model)
        try:
            async def stream_then_poison():
                first_chunk = asyncio.Event()

                async def stream():
                    chunks = []
                    async for item in own.handle({"id": "s", "input": {**job, "stream": True}}):
                        chunks.append(item)
                        first_chunk.set()
                    return chunks

                streaming = asyncio.ensure_future(stream())
                await first_chunk.wait()
                bad = await collect(own, {"prompt": self.POISON, "max_new_tokens": 4})
                return bad, await streaming
            (bad,), chunks = loop.run(stream_then_poison())
        finally:
            handle.remove()
        assert bad["error_code"] == "internal", bad
        assert all("error" not in c for c in chunks), chunks[-1]
        assert "".join(c["text"] for c in chunks) == alone
        assert own.task.batcher.isolated >= 1

    def test_the_batcher_answers_every_job_when_releasing_memory_fails(
            self, loop, worker, monkeypatch):
        own = fresh_worker(worker)

        def hook(module, args, kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def empty_cache():
            raise RuntimeError("the caching allocator is in an unexpected state")

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
        handle = own.loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = loop.run(collect(own, chat(CAPITAL, max_new_tokens=4)), timeout=60)[0]
        finally:
            handle.remove()
            monkeypatch.undo()
        assert out["error_code"] == "out_of_memory", out
        assert "Paris" in answer(loop, own, chat(CAPITAL, max_new_tokens=12))["text"]

    def test_the_batcher_survives_an_exception_that_breaks_its_own_error_handling(
            self, loop, worker):
        own = fresh_worker(worker)

        class Unprintable(RuntimeError):
            def __str__(self) -> str:
                raise ValueError("cannot describe this failure")

        def hook(module, args, kwargs):
            raise Unprintable()

        handle = own.loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            async def two():
                return await asyncio.gather(collect(own, chat(CAPITAL, max_new_tokens=4)),
                                            collect(own, chat("Say hi.", max_new_tokens=4)))
            results = loop.run(two(), timeout=60)
        finally:
            handle.remove()
        assert [items[0]["error_code"] for items in results] == ["internal", "internal"]
        assert "Paris" in answer(loop, own, chat(CAPITAL, max_new_tokens=12))["text"]


class TestWholeJobDeadline:
    def test_a_batch_job_as_a_whole_ends_at_the_time_limit_and_frees_its_rows(
            self, loop, worker):
        own = fresh_worker(worker, job_timeout_s=1.0, max_batch_size=4)
        started = time.monotonic()
        out = answer(loop, own, {"batch": [{"prompt": f"Story {i}:", "max_new_tokens": 64}
                                           for i in range(64)]})
        assert out.get("error_code") == "timeout", {k: str(v)[:200] for k, v in out.items()}
        assert "WORKER_JOB_TIMEOUT_S" in out["error"]
        assert time.monotonic() - started < 30

        async def rows_freed():
            for _ in range(100):
                if not own.task.batcher.running and not own.task.batcher._queue:
                    return True
                await asyncio.sleep(0.1)
            return False

        assert loop.run(rows_freed()), "the timed-out batch kept its rows"

    def test_a_job_waiting_for_a_busy_device_ends_at_the_time_limit(self, loop, worker):
        own = fresh_worker(worker, job_timeout_s=1.0)
        release = threading.Event()
        busy = DEVICE_THREAD.submit(release.wait, 30)
        try:
            started = time.monotonic()
            out = answer(loop, own, chat(CAPITAL, max_new_tokens=4))
            elapsed = time.monotonic() - started
        finally:
            release.set()
            busy.result()
        assert out["error_code"] == "timeout", out
        assert "WORKER_JOB_TIMEOUT_S" in out["error"]
        assert elapsed < 15


class TestBatchJobs:
    def test_one_batch_job_leaves_decode_rows_for_other_jobs(self, loop, worker):
        own = fresh_worker(worker, max_batch_size=4)
        out = answer(loop, own, {"batch": [{"prompt": f"Item {i}:", "max_new_tokens": 6}
                                           for i in range(8)]})
        assert out["failed"] == 0
        assert own.task.batcher.largest_batch <= 2

    def test_a_batch_whose_every_item_failed_completes_with_the_errors(self, loop, worker):
        out = answer(loop, worker, {"batch": [{"prompt": "x", "temprature": 1},
                                              {"prompt": "word " * 800_000}]})
        assert "error" not in out, "a top-level error would make RunPod mark the job FAILED"
        assert out["failed"] == 2
        assert [r["index"] for r in out["results"]] == [0, 1]
        assert all(r["error_code"] == "invalid_input" for r in out["results"])
        assert out["results"][1]["error"].startswith("input.batch.1.prompt: is 4,000,000 char")

"""Embeddings through the job wiring on the real all-MiniLM-L6-v2 (in-process, no SDK loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from serving.device import DEVICE_THREAD
from serving.errors import ModelNotFound
from serving.worker import Worker
from tasks.embed import EmbedTask, read_pooling
from tests.support.worker import MINILM_NAME, LoopThread, collect

pytestmark = pytest.mark.slow

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog, twice.",
         "Embeddings map text to vectors."]


def answer(loop: LoopThread, worker: Worker, job_input: dict) -> dict:
    items = loop.run(collect(worker, job_input))
    assert len(items) == 1, items
    return items[0]


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> torch.Tensor:
    """The model's own definition, computed directly: mean pooling over the mask, then L2."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1)


def cosines(a: list[list[float]], b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.tensor(a), b, dim=1)


class TestTaskDetection:
    def test_sentence_transformers_model_is_served_as_embed(self, embed_worker):
        assert embed_worker.loaded.task == "embed"
        assert embed_worker.task.name == "embed"
        assert embed_worker.task.pooling == "mean"

    def test_missing_pooling_config_is_refused_rather_than_guessed(self, minilm_dir, tmp_path):
        for name in ("config.json", "modules.json"):
            (tmp_path / name).write_text((minilm_dir / name).read_text())
        with pytest.raises(ModelNotFound, match="has no 1_Pooling/config.json"):
            read_pooling(tmp_path)


class TestAnswers:
    def test_embeddings_match_mean_pooling_computed_directly(self, loop, embed_worker,
                                                            reference):
        out = answer(loop, embed_worker, {"texts": TEXTS})
        assert out["dim"] == 384 and out["model"] == MINILM_NAME
        assert len(out["embeddings"]) == len(TEXTS)
        assert cosines(out["embeddings"], reference).min() > 0.999
        norms = torch.tensor(out["embeddings"]).norm(dim=1)
        assert torch.allclose(norms, torch.ones(len(TEXTS)), atol=1e-5)

    def test_usage_counts_every_token_special_ones_included(self, loop, embed_worker,
                                                           minilm_dir):
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
        expected = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
        assert answer(loop, embed_worker, {"texts": TEXTS})["usage"] == {"prompt_tokens":
                                                                         expected}

    def test_single_text_gives_one_vector(self, loop, embed_worker, reference):
        out = answer(loop, embed_worker, {"text": TEXTS[0]})
        assert len(out["embeddings"]) == 1
        assert cosines(out["embeddings"], reference[:1]).item() > 0.999

    def test_normalize_false_keeps_the_pooled_length(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"texts": TEXTS, "normalize": False})
        norms = torch.tensor(out["embeddings"]).norm(dim=1)
        assert (norms - 1).abs().min() > 0.01

    def test_dimensions_keep_the_first_components_renormalized(self, loop, embed_worker):
        raw = answer(loop, embed_worker, {"texts": TEXTS, "normalize": False})
        cut = answer(loop, embed_worker, {"texts": TEXTS, "dimensions": 32})
        assert cut["dim"] == 32 and len(cut["embeddings"][0]) == 32
        expected = torch.nn.functional.normalize(torch.tensor(raw["embeddings"])[:, :32], dim=1)
        assert torch.allclose(torch.tensor(cut["embeddings"]), expected, atol=1e-5)

    def test_answer_is_plain_json(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"texts": TEXTS})
        assert json.loads(json.dumps(out)) == out


class TestBatching:
    def test_texts_of_concurrent_jobs_share_one_forward_pass(self, loop, embed_worker):
        alone = [answer(loop, embed_worker, {"text": t})["embeddings"][0] for t in TEXTS]
        batcher = embed_worker.task.batcher
        batches_before = batcher.batches_run

        async def together():
            return await asyncio.gather(*(collect(embed_worker, {"text": t}) for t in TEXTS))

        batched = [items[0]["embeddings"][0] for items in loop.run(together())]
        assert batcher.batches_run == batches_before + 1
        assert batcher.largest_batch >= len(TEXTS)
        # Padding to the longest text with a mask must not change any text's vector.
        assert cosines(batched, torch.tensor(alone)).min() > 0.9999

    def test_worker_embed_batch_size_caps_the_texts_of_one_forward_pass(self, loop,
                                                                        embed_worker):
        """WORKER_EMBED_BATCH_SIZE counts texts, not WORKER_MAX_BATCH_SIZE's sequences."""
        settings = dataclasses.replace(embed_worker.settings, embed_batch_size=2,
                                       max_batch_size=1)
        capped = dataclasses.replace(embed_worker, settings=settings,
                                     task=EmbedTask(embed_worker.loaded, settings))
        whole = answer(loop, embed_worker, {"texts": TEXTS})
        out = answer(loop, capped, {"texts": TEXTS})
        assert capped.task.batcher.largest_batch == 2
        assert torch.allclose(torch.tensor(out["embeddings"]), torch.tensor(whole["embeddings"]),
                              atol=1e-5)


class TestLimits:
    def test_dimensions_over_the_model_are_refused(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"texts": TEXTS, "dimensions": 385})
        assert out["error"] == "input.dimensions: 385 is more than the model's 384 dimensions"

    def test_too_many_texts_name_the_setting(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"texts": ["x"] * 65})
        assert out["error"] == ("input.texts: has 65 texts, over the limit of 64 "
                                "(WORKER_MAX_TEXTS)")

    def test_over_long_text_is_refused_naming_it_and_the_limit(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"texts": ["short", "word " * 300]})
        assert out["error"].startswith("input.texts[1]: is 302 tokens, over the limit of 256")
        assert '"truncate": true' in out["error"]

    def test_an_over_long_text_of_a_batch_item_is_named_under_the_item(self, loop,
                                                                       embed_worker):
        out = answer(loop, embed_worker, {"batch": [{"texts": TEXTS},
                                                    {"texts": ["short", "word " * 300]}]})
        assert len(out["results"][0]["embeddings"]) == len(TEXTS)
        assert out["results"][1]["error"].startswith(
            "input.batch.1.texts[1]: is 302 tokens, over the limit of 256")

    def test_truncate_cuts_over_long_texts_to_the_limit(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"text": "word " * 300, "truncate": True})
        assert out["usage"]["prompt_tokens"] == 256
        assert len(out["embeddings"]) == 1

    def test_texts_and_text_together_are_refused(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"texts": ["a"], "text": "b"})
        assert "send exactly one of 'texts'" in out["error"]

    def test_unknown_field_is_refused_by_name(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"texts": ["a"], "pooling": "cls"})
        assert out["error"].startswith("input.pooling: unknown field; allowed fields: dimensions")


class TestTimeLimit:
    def test_a_job_stuck_behind_busy_device_ends_at_the_time_limit(self, loop, embed_worker):
        settings = dataclasses.replace(embed_worker.settings, job_timeout_s=1.0)
        limited = dataclasses.replace(embed_worker, settings=settings,
                                      task=EmbedTask(embed_worker.loaded, settings))
        release = threading.Event()
        hold_s = 120                                    # released early once the job answers
        busy = DEVICE_THREAD.submit(release.wait, hold_s)   # the device thread is taken
        try:
            started = time.monotonic()
            out = answer(loop, limited, {"texts": TEXTS})
        finally:
            release.set()
            busy.result()
        assert out["error_code"] == "timeout"
        assert "WORKER_JOB_TIMEOUT_S" in out["error"]
        # Did not wait for the device: without the limit the job would end only after hold_s.
        assert time.monotonic() - started < hold_s / 4
        # Its texts were skipped, not left queued: the worker answers the next job.
        assert len(answer(loop, limited, {"texts": TEXTS})["embeddings"]) == len(TEXTS)


class TestLargeEmbeddingAnswers:
    def test_thousands_of_texts_go_out_as_a_link(self, loop, embed_worker, tmp_path):
        import dataclasses
        import urllib.request

        from serving.config import StorageSettings
        from storage import storage_from_settings

        settings = StorageSettings.from_env({"OUTPUT_LOCAL_DIR": str(tmp_path)})
        limits = dataclasses.replace(embed_worker.settings, max_texts=2048)
        linked = dataclasses.replace(embed_worker, settings=limits, storage_settings=settings,
                                     storage=storage_from_settings(settings),
                                     task=type(embed_worker.task)(embed_worker.loaded, limits))
        texts = [f"sentence number {i}" for i in range(1000)]   # ~8 MB of JSON inline
        out = loop.run(collect(linked, {"texts": texts}), timeout=300)[0]
        assert "output_link" in out, {k: str(v)[:200] for k, v in out.items()}
        link = out["output_link"]
        with urllib.request.urlopen(link["url"]) as f:
            answer = json.loads(f.read())
        assert len(answer["embeddings"]) == 1000 and answer["dim"] == 384
        assert link["bytes"] > settings.inline_limit_bytes


class TestInputCosts:
    def test_a_4_mb_text_is_refused_by_its_length_before_it_is_tokenized(self, loop,
                                                                        embed_worker):
        out = answer(loop, embed_worker, {"texts": ["short", "word " * 800_000]})
        assert out["error_code"] == "invalid_input"
        assert out["error"].startswith(
            "input.texts[1]: is 4,000,000 characters, over the limit of 8,192"), out["error"]

    def test_truncate_cuts_a_4_mb_text_to_the_token_limit(self, loop, embed_worker):
        out = answer(loop, embed_worker, {"text": "word " * 800_000, "truncate": True})
        short = answer(loop, embed_worker, {"text": "word " * 300, "truncate": True})
        assert out["usage"]["prompt_tokens"] == 256
        assert torch.allclose(torch.tensor(out["embeddings"]), torch.tensor(short["embeddings"]))

    def test_tokenizing_runs_off_the_event_loop_and_off_the_device_thread(self, loop,
                                                                         embed_worker):
        class Recording:
            def __init__(self, inner) -> None:
                self._inner, self.threads = inner, []

            def __getattr__(self, name: str):
                return getattr(self._inner, name)

            def __call__(self, *args, **kwargs):
                self.threads.append(threading.current_thread())
                return self._inner(*args, **kwargs)

        recording = Recording(embed_worker.loaded.tokenizer)
        loaded = dataclasses.replace(embed_worker.loaded, tokenizer=recording)
        spied = dataclasses.replace(embed_worker,
                                    task=EmbedTask(loaded, embed_worker.settings))
        assert len(answer(loop, spied, {"texts": TEXTS})["embeddings"]) == len(TEXTS)
        names = [t.name for t in recording.threads]
        assert names, "the tokenizer was never called"
        assert loop.thread not in recording.threads, names
        assert not any(name.startswith("device") for name in names), names

"""Batch jobs whose items are read from disk and whose answers are spooled to it.

A spooled answer is the same answer, in item order; a batch file is checked line by line before
any item runs and then read one item at a time; and every temporary file a batch job makes is
gone when the job ends, however it ends (answered, failed, timed out, cancelled). Attacks on
the same bounds (memory against the answer's and the file's size): ``test_hostile_io.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image

from serving.batchfile import BatchAnswers, BatchFile
from serving.config import DownloadSettings
from serving.delivery import measure_answer
from serving.errors import InputError, PayloadTooLarge
from serving.worker import Worker
from tests.support.spool import WatchedStorage, spool_files
from tests.support.worker import LoopThread, configured

EMBED_SLOW_S = 300           # hundreds of texts on a shared CPU


def answer(loop: LoopThread, worker: Worker, job_input: dict[str, Any], progress: Any = None,
           ) -> dict[str, Any]:
    async def run() -> list[Any]:
        return [item async for item in worker.handle({"id": "batch-1", "input": job_input},
                                                     progress=progress)]

    items = loop.run(run(), timeout=EMBED_SLOW_S)
    assert len(items) == 1, items
    return items[0]


def texts(item: int, count: int = 2) -> dict[str, Any]:
    return {"texts": [f"item {item} text {j}" for j in range(count)]}


def png_uri(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (width * 9 % 256, 40, 90)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def jsonl(items: list[Any]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


class TestBatchAnswers:
    def test_answers_finishing_out_of_order_are_delivered_in_item_order(self, tmp_path):
        answers = BatchAnswers(3, memory_bytes=0, max_bytes=10_000, spool_dir=str(tmp_path))
        for index in (2, 0, 1):
            answers.add(index, {"n": index, "usage": {"tokens": 1}})
        assert answers.spooled
        assert [r["n"] for r in answers.results()] == [0, 1, 2]
        lines = answers.write_ordered().read_bytes().splitlines()
        assert [json.loads(line)["n"] for line in lines] == [0, 1, 2]
        assert answers.usage == {"tokens": 3} and answers.failed == 0
        answers.close()
        assert spool_files(tmp_path) == []

    def test_answers_stay_in_memory_up_to_the_bound_and_no_further(self, tmp_path):
        one = measure_answer({"n": 0})
        held = BatchAnswers(2, memory_bytes=2 * one, max_bytes=10_000, spool_dir=str(tmp_path))
        held.add(0, {"n": 0})
        held.add(1, {"n": 1})
        assert not held.spooled and spool_files(tmp_path) == []
        over = BatchAnswers(2, memory_bytes=2 * one - 1, max_bytes=10_000,
                            spool_dir=str(tmp_path))
        over.add(1, {"n": 1})
        assert not over.spooled
        over.add(0, {"n": 0})
        assert over.spooled and len(spool_files(tmp_path)) == 1
        assert over.results() == held.results() == [{"n": 0}, {"n": 1}]
        over.close()
        assert spool_files(tmp_path) == []

    def test_past_the_cap_the_job_fails_naming_the_setting(self, tmp_path):
        with BatchAnswers(9, memory_bytes=0, max_bytes=30, spool_dir=str(tmp_path)) as answers:
            answers.add(0, {"n": 0})
            with pytest.raises(PayloadTooLarge, match=r"grew past 30 bytes of JSON after 3 of 9 "
                                                      r"items \(BATCH_MAX_ANSWER_BYTES\)"):
                answers.add(1, {"n": 1})
                answers.add(2, {"n": 2, "more": "x" * 30})
        assert spool_files(tmp_path) == []

    def test_only_spooled_answers_are_prepared(self, tmp_path):
        prepared: list[int] = []

        def prepare(result: dict[str, Any]) -> dict[str, Any]:
            prepared.append(result["n"])
            return {**result, "prepared": True}

        with BatchAnswers(2, memory_bytes=10_000, max_bytes=10_000, spool_dir=str(tmp_path),
                          prepare=prepare) as held:
            held.add(0, {"n": 0})
            assert prepared == []
        with BatchAnswers(2, memory_bytes=0, max_bytes=10_000, spool_dir=str(tmp_path),
                          prepare=prepare) as spooled:
            spooled.add(0, {"n": 0})
            spooled.add(1, {"n": 1})
            assert prepared == [0, 1]
            assert all(r["prepared"] for r in spooled.results())

    def test_once_closed_nothing_more_is_written(self, tmp_path):
        answers = BatchAnswers(2, memory_bytes=0, max_bytes=10_000, spool_dir=str(tmp_path))
        answers.add(0, {"n": 0})
        answers.close()
        with pytest.raises(RuntimeError, match="has ended"):
            answers.add(1, {"n": 1})
        assert spool_files(tmp_path) == []


class TestBatchFile:
    def settings(self) -> DownloadSettings:
        return DownloadSettings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "true"})

    def test_every_line_is_checked_then_items_are_read_one_at_a_time(self, http_server,
                                                                     tmp_path):
        http_server.files["three"] = jsonl([{"a": 1}, [2], "three"])
        with BatchFile(str(tmp_path)) as items:
            assert items.fetch(http_server.url("/jsonl/three"), self.settings(),
                               field="input.batch_url", max_item_bytes=1024) == 3
            assert len(spool_files(tmp_path)) == 1
            assert [items.next_item() for _ in range(3)] == [{"a": 1}, [2], "three"]
        assert spool_files(tmp_path) == []

    @pytest.mark.parametrize("body, message", [
        (b'{}\n{}\n{"a": \n', "input.batch_url: line 3 is not valid JSON"),
        (b'{}\n{"text": "\\udfff"}\n', "input.batch_url: line 2 holds text that is not valid "
                                       "Unicode"),
        (b"\n \n", "input.batch_url: holds no items"),
    ])
    def test_a_bad_file_fails_before_any_item_is_read(self, http_server, tmp_path, body,
                                                      message):
        http_server.files["bad"] = body
        with BatchFile(str(tmp_path)) as items, pytest.raises(InputError) as err:
            items.fetch(http_server.url("/jsonl/bad"), self.settings(),
                        field="input.batch_url", max_item_bytes=1024)
        assert str(err.value).startswith(message)
        assert spool_files(tmp_path) == []


@pytest.mark.slow
class TestSpooledAnswersThroughTheWorker:
    def test_a_spooled_answer_that_fits_is_sent_inline_as_if_held(self, loop, embed_worker):
        batch = [texts(i) for i in range(4)] + [{"text": ""}, {"texts": []}]
        held = answer(loop, configured(embed_worker, WORKER_MAX_TEXTS="64"), {"batch": batch})
        spooled = answer(loop, configured(embed_worker, WORKER_MAX_TEXTS="64",
                                          BATCH_ANSWER_MEMORY_BYTES="0"), {"batch": batch})
        assert set(spooled) == {"results", "failed", "usage", "model"}
        assert spooled["failed"] == held["failed"] == 1
        assert spooled["usage"] == held["usage"]
        for a, b in zip(spooled["results"], held["results"], strict=True):
            assert a.keys() == b.keys()
            if "embeddings" in a:
                for u, v in zip(a["embeddings"], b["embeddings"], strict=True):
                    assert u == pytest.approx(v, abs=1e-5)
            else:
                assert a == b

    def test_a_spooled_answers_files_are_stored_as_links_as_items_finish(
            self, loop, upscale_worker, tmp_path):
        own = configured(upscale_worker, BATCH_ANSWER_MEMORY_BYTES="0",
                         OUTPUT_LOCAL_DIR=str(tmp_path))
        batch = [{"image": png_uri(8 + i, 8)} for i in range(3)]
        out = answer(loop, own, {"batch": batch})
        assert out["failed"] == 0
        images = [result["image"] for result in out["results"]]
        # The answer (links only) fits inline after all; each file is its own object.
        assert set(out) == {"results", "failed", "usage", "model"}
        for i, image in enumerate(images):
            assert image["key"].endswith(f"/batch-1/{i}-image.png")
        for i, image in enumerate(images):
            stored = Path(urlsplit(image["url"]).path).read_bytes()
            assert Image.open(io.BytesIO(stored)).size == (2 * (8 + i), 16)

    def test_inline_mode_fails_naming_the_limit_when_a_spooled_answer_is_too_large(
            self, loop, embed_worker, tmp_path):
        own = configured(embed_worker, WORKER_MAX_TEXTS="64", BATCH_ANSWER_MEMORY_BYTES="0",
                         OUTPUT_INLINE_LIMIT_BYTES="1000", OUTPUT_LOCAL_DIR=str(tmp_path))
        out = answer(loop, own, {"batch": [texts(i) for i in range(3)],
                                 "output_mode": "inline"})
        assert out.get("error_code") == "payload_too_large", out
        assert "OUTPUT_INLINE_LIMIT_BYTES" in out["error"]
        assert "output_mode 'auto' or 'link'" in out["error"]

    def test_without_storage_a_spooled_answer_too_large_says_how_to_enable_links(
            self, loop, embed_worker):
        own = configured(embed_worker, WORKER_MAX_TEXTS="64", BATCH_ANSWER_MEMORY_BYTES="0",
                         OUTPUT_INLINE_LIMIT_BYTES="1000")
        out = answer(loop, own, {"batch": [texts(i) for i in range(3)]})
        assert out.get("error_code") == "payload_too_large", out
        assert "BUCKET_ENDPOINT_URL" in out["error"] and "s3Config" in out["error"]


@pytest.mark.slow
class TestTemporaryFilesGo:
    """Whatever way a batch job ends, its spool directory is as it found it: no file left, and
    none held open (an unnamed temporary file shows only as an open one)."""

    def spooling(self, worker: Worker, spool: Path, **env: str) -> Worker:
        return configured(worker, WORKER_MAX_TEXTS="64", DOWNLOAD_ALLOW_PRIVATE="true",
                          BATCH_ANSWER_MEMORY_BYTES="0", BATCH_SPOOL_DIR=str(spool), **env)

    def test_when_it_is_answered(self, loop, embed_worker, http_server, tmp_path):
        spool = tmp_path / "spool"
        spool.mkdir()
        http_server.files["answered"] = jsonl([texts(i) for i in range(6)])
        storage = WatchedStorage(tmp_path / "out", spool=spool)
        own = dataclasses.replace(self.spooling(embed_worker, spool,
                                                OUTPUT_INLINE_LIMIT_BYTES="1000"),
                                  storage=storage)
        out = answer(loop, own, {"batch_url": http_server.url("/jsonl/answered")})
        assert out["count"] == 6 and out["output_link"]["content_type"] == "application/x-ndjson"
        # While the answer was uploaded: the items, the answers, the answers in item order.
        assert len(storage.spool_seen[-1]) == 3, storage.spool_seen
        assert spool_files(spool) == []

    def test_when_it_fails(self, loop, embed_worker, http_server, tmp_path):
        http_server.files["fails"] = jsonl([texts(i) for i in range(6)])
        own = self.spooling(embed_worker, tmp_path, BATCH_MAX_ANSWER_BYTES="20000")
        out = answer(loop, own, {"batch_url": http_server.url("/jsonl/fails")})
        assert out.get("error_code") == "payload_too_large", out
        assert spool_files(tmp_path) == []

    def long_job(self, http_server) -> dict[str, Any]:
        http_server.files["long"] = jsonl([texts(i, 8) for i in range(2000)])
        return {"batch_url": http_server.url("/jsonl/long")}

    def test_when_it_times_out(self, loop, embed_worker, http_server, tmp_path):
        own = self.spooling(embed_worker, tmp_path, WORKER_JOB_TIMEOUT_S="4")
        seen: list[list[str]] = []
        out = answer(loop, own, self.long_job(http_server),
                     progress=lambda job, value: seen.append(spool_files(tmp_path)))
        assert out.get("error_code") == "timeout", out
        assert seen and len(seen[0]) == 2, seen      # the items and the answers, while it ran
        assert spool_files(tmp_path) == []

    def test_when_it_is_cancelled(self, loop, embed_worker, http_server, tmp_path):
        own = self.spooling(embed_worker, tmp_path)
        job = {"id": "batch-cancelled", "input": self.long_job(http_server)}
        seen: list[list[str]] = []

        async def cancelled() -> bool:
            async def run() -> list[Any]:
                return [item async for item in own.handle(job, progress=cancel)]

            task = asyncio.ensure_future(run())

            def cancel(job: Any, value: Any) -> None:
                seen.append(spool_files(tmp_path))
                task.cancel()

            with contextlib.suppress(asyncio.CancelledError):
                await task
            return task.cancelled()

        assert loop.run(cancelled(), timeout=EMBED_SLOW_S)
        assert seen and len(seen[0]) == 2, seen
        assert spool_files(tmp_path) == []

"""What the worker owns for a declared task: media inputs, predict's forms, declared batching
(its failures included, and the pieces an async predict batches), streaming through
predict_stream, a task's own settings, and the job fields beside the input.

The tasks here are small ``Task`` subclasses written as a forker would, on the real tiny
Swin2SR model, behind the real job wiring; downloads go to a real HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import threading
from collections.abc import AsyncIterator
from typing import Any

import PIL.Image
import pytest
import torch
from pydantic import Field

from serving.config import DownloadSettings
from serving.errors import InputError, SettingsError
from serving.worker import Worker
from tasks.base import Audio, File, Image, Input, OutputFile, Task, TaskSettings
from tests.support.http_server import pattern
from tests.support.worker import collect


def png_uri(width: int, height: int) -> str:
    out = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 10, 10)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def serve(base: Worker, task_class: type[Task], env: dict[str, str] | None = None,
          **settings: Any) -> Worker:
    """``task_class`` on ``base``'s loaded model, behind a worker of its own."""
    worker_settings = dataclasses.replace(base.settings, **settings)
    downloads = DownloadSettings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "true", **(env or {})})
    return dataclasses.replace(base, settings=worker_settings, download_settings=downloads,
                               task=task_class(base.loaded, worker_settings, env or {}))


def run(loop: Any, worker: Worker, job_input: Any, **job: Any) -> dict[str, Any]:
    (out,) = loop.run(collect(worker, job_input) if not job else
                      _collect_job(worker, {"id": "j", "input": job_input, **job}))
    return out


async def _collect_job(worker: Worker, job: dict[str, Any]) -> list[dict[str, Any]]:
    return [item async for item in worker.handle(job)]


class MediaInput(Input):
    file: File | None = None
    sound: Audio | None = None
    images: list[Image] = []


class MediaTask(Task):
    name = "media"
    input = MediaInput

    def predict(self, input: MediaInput) -> dict[str, Any]:
        sound = input.sound
        return {"file": None if input.file is None else [len(input.file), input.file[:4].hex()],
                "sound": None if sound is None else [len(sound.data), sound.content_type],
                "images": [[i.mode, *i.size] for i in input.images]}


class TestMediaInputs:
    def test_file_audio_and_images_arrive_fetched_and_decoded(self, loop, upscale_worker,
                                                              http_server):
        worker = serve(upscale_worker, MediaTask)
        wav = "data:audio/wav;base64," + base64.b64encode(b"RIFF0000WAVE").decode()
        out = run(loop, worker, {"file": http_server.url("/data/1000"), "sound": wav,
                                 "images": [png_uri(3, 2), png_uri(5, 4)]})
        assert out["file"] == [1000, pattern(4).hex()]
        assert out["sound"] == [12, "audio/wav"]
        assert out["images"] == [["RGB", 3, 2], ["RGB", 5, 4]]

    def test_an_s3_url_is_read_from_the_jobs_own_bucket(self, loop, upscale_worker, s3_server):
        import boto3
        bucket = s3_server.make_bucket()
        client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                              aws_access_key_id=s3_server.access_key,
                              aws_secret_access_key=s3_server.secret_key)
        client.put_object(Bucket=bucket, Key="in/blob.bin", Body=b"\x01\x02\x03")
        client.close()
        s3_config = {"accessId": s3_server.access_key, "accessSecret": s3_server.secret_key,
                     "bucketName": bucket, "endpointUrl": s3_server.endpoint}
        out = run(loop, serve(upscale_worker, MediaTask), {"file": f"s3://{bucket}/in/blob.bin"},
                  s3Config=s3_config)
        assert out["file"] == [3, "010203"]

    def test_a_bad_image_in_a_list_names_its_index(self, loop, upscale_worker):
        worker = serve(upscale_worker, MediaTask)
        bad = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
        out = run(loop, worker, {"images": [png_uri(3, 2), bad]})
        assert out["error_code"] == "invalid_input"
        assert out["error"].startswith("input.images.1: is not a PNG, JPEG or WebP image")

    def test_a_reference_that_is_no_url_is_refused_before_any_download(self, loop,
                                                                       upscale_worker):
        out = run(loop, serve(upscale_worker, MediaTask), {"file": "/etc/passwd"})
        assert out["error"].startswith("input.file: must be an https:// or s3:// URL")

    def test_a_failed_download_names_the_field(self, loop, upscale_worker, http_server):
        """Pins: download failures used to omit the field JobContext.download promised."""
        out = run(loop, serve(upscale_worker, MediaTask),
                  {"file": http_server.url("/status/404")})
        assert out["error_code"] == "download_failed"
        assert out["error"].startswith("input.file: ") and "HTTP 404" in out["error"]

    def test_an_image_over_its_byte_limit_names_the_pixel_limit(self, loop, upscale_worker,
                                                                http_server):
        """Pins: the image's own byte limit used to be reported as DOWNLOAD_MAX_BYTES."""
        worker = serve(upscale_worker, MediaTask, max_image_pixels=1000)
        out = run(loop, worker, {"images": [http_server.url("/data/1100000")]})
        assert out["error_code"] == "download_failed"
        assert out["error"].startswith("input.images.0: ")
        assert "WORKER_MAX_IMAGE_PIXELS=1,000" in out["error"]
        assert "DOWNLOAD_MAX_BYTES" not in out["error"]

    def test_a_file_over_the_download_limit_names_download_max_bytes(self, loop, upscale_worker,
                                                                     http_server):
        worker = serve(upscale_worker, MediaTask, env={"DOWNLOAD_MAX_BYTES": "500"})
        out = run(loop, worker, {"file": http_server.url("/data/1000")})
        assert out["error"].startswith("input.file: ") and "DOWNLOAD_MAX_BYTES" in out["error"]


class EchoInput(Input):
    text: str = Field(min_length=1)


class AsyncTask(Task):
    name = "async"
    input = EchoInput
    example = {"text": "hi"}

    async def predict(self, input: EchoInput, job: Any) -> dict[str, Any]:
        shape = await self.on_device(lambda: tuple(torch.ones(2, 3).shape))
        return {"text": input.text, "shape": list(shape), "job": job.job_id}


class WrongAnswerTask(Task):
    name = "wrong"
    input = EchoInput

    def predict(self, input: EchoInput) -> list[str]:
        return [input.text]


class TestPredictForms:
    def test_an_async_predict_runs_on_the_loop_and_gets_the_job(self, loop, upscale_worker):
        out = run(loop, serve(upscale_worker, AsyncTask), {"text": "x"})
        assert out == {"text": "x", "shape": [2, 3], "job": "test",
                       "model": upscale_worker.loaded.served_name}

    def test_an_answer_that_is_not_a_dict_is_an_internal_error(self, loop, upscale_worker):
        out = run(loop, serve(upscale_worker, WrongAnswerTask), {"text": "x"})
        assert out["error_code"] == "internal"


class CountInput(Input):
    n: int = Field(ge=0)


class CountTask(Task):
    """Batched: answers each n, records the batch sizes; n=13 fails, n=99 breaks the device."""

    name = "count"
    input = CountInput
    example = {"n": 1}
    max_batch_size = 8
    batch_wait_ms = 50

    def setup(self) -> None:
        self.sizes: list[int] = []
        self.oom_once = threading.Event()

    def predict_batch(self, inputs: list[CountInput]) -> list[dict[str, Any]]:
        self.sizes.append(len(inputs))
        ns = [i.n for i in inputs]
        if 99 in ns:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if 13 in ns and len(ns) > 1:
            raise ValueError("unlucky")
        if 13 in ns:
            raise ValueError("unlucky alone")
        if 7 in ns and len(ns) > 1 and not self.oom_once.is_set():
            self.oom_once.set()
            raise torch.OutOfMemoryError("CUDA out of memory")
        assert not torch.is_grad_enabled()     # predict_batch runs in inference mode
        return [{"n": n, "file": OutputFile(str(n).encode(), "text/plain", "n.txt")}
                for n in ns]


def concurrently(loop: Any, worker: Worker, inputs: list[dict[str, Any]]) -> list[dict]:
    async def all_of() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(collect(worker, i, f"j{k}") for k, i in enumerate(inputs)))
    return [out for (out,) in loop.run(all_of())]


class TestDeclaredBatching:
    def test_concurrent_jobs_share_predict_batch_calls(self, loop, upscale_worker):
        worker = serve(upscale_worker, CountTask)
        outs = concurrently(loop, worker, [{"n": n} for n in range(6)])
        assert [o["n"] for o in outs] == list(range(6))
        assert max(worker.task.sizes) > 1
        assert worker.task.batcher.max_batch_size == 8

    def test_max_batch_size_is_capped_by_the_worker_setting(self, upscale_worker):
        task = CountTask(upscale_worker.loaded, dataclasses.replace(upscale_worker.settings,
                                                                    max_batch_size=3))
        assert task.batcher.max_batch_size == 3

    def test_a_failing_input_fails_alone(self, loop, upscale_worker):
        worker = serve(upscale_worker, CountTask)
        outs = concurrently(loop, worker, [{"n": 1}, {"n": 13}, {"n": 2}])
        assert outs[0]["n"] == 1 and outs[2]["n"] == 2
        assert outs[1]["error_code"] == "internal"

    def test_out_of_memory_splits_the_batch_and_every_job_is_answered(self, loop,
                                                                      upscale_worker):
        worker = serve(upscale_worker, CountTask)
        outs = concurrently(loop, worker, [{"n": 7}, {"n": 8}, {"n": 9}, {"n": 10}])
        assert [o["n"] for o in outs] == [7, 8, 9, 10]
        assert worker.task.batcher.oom_retries == 1

    def test_a_device_fault_replaces_the_worker_without_the_task_reporting_it(
            self, loop, upscale_worker):
        """Pins: a batched task had to forward its batcher's device_fault itself."""
        worker = serve(upscale_worker, CountTask)
        out = run(loop, worker, {"n": 99})
        assert out["error_code"] == "device_fault" and out["refresh_worker"] is True
        assert worker.needs_refresh

    def test_batch_items_files_get_their_index(self, loop, upscale_worker):
        out = run(loop, serve(upscale_worker, CountTask), {"batch": [{"n": 1}, {"n": 2}]})
        assert [r["file"]["data"] for r in out["results"]] == ["MQ==", "Mg=="]

    def test_respond_runs_off_the_device_thread(self, loop, upscale_worker):
        class Responding(CountTask):
            def respond(self, output: dict[str, Any], input: CountInput) -> dict[str, Any]:
                return {"n": output["n"], "thread": threading.current_thread().name}

        out = run(loop, serve(upscale_worker, Responding), {"n": 5})
        assert out["n"] == 5 and not out["thread"].startswith("device")

    def test_the_default_warm_up_answers_the_example(self, upscale_worker):
        task = CountTask(upscale_worker.loaded, upscale_worker.settings)
        task.warm_up()
        assert task.sizes == [1]


class WordsInput(Input):
    words: list[str] = Field(min_length=1)


class WordsTask(Task):
    """An async predict that batches each word of a job as a piece of its own."""

    name = "words"
    input = WordsInput
    example = {"words": ["hi"]}
    max_batch_size = 8
    batch_wait_ms = 50

    def setup(self) -> None:
        self.sizes: list[int] = []

    async def predict(self, input: WordsInput, job: Any) -> dict[str, Any]:
        if not all(w.strip() for w in input.words):
            raise InputError("holds a blank word", field="input.words")
        return {"lengths": await self.batched(input.words, job)}

    def predict_batch(self, inputs: list[str]) -> list[int]:
        self.sizes.append(len(inputs))
        if "bad" in inputs:
            raise ValueError("a bad word")
        return [len(w) for w in inputs]


class TestBatchedPieces:
    def test_the_pieces_of_concurrent_jobs_share_predict_batch_calls(self, loop,
                                                                      upscale_worker):
        worker = serve(upscale_worker, WordsTask)
        outs = concurrently(loop, worker, [{"words": ["a", "bb", "ccc"]},
                                           {"words": ["dddd", "e", "ff"]}])
        assert [o["lengths"] for o in outs] == [[1, 2, 3], [4, 1, 2]]
        assert max(worker.task.sizes) > 3          # one call held pieces of both jobs

    def test_a_failing_piece_fails_only_its_own_job(self, loop, upscale_worker):
        worker = serve(upscale_worker, WordsTask)
        outs = concurrently(loop, worker, [{"words": ["a", "bad"]}, {"words": ["cc", "d"]}])
        assert outs[0]["error_code"] == "internal"
        assert outs[1]["lengths"] == [2, 1]

    def test_an_input_error_from_predict_names_the_batch_item(self, loop, upscale_worker):
        """Pins: predict cannot know where its input sits in a batch job; its errors named the
        field as a single job's, input.words."""
        out = run(loop, serve(upscale_worker, WordsTask),
                  {"batch": [{"words": ["a"]}, {"words": [" "]}]})
        assert out["results"][0]["lengths"] == [1]
        assert out["results"][1]["error"] == "input.batch.1.words: holds a blank word"


class StreamInput(Input):
    text: str = Field(min_length=1)
    stream: bool = False


class SpellTask(Task):
    """Streams its text one character a chunk."""

    name = "spell"
    input = StreamInput
    example = {"text": "hi"}

    async def predict(self, input: StreamInput, job: Any) -> dict[str, Any]:
        return {"text": input.text}

    async def predict_stream(self, input: StreamInput, job: Any) -> AsyncIterator[dict[str, Any]]:
        for char in input.text:
            yield {"text": char}


class TestStreaming:
    def test_a_stream_job_gets_predict_streams_chunks(self, loop, upscale_worker):
        items = loop.run(collect(serve(upscale_worker, SpellTask),
                                 {"text": "abc", "stream": True}))
        assert items == [{"text": "a"}, {"text": "b"}, {"text": "c"}]

    def test_without_stream_the_answer_is_predicts(self, loop, upscale_worker):
        out = run(loop, serve(upscale_worker, SpellTask), {"text": "abc"})
        assert out == {"text": "abc", "model": upscale_worker.loaded.served_name}

    def test_a_streamed_batch_item_is_refused_by_the_worker(self, loop, upscale_worker):
        out = run(loop, serve(upscale_worker, SpellTask),
                  {"batch": [{"text": "a", "stream": True}]})
        assert out["results"][0]["error"].startswith("input.batch.0.stream: ")

    def test_a_task_without_predict_stream_streams_its_whole_answer(self, loop,
                                                                    upscale_worker):
        class Whole(SpellTask):
            predict_stream = Task.predict_stream

        items = loop.run(collect(serve(upscale_worker, Whole), {"text": "abc", "stream": True}))
        assert items == [{"text": "abc", "model": upscale_worker.loaded.served_name}]


class LimitSettings(TaskSettings):
    env_prefix = "CLASSIFY_"
    max_chars: int = Field(100, ge=1, le=10_000)
    label: str = "positive"


class TestTaskSettings:
    def test_a_task_reads_its_own_settings_with_its_prefix(self, upscale_worker):
        class Limited(AsyncTask):
            Settings = LimitSettings

        task = Limited(upscale_worker.loaded, upscale_worker.settings,
                       {"CLASSIFY_MAX_CHARS": "42"})
        assert task.options == LimitSettings(max_chars=42, label="positive")

    @pytest.mark.parametrize("value", ["0", "many"])
    def test_an_invalid_value_names_the_variable(self, value):
        with pytest.raises(SettingsError, match=rf"CLASSIFY_MAX_CHARS=('?){value}\1 is .*an "
                                                rf"integer from 1 to 10000$"):
            LimitSettings.from_env({"CLASSIFY_MAX_CHARS": value})


class TestJobFields:
    def test_output_mode_beside_the_input_is_refused_not_ignored(self, loop, upscale_worker):
        """Pins: a top-level output_mode was silently ignored."""
        out = run(loop, serve(upscale_worker, AsyncTask), {"text": "x"}, output_mode="link")
        assert out["error_code"] == "invalid_input"
        assert out["error"].startswith("output_mode: belongs inside the input")

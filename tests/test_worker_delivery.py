"""Answers that never break the payload limit, batch jobs, and per-job storage, through the job
wiring on the real model and a real S3-compatible server (rclone) on loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.request

import pytest

from serving.config import DownloadSettings, StorageSettings
from serving.delivery import measure_answer
from serving.worker import Worker
from storage import storage_from_settings
from tests.support.worker import chat

pytestmark = pytest.mark.slow

CAPITAL = chat("What is the capital of France?", max_new_tokens=20)


def with_storage(worker: Worker, env: dict[str, str]) -> Worker:
    """The same loaded model and task, with other storage and download settings."""
    settings = StorageSettings.from_env(env)
    return dataclasses.replace(worker, storage_settings=settings,
                               storage=storage_from_settings(settings),
                               download_settings=DownloadSettings.from_env(env))


def only(loop, worker: Worker, job_input: dict, job: dict | None = None) -> dict:
    async def run():
        full = {"id": "job-1", "input": job_input, **(job or {})}
        return [item async for item in worker.handle(
            full, progress=lambda j, p: progress_seen.append((j, p)))]

    progress_seen.clear()
    items = loop.run(run())
    assert len(items) == 1, items
    return items[0]


progress_seen: list = []


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def check_link(link: dict) -> bytes:
    """Download the link with plain HTTP; its bytes and sha256 must be what the link says."""
    body = fetch(link["url"])
    assert len(body) == link["bytes"]
    assert hashlib.sha256(body).hexdigest() == link["sha256"]
    return body


@pytest.fixture(scope="module")
def inline_size(loop, worker) -> int:
    """Bytes of the greedy Paris answer as the SDK would post it."""
    return measure_answer(only(loop, worker, CAPITAL))


class TestInlineOrLink:
    def test_answer_at_the_limit_is_inline_and_one_byte_over_is_a_link(
            self, loop, worker, inline_size, s3_server, s3_bucket):
        at_limit = with_storage(worker, s3_server.env(
            s3_bucket, OUTPUT_INLINE_LIMIT_BYTES=str(inline_size)))
        inline = only(loop, at_limit, CAPITAL)
        assert "Paris" in inline["text"]
        over = with_storage(worker, s3_server.env(
            s3_bucket, OUTPUT_INLINE_LIMIT_BYTES=str(inline_size - 1)))
        linked = only(loop, over, CAPITAL)
        assert set(linked) == {"output_link"}
        link = linked["output_link"]
        assert json.loads(check_link(link)) == inline
        assert link["content_type"] == "application/json"
        assert link["key"].endswith("job-1/answer.json")
        assert link["expires_at"].endswith("Z")

    def test_link_mode_uploads_even_a_small_answer(self, loop, worker, s3_server, s3_bucket):
        linked = only(loop, with_storage(worker, s3_server.env(s3_bucket)),
                      {**CAPITAL, "output_mode": "link"})
        assert "Paris" in json.loads(check_link(linked["output_link"]))["text"]

    def test_inline_mode_over_the_limit_fails_naming_the_setting(
            self, loop, worker, s3_server, s3_bucket):
        tiny = with_storage(worker, s3_server.env(s3_bucket, OUTPUT_INLINE_LIMIT_BYTES="10"))
        out = only(loop, tiny, {**CAPITAL, "output_mode": "inline"})
        assert "OUTPUT_INLINE_LIMIT_BYTES" in out["error"]
        assert out["error_code"] == "payload_too_large"

    def test_too_large_without_storage_fails_saying_how_to_enable_links(self, loop, worker):
        tiny = with_storage(worker, {"OUTPUT_INLINE_LIMIT_BYTES": "10"})
        out = only(loop, tiny, CAPITAL)
        assert "over the inline limit of 10 bytes" in out["error"]
        assert "BUCKET_ENDPOINT_URL" in out["error"] and "s3Config" in out["error"]

    def test_unknown_output_mode_names_the_field(self, loop, worker):
        assert only(loop, worker, {**CAPITAL, "output_mode": "email"})["error"].startswith(
            "input.output_mode: must be one of inline, link, auto")

    def test_a_jobs_own_s3config_lands_in_its_own_bucket(self, loop, worker, s3_server):
        own = s3_server.make_bucket()
        job = {"s3Config": {"accessId": s3_server.access_key,
                            "accessSecret": s3_server.secret_key,
                            "bucketName": own, "endpointUrl": s3_server.endpoint}}
        # The test server is on loopback: allowed here, refused by default (test_hostile_io).
        allowed = with_storage(worker, {"DOWNLOAD_ALLOW_PRIVATE": "true"})
        out = only(loop, allowed, {**CAPITAL, "output_mode": "link"}, job)
        assert f"/{own}/" in out["output_link"]["url"]
        check_link(out["output_link"])

    def test_storage_down_fails_the_job_cleanly_and_the_next_job_is_served(
            self, loop, worker, start_s3_server):
        server = start_s3_server()
        bucket = server.make_bucket()
        linked = with_storage(worker, server.env(bucket))
        server.stop()
        out = only(loop, linked, {**CAPITAL, "output_mode": "link"})
        assert out["error_code"] == "storage_failed"
        assert server.secret_key not in out["error"]
        assert "Paris" in only(loop, worker, CAPITAL)["text"]


class TestBatchJobs:
    def test_items_are_answered_in_order_and_a_bad_item_fails_alone(self, loop, worker):
        out = only(loop, worker, {"batch": [
            CAPITAL, {"prompt": "Hello", "max_new_tokens": 3, "temprature": 1},
            {"prompt": "One, two,", "max_new_tokens": 4}]})
        first, bad, third = out["results"]
        assert "Paris" in first["text"]
        assert bad["error"].startswith("input.batch.1.temprature: unknown field")
        assert bad["index"] == 1
        assert third["usage"]["completion_tokens"] == 4
        assert out["failed"] == 1
        assert out["usage"]["completion_tokens"] == (first["usage"]["completion_tokens"] + 4)

    def test_batch_answers_match_the_same_jobs_run_alone(self, loop, worker):
        jobs = [chat(q, max_new_tokens=12) for q in ("Say hi.", "Name a color.", "2+2?")]
        alone = [only(loop, worker, j)["text"] for j in jobs]
        assert [r["text"] for r in only(loop, worker, {"batch": jobs})["results"]] == alone

    def test_fields_beside_a_batch_are_refused(self, loop, worker):
        out = only(loop, worker, {"batch": [CAPITAL], "max_new_tokens": 3})
        assert out["error"].startswith("input.max_new_tokens: unknown field beside a batch")

    def test_batch_over_the_item_limit_names_the_setting(self, loop, worker):
        small = with_storage(worker, {"BATCH_MAX_ITEMS": "2"})
        out = only(loop, small, {"batch": [CAPITAL] * 3})
        assert "BATCH_MAX_ITEMS" in out["error"]

    def test_batch_url_on_s3_and_a_large_result_goes_out_as_jsonl(
            self, loop, worker, s3_server, s3_bucket):
        import boto3
        lines = "\n".join(json.dumps({"prompt": f"Item {i}:", "max_new_tokens": 2})
                          for i in range(6))
        client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                              aws_access_key_id=s3_server.access_key,
                              aws_secret_access_key=s3_server.secret_key)
        client.put_object(Bucket=s3_bucket, Key="in/batch.jsonl", Body=lines.encode())
        small = with_storage(worker, s3_server.env(s3_bucket, OUTPUT_INLINE_LIMIT_BYTES="300",
                                                   BATCH_URL_S3_PREFIX="in"))
        out = only(loop, small, {"batch_url": f"s3://{s3_bucket}/in/batch.jsonl"})
        assert out["count"] == 6 and out["model"] == worker.loaded.served_name
        assert out["failed"] == 0     # beside the link too, so a client need not download it
        body = check_link(out["output_link"])
        results = [json.loads(line) for line in body.decode().splitlines()]
        assert len(results) == 6
        assert all(r["usage"]["completion_tokens"] == 2 for r in results)
        assert out["output_link"]["content_type"] == "application/x-ndjson"

    def test_batch_url_over_http_is_refused_for_private_addresses_by_default(
            self, loop, worker, http_server):
        http_server.files["b"] = json.dumps(CAPITAL).encode()
        out = only(loop, worker, {"batch_url": http_server.url("/jsonl/b")})
        assert out["error_code"] == "download_failed"
        allowed = with_storage(worker, {"DOWNLOAD_ALLOW_PRIVATE": "true"})
        assert "Paris" in only(loop, allowed, {"batch_url": http_server.url("/jsonl/b")}
                               )["results"][0]["text"]

    def test_long_batches_report_progress(self, loop, worker):
        out = only(loop, worker, {"batch": [{"prompt": f"Story {i}:", "max_new_tokens": 3 + 3 * i}
                                            for i in range(12)]})
        assert out["failed"] == 0
        assert progress_seen, "no progress update during a multi-second batch"
        job, progress = progress_seen[-1]
        assert job["id"] == "job-1"
        assert 0 < progress["done"] < progress["total"] == 12

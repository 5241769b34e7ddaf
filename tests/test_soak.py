"""A soak run through the local endpoint and the real worker loop, bounded in count and time.

Hundreds of mixed jobs at full concurrency: whole answers, streams, cancels, bad input and
answers large enough to go out as links. Every job must reach a final state with the right
answer or error; none is lost or answered twice; the worker's memory does not grow from the
first half to the second.
"""

from __future__ import annotations

import hashlib
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.endpoint import call, start_handler_service, stop_service

pytestmark = pytest.mark.slow

JOBS = 240                      # in two halves; memory is compared between them
CONCURRENCY = 8
PROMPTS = ["Say hello.", "Name a color.", "What is 2 plus 2?", "Name a fruit."]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def soak_service(default_model_dir, s3_server, tmp_path_factory):
    bucket = s3_server.make_bucket()
    service = start_handler_service(
        default_model_dir, tmp_path_factory.mktemp("soak") / "worker.log", "soak-worker",
        WORKER_CONCURRENCY=str(CONCURRENCY),
        **s3_server.env(bucket, OUTPUT_INLINE_LIMIT_BYTES="600"))
    yield service
    stop_service(service)


def test_hundreds_of_mixed_jobs_each_end_right_and_memory_stays_flat(soak_service):
    client, endpoint = soak_service.client, soak_service.endpoint
    # Greedy references, one per prompt: every whole or streamed answer must equal its own.
    reference = {p: client.run_sync({"input": {"messages": [{"role": "user", "content": p}],
                                               "max_new_tokens": 6}}, timeout=120)[0]["text"]
                 for p in PROMPTS}
    rng = random.Random(1234)
    kinds = rng.choices(["whole", "stream", "bad", "cancel", "large"],
                        weights=[35, 20, 15, 10, 20], k=JOBS)

    def run_one(index: int) -> tuple[int, str, str | None]:
        """(index, kind, problem or None)"""
        kind = kinds[index]
        prompt = PROMPTS[index % len(PROMPTS)]
        chat = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 6}
        if kind == "whole":
            out = client.run_sync({"input": chat}, timeout=300)
            ok = out[0]["text"] == reference[prompt]
            return index, kind, None if ok else f"whole answer {out!r}"
        if kind == "stream":
            job = client.run({"input": {**chat, "stream": True}})
            text = "".join(c["text"] for c in job.stream())
            return index, kind, None if text == reference[prompt] else f"stream {text!r}"
        if kind == "bad":
            _, body = call(endpoint, "POST", "runsync", {"input": {**chat, "max_new_tokens": -1}})
            ok = body["status"] == "FAILED" and body["error"].startswith("input.max_new_tokens")
            return index, kind, None if ok else f"bad input {body!r}"
        if kind == "cancel":
            job = client.run({"input": {"prompt": "Count:", "max_new_tokens": 200}})
            time.sleep(rng.uniform(0.05, 0.5))
            job.cancel()
            status = endpoint.wait_for_status(job.job_id, timeout_s=300)["status"]
            return index, kind, None if status in ("CANCELLED", "COMPLETED") else status
        out = client.run_sync({"input": {"batch": [chat] * 4}}, timeout=300)
        link = out[0]["output_link"]
        with urllib.request.urlopen(link["url"], timeout=10) as response:
            body = response.read()
        ok = (hashlib.sha256(body).hexdigest() == link["sha256"] and out[0]["count"] == 4)
        return index, kind, None if ok else f"large {out!r}"

    pid = soak_service.worker.process.pid
    started = time.monotonic()
    results = []
    memory = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for half in (range(0, JOBS // 2), range(JOBS // 2, JOBS)):
            results += list(pool.map(run_one, half))
            memory.append(rss_bytes(pid))
            assert time.monotonic() - started < 600, "the soak run is over its time bound"
    problems = [r for r in results if r[2] is not None]
    assert not problems, problems[:5]
    assert sorted(i for i, _, _ in results) == list(range(JOBS))      # none lost, none twice
    _, health = call(endpoint, "GET", "health")
    assert health["jobs"]["inQueue"] == 0 and health["jobs"]["inProgress"] == 0
    growth = memory[1] - memory[0]
    assert growth < 0.10 * memory[0], (
        f"worker memory grew {growth / 2**20:.0f} MiB over {JOBS // 2} jobs "
        f"(from {memory[0] / 2**20:.0f} MiB)")

"""A soak run through the local endpoint and the real worker loop, bounded in count and time.

Hundreds of mixed jobs at full concurrency: whole answers, streams, cancels, bad input,
hostile shapes (private addresses, a lone surrogate) and answers large enough to go out as
links. Every job must reach a final state with the right
answer or error; the endpoint's own records account for every job sent, each id once and each
in a final state; the worker's memory does not grow from the first half to the second.
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

# The run's own did-not-hang bound is 600 s (below); pytest's default 300 s would cut it first.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

JOBS = 240                      # in two halves; memory is compared between them
CONCURRENCY = 8
PROMPTS = ["Say hello.", "Name a color.", "What is 2 plus 2?", "Name a fruit."]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# The final status each kind of job must end in, as the endpoint records it.
ENDS = {"whole": {"COMPLETED"}, "stream": {"COMPLETED"}, "large": {"COMPLETED"},
        "bad": {"FAILED"}, "cancel": {"CANCELLED", "COMPLETED"}, "hostile": {"FAILED"}}
# Hostile shapes a job may take, each refused with an error naming its field: a batch_url and
# a job's own storage aimed at private addresses, a lone surrogate.
HOSTILE = [
    ({"input": {"batch_url": "http://10.0.0.1/items.jsonl"}}, "input.batch_url"),
    ({"input": {"prompt": "\ud800 hi", "max_new_tokens": 2}}, "not valid Unicode"),
    ({"input": {"prompt": "hi", "max_new_tokens": 2, "output_mode": "link"},
      "s3Config": {"accessId": "a", "accessSecret": "s", "bucketName": "bucket",
                   "endpointUrl": "http://169.254.169.254"}}, "s3Config.endpointUrl"),
]


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
    # Keep every result for the whole run, so the final count can read each job's record.
    service.endpoint.runsync_retention_s = service.endpoint.run_retention_s = 3600.0
    yield service
    stop_service(service)


def test_hundreds_of_mixed_jobs_each_end_right_and_memory_stays_flat(soak_service):
    client, endpoint = soak_service.client, soak_service.endpoint
    # Greedy references, one per prompt: every whole or streamed answer must equal its own.
    reference = {p: client.run_sync({"input": {"messages": [{"role": "user", "content": p}],
                                               "max_new_tokens": 6}}, timeout=120)[0]["text"]
                 for p in PROMPTS}
    rng = random.Random(1234)
    kinds = rng.choices(["whole", "stream", "bad", "cancel", "large", "hostile"],
                        weights=[30, 20, 10, 10, 20, 10], k=JOBS)

    def run_one(index: int) -> tuple[int, str, str, str | None]:
        """(index, kind, job id, problem or None)"""
        kind = kinds[index]
        prompt = PROMPTS[index % len(PROMPTS)]
        chat = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 6}
        if kind == "whole":
            _, body = call(endpoint, "POST", "runsync", {"input": chat}, timeout_s=300)
            if body["status"] not in FINAL:       # /runsync gave up waiting: read it later
                body = endpoint.wait_for_status(body["id"], timeout_s=300)
            out = body.get("output")
            ok = body["status"] == "COMPLETED" and bool(out) and out[0]["text"] == reference[prompt]
            return index, kind, body["id"], None if ok else f"whole answer {body!r}"
        if kind == "stream":
            job = client.run({"input": {**chat, "stream": True}})
            text = "".join(c["text"] for c in job.stream())
            problem = None if text == reference[prompt] else f"stream {text!r}"
            return index, kind, job.job_id, problem
        if kind == "bad":
            _, body = call(endpoint, "POST", "runsync", {"input": {**chat, "max_new_tokens": -1}})
            ok = body["status"] == "FAILED" and body["error"].startswith("input.max_new_tokens")
            return index, kind, body["id"], None if ok else f"bad input {body!r}"
        if kind == "hostile":
            job, field = HOSTILE[index % len(HOSTILE)]
            _, body = call(endpoint, "POST", "runsync", job, timeout_s=300)
            if body["status"] not in FINAL:
                body = endpoint.wait_for_status(body["id"], timeout_s=300)
            ok = body["status"] == "FAILED" and field in body.get("error", "")
            return index, kind, body["id"], None if ok else f"hostile {field}: {body!r}"
        if kind == "cancel":
            job = client.run({"input": {"prompt": "Count:", "max_new_tokens": 200}})
            time.sleep(rng.uniform(0.05, 0.5))
            job.cancel()
            status = endpoint.wait_for_status(job.job_id, timeout_s=300)["status"]
            return index, kind, job.job_id, None if status in ENDS["cancel"] else status
        _, body = call(endpoint, "POST", "runsync", {"input": {"batch": [chat] * 4}},
                       timeout_s=300)
        if body["status"] not in FINAL:
            body = endpoint.wait_for_status(body["id"], timeout_s=300)
        out = body.get("output")
        if body["status"] != "COMPLETED" or not out:
            return index, kind, body["id"], f"large {body!r}"
        link = out[0]["output_link"]
        with urllib.request.urlopen(link["url"], timeout=10) as response:
            data = response.read()
        ok = (hashlib.sha256(data).hexdigest() == link["sha256"] and out[0]["count"] == 4)
        return index, kind, body["id"], None if ok else f"large {out!r}"

    pid = soak_service.worker.process.pid
    _, before = call(endpoint, "GET", "health")
    started = time.monotonic()
    results = []
    memory = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for half in (range(0, JOBS // 2), range(JOBS // 2, JOBS)):
            results += list(pool.map(run_one, half))
            memory.append(rss_bytes(pid))
            assert time.monotonic() - started < 600, "the soak run is over its time bound"
    problems = [r for r in results if r[3] is not None]
    assert not problems, problems[:5]

    # Count at the endpoint, not in our own loop: each job sent has its own id, and the
    # endpoint's record of each is final and the one its kind must end in.
    ids = [job_id for _, _, job_id, _ in results]
    assert len(set(ids)) == JOBS, "two jobs were given the same id"
    ended = {}
    for _, kind, job_id, _ in results:
        status, record = call(endpoint, "GET", f"status/{job_id}")
        assert status == 200, f"the endpoint lost job {job_id} ({kind}): HTTP {status}"
        assert record["status"] in ENDS[kind], f"{kind} job {job_id} ended {record['status']}"
        ended[record["status"]] = ended.get(record["status"], 0) + 1
    # The endpoint ended exactly these jobs in this run (it counts each job once, when it
    # ends): no job of ours ended twice or went missing, and no other job ended.
    _, health = call(endpoint, "GET", "health")
    assert health["jobs"]["inQueue"] == 0 and health["jobs"]["inProgress"] == 0
    assert (health["jobs"]["completed"] - before["jobs"]["completed"],
            health["jobs"]["failed"] - before["jobs"]["failed"]) == (
        ended.get("COMPLETED", 0), ended.get("FAILED", 0))
    assert sum(ended.values()) == JOBS
    growth = memory[1] - memory[0]
    assert growth < 0.10 * memory[0], (
        f"worker memory grew {growth / 2**20:.0f} MiB over {JOBS // 2} jobs "
        f"(from {memory[0] / 2**20:.0f} MiB)")

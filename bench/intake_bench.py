"""Intake benchmark: a fast model through the real worker loop, with the SDK's intake and ours.

A model whose decode step is as fast as the default model's on a GPU (``gpu_bench``'s ``tiny``
architecture: ~3M random parameters, 1 to 2 ms a step on two CPU cores) leaves the per-job
path around the engine as the cost. N concurrent jobs go through the local endpoint and the
real runpod worker loop (``handler.py``), once with ``WORKER_INTAKE=sdk`` (the SDK's own
JobScaler) and once with ``fast`` (serving/intake.py), each as a ratio to one direct batched
``model.generate`` of the same prompts measured in the same run, alternated round by round.
Both workers take 32 jobs at a time; 64 jobs at once make them refill slots as jobs end. The
endpoint's timings say where a job's time went: waiting to be taken, then running.

The model computes on one thread everywhere (the workers and the ceiling): the per-job path is
Python on one core, and the second core is left to the endpoint, the client and the other
worker. Two OpenMP threads on a shared two-core machine made every round hostage to whatever
else ran (the same config measured from 140 to 1450 tokens/s); one thread varied by 10 %.

    .venv/bin/python -m bench.intake_bench                      # ~3 min on 2 CPU cores
    .venv/bin/python -m bench.intake_bench --concurrency 32 --repeat 5

Results go to ``bench/results/<device>-intake.json``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.worker_bench import (
    RESULTS,
    ROOT,
    DirectGenerate,
    job,
    model_dir,
    percentile,
    post_concurrently,
)

MODES = ("sdk", "fast")


def tiny_model(out: Path) -> Path:
    """The ~3M-parameter random model in the default architecture (made once per run)."""
    from bench.gpu_bench import make_model

    if not (out / "config.json").exists():
        make_model(out, "tiny", model_dir())
    return out


def run(path: Path, levels: list[int], max_new_tokens: int, repeat: int, worker_jobs: int
        ) -> dict[str, Any]:
    import torch

    from dev.local_endpoint import LocalEndpoint, WorkerProcess

    torch.set_num_threads(1)
    ceiling = DirectGenerate(path)
    settings = {"MODEL_PATH": str(path), "RUNPOD_LOG_LEVEL": "ERROR", "OMP_NUM_THREADS": "1",
                "WORKER_CONCURRENCY": str(worker_jobs), "WORKER_MAX_BATCH_SIZE": str(worker_jobs)}
    # One worker per mode, both alive; rounds alternate between them and the direct generate,
    # so the machine's drift hits all three alike.
    endpoints = {mode: LocalEndpoint().start() for mode in MODES}
    log = open(Path(tempfile.gettempdir()) / "bench-intake.log", "wb")  # noqa: SIM115
    workers = {mode: WorkerProcess(endpoints[mode], [sys.executable, "handler.py"],
                                   f"intake-{mode}", cwd=str(ROOT), output=log,
                                   extra_env={**settings, "WORKER_INTAKE": mode}).start()
               for mode in MODES}
    rows = []
    try:
        for mode in MODES:
            workers[mode].wait_ready(300)

        def round_(mode: str, n: int) -> tuple[float, list[float]]:
            endpoint = endpoints[mode]
            url = f"{endpoint.base_url}/{endpoint.endpoint_id}/runsync"
            wall, answers = post_concurrently(
                [(url, {"input": job(i, max_new_tokens)}) for i in range(n)])
            tokens = sum(a["output"][0]["usage"]["completion_tokens"] for _, a in answers)
            return tokens / wall, [s for s, _ in answers]

        for mode in MODES:
            round_(mode, worker_jobs)   # each worker's first batch of its full size
        for n in levels:
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            latencies: dict[str, list[float]] = {m: [] for m in MODES}
            direct: list[float] = []
            since = time.monotonic()
            for r in range(repeat):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    rate, lat = round_(mode, n)
                    rates[mode].append(rate)
                    latencies[mode] += lat
                direct.append(ceiling.tokens_per_s(n, max_new_tokens))
            row: dict[str, Any] = {"concurrency": n, "repeat": repeat,
                                   "direct_batched_tokens_per_s": statistics.median(direct),
                                   "direct_rounds_tokens_per_s": direct}
            for mode in MODES:
                waits, runs = zip(*endpoints[mode].timings(since), strict=True)
                rate = statistics.median(rates[mode])
                row[mode] = {"tokens_per_s": rate, "rounds_tokens_per_s": rates[mode],
                             "ratio_to_direct_batched": rate / row["direct_batched_tokens_per_s"],
                             "p50_s": percentile(latencies[mode], 0.5),
                             "p95_s": percentile(latencies[mode], 0.95),
                             "queue_wait_max_s": max(waits),
                             "execution_p50_s": percentile(list(runs), 0.5)}
            rows.append(row)
            print(f"  {n:>3} jobs: direct {row['direct_batched_tokens_per_s']:7.1f} tok/s; "
                  + "; ".join(f"{m} intake {row[m]['tokens_per_s']:7.1f} tok/s = "
                              f"x{row[m]['ratio_to_direct_batched']:.2f} of direct "
                              f"(longest wait to be taken {row[m]['queue_wait_max_s']:.2f} s)"
                              for m in MODES), flush=True)
    finally:
        for mode in MODES:
            workers[mode].stop(60)
            endpoints[mode].stop()
        log.close()
    return {"max_new_tokens": max_new_tokens, "worker_env": settings, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[8, 32, 64],
                        help="jobs sent at once; the worker takes 32 at a time (--worker-jobs)")
    parser.add_argument("--worker-jobs", type=int, default=32,
                        help="WORKER_CONCURRENCY and WORKER_MAX_BATCH_SIZE of both workers")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None,
                        help="a model directory (default: the tiny random model, made here)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import platform

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp) / "tiny")
        print(f"intake: {path.name} model, {args.max_new_tokens} new tokens per job", flush=True)
        load_before = round(os.getloadavg()[0], 2)    # the machine's 1-minute load average
        result = {"device": device, "machine": platform.machine(), "model": path.name,
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  **run(path, args.concurrency, args.max_new_tokens, args.repeat, args.worker_jobs),
                  "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}
    out = args.out or RESULTS / f"{device}-intake.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()

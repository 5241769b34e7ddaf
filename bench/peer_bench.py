"""A peer side by side: our OpenAI route against ``transformers serve`` on the same model.

Both serve ``models/default`` on this machine, one at a time in alternating rounds (both stay
loaded): ``transformers serve --continuous-batching`` (transformers' own OpenAI-compatible
server, FastAPI and uvicorn) at ``/v1/chat/completions``, and this worker behind the local
endpoint and the real runpod worker loop at ``/v2/local/openai/v1/chat/completions``, with its
default settings. The same chat requests go to both: greedy, at most 48 tokens, 1, 8 and 16 at
once. Reported: tokens/s of each (completion tokens from each answer's ``usage`` over the
round's wall time) and ours as a ratio of the peer's, medians over the rounds.

    .venv/bin/python -m bench.peer_bench                    # ~4 min on 2 CPU cores

Results go to ``bench/results/<device>-peer.json``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.worker_bench import RESULTS, ROOT, job, model_dir, percentile, post_concurrently


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(path: Path, log: Any) -> tuple[subprocess.Popen[bytes], str]:
    """``transformers serve`` on ``path``; returns the process and its base URL once healthy."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(path),
               "--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return process, base
        except OSError:
            time.sleep(1)
    process.kill()
    raise RuntimeError("transformers serve did not answer /health in time")


def chat(i: int, model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": job(i, 0)["messages"], "max_tokens": max_tokens,
            "temperature": 0}


def run(path: Path, levels: list[int], max_tokens: int, repeat: int) -> dict[str, Any]:
    from dev.local_endpoint import LocalEndpoint, WorkerProcess

    log = open(Path(tempfile.gettempdir()) / "bench-peer.log", "wb")  # noqa: SIM115
    endpoint = LocalEndpoint().start()
    worker = WorkerProcess(endpoint, [sys.executable, "handler.py"], "peer-bench",
                           cwd=str(ROOT), output=log,
                           extra_env={"MODEL_PATH": str(path), "RUNPOD_LOG_LEVEL": "ERROR"})
    peer, peer_base = start_peer(path, log)
    worker.start()
    try:
        worker.wait_ready(300)
        ours = f"{endpoint.base_url}/{endpoint.endpoint_id}/openai/v1"
        with urllib.request.urlopen(f"{ours}/models", timeout=60) as response:
            served = json.loads(response.read())["data"][0]["id"]   # the name it answers as
        targets = {
            "ours": (f"{ours}/chat/completions", served),
            "transformers_serve": (f"{peer_base}/v1/chat/completions", str(path)),
        }

        def round_(name: str, n: int) -> tuple[float, list[float]]:
            url, model = targets[name]
            wall, answers = post_concurrently([(url, chat(i, model, max_tokens))
                                               for i in range(n)])
            tokens = sum(a["usage"]["completion_tokens"] for _, a in answers)
            return tokens / wall, [s for s, _ in answers]

        for name in targets:             # first requests: each server's own start-up costs
            round_(name, max(levels))
        rows = []
        for n in levels:
            rates: dict[str, list[float]] = {k: [] for k in targets}
            latencies: dict[str, list[float]] = {k: [] for k in targets}
            for r in range(repeat):       # alternating, and which goes first alternates too
                for name in (list(targets) if r % 2 == 0 else list(targets)[::-1]):
                    rate, lat = round_(name, n)
                    rates[name].append(rate)
                    latencies[name] += lat
            row: dict[str, Any] = {"concurrency": n, "repeat": repeat}
            for name in targets:
                row[name] = {"tokens_per_s": statistics.median(rates[name]),
                             "p50_s": percentile(latencies[name], 0.5),
                             "p95_s": percentile(latencies[name], 0.95)}
            row["ratio"] = row["ours"]["tokens_per_s"] / row["transformers_serve"]["tokens_per_s"]
            rows.append(row)
            print(f"  {n:>3} at once: ours {row['ours']['tokens_per_s']:6.1f} tok/s, "
                  f"transformers serve {row['transformers_serve']['tokens_per_s']:6.1f} tok/s "
                  f"= x{row['ratio']:.2f}; p50 {row['ours']['p50_s']:.2f} s vs "
                  f"{row['transformers_serve']['p50_s']:.2f} s", flush=True)
    finally:
        worker.stop(60)
        endpoint.stop()
        peer.terminate()
        try:
            peer.wait(30)
        except subprocess.TimeoutExpired:
            peer.kill()
        log.close()
    return {"max_tokens": max_tokens, "rows": rows,
            "peer": "transformers serve --continuous-batching (defaults otherwise)",
            "ours": "handler.py behind dev/local_endpoint.py, default settings"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = model_dir()
    print(f"peer: {path.name}, greedy, at most {args.max_tokens} tokens a request", flush=True)
    load_before = round(os.getloadavg()[0], 2)        # the machine's 1-minute load average
    result = {"device": device, "machine": platform.machine(), "cpus": os.cpu_count(),
              "model": path.name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **run(path, args.concurrency, args.max_tokens, args.repeat),
              "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}
    out = args.out or RESULTS / f"{device}-peer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()

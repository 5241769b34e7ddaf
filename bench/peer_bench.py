"""A peer side by side: our OpenAI route against ``transformers serve`` on the same model.

Both serve ``models/default`` on this machine, one at a time in alternating rounds (both stay
loaded): ``transformers serve --continuous-batching`` (transformers' own OpenAI-compatible
server, FastAPI and uvicorn) at ``/v1/chat/completions``, and this worker behind the local
endpoint and the real runpod worker loop at ``/v2/local/openai/v1/chat/completions``, with its
default settings. The same chat requests go to both: greedy, at most 48 tokens, 1, 8 and 16 at
once. Reported: tokens/s of each (completion tokens from each answer's ``usage`` over the
round's wall time) and ours as a ratio of the peer's, medians over the rounds.

    .venv/bin/python -m bench.peer_bench                    # ~4 min on 2 CPU cores
    python -m bench.peer_bench --peer-cuda-graph --peer-compile-level 1   # a GPU: its best

On a GPU the peer should run as fast as it can. Its continuous batching has two accelerations,
both off by default: CUDA graphs of its forward passes (``--cb-use-cuda-graph``, which the CLI
has; with SDPA attention the library's default leaves them off because the attention mask
pads every graph) and ``torch.compile`` of them (``ContinuousBatchingConfig``'s
``default_compile_level``, 1 to 3, which the CLI does not expose: ``--peer-compile-level`` sets
it by starting the same CLI from a few lines of Python that give the config that default).
``--compile`` of the CLI is for the non-batching path only (a static cache), not used here.
Ours runs with WORKER_DECODE=auto (compiled on a GPU), or what ``--ours-env`` says.

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


# ``transformers serve`` from this Python (the CLI's own entry point, so it runs wherever
# transformers imports, console script or not), with ContinuousBatchingConfig's
# default_compile_level set to argv[1] when it is not 0 (the CLI has no flag for it).
PEER_LAUNCHER = """
import sys
from transformers import ContinuousBatchingConfig
level = int(sys.argv.pop(1))
if level:
    plain_init = ContinuousBatchingConfig.__init__
    def init_with_compile(self, *args, **kwargs):
        kwargs.setdefault("default_compile_level", level)
        plain_init(self, *args, **kwargs)
    ContinuousBatchingConfig.__init__ = init_with_compile
from transformers.cli.transformers import main
sys.argv[0] = "transformers"
main()
"""


def start_peer(path: Path, log: Any, cuda_graph: bool = False, compile_level: int = 0
               ) -> tuple[subprocess.Popen[bytes], str]:
    """``transformers serve`` on ``path``; returns the process and its base URL once healthy."""
    port = free_port()
    command = [sys.executable, "-c", PEER_LAUNCHER, str(compile_level), "serve", str(path),
               "--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
    if cuda_graph:
        command.append("--cb-use-cuda-graph")
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


def run(path: Path, levels: list[int], max_tokens: int, repeat: int,
        peer_cuda_graph: bool = False, peer_compile_level: int = 0,
        ours_env: dict[str, str] | None = None) -> dict[str, Any]:
    from bench.worker_bench import parse_startup_line
    from dev.local_endpoint import LocalEndpoint, WorkerProcess

    log_path = Path(tempfile.gettempdir()) / "bench-peer.log"
    log = open(log_path, "wb")  # noqa: SIM115
    endpoint = LocalEndpoint().start()
    worker = WorkerProcess(endpoint, [sys.executable, "handler.py"], "peer-bench",
                           cwd=str(ROOT), output=log,
                           extra_env={"MODEL_PATH": str(path), "RUNPOD_LOG_LEVEL": "ERROR",
                                      **(ours_env or {})})
    peer, peer_base = start_peer(path, log, peer_cuda_graph, peer_compile_level)
    worker.start()
    try:
        worker.wait_ready(300)
        decode = parse_startup_line(log_path.read_text(errors="replace"))["decode"]
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

        warmup_s = {}
        for name in targets:             # first requests: each server's own start-up costs
            start = time.perf_counter()  # (a compiled peer compiles, captures graphs here)
            # A graph per batch shape: with graphs or compile, every level is warmed up.
            warm = sorted(set(levels)) if peer_cuda_graph or peer_compile_level else levels[-1:]
            for n in warm:
                round_(name, n)
            warmup_s[name] = time.perf_counter() - start
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
    described = "transformers serve --continuous-batching"
    described += " --cb-use-cuda-graph" if peer_cuda_graph else ""
    described += (f", ContinuousBatchingConfig(default_compile_level={peer_compile_level})"
                  if peer_compile_level else "")
    return {"max_tokens": max_tokens, "rows": rows, "first_rounds_s": warmup_s,
            "peer": described + " (defaults otherwise)",
            "ours": "handler.py behind dev/local_endpoint.py, default settings"
                    + (f" but {ours_env}" if ours_env else ""),
            "decode_path": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--peer-cuda-graph", action="store_true",
                        help="the peer captures CUDA graphs (--cb-use-cuda-graph)")
    parser.add_argument("--peer-compile-level", type=int, default=0, choices=[0, 1, 2, 3],
                        help="the peer compiles its forward passes at this level (1: mode "
                             "default; 2 and 3: max-autotune, minutes of warm-up)")
    parser.add_argument("--ours-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="settings for our worker, e.g. WORKER_MAX_BATCH_SIZE=32")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = model_dir()
    print(f"peer: {path.name}, greedy, at most {args.max_tokens} tokens a request", flush=True)
    load_before = round(os.getloadavg()[0], 2)        # the machine's 1-minute load average
    result: dict[str, Any] = {
        "device": device, "machine": platform.machine(), "cpus": os.cpu_count(),
        "model": path.name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **run(path, args.concurrency, args.max_tokens, args.repeat,
              args.peer_cuda_graph, args.peer_compile_level,
              dict(item.split("=", 1) for item in args.ours_env)),
        "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        from bench.gpu_bench import versions
        result["versions"] = versions()
    out = args.out or RESULTS / f"{device}-peer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()

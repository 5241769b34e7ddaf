"""Worker benchmarks: cold start, per-job overhead and throughput, each as a ratio to a baseline
measured in the same run (absolute times on a shared machine are noise). Not a test.

    .venv/bin/python -m bench.worker_bench                  # everything, ~5 min on 2 CPU cores
    .venv/bin/python -m bench.worker_bench --only throughput --concurrency 1 8

What is measured, and against what:
- cold start: ``python handler.py --test_input`` with a one-token job, start to exit, and the
  worker loop's first answer (``handler.py`` behind the local endpoint, the job queued before it
  starts), against the floor: a fresh process that only imports torch and loads the same
  safetensors files with ``safetensors.torch.load_file``. Median of ``--repeat``, interleaved;
  with the import-time budget of the test mode by package (``python -X importtime``).
- eager and compiled paths (``bench_switch``): fresh processes with WORKER_DECODE=eager and
  compiled: the first answer after process start (compiled as a ratio to eager), the time until
  the compiled step serves (empty compile cache, then found), tokens/s at 1 and 32 concurrent
  jobs on each path. On a CPU, the rehearsal on a two-layer cut of the model.
- per-job overhead: a one-token job through ``Worker.handle`` (validation, tokenizing, batcher,
  engine, delivery) against ``model.generate`` of one token on the same prompt, in-process.
- throughput: N concurrent jobs through the local endpoint and the real runpod worker loop,
  against (a) the same jobs sent one at a time through the same endpoint, and (b) the ceiling:
  one direct batched decode of all N prompts (``model.generate``, left padding) in-process.
  Reports tokens/s, p50 and p95 latency.

Results go to ``bench/results/<device>.json`` (committed) and ``bench/results/<device>.svg``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a day at the beach.",
    "Write a poem about autumn leaves.",
    "Explain why the sky is blue.",
    "Describe your favourite meal.",
    "Write a letter to a friend about a trip.",
    "Explain how plants grow.",
]


def model_dir() -> Path:
    path = Path(os.environ.get("MODEL_PATH", ROOT / "models" / "default"))
    if not (path / "config.json").exists():
        sys.exit(f"no model at {path}: run `make model` first or set MODEL_PATH")
    return path


def job(i: int, max_new_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_new_tokens": max_new_tokens, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ----------------------------------------------------------------------------------------------
ONE_TOKEN_JOB = {"input": {"prompt": "Hello", "max_new_tokens": 1, "temperature": 0}}
STARTUP_LINE = re.compile(r"import ([\d.]+)s, read ([\d.]+)s .*place ([\d.]+)s, "
                          r"warm-up ([\d.]+)s")
# The last part of the startup line: "| decode compiled (...), 7.9e-07 from eager".
DECODE_NOTE = re.compile(r"\| (decode (?:compiled|eager)\b[^|\n]*?)\s*$", re.MULTILINE)


def parse_startup_line(text: str) -> dict[str, Any]:
    """The phases (seconds) and the decode path of the worker's startup line in ``text``."""
    found: dict[str, Any] = {}
    if match := STARTUP_LINE.search(text):
        found = dict(zip(("import_s", "read_s", "place_s", "warmup_s"),
                         (float(x) for x in match.groups()), strict=True))
    note = DECODE_NOTE.search(text)
    found["decode"] = note.group(1) if note else None
    return found


def test_mode_process(path: Path, extra_env: dict[str, str] | None = None,
                      python_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """``python handler.py --test_input`` with a one-token job in a fresh process: seconds from
    start to exit, and its startup line's phases and decode path (``stderr`` too)."""
    env = {**os.environ, "MODEL_PATH": str(path), **(extra_env or {})}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *python_args, "handler.py", "--test_input",
                           json.dumps(ONE_TOKEN_JOB)], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"handler.py --test_input exited {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")
    return {"process_s": seconds, **parse_startup_line(done.stderr), "stderr": done.stderr}


def bench_cold_start(path: Path, repeat: int, decodes: list[str] | None = None,
                     worker_loop: bool = True, compile_cache: Path | None = None
                     ) -> dict[str, Any]:
    """Fresh processes, interleaved: the floor, the test mode, the worker loop's first answer.

    - floor: a process that only imports torch and reads the same safetensors files onto the
      device (``safetensors.torch.load_file``);
    - test mode: ``python handler.py --test_input`` with a one-token job, start to exit; with
      ``decodes``, once per WORKER_DECODE value. ``compiled`` answers eagerly at once (its step
      compiles off the job path, and the process exits before it is done; ``bench_switch``
      times the compile and the switch) and runs with its own compile cache (``compile_cache``,
      else a new directory);
    - worker loop: ``python handler.py`` behind the local endpoint with the same job already
      queued, from process start to the job's answer (what a RunPod cold start costs the
      first caller, less the platform's own container start).
    """
    floor_code = (
        "import glob,torch;from safetensors.torch import load_file;"
        "d='cuda' if torch.cuda.is_available() else 'cpu';"
        f"[load_file(f,device=d) for f in glob.glob({str(path / '*.safetensors')!r})];"
        "torch.cuda.synchronize() if d=='cuda' else None")
    env = {**os.environ, "MODEL_PATH": str(path)}

    def floor() -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", floor_code], cwd=ROOT, capture_output=True,
                       text=True, check=True, env=env)
        return time.perf_counter() - start

    def worker_loop_first_answer() -> float:
        from dev.local_endpoint import COMPLETED, LocalEndpoint, WorkerProcess

        endpoint = LocalEndpoint().start()
        try:
            request = urllib.request.Request(
                f"{endpoint.base_url}/{endpoint.endpoint_id}/run", method="POST",
                data=json.dumps(ONE_TOKEN_JOB).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                job_id = json.loads(response.read())["id"]          # queued before the worker runs
            start = time.perf_counter()
            worker = WorkerProcess(endpoint, [sys.executable, "handler.py"], "cold", cwd=str(ROOT),
                                   output=subprocess.DEVNULL,
                                   extra_env={"MODEL_PATH": str(path),
                                              "RUNPOD_LOG_LEVEL": "ERROR"}).start()
            try:
                status = endpoint.wait_for_status(job_id, timeout_s=600)
                elapsed = time.perf_counter() - start
                assert status["status"] == COMPLETED, status
            finally:
                worker.stop(60)
            return elapsed
        finally:
            endpoint.stop()

    # One entry per test-mode setting: the environment's own (no WORKER_DECODE given), or each
    # WORKER_DECODE value; compiled with a cache of its own.
    settings: dict[str, dict[str, str]] = {}
    for decode in decodes or []:
        settings[decode] = {"WORKER_DECODE": decode}
        if decode == "compiled":
            cache = compile_cache or Path(tempfile.mkdtemp(prefix="compile-cache-"))
            settings[decode]["WORKER_COMPILE_CACHE_DIR"] = str(cache)
    if not settings:
        settings["environment"] = {}
    floors, loops = [], []
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for _ in range(repeat):              # interleaved, so drift hits all alike
        floors.append(floor())
        for name, extra in settings.items():
            run = test_mode_process(path, extra)
            run.pop("stderr")
            runs[name].append(run)
        if worker_loop:
            loops.append(worker_loop_first_answer())
    floor_s = statistics.median(floors)
    keys = ("import_s", "read_s", "place_s", "warmup_s")

    def summary(found: list[dict[str, Any]]) -> dict[str, Any]:
        process_s = statistics.median(r["process_s"] for r in found)
        out = {"process_s": process_s, "ratio_to_floor": process_s / floor_s,
               "decode": found[0]["decode"], "runs_s": [r["process_s"] for r in found]}
        if all("warmup_s" in r for r in found):
            out["startup_line"] = {k: statistics.median(r[k] for r in found) for k in keys}
        return out

    by_setting = {name: summary(found) for name, found in runs.items()}
    main = next(iter(by_setting.values()))
    result: dict[str, Any] = {
        "repeat": repeat, "floor_process_s": floor_s,
        "test_mode_process_s": main["process_s"], "ratio_to_floor": main["ratio_to_floor"],
        "runs_s": {"floor": floors, "test_mode": main["runs_s"]}}
    if "startup_line" in main:
        result["startup_line"] = main["startup_line"]
    if decodes:
        result["by_decode"] = by_setting
    if worker_loop:
        result["worker_loop_first_answer_s"] = statistics.median(loops)
        result["worker_loop_ratio_to_floor"] = statistics.median(loops) / floor_s
        result["runs_s"]["worker_loop"] = loops
    first = next(iter(settings.values()))
    budget = test_mode_process(path, first, python_args=("-X", "importtime"))
    result["import_budget"] = import_budget(budget["stderr"])
    return result


def import_budget(importtime_stderr: str, top: int = 12) -> dict[str, Any]:
    """``python -X importtime``'s report, summed: the seconds each top-level package took
    (its modules' own time, so nothing counts twice), and the slowest imports of the handler
    itself (cumulative: each with everything it pulled in)."""
    by_package: dict[str, float] = {}
    direct: dict[str, float] = {}
    for line in importtime_stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, own, cumulative, name = (part for part in re.split(r"[:|]", line, maxsplit=3))
        if not own.strip().isdigit():
            continue                      # the header line
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(own) / 1e6
        if not name.startswith("  "):     # imported by the handler itself, not by a module
            direct[name.strip()] = int(cumulative) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    return {"total_s": sum(by_package.values()),
            "by_package_s": dict(ranked[:top]),
            "handler_imports_cumulative_s": dict(sorted(direct.items(),
                                                         key=lambda kv: -kv[1])[:top])}


# ----------------------------------------------------------------------------------------------
def bench_overhead(path: Path, repeat: int) -> dict[str, Any]:
    """A one-token job through Worker.handle vs model.generate of one token."""
    import torch

    from serving.device import DEVICE_THREAD
    from tests.support.worker import build_worker

    w = build_worker({"MODEL_PATH": str(path), "WORKER_BATCH_WAIT_MS": "0"})
    tok, model = w.loaded.tokenizer, w.loaded.model
    job_input = {"prompt": "Hello", "max_new_tokens": 1, "temperature": 0}
    ids = tok("Hello", return_tensors="pt").to(w.loaded.device)

    async def through_handler() -> float:
        start = time.perf_counter()
        items = [i async for i in w.handle({"id": "bench", "input": job_input})]
        assert "text" in items[0], items
        return time.perf_counter() - start

    def direct() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=1, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        return time.perf_counter() - start

    loop = asyncio.new_event_loop()
    handler_s, direct_s = [], []
    for _ in range(repeat):              # interleaved, so drift hits both alike
        handler_s.append(loop.run_until_complete(through_handler()))
        direct_s.append(DEVICE_THREAD.submit(direct).result())  # torch's own thread, as jobs
    for task in asyncio.all_tasks(loop):     # the batcher's runner
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    h, d = statistics.median(handler_s), statistics.median(direct_s)
    return {"handler_ms": h * 1000, "direct_generate_ms": d * 1000,
            "overhead_ms": (h - d) * 1000, "ratio": h / d, "repeat": repeat}


# ----------------------------------------------------------------------------------------------
def cut_model(source: Path, out: Path, layers: int) -> Path:
    """The first ``layers`` layers of ``source`` with its own embeddings and tokenizer: real
    weights (varied tokens, unlike a random model) at a fraction of the compile time."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, num_hidden_layers=layers,
                                                 dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "config.json", "model.safetensors.index.json", "builder.json"):
            shutil.copy(f, out / f.name)
    return out


def _switch_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load the task as the worker does, answer one job, wait for the
    compiled step (if any), then time concurrent jobs. Seconds count from ``spec["started"]``,
    the parent's clock just before it started this process."""
    from serving.config import ModelSettings, WorkerSettings
    from serving.graphs import SwitchingEngine
    from tasks import TASKS
    from tests.support.worker import load_task

    env = {**os.environ, "WORKER_TASK": "generate"}
    task = load_task(ModelSettings.from_env(env), WorkerSettings.from_env(env), TASKS)

    async def answer(i: int, tokens: int) -> dict[str, Any]:
        return await task.answer(task.parse(job(i, tokens)))

    asyncio.run(answer(0, 1))
    out: dict[str, Any] = {"first_answer_s": time.time() - spec["started"],
                           "decode": task.loaded.stats.note}
    engine = task.batcher.engine
    if isinstance(engine, SwitchingEngine):
        # What the compile costs the jobs served meanwhile: one job after another until the
        # compiled step is ready (eager, beside the compile thread).
        tokens, start = 0, time.perf_counter()
        while not engine.prepared.is_set() and not engine.settled.is_set():
            done = asyncio.run(answer(1, max(spec["new_tokens"], 16)))
            tokens += done["usage"]["completion_tokens"]
        elapsed = time.perf_counter() - start
        out["while_compiling_tokens_per_s"] = tokens / elapsed if tokens else None
        engine.settled.wait(spec["wait_s"])
        out["serving_s"] = (time.time() - spec["started"]) if engine.serving else None
        out["why_eager"] = engine.why_eager
        out["switch"] = engine.timings
    out["tokens_per_s"] = {}
    for n in spec["levels"]:
        async def many(n: int = n) -> list[dict[str, Any]]:
            return await asyncio.gather(*(answer(i, spec["new_tokens"]) for i in range(n)))

        asyncio.run(many(1))                        # this level's shapes, once
        start = time.perf_counter()
        answers = asyncio.run(many())
        elapsed = time.perf_counter() - start
        out["tokens_per_s"][str(n)] = sum(a["usage"]["completion_tokens"]
                                          for a in answers) / elapsed
    return out


def switch_probe(path: Path, env: dict[str, str], levels: list[int], new_tokens: int,
                 wait_s: float = 900) -> dict[str, Any]:
    """A fresh process serving ``path`` with ``env``: seconds from its start to the first
    answer and (compiled path) to the compiled step serving, then tokens/s at each level of
    concurrent jobs (greedy, ``new_tokens`` each, end token included)."""
    spec = {"levels": levels, "new_tokens": new_tokens, "wait_s": wait_s}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "bench.worker_bench", "--switch-child",
         json.dumps({**spec, "started": started})], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "MODEL_PATH": str(path), **env})
    if done.returncode != 0:
        raise RuntimeError(f"the switch probe exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_switch(path: Path, levels: list[int], new_tokens: int,
                 compile_cache: Path | None = None, env: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """The eager path against the compiled one, each in fresh processes: the first answer
    after process start (compiled as a ratio to eager: the compiled path answers at the eager
    cold start and compiles off the job path), the time until the compiled step serves, with
    an empty compile cache (an endpoint's first worker) and with it filled (every later one),
    and tokens/s at each level of concurrent jobs on each path once it serves.

    On a CPU this is the rehearsal: a two-layer cut of ``path`` with short limits (a compile of
    the whole default model costs minutes there and tells nothing about a GPU).
    """
    import torch

    settings = {"WORKER_MAX_BATCH_SIZE": str(max(levels)), "WORKER_CONCURRENCY": str(max(levels)),
                **(env or {})}
    work = Path(tempfile.mkdtemp(prefix="switch-bench-"))
    if not torch.cuda.is_available():
        path = cut_model(path, work / "two-layers", 2)
        settings.update({"WORKER_MAX_PROMPT_TOKENS": "128", "WORKER_MAX_NEW_TOKENS": "64",
                         "WORKER_DEFAULT_MAX_NEW_TOKENS": "64"})
    import shutil

    # The first compiled worker finds an empty cache of its own; the second finds what it left,
    # copied into ``compile_cache`` when given (so later workers there find it too).
    empty_cache, cache = work / "compile-cache", compile_cache or work / "compile-cache"
    compiled = {**settings, "WORKER_DECODE": "compiled"}
    eager = switch_probe(path, {**settings, "WORKER_DECODE": "eager"}, levels, new_tokens)
    print(f"  eager: first answer {eager['first_answer_s']:.2f} s", flush=True)
    empty = switch_probe(path, {**compiled, "WORKER_COMPILE_CACHE_DIR": str(empty_cache)},
                         levels, new_tokens)
    print(f"  compiled, empty compile cache: first answer {empty['first_answer_s']:.2f} s, "
          f"serving after {empty.get('serving_s') or 0:.1f} s", flush=True)
    if cache != empty_cache:
        shutil.copytree(empty_cache, cache, dirs_exist_ok=True)
    found = switch_probe(path, {**compiled, "WORKER_COMPILE_CACHE_DIR": str(cache)}, levels,
                         new_tokens)
    return {"model": str(path), "settings": settings, "new_tokens": new_tokens,
            "eager": eager, "compiled_empty_cache": empty, "compiled_cache_found": found,
            "first_answer_ratio_to_eager": {
                "empty_cache": empty["first_answer_s"] / eager["first_answer_s"],
                "cache_found": found["first_answer_s"] / eager["first_answer_s"]}}


# ----------------------------------------------------------------------------------------------
class DirectGenerate:
    """The ceiling: one direct batched ``model.generate`` of the bench's prompts, in-process,
    on the device and in the dtype the worker picks there."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from serving.placement import choose_dtype

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=choose_dtype("auto", self.device), device_map={"": self.device}).eval()
        with torch.inference_mode():                 # warm-up, as the worker had
            self.model.generate(**self.tok("Hello", return_tensors="pt").to(self.device),
                                max_new_tokens=4, pad_token_id=self.tok.pad_token_id)

    def tokens_per_s(self, n: int, max_new_tokens: int) -> float:
        """Tokens/s of one batched generate of the first n prompts (EOS ends a row, as in
        jobs; prompts repeat past len(PROMPTS), as the jobs' do)."""
        import torch

        tok = self.tok
        texts = [tok.apply_chat_template(job(i, 0)["messages"], add_generation_prompt=True,
                                         tokenize=False) for i in range(n)]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        if self.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1]:]
        produced = sum(min(max_new_tokens, int((r != tok.pad_token_id).sum()) + 1) for r in new)
        return produced / elapsed


def post_concurrently(urls_and_bodies: list[tuple[str, dict[str, Any]]], timeout_s: float = 600
                      ) -> tuple[float, list[tuple[float, Any]]]:
    """POST all at once from one event loop (a light client: it shares the machine); returns
    the wall time and each request's (latency, parsed JSON answer)."""
    import aiohttp

    async def run() -> tuple[float, list[tuple[float, Any]]]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(url: str, body: dict[str, Any]) -> tuple[float, Any]:
                start = time.perf_counter()
                async with session.post(url, json=body) as response:
                    answer = await response.json(content_type=None)
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}: {answer}")
                return time.perf_counter() - start, answer

            start = time.perf_counter()
            results = await asyncio.gather(*(one(u, b) for u, b in urls_and_bodies))
            return time.perf_counter() - start, list(results)

    return asyncio.run(run())


# ----------------------------------------------------------------------------------------------
def wait_for_switch(log_path: Path, timeout_s: float = 900) -> str | None:
    """A worker on the compiled path answers eagerly until its step is ready: wait (reading
    its log) for the line that says it switched or will not, so throughput is measured on what
    serves from then on. Returns that line; None at once for a worker that decodes eagerly."""
    text = log_path.read_text(errors="replace")
    if "decode eager now, compiled once ready" not in text:
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if "decode: switched to the compiled step" in line or "will not serve" in line:
                return line[line.index("decode:"):]
        time.sleep(0.5)         # another process's log: nothing to await but the file
    raise RuntimeError(f"the worker did not switch to its compiled step in {timeout_s:g} s")


def bench_throughput(path: Path, levels: list[int], max_new_tokens: int, repeat: int,
                     worker_env: dict[str, str] | None = None,
                     decode_note: list[str] | None = None) -> list[dict[str, Any]]:
    """N concurrent jobs through the local endpoint and real worker loop, vs baselines.

    The worker's concurrent runs and the direct batched ``generate`` (in this process, while the
    worker idles) alternate ``repeat`` times and medians are compared, so the machine's drift
    over minutes hits both alike. ``decode_note``, when given, receives the decode path of the
    worker's startup line.
    """
    from dev.local_endpoint import LocalEndpoint, WorkerProcess

    ceiling = DirectGenerate(path)

    def direct(n: int) -> float:
        return ceiling.tokens_per_s(n, max_new_tokens)

    rows = []
    endpoint = LocalEndpoint().start()
    log_path = Path(tempfile.gettempdir()) / "bench-worker.log"
    log = open(log_path, "wb")  # noqa: SIM115
    # The worker runs with its defaults (WORKER_CONCURRENCY, WORKER_MAX_BATCH_SIZE: 16), unless
    # --worker-env says otherwise.
    settings = {"MODEL_PATH": str(path), "RUNPOD_LOG_LEVEL": "ERROR", **(worker_env or {})}
    worker = WorkerProcess(endpoint, [sys.executable, "handler.py"], "bench-worker", cwd=str(ROOT),
                           output=log, extra_env=settings).start()
    try:
        worker.wait_ready(180)
        if decode_note is not None:
            decode_note.append(parse_startup_line(
                log_path.read_text(errors="replace"))["decode"] or "not in the log")
        settled = wait_for_switch(log_path)
        if decode_note is not None and settled:
            decode_note[-1] += f" | {settled}"
        import logging

        import runpod
        # The SDK client's HTTP pool holds 10 connections; beyond 10 threads urllib3 warns on
        # every extra one (harmless: it opens another).
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        runpod.api_key = "bench"
        runpod.endpoint_url_base = endpoint.base_url
        client = runpod.Endpoint(endpoint.endpoint_id)

        def one(i: int) -> tuple[float, int]:
            start = time.perf_counter()
            out = client.run_sync({"input": job(i, max_new_tokens)}, timeout=600)
            return time.perf_counter() - start, out[0]["usage"]["completion_tokens"]

        one(0)  # the first job pays the SDK's session start-up
        for n in levels:
            start = time.perf_counter()
            sequential = [one(i) for i in range(n)]
            seq_s = time.perf_counter() - start
            worker_rates, direct_rates, latencies, rounds = [], [], [], []
            since = time.monotonic()
            for _ in range(repeat):
                with ThreadPoolExecutor(n) as pool:
                    start = time.perf_counter()
                    concurrent = list(pool.map(one, range(n)))
                    conc_s = time.perf_counter() - start
                worker_rates.append(sum(t for _, t in concurrent) / conc_s)
                rounds.append(conc_s)
                latencies += [s for s, _ in concurrent]
                direct_rates.append(direct(n))
            row = {"concurrency": n, "repeat": repeat,
                   "worker_tokens_per_s": statistics.median(worker_rates),
                   "one_at_a_time_tokens_per_s": sum(t for _, t in sequential) / seq_s,
                   "direct_batched_tokens_per_s": statistics.median(direct_rates),
                   "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
                   "rounds_s": rounds}
            # Where a job's time went, as the endpoint saw it: waiting to be taken, then running.
            waits, runs = zip(*endpoint.timings(since), strict=True)
            row.update({"queue_wait_p50_s": percentile(list(waits), 0.5),
                        "queue_wait_max_s": max(waits),
                        "execution_p50_s": percentile(list(runs), 0.5),
                        "execution_max_s": max(runs)})
            row["ratio_to_one_at_a_time"] = (row["worker_tokens_per_s"]
                                             / row["one_at_a_time_tokens_per_s"])
            row["ratio_to_direct_batched"] = (row["worker_tokens_per_s"]
                                              / row["direct_batched_tokens_per_s"])
            rows.append(row)
            print(f"  concurrency {n}: {row['worker_tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        worker.stop(60)
        endpoint.stop()
        log.close()
    return rows


# ----------------------------------------------------------------------------------------------
def write_svg(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """A grouped bar chart of tokens/s per concurrency: worker, one at a time, ceiling."""
    series = [("worker_tokens_per_s", "worker (batched)", "#2b6cb0"),
              ("one_at_a_time_tokens_per_s", "one at a time", "#a0aec0"),
              ("direct_batched_tokens_per_s", "direct batched generate", "#38a169")]
    top = max(r[k] for r in rows for k, _, _ in series) or 1
    width, height, left, bottom = 640, 320, 60, 40
    group = (width - left - 20) / len(rows)
    bar = group / (len(series) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="16" font-size="14">{title}</text>']
    for gi, row in enumerate(rows):
        x0 = left + gi * group
        for si, (key, _, color) in enumerate(series):
            h = (height - bottom - 40) * row[key] / top
            parts.append(f'<rect x="{x0 + si * bar:.1f}" y="{height - bottom - h:.1f}" '
                         f'width="{bar * 0.9:.1f}" height="{h:.1f}" fill="{color}"/>')
        parts.append(f'<text x="{x0 + group / 3:.1f}" y="{height - bottom + 16}">'
                     f'{row["concurrency"]} jobs</text>')
    for si, (_, label, color) in enumerate(series):
        parts.append(f'<rect x="{left + si * 190}" y="{height - 14}" width="10" height="10" '
                     f'fill="{color}"/><text x="{left + si * 190 + 14}" y="{height - 5}">'
                     f'{label}</text>')
    parts.append(f'<text x="4" y="{height / 2}" transform="rotate(-90 12 {height / 2})">'
                 'tokens/s</text></svg>')
    out.write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["cold", "switch", "overhead", "throughput"],
                        nargs="*")
    parser.add_argument("--switch-child", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3,
                        help="cold starts, and concurrent/direct alternations per level")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="settings for the benchmarked worker, e.g. WORKER_CONCURRENCY=32")
    parser.add_argument("--decode", nargs="*", choices=["auto", "compiled", "eager"],
                        help="cold start: time the test mode once per WORKER_DECODE value "
                             "(compiled: with an empty compile cache once, then finding it)")
    parser.add_argument("--compile-cache", type=Path,
                        help="cold start: the compile cache of --decode compiled (default: a "
                             "new directory); switch: where the compiled step is left for "
                             "later workers")
    parser.add_argument("--no-worker-loop", action="store_true",
                        help="cold start: leave out the worker loop's first answer")
    args = parser.parse_args()
    if args.switch_child:
        print(json.dumps(_switch_child(json.loads(args.switch_child))), flush=True)
        os._exit(0)            # the compile thread may still run: nothing of it is wanted
    path = model_dir()
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    only = set(args.only or ["cold", "switch", "overhead", "throughput"])
    out = args.out or RESULTS / f"{device}.json"
    # With --only, the sections not run are kept from the results file: each has its own
    # time and the machine's load (1-minute average) before and after, so a section measured
    # while the shared machine was busy can be measured again on its own.
    result: dict[str, Any] = json.loads(out.read_text()) if args.only and out.exists() else {}
    result.update({"device": device, "machine": platform.machine(), "cpus": os.cpu_count(),
                   "model": str(path.name)})
    result.setdefault("sections", {})
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
        from bench.gpu_bench import versions
        result["versions"] = versions()

    def begin(section: str) -> None:
        result["sections"][section] = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_before": round(os.getloadavg()[0], 2)}

    def end(section: str) -> None:
        result["sections"][section]["load_after"] = round(os.getloadavg()[0], 2)

    if "cold" in only:
        print("cold start ...", flush=True)
        begin("cold")
        result["cold_start"] = cold = bench_cold_start(
            path, args.repeat, args.decode, not args.no_worker_loop, args.compile_cache)
        end("cold")
        print(f"  floor (import torch + load_file): {cold['floor_process_s']:.2f} s\n"
              f"  test mode, one-token job:         {cold['test_mode_process_s']:.2f} s "
              f"= x{cold['ratio_to_floor']:.2f} the floor  (median of {args.repeat})")
        for name, found in cold.get("by_decode", {}).items():
            print(f"    WORKER_DECODE={name}: {found['process_s']:.2f} s = "
                  f"x{found['ratio_to_floor']:.2f} the floor, warm-up "
                  f"{(found.get('startup_line') or {}).get('warmup_s') or 0:.2f} s "
                  f"({found['decode']})")
        if "worker_loop_first_answer_s" in cold:
            print(f"  worker loop, first answer:        {cold['worker_loop_first_answer_s']:.2f} s"
                  f" = x{cold['worker_loop_ratio_to_floor']:.2f} the floor")
        budget = cold["import_budget"]
        print(f"  import time of the test mode, {budget['total_s']:.2f} s, by package: "
              + ", ".join(f"{k} {v:.2f}" for k, v in budget["by_package_s"].items()))
        print("  handler's imports, cumulative: "
              + ", ".join(f"{k} {v:.2f}"
                          for k, v in budget["handler_imports_cumulative_s"].items()))
    if "switch" in only:
        print("eager and compiled paths: first answer, switch, tokens/s ...", flush=True)
        begin("switch")
        levels = [1, 32]
        result["switch"] = sw = bench_switch(path, levels, 32, args.compile_cache)
        end("switch")
        for name in ("eager", "compiled_empty_cache", "compiled_cache_found"):
            found = sw[name]
            serving = found.get("serving_s")
            print(f"  {name:<21} first answer {found['first_answer_s']:6.2f} s after start"
                  + (f", compiled step serving after {serving:6.1f} s" if serving else
                     f", stays eager: {found['why_eager']}" if "why_eager" in found else "")
                  + "; " + ", ".join(f"{n} jobs {r:7.1f} tok/s"
                                     for n, r in found["tokens_per_s"].items()))
        during = sw["compiled_empty_cache"].get("while_compiling_tokens_per_s")
        if during:
            print(f"  one job at a time while the step compiles: {during:.1f} tok/s = "
                  f"x{during / sw['eager']['tokens_per_s']['1']:.2f} the eager worker's")
        ratio = sw["first_answer_ratio_to_eager"]
        print(f"  first answer, compiled / eager: x{ratio['empty_cache']:.2f} (empty compile "
              f"cache), x{ratio['cache_found']:.2f} (cache found)")
    if "overhead" in only:
        print("per-job overhead ...", flush=True)
        begin("overhead")
        result["overhead"] = bench_overhead(path, max(args.repeat * 7, 20))
        end("overhead")
        print(json.dumps(result["overhead"], indent=2))
    if "throughput" in only:
        print("throughput ...", flush=True)
        worker_env = dict(item.split("=", 1) for item in args.worker_env)
        begin("throughput")
        note: list[str] = []
        rows = bench_throughput(path, args.concurrency, args.max_new_tokens, args.repeat,
                                worker_env, note)
        end("throughput")
        result["worker_env"] = worker_env
        result["decode_path"] = note[0] if note else None
        result["throughput"] = {"max_new_tokens": args.max_new_tokens, "rows": rows}
        for row in rows:
            print(f"{row['concurrency']:>3} jobs: {row['worker_tokens_per_s']:7.1f} tok/s "
                  f"x{row['ratio_to_one_at_a_time']:.2f} one-at-a-time, "
                  f"x{row['ratio_to_direct_batched']:.2f} of direct batched; "
                  f"p50 {row['p50_s']:.2f}s p95 {row['p95_s']:.2f}s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if "throughput" in result:
        write_svg(result["throughput"]["rows"], out.with_suffix(".svg"),
                  f"Throughput on {device} ({result.get('gpu', platform.machine())}), "
                  f"{args.max_new_tokens} new tokens per job")
    print(f"results: {out}")


if __name__ == "__main__":
    main()

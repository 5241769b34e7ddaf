"""GPU benchmarks for ``make gpu-check``: load bandwidth, the decode step and batched decoding of
both engines, first runs after start-up and the compile's cost, each as a ratio to what the
device itself (or transformers' own ``generate``) does in the same run. Not a test; needs a CUDA
device (``--dry-run-on-cpu`` checks the script itself).

Needs torch, transformers and safetensors, plus what loading the worker's task imports
(pydantic), and a model directory: ``--make-model DIR`` writes one with random weights in the
default model's architecture (a larger one with ``--arch 1b``, a ~3M one with ``--arch tiny``),
taking config and tokenizer from ``models/default`` (weights are not needed there, only its
small json and tokenizer files).

    python -m bench.gpu_bench --make-model /tmp/gpu-model --arch 1b
    python -m bench.gpu_bench --model /tmp/gpu-model --out gpu-results/bench.json
    python -m bench.gpu_bench --model /tmp/gpu-model --measure compile-cost --out cc.json

The model is loaded as the worker loads it (``serving.loading.load_task`` with the worker's settings
from the environment: WORKER_DECODE, WORKER_MAX_BATCH_SIZE, WORKER_COMPILE_CACHE_DIR), task
warm-up included; "the worker's engine" below is that task's engine: on CUDA with
WORKER_DECODE=auto the compiled one (``serving/graphs.py``), else the eager ``Engine``.
``--measure`` picks what is measured, in this order:

- ``first-batch``: first: the first and second run of 1, 8 and 32 sequences on the worker's
  engine right after its warm-up (what the first jobs on a new worker pay over later ones);
- ``decode``: placement (weight bytes / place time against a pinned host-to-device copy of the
  same bytes) and the decode step at batch 1 of the eager engine, of the worker's engine and,
  per ``--graph-slots 1``, of a compiled engine with one slot and a cache just long enough:
  milliseconds per step (the difference between a 64-token and an 8-token run, over 56 steps,
  so the prefill is left out) and weight bytes read per step against a device-to-device copy
  (the practical memory bandwidth);
- ``throughput``: tokens/s through the Batcher on the eager engine and on the worker's engine at
  each ``--concurrency``, against one sequence at a time and against ``model.generate`` of the
  same batch (the ceiling the issue measures against);
- ``compile-cost``: two fresh worker processes with WORKER_DECODE=compiled and one new, empty
  WORKER_COMPILE_CACHE_DIR: seconds from process start to the first answer and to the compiled
  step serving, when the compile runs (empty cache) and when the second process finds it.

With WORKER_DECODE=compiled (or auto on CUDA) the worker answers eagerly while its step compiles
off the job path (``graphs.SwitchingEngine``); after ``first-batch`` the bench waits for the
switch and measures the compiled engine as "the worker's engine".

Every result records the versions it ran with (``versions``) and the decode path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
ARCHS = {  # extra config for other models of the same family
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,  # ~1.1B
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    # ~3M parameters (mostly the embedding): a decode step costs on two CPU cores about what
    # the default model's costs on a GPU, so what is left is the per-job path around it.
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
}
MEASURES = ("first-batch", "decode", "throughput", "compile-cost")
PROMPT = "The history of the printing press"


def make_model(out: Path, arch: str, source: Path) -> None:
    """A model directory with random bf16 weights, the tokenizer and config of ``source``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    config = AutoConfig.from_pretrained(source)
    for key, value in ARCHS.get(arch, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    print(f"made {arch} model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")


def versions() -> dict[str, Any]:
    """What a result was measured with: the GPU machine's torch is not the pinned one."""
    import transformers

    cuda = torch.cuda.is_available()
    found: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "cpus": os.cpu_count()}
    for name in ("tokenizers", "huggingface_hub", "triton"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or odd: the record says so
            found[name] = None
    if cuda and shutil.which("nvidia-smi"):
        try:
            found["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            found["driver"] = None
    return found


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def on_device(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the worker's device thread, where the task was loaded and warmed up: a
    compiled step's CUDA graphs belong to the thread that captured them."""
    from serving.device import DEVICE_THREAD

    return DEVICE_THREAD.submit(fn).result()


def copy_seconds(nbytes: int) -> tuple[float, float]:
    """Best times to copy ``nbytes`` pinned host → device, and device → device."""
    cuda = torch.cuda.is_available()
    host = torch.empty(nbytes, dtype=torch.uint8)
    host = host.pin_memory() if cuda else host
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    other = torch.empty_like(device)
    return (timed(lambda: device.copy_(host, non_blocking=True)),
            timed(lambda: other.copy_(device)))


def load_worker_task(model_dir: Path) -> Any:
    """The generation task as the worker builds it from this environment, warmed up."""
    from serving.config import ModelSettings, WorkerSettings
    from tasks import TASKS
    from tests.support.worker import load_task

    env = {**os.environ, "MODEL_PATH": str(model_dir), "WORKER_TASK": "generate"}
    return load_task(ModelSettings.from_env(env), WorkerSettings.from_env(env), TASKS)


def describe_engine(engine: Any) -> dict[str, Any]:
    from serving.graphs import GraphEngine, SwitchingEngine

    if isinstance(engine, SwitchingEngine):
        if engine.serving is None:
            return {"kind": "eager", "why": engine.why_eager or "the compiled step not ready"}
        return {**describe_engine(engine.serving), "switch": engine.timings}
    if isinstance(engine, GraphEngine):
        return {"kind": "compiled" if engine.compiled else "static cache, not compiled",
                "slots": engine.slots, "columns": engine.columns,
                "warmup_s": engine.compile_s}
    return {"kind": "eager"}


# ----------------------------------------------------------------------------------------------
def first_batch(engine: Any, prompt: list[int]) -> dict[str, Any]:
    """Seconds of the first and second run of one sequence, then of 8 and of 32 sequences, on
    ``engine`` right after the task's warm-up: what the first jobs on a new worker pay.

    On the H200 (bench/results/h200/README.md) every first run of the eager engine paid 1.1 to
    2.5 s more than the next one. Each run also records how many device allocations it made
    (``cudaMalloc`` calls): an allocator that has to grow is one known cause.
    """
    from serving.engine import SamplingParams, Sequence

    cuda = torch.cuda.is_available()
    runs: list[dict[str, Any]] = []

    def device_allocs() -> int:
        return int(torch.cuda.memory_stats().get("num_device_alloc", 0)) if cuda else 0

    def once(rows: int, label: str) -> None:
        def go() -> tuple[float, int]:
            before = device_allocs()
            seconds = timed(lambda: engine.run(
                [Sequence(list(prompt), SamplingParams(max_new_tokens=32)) for _ in range(rows)]),
                repeat=1)
            return seconds, device_allocs() - before
        seconds, allocs = on_device(go)
        runs.append({"run": label, "rows": rows, "seconds": seconds, "device_allocs": allocs})

    for label in ("first", "second", "third"):
        once(1, label)
    for rows in (8, 32):
        once(rows, "first")
        once(rows, "second")
    extra = {}
    for rows in (1, 8, 32):
        first = next(r["seconds"] for r in runs if r["rows"] == rows and r["run"] == "first")
        second = next(r["seconds"] for r in runs if r["rows"] == rows and r["run"] == "second")
        extra[str(rows)] = first - second
    print("  first runs after start-up, extra seconds over the second run: "
          + ", ".join(f"{k} rows {v:+.3f}" for k, v in extra.items()), flush=True)
    return {"alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "engine": describe_engine(engine), "runs": runs, "extra_s_by_rows": extra,
            "max_extra_s": max(extra.values())}


def decode_step(engine: Any, prompt: list[int], nbytes: int, d2d_bw: float,
                short: int = 8, long: int = 64) -> dict[str, Any]:
    """One decode step at batch 1: the time of a ``long``-token run less a ``short``-token one,
    over the steps between (the prefill and the run's set-up cancel out), best of 3 each."""
    from serving.engine import SamplingParams, Sequence

    def tokens(n: int) -> Callable[[], None]:
        return lambda: engine.run([Sequence(list(prompt), SamplingParams(max_new_tokens=n))])

    long_s = on_device(lambda: timed(tokens(long), repeat=3))
    short_s = on_device(lambda: timed(tokens(short), repeat=3))
    step_s = max(long_s - short_s, 1e-9) / (long - short)
    return {**describe_engine(engine), "step_ms_batch1": step_s * 1000,
            "per_token_ms_with_prefill": long_s / long * 1000,
            "weights_read_GBps": nbytes / step_s / 1e9,
            "ratio_to_d2d": (nbytes / step_s) / d2d_bw}


def throughput(loaded: Any, engines: dict[str, Any], prompt: list[int], levels: list[int],
               new_tokens: int) -> list[dict[str, Any]]:
    """Tokens/s of ``n`` concurrent sequences through the Batcher on each engine, against one
    at a time (on the first engine, the worker's) and a direct batched ``model.generate``."""
    from serving.batcher import Batcher
    from serving.engine import SamplingParams, Sequence

    tok = loaded.tokenizer
    first = next(iter(engines.values()))

    def params() -> SamplingParams:   # eos_ids are emptied: every sequence decodes new_tokens
        return SamplingParams(max_new_tokens=new_tokens)

    rows = []
    for n in levels:
        tokens = n * new_tokens
        row: dict[str, Any] = {"concurrency": n}
        for name, engine in engines.items():
            batcher = Batcher(engine, max_batch_size=n, wait_ms=5)

            async def concurrent(n: int = n, batcher: Batcher = batcher) -> None:
                await asyncio.gather(*(batcher.submit(Sequence(list(prompt), params()))
                                       for _ in range(n)))

            loop = asyncio.new_event_loop()
            batched_s = timed(lambda loop=loop: loop.run_until_complete(concurrent()), repeat=2)
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            row[f"{name}_tokens_per_s"] = tokens / batched_s
        single_s = on_device(lambda: timed(
            lambda: first.run([Sequence(list(prompt), params())]), repeat=2))
        ids = torch.tensor([prompt] * n, device=loaded.device)

        def direct(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                loaded.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id)

        direct_s = on_device(lambda: timed(direct, repeat=2))
        row["one_at_a_time_tokens_per_s"] = new_tokens / single_s
        row["direct_batched_tokens_per_s"] = tokens / direct_s
        for name in engines:
            rate = row[f"{name}_tokens_per_s"]
            row[f"{name}_ratio_to_direct_batched"] = rate / row["direct_batched_tokens_per_s"]
            row[f"{name}_ratio_to_one_at_a_time"] = rate / row["one_at_a_time_tokens_per_s"]
        rows.append(row)
        print(f"  {n:>3} jobs: " + ", ".join(
            f"{name} {row[f'{name}_tokens_per_s']:8.0f} tok/s "
            f"(x{row[f'{name}_ratio_to_direct_batched']:.2f} of direct batched)"
            for name in engines), flush=True)
    return rows


def compile_cost(model_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The compile's cost, off the job path: two fresh worker processes with
    WORKER_DECODE=compiled and the same new WORKER_COMPILE_CACHE_DIR (``worker_bench``'s switch
    probe); the first compiles (the cache is empty), the second finds the compiled step (the
    CUDA graph is captured in each). Seconds from process start to the first answer (eager, at
    once) and to the compiled step serving, and what the switch took."""
    from bench.worker_bench import switch_probe

    cache = cache_dir or Path(tempfile.mkdtemp(prefix="compile-cache-"))
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"compile-cost needs an empty compile cache, and {cache} is not")
    env = {"WORKER_DECODE": "compiled", "WORKER_COMPILE_CACHE_DIR": str(cache)}
    cold = switch_probe(model_dir, env, [], 0)
    warm = switch_probe(model_dir, env, [], 0)
    result = {"cache_dir": str(cache), "cold_cache": cold, "warm_cache": warm,
              "serving_s_cold_cache": cold.get("serving_s"),
              "serving_s_warm_cache": warm.get("serving_s")}
    print(f"  compiled step serving {cold.get('serving_s') or 0:.1f} s after start with an "
          f"empty cache, {warm.get('serving_s') or 0:.1f} s finding it; first answers "
          f"{cold['first_answer_s']:.1f} s and {warm['first_answer_s']:.1f} s", flush=True)
    return result


# ----------------------------------------------------------------------------------------------
def run(model_dir: Path, measures: list[str], levels: list[int], new_tokens: int,
        graph_slots: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {"model": str(model_dir), "versions": versions(),
                              "measures": measures}
    if "compile-cost" in measures:
        result["compile_cost"] = compile_cost(model_dir)
    if not set(measures) - {"compile-cost"}:
        return result

    from serving.engine import Engine
    from serving.graphs import GraphEngine, SwitchingEngine

    task = load_worker_task(model_dir)
    loaded = task.loaded
    stats = loaded.stats
    worker_engine = task.batcher.engine
    prompt = list(loaded.tokenizer(PROMPT)["input_ids"])
    result.update({
        "decode_path": stats.note,
        "startup_note": stats.note,
        "worker_settings": {"max_batch_size": task.settings.max_batch_size,
                            "decode": task.settings.decode,
                            "compile_cache_dir": task.settings.compile_cache_dir},
        "weight_bytes": stats.weight_bytes,
        "startup": {"import_s": stats.import_s, "read_s": stats.read_s,
                    "place_s": stats.place_s, "warmup_s": stats.warmup_s,
                    "dtype": stats.dtype, "device": stats.device}})
    print(f"  {stats.note}; warm-up {stats.warmup_s:.2f} s", flush=True)
    if "first-batch" in measures:      # before anything else runs on the engine
        result["first_batch"] = first_batch(worker_engine, prompt)
    if isinstance(worker_engine, SwitchingEngine):
        # The compiled path answers eagerly until its step is ready: measure what serves then.
        worker_engine.settled.wait(900)
        graph = worker_engine.serving
        result["switch"] = {**worker_engine.timings, "why_eager": worker_engine.why_eager}
        if graph is not None:
            result["decode_path"] = (
                f"decode compiled ({graph.slots} slots x {graph.columns} tokens, switched "
                f"{worker_engine.timings['ready_after_s']:.1f} s after the warm-up), "
                f"{worker_engine.timings['drift']:.1e} from eager")
            worker_engine = graph
        else:
            result["decode_path"] = f"decode eager ({worker_engine.why_eager})"
        print(f"  {result['decode_path']}", flush=True)

    engines: dict[str, Any] = {"worker": worker_engine}
    if isinstance(worker_engine, GraphEngine):   # else the worker's engine is the eager one
        engines["eager"] = Engine(loaded)
    for engine in engines.values():
        engine.eos_ids = set()           # every sequence decodes its full length

    if "decode" in measures:
        nbytes = stats.weight_bytes
        h2d_s, d2d_s = copy_seconds(nbytes)
        d2d_bw = 2 * nbytes / d2d_s      # a copy reads and writes every byte
        result["placement"] = {"place_GBps": nbytes / stats.place_s / 1e9,
                               "h2d_copy_GBps": nbytes / h2d_s / 1e9,
                               "ratio_to_h2d_copy": h2d_s / stats.place_s}
        steps: dict[str, Any] = {}
        for name, engine in engines.items():
            steps[name] = decode_step(engine, prompt, nbytes, d2d_bw)
        for slots in graph_slots:
            # As small as batch 1 allows: one slot, and a cache no longer than this run needs,
            # against the worker's engine with all its slots (each reads its attention window).
            columns = len(prompt) + 64 + 8
            engine = on_device(lambda slots=slots, columns=columns: GraphEngine(
                loaded, slots, columns, compile_step=loaded.device.type == "cuda"))
            engine.eos_ids = set()
            warmup_s = on_device(lambda engine=engine: engine.warm_up(prompt))
            steps[f"graph_{slots}_slot"] = {**decode_step(engine, prompt, nbytes, d2d_bw),
                                               "warmup_s": warmup_s}
            del engine
        result["decode_bandwidth"] = {"d2d_copy_GBps": d2d_bw / 1e9, "engines": steps}
        for name, s in steps.items():
            print(f"  decode step at batch 1, {name} ({s['kind']}"
                  + (f", {s['slots']} slots x {s['columns']}" if "slots" in s else "")
                  + f"): {s['step_ms_batch1']:.2f} ms, {s['ratio_to_d2d']:.3f} of the "
                  f"device-to-device copy bandwidth", flush=True)

    if "throughput" in measures and levels:
        result["throughput"] = {"new_tokens": new_tokens, "engines": {
            name: describe_engine(e) for name, e in engines.items()},
            "rows": throughput(loaded, engines, prompt, levels, new_tokens)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-model", type=Path)
    parser.add_argument("--arch", choices=["smollm", *ARCHS], default="smollm")
    parser.add_argument("--source", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--measure", nargs="+", choices=MEASURES,
                        default=["decode", "throughput"])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--graph-slots", type=int, nargs="*", default=[],
                        help="also time the decode step of a compiled engine with this many "
                             "slots (1: the step's own cost at batch 1)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--first-batch", action="store_true",
                        help="only the first runs after start-up (--measure first-batch)")
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="run on the CPU to check the script itself (numbers mean nothing)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run_on_cpu:
        raise SystemExit("gpu_bench needs a CUDA device")
    if args.make_model:
        make_model(args.make_model, args.arch, args.source)
    if args.model:
        measures = ["first-batch"] if args.first_batch else args.measure
        measures = [m for m in MEASURES if m in measures]
        result = run(args.model, measures, args.concurrency, args.new_tokens, args.graph_slots)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

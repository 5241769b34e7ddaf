"""GPU benchmarks for ``make gpu-check``: load bandwidth and batched decoding as ratios to what
the device itself can do, measured in the same run. Not a test; needs a CUDA device.

Needs only torch, transformers and safetensors (a GPU machine may have nothing else), and a
model directory: ``--make-model DIR`` writes one with random weights in the default model's
architecture (a larger one with ``--arch 1b``, a ~3M one with ``--arch tiny``), taking config
and tokenizer from ``models/default`` (weights are not needed there, only its small json and
tokenizer files).

    python -m bench.gpu_bench --make-model /tmp/gpu-model --arch 1b
    python -m bench.gpu_bench --model /tmp/gpu-model --out gpu-results/bench.json

Reported, each with its baseline:
- placement: weight bytes / place time, against a pinned host-to-device copy of the same bytes;
- decoding: tokens/s through the Batcher at several concurrencies, against one sequence at a
  time and against ``model.generate`` of the same batch (the ceiling);
- decode bandwidth: weight bytes read per step at batch 1 / step time, against a device-to-device
  copy (the practical memory bandwidth);
- with ``--first-batch``, in a fresh process: the first run of 1, 8 and 32 sequences against the
  second (what the first jobs on a new worker pay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
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


def copy_seconds(nbytes: int) -> tuple[float, float]:
    """Best times to copy ``nbytes`` pinned host → device, and device → device."""
    cuda = torch.cuda.is_available()
    host = torch.empty(nbytes, dtype=torch.uint8)
    host = host.pin_memory() if cuda else host
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    other = torch.empty_like(device)
    return (timed(lambda: device.copy_(host, non_blocking=True)),
            timed(lambda: other.copy_(device)))


def run(model_dir: Path, levels: list[int], new_tokens: int) -> dict[str, Any]:
    from model_loader import load_model
    from serving.batcher import Batcher
    from serving.config import ModelSettings
    from serving.engine import Engine, SamplingParams, Sequence

    loaded = load_model(ModelSettings.from_env({"MODEL_PATH": str(model_dir)}))
    stats = loaded.stats
    nbytes = stats.weight_bytes
    h2d_s, d2d_s = copy_seconds(nbytes)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
        "weight_bytes": nbytes,
        "startup": {"import_s": stats.import_s, "read_s": stats.read_s,
                    "place_s": stats.place_s, "warmup_s": stats.warmup_s,
                    "dtype": stats.dtype, "device": stats.device},
        "placement": {"place_GBps": nbytes / stats.place_s / 1e9,
                      "h2d_copy_GBps": nbytes / h2d_s / 1e9,
                      "ratio_to_h2d_copy": (nbytes / stats.place_s) / (nbytes / h2d_s)},
    }

    engine = Engine(loaded)
    tok = loaded.tokenizer
    prompt = tok("The history of the printing press")["input_ids"]

    def params() -> SamplingParams:   # ignore stops: every sequence decodes new_tokens
        return SamplingParams(max_new_tokens=new_tokens)

    engine.eos_ids = set()           # every sequence decodes its full length
    step_s = timed(lambda: engine.run([Sequence(prompt, SamplingParams(max_new_tokens=64))]),
                   repeat=2) / 64
    d2d_bw = 2 * nbytes / d2d_s      # a copy reads and writes every byte
    result["decode_bandwidth"] = {"step_ms_batch1": step_s * 1000,
                                  "weights_read_GBps": nbytes / step_s / 1e9,
                                  "d2d_copy_GBps": d2d_bw / 1e9,
                                  "ratio_to_d2d": (nbytes / step_s) / d2d_bw}

    rows = []
    for n in levels:
        batcher = Batcher(engine, max_batch_size=n, wait_ms=5)

        async def concurrent(n: int = n, batcher: Batcher = batcher) -> None:
            await asyncio.gather(*(batcher.submit(Sequence(prompt, params()))
                                   for _ in range(n)))

        loop = asyncio.new_event_loop()
        batched_s = timed(lambda loop=loop: loop.run_until_complete(concurrent()), repeat=2)
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        single_s = timed(lambda: engine.run([Sequence(prompt, params())]), repeat=2)
        ids = torch.tensor([prompt] * n, device=loaded.device)

        def direct(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                loaded.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id)

        direct_s = timed(direct, repeat=2)
        tokens = n * new_tokens
        rows.append({"concurrency": n, "worker_tokens_per_s": tokens / batched_s,
                     "one_at_a_time_tokens_per_s": new_tokens / single_s,
                     "direct_batched_tokens_per_s": tokens / direct_s,
                     "ratio_to_one_at_a_time": (tokens / batched_s) / (new_tokens / single_s),
                     "ratio_to_direct_batched": direct_s / batched_s})
        print(f"  {n:>3} jobs: {rows[-1]['worker_tokens_per_s']:9.0f} tok/s "
              f"x{rows[-1]['ratio_to_one_at_a_time']:.1f} one-at-a-time, "
              f"x{rows[-1]['ratio_to_direct_batched']:.2f} of direct batched", flush=True)
    result["throughput"] = {"new_tokens": new_tokens, "rows": rows}
    return result


def first_batch(model_dir: Path) -> dict[str, Any]:
    """Seconds of the first and second run of one sequence, then of 8 and of 32 sequences, in
    a fresh process after the loader's warm-up: what the first jobs on a new worker pay.

    On the H200 (bench/results/h200/README.md) every first run paid 1.1 to 2.5 s more than the
    next one, and a warm-up that decoded 3 tokens at every power of two up to 32 rows removed
    none of it. One lead: the KV cache grows by a new allocation per layer and step, and a run
    that needs more memory than the allocator has cached asks the driver for it (slow inside a
    virtual machine). So each run also records how many device allocations it made
    (``cudaMalloc`` calls); ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` is the
    experiment to compare (gpu_check.sh runs both).
    """
    from model_loader import load_model
    from serving.config import ModelSettings
    from serving.engine import Engine, SamplingParams, Sequence

    cuda = torch.cuda.is_available()
    loaded = load_model(ModelSettings.from_env({"MODEL_PATH": str(model_dir)}))
    engine = Engine(loaded)
    engine.eos_ids = set()
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "runs": []}
    prompt = loaded.tokenizer("The history of the printing press")["input_ids"]

    def device_allocs() -> int:
        return int(torch.cuda.memory_stats().get("num_device_alloc", 0)) if cuda else 0

    def once(rows: int, label: str) -> None:
        before = device_allocs()
        seconds = timed(lambda: engine.run([Sequence(prompt, SamplingParams(max_new_tokens=32))
                                            for _ in range(rows)]), repeat=1)
        result["runs"].append({"run": label, "rows": rows, "seconds": seconds,
                               "device_allocs": device_allocs() - before})

    for label in ("first", "second", "third"):
        once(1, label)
    for rows in (8, 32):
        once(rows, "first")
        once(rows, "second")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-model", type=Path)
    parser.add_argument("--arch", choices=["smollm", *ARCHS], default="smollm")
    parser.add_argument("--source", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--first-batch", action="store_true",
                        help="time the first runs after start-up against the second ones")
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="run on the CPU to check the script itself (numbers mean nothing)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run_on_cpu:
        raise SystemExit("gpu_bench needs a CUDA device")
    if args.make_model:
        make_model(args.make_model, args.arch, args.source)
    if args.model:
        result = (first_batch(args.model) if args.first_batch
                  else run(args.model, args.concurrency, args.new_tokens))
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")

if __name__ == "__main__":
    main()

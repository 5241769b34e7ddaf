"""Upscale task benchmark: per-image latency and concurrent throughput, as ratios to calling the
model directly on the same images in the same run. Not a test.

    .venv/bin/python -m bench.upscale_bench                  # ~1 min on 2 CPU cores
    .venv/bin/python -m bench.upscale_bench --size 128 --concurrency 8 --device cuda

The model is a Swin2SR of the lightweight size (embed dim 60, 4 stages of 6 blocks, x2) with
random weights, made here: the timing of a forward pass does not depend on the weights' values.

- per image: one job through ``Worker.handle`` (data-URI decode, checks, processor, batcher,
  forward, crop, PNG encode, inline delivery) against the direct call: processor, forward and
  crop of the same image, in-process, no encode.
- concurrent: N jobs of same-size images at once through ``Worker.handle`` (the batcher runs
  them in shared forward passes) against N direct calls one after another, and against the
  same N jobs through a worker that runs one image per forward pass (WORKER_MAX_BATCH_SIZE=1):
  what batching itself gains or loses on this device.

Results go to ``bench/results/<device>-upscale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, Swin2SRConfig, Swin2SRForImageSuperResolution
from transformers.models.swin2sr import Swin2SRImageProcessorPil

from tests.support.worker import build_worker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def make_model(path: Path) -> Path:
    torch.manual_seed(0)
    config = Swin2SRConfig(embed_dim=60, depths=[6, 6, 6, 6], num_heads=[6, 6, 6, 6],
                           window_size=8, upscale=2, upsampler="pixelshuffledirect")
    Swin2SRForImageSuperResolution(config).save_pretrained(path, safe_serialization=True)
    Swin2SRImageProcessorPil(pad_size=8).save_pretrained(path)
    return path


def png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def median_time(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input image side, pixels")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "swin2sr-light-x2")
        env = {"MODEL_PATH": str(model_dir), "MODEL_DEVICE": args.device,
               "WORKER_BATCH_WAIT_MS": "5"}
        worker = build_worker({**env, "WORKER_MAX_BATCH_SIZE": str(args.concurrency)})
        unbatched = build_worker({**env, "WORKER_MAX_BATCH_SIZE": "1"})
        model = Swin2SRForImageSuperResolution.from_pretrained(model_dir).eval()
        model = model.to(worker.loaded.device, next(worker.loaded.model.parameters()).dtype)
        processor = AutoImageProcessor.from_pretrained(model_dir)
        images = [png(args.size, seed) for seed in range(args.concurrency)]
        uris = ["data:image/png;base64," + base64.b64encode(raw).decode() for raw in images]

        def direct(raw: bytes) -> None:
            image = Image.open(io.BytesIO(raw)).convert("RGB")
            pixels = processor(image, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                out = model(pixel_values=pixels.to(model.device, model.dtype)).reconstruction
                out[:, :, :image.height * 2, :image.width * 2].cpu()

        loop = asyncio.new_event_loop()

        def through_worker(batch: list[str], which: Any = worker) -> None:
            async def jobs() -> list[Any]:
                return await asyncio.gather(*(
                    _one(which, {"image": uri}, f"b{i}") for i, uri in enumerate(batch)))
            results = loop.run_until_complete(jobs())
            assert all("image" in r for r in results), results

        direct(images[0])                               # warm every path once
        through_worker(uris[:1])
        through_worker(uris[:1], unbatched)
        one_direct = median_time(lambda: direct(images[0]), args.repeat)
        one_worker = median_time(lambda: through_worker(uris[:1]), args.repeat)
        n_direct = median_time(lambda: [direct(raw) for raw in images], args.repeat)
        n_worker = median_time(lambda: through_worker(uris), args.repeat)
        n_unbatched = median_time(lambda: through_worker(uris, unbatched), args.repeat)
        for task in asyncio.all_tasks(loop):            # the batchers' idle runners
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    result = {
        "device": str(worker.loaded.device), "dtype": worker.loaded.stats.dtype,
        "torch": torch.__version__, "machine": platform.machine(),
        "image": f"{args.size}x{args.size} -> x2", "concurrency": args.concurrency,
        "per_image": {"worker_s": one_worker, "direct_s": one_direct,
                      "ratio_vs_direct": one_worker / one_direct},
        "concurrent": {"worker_s": n_worker, "direct_sequential_s": n_direct,
                       "speedup_vs_direct_sequential": n_direct / n_worker,
                       "unbatched_worker_s": n_unbatched,
                       "speedup_of_batching": n_unbatched / n_worker,
                       "batches_run": worker.task.batcher.batches_run,
                       "largest_batch": worker.task.batcher.largest_batch},
    }
    print(f"upscale {result['image']} on {result['device']} ({result['dtype']}):")
    print(f"  one image: worker {one_worker * 1000:.1f} ms vs direct {one_direct * 1000:.1f} ms "
          f"= {one_worker / one_direct:.2f}x the direct time")
    print(f"  {args.concurrency} concurrent: worker {n_worker * 1000:.1f} ms vs direct one after "
          f"another {n_direct * 1000:.1f} ms = {n_direct / n_worker:.2f}x as fast")
    print(f"  batching itself: one image per forward pass {n_unbatched * 1000:.1f} ms, so "
          f"shared passes run {n_unbatched / n_worker:.2f}x as fast")
    out = args.out or RESULTS / f"{result['device'].split(':')[0]}-upscale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


async def _one(worker: Any, job_input: dict[str, Any], job_id: str) -> dict[str, Any]:
    return [item async for item in worker.handle({"id": job_id, "input": job_input})][0]


if __name__ == "__main__":
    main()

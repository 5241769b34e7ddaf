"""The compiled decode path (serving/graphs.py) gives the eager engine's tokens, on the CPU.

The static cache's bookkeeping (slots, the shared write column, shifts when a wider prompt
joins or the cache fills) runs here without compiling, on the real default model, and is
compared token for token with the eager engine decoding each sequence alone (float32, greedy:
exact). The compiled step itself (``torch.compile``; on CUDA it is also captured as a CUDA
graph, which ``tests/test_gpu.py`` checks) runs on a two-layer cut of the same model, in-process
and through ``handler.py --test_input`` as a user runs it with WORKER_DECODE=compiled (the
switch from eager to it: ``tests/test_decode_switch.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from bench.worker_bench import cut_model as _cut_model
from serving.config import PROJECT_ROOT, ModelSettings, WorkerSettings
from serving.engine import Engine, SamplingParams, Sequence
from serving.graphs import GraphEngine, choose_engine
from serving.placement import LoadedModel
from tests.support.worker import load_model

pytestmark = pytest.mark.slow

PROMPTS = ["Hello", "Once upon a time, in a small village by the sea, there lived an old "
           "fisherman who", "The capital of France is", "1, 2, 3,", "My favourite food is"]


@pytest.fixture(scope="module")
def loaded(default_model_dir: Path) -> LoadedModel:
    return load_model(ModelSettings.from_env({"MODEL_PATH": str(default_model_dir)}),
                      warmup=False)


@pytest.fixture(scope="module")
def small_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cut_model(default_model_dir, tmp_path_factory.mktemp("cut") / "two-layers", 2)


def _seqs(loaded: LoadedModel, params: list[SamplingParams]) -> list[Sequence]:
    tok = loaded.tokenizer
    return [Sequence(tok(PROMPTS[i % len(PROMPTS)])["input_ids"], p)
            for i, p in enumerate(params)]


def _alone(loaded: LoadedModel, params: list[SamplingParams]) -> list[Sequence]:
    """Each sequence decoded alone by the eager engine: the reference."""
    engine = Engine(loaded)
    seqs = _seqs(loaded, params)
    for s in seqs:
        engine.run([s])
    return seqs


def _staggered(engine: Engine, seqs: list[Sequence], every: int, max_rows: int) -> None:
    """Run the first sequence; admit one more every ``every`` steps, as jobs arrive."""
    pending, calls = list(seqs[1:]), [0]

    def admit(free: int) -> list[Sequence]:
        calls[0] += 1
        return [pending.pop(0)] if pending and calls[0] % every == 0 else []

    engine.run(seqs[:1], admit=admit, max_rows=max_rows)
    assert not pending


def test_static_slots_give_each_sequence_its_eager_tokens_as_sequences_come_and_go(loaded):
    params = [SamplingParams(max_new_tokens=n) for n in (14, 10, 12, 9, 11)]
    expected = _alone(loaded, params)
    # The longest sequence fits exactly, so the cache fills and must drop unused columns; the
    # second prompt is wider than the first's history when it joins, so rows shift right.
    columns = max(len(s.prompt_ids) + s.params.max_new_tokens for s in expected)
    engine = GraphEngine(loaded, slots=3, columns=columns, compile_step=False)
    seqs = _seqs(loaded, params)
    _staggered(engine, seqs, every=3, max_rows=3)
    assert [s.generated for s in seqs] == [s.generated for s in expected]
    assert [s.finish_reason for s in seqs] == [s.finish_reason for s in expected]
    assert engine.shifts >= 2          # at least one shift right (a wide join) and one left
    assert engine.joins == len(seqs) - 1   # all but the first joined a running batch


def test_attention_reads_a_window_that_grows_and_shrinks_with_the_rows_in_use(loaded):
    """Windows of 8, 16, 32 and 64 columns: rows that leave let the rest move left into a
    smaller window; every sequence still gets exactly its eager tokens."""
    params = [SamplingParams(max_new_tokens=n) for n in (30, 6, 20, 8, 24)]
    expected = _alone(loaded, params)
    engine = GraphEngine(loaded, slots=3, columns=64, compile_step=False, min_window=8)
    assert list(engine.windows) == [8, 16, 32, 64]
    seqs = _seqs(loaded, params)
    _staggered(engine, seqs, every=4, max_rows=3)
    assert [s.generated for s in seqs] == [s.generated for s in expected]
    assert len(engine.window_steps) >= 3, engine.window_steps
    assert engine.shifts >= 2


def test_sampling_penalties_stops_and_streams_are_the_eager_engines(loaded):
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(max_new_tokens=12, repetition_penalty=1.5),
              SamplingParams(max_new_tokens=12, stop=(" Paris",)),
              SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, seed=11),
              SamplingParams(max_new_tokens=12)]
    expected = _alone(loaded, params)
    engine = GraphEngine(loaded, slots=4, columns=64, compile_step=False)
    seqs = _seqs(loaded, params)
    streamed = [[] for _ in seqs]
    for s, parts in zip(seqs, streamed, strict=True):
        s.on_text = parts.append
    engine.run(seqs, max_rows=4)       # four at once; the fifth takes a freed slot
    assert [s.text for s in seqs] == [s.text for s in expected]
    assert ["".join(parts) for parts in streamed] == [s.text for s in seqs]
    assert seqs[2].finish_reason == "stop" and "Paris" not in seqs[2].text


def test_a_cancelled_sequence_leaves_its_slot_to_the_next(loaded):
    params = [SamplingParams(max_new_tokens=30) for _ in range(3)]
    expected = _alone(loaded, params)
    engine = GraphEngine(loaded, slots=2, columns=64, compile_step=False)
    seqs = _seqs(loaded, params)
    seqs[0].on_text = lambda _delta: seqs[0].cancelled.set()
    engine.run(seqs, max_rows=2)
    assert seqs[0].finish_reason == "cancelled"
    assert [s.generated for s in seqs[1:]] == [s.generated for s in expected[1:]]


def _failing_at(engine: GraphEngine, call: int, exc: BaseException) -> list[int]:
    """Make the engine's step raise ``exc`` at its ``call``-th call; returns the call count."""
    calls, step = [0], engine._step_fn

    def flaky(**kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == call:
            raise exc
        return step(**kwargs)

    engine._step_fn = flaky
    return calls


def test_a_step_that_fails_while_serving_leaves_every_sequence_to_eager_decoding(loaded, caplog):
    """A compiled step that breaks after the start-up checks (a replay error on a GPU never
    tried) must not fail the jobs in flight: they resume eagerly from the tokens they have, with
    the same greedy tokens, seeded samples and streamed text, and later runs decode eagerly."""
    params = [SamplingParams(max_new_tokens=14),
              SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(max_new_tokens=12, stop=(" Paris",)),
              SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=11)]
    expected = _alone(loaded, params)
    engine = GraphEngine(loaded, slots=3, columns=64, compile_step=False)
    calls = _failing_at(engine, 7, AssertionError("a CUDA graph replay found its inputs moved"))
    seqs = _seqs(loaded, params)
    streamed = [[] for _ in seqs]
    for s, parts in zip(seqs, streamed, strict=True):
        s.on_text = parts.append
    with caplog.at_level("ERROR", logger="worker.graphs"):
        _staggered(engine, seqs, every=3, max_rows=3)
    assert [s.text for s in seqs] == [s.text for s in expected]
    assert [s.finish_reason for s in seqs] == [s.finish_reason for s in expected]
    assert ["".join(parts) for parts in streamed] == [s.text for s in seqs]
    assert engine.failed == "AssertionError: a CUDA graph replay found its inputs moved"
    assert "decoding eagerly from now on" in caplog.text
    assert calls[0] == 7                  # the step that failed was the last compiled one

    again = _seqs(loaded, params[:2])
    engine.run(again, max_rows=3)
    assert calls[0] == 7
    assert [s.text for s in again] == [s.text for s in expected[:2]]


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered")],
    ids=["out-of-memory", "device-fault"])
def test_out_of_memory_and_device_faults_in_the_step_are_left_to_the_batcher(loaded, exc):
    """The batcher handles these (out of memory: halve the batch and retry; a device fault:
    replace the worker), so the engine raises them and keeps its compiled step."""
    engine = GraphEngine(loaded, slots=2, columns=64, compile_step=False)
    _failing_at(engine, 2, exc)
    with pytest.raises(type(exc)):
        engine.run(_seqs(loaded, [SamplingParams(max_new_tokens=6)] * 2), max_rows=2)
    assert engine.failed is None
    seqs = _seqs(loaded, [SamplingParams(max_new_tokens=6)])
    engine.run(seqs)
    assert seqs[0].generated == _alone(loaded, [SamplingParams(max_new_tokens=6)])[0].generated


def test_the_compiled_step_gives_the_eager_tokens(small_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    small = load_model(ModelSettings.from_env({"MODEL_PATH": str(small_dir)}), warmup=False)
    params = [SamplingParams(max_new_tokens=n) for n in (12, 8, 10)]
    expected = _alone(small, params)
    engine = GraphEngine(small, slots=2, columns=48, compile_step=True, min_window=8)
    before = counters["frames"]["total"]
    engine.warm_up(small.tokenizer("Hello")["input_ids"])
    assert counters["frames"]["total"] - before == 1, "one compilation for every window"
    compiled = dict(counters["frames"])
    seqs = _seqs(small, params)
    _staggered(engine, seqs, every=2, max_rows=2)
    assert [s.generated for s in seqs] == [s.generated for s in expected]
    assert len({tuple(s.generated) for s in seqs}) == len(seqs)   # not one repeated answer
    assert len(engine.window_steps) >= 2, engine.window_steps
    assert dict(counters["frames"]) == compiled, "a step compiled again after the warm-up"
    assert engine.drift(small.tokenizer("The capital of France is")["input_ids"]) < 1e-4


def _test_mode(model: Path, **env: str) -> subprocess.CompletedProcess[str]:
    job = json.dumps({"input": {"prompt": "The capital of France is", "max_new_tokens": 8,
                                "temperature": 0}})
    return subprocess.run([sys.executable, "handler.py", "--test_input", job], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MODEL_PATH": str(model), **env})


def test_worker_decode_compiled_answers_the_test_mode_at_once_as_eager_does(small_dir,
                                                                          tmp_path):
    """The test mode's one job does not wait for the compile: it is answered on the eager
    engine while the compiled step is prepared (tests/test_decode_switch.py: the switch)."""
    compiled = _test_mode(small_dir, WORKER_DECODE="compiled",
                          WORKER_COMPILE_CACHE_DIR=str(tmp_path / "cache"),
                          WORKER_MAX_BATCH_SIZE="2")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    eager = _test_mode(small_dir, WORKER_DECODE="eager")
    assert eager.returncode == 0, eager.stderr[-3000:]
    answer = json.loads(compiled.stdout.strip().splitlines()[-1])["output"][0]
    assert answer == json.loads(eager.stdout.strip().splitlines()[-1])["output"][0]
    assert answer["usage"]["completion_tokens"] == 8
    assert "decode eager now, compiled once ready (2 slots x" in compiled.stderr
    assert "decode eager (WORKER_DECODE=eager)" in eager.stderr


def test_auto_decodes_eagerly_on_a_cpu_and_says_so(loaded):
    engine, note = choose_engine(loaded, WorkerSettings.from_env({}), 2048)
    assert type(engine) is Engine
    assert note == "decode eager (WORKER_DECODE=auto on a CPU)"


def _sliding_window_dir(default_model_dir: Path, out: Path) -> Path:
    """A tiny random Mistral whose layers attend through a sliding window."""
    from transformers import MistralConfig, MistralForCausalLM

    tok_files = [f for f in default_model_dir.iterdir() if f.name.startswith(("tokenizer",
                                                                              "special"))]
    config = MistralConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           sliding_window=16, max_position_embeddings=256)
    MistralForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for f in tok_files:
        shutil.copy(f, out / f.name)
    return out


def test_compiled_on_a_model_it_cannot_serve_stops_the_start_with_one_line(
        default_model_dir, tmp_path):
    model = _sliding_window_dir(default_model_dir, tmp_path / "sliding")
    loaded_sliding = load_model(ModelSettings.from_env({"MODEL_PATH": str(model)}),
                                warmup=False)
    assert "sliding_attention" in (GraphEngine.supports(loaded_sliding) or "")
    done = _test_mode(model, WORKER_DECODE="compiled")
    assert done.returncode == 1
    assert "WORKER_DECODE=compiled cannot serve this model" in done.stderr
    assert "set WORKER_DECODE=eager" in done.stderr
    assert "Traceback" not in done.stderr

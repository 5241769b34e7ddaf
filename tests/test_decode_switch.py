"""The compiled decode path off the job path: answer at once, switch between two steps.

With WORKER_DECODE=compiled a worker answers its first jobs on the eager engine while its
compiled step is prepared in a thread of its own (``graphs.SwitchingEngine``), then switches
between two steps; the sequences in flight carry on in the compiled engine with the tokens an
eager-only worker gives them. Rehearsed on the CPU with a two-layer cut of the default model
(the real model's weights, a fraction of the compile). The static cache is sized from the
device's free memory (``graphs.plan_cache``), checked here with the figures supplied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import PROJECT_ROOT, ModelSettings, WorkerSettings
from serving.device import DEVICE_THREAD
from serving.engine import Engine, SamplingParams, Sequence
from serving.graphs import DeviceMemory, SwitchingEngine, plan_cache
from tasks import TASKS
from tasks.base import Task
from tests.support.worker import load_task
from tests.test_graphs import PROMPTS, _cut_model

GIB = 1024**3
# Keys and values of one token in bfloat16: the default model (30 layers, 3 key-value heads
# of 64) and an 8B Llama (32 layers, 8 key-value heads of 128).
DEFAULT_MODEL_TOKEN = 30 * 2 * 3 * 64 * 2
LLAMA_8B_TOKEN = 32 * 2 * 8 * 128 * 2


def _settings(**env: str) -> WorkerSettings:
    return WorkerSettings.from_env({"WORKER_MAX_BATCH_SIZE": "16",
                                    "WORKER_MAX_PROMPT_TOKENS": "4096",
                                    "WORKER_MAX_NEW_TOKENS": "1024", **env})


class TestCacheSizedToTheDevice:
    def test_a_cache_that_fits_takes_the_settings_and_says_how_much_is_left(self):
        memory = DeviceMemory(total=140 * GIB, free=137 * GIB, warmup_peak=GIB)
        plan = plan_cache(memory, DEFAULT_MODEL_TOKEN, _settings(), context=8192)
        assert (plan.slots, plan.columns) == (16, 5120)
        assert plan.why.startswith("1.76 GiB of the 122.00 GiB left under "
                                   "WORKER_GPU_MEMORY_UTILIZATION=0.9"), plan.why

    def test_an_8b_model_on_a_24_gb_gpu_gets_the_slots_that_fit_not_an_error(self):
        """Pins the settings-sized cache: 16 x 5120 tokens (10 GiB) beside 16 GiB of weights."""
        memory = DeviceMemory(total=24 * GIB, free=int(7.5 * GIB), warmup_peak=GIB)
        plan = plan_cache(memory, LLAMA_8B_TOKEN, _settings(), context=8192)
        # 0.9 x 24 - 16.5 in use - 1 peak = 4.1 GiB; a row of 5120 tokens is 0.625 GiB.
        assert (plan.slots, plan.columns) == (6, 5120)
        assert "6 of WORKER_MAX_BATCH_SIZE=16 slots fit in the 4.10 GiB left" in plan.why

    def test_the_share_setting_is_the_headroom(self):
        memory = DeviceMemory(total=24 * GIB, free=int(7.5 * GIB), warmup_peak=GIB)
        plan = plan_cache(memory, LLAMA_8B_TOKEN,
                          _settings(WORKER_GPU_MEMORY_UTILIZATION="0.95"), context=8192)
        assert plan.slots == 8                       # 1.2 GiB more: two more rows

    def test_a_model_that_leaves_no_room_for_one_row_gets_none_and_the_reason(self):
        memory = DeviceMemory(total=24 * GIB, free=3 * GIB, warmup_peak=GIB)
        plan = plan_cache(memory, LLAMA_8B_TOKEN, _settings(), context=8192)
        assert plan.slots == 0
        assert "one slot of 5120 tokens needs 0.62 GiB and 0.00 GiB is left" in plan.why
        assert "lower WORKER_MAX_PROMPT_TOKENS + WORKER_MAX_NEW_TOKENS" in plan.why

    def test_a_row_is_never_longer_than_the_models_context(self):
        plan = plan_cache(None, DEFAULT_MODEL_TOKEN, _settings(), context=2048)
        assert (plan.slots, plan.columns) == (16, 2048)
        assert plan.why == "the settings' bounds: no device memory to measure"

    def test_the_share_is_checked_at_startup(self):
        from serving.errors import SettingsError

        with pytest.raises(SettingsError, match="WORKER_GPU_MEMORY_UTILIZATION=1.5 is out of "
                                                "range: a number from 0.1 to 1.0"):
            _settings(WORKER_GPU_MEMORY_UTILIZATION="1.5")


# ----------------------------------------------------------------------------------------------
SMALL_ENV = {"WORKER_MAX_BATCH_SIZE": "4", "WORKER_MAX_PROMPT_TOKENS": "64",
             "WORKER_MAX_NEW_TOKENS": "32", "WORKER_DEFAULT_MAX_NEW_TOKENS": "16"}
JOB = {"prompt": "The capital of France is", "max_new_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def small_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cut_model(default_model_dir, tmp_path_factory.mktemp("cut") / "two-layers", 2)


@pytest.fixture(scope="module")
def compile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compile-cache")


def _task(model: Path, **env: str) -> Task:
    values = {"MODEL_PATH": str(model), **SMALL_ENV, **env}
    return load_task(ModelSettings.from_env(values), WorkerSettings.from_env(values), TASKS)


def _answer(task: Task, job: dict[str, object]) -> dict[str, object]:
    return asyncio.run(task.answer(task.parse(job)))


def _in_flight(task: Task) -> list[Sequence]:
    tok = task.tokenizer
    params = [SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=20),
              SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(max_new_tokens=16)]
    return [Sequence(list(tok(PROMPTS[i])["input_ids"]), p) for i, p in enumerate(params)]


@pytest.mark.slow
@pytest.mark.timeout(900)     # a compile on two busy cores: minutes
def test_a_compiled_worker_answers_at_once_and_switches_between_two_steps(
        small_dir, compile_dir, caplog):
    """The first job is answered on the eager engine while the step compiles off the job path;
    sequences in flight when it is ready carry on in the compiled engine with an eager-only
    worker's tokens (greedy and seeded); the log shows the switch; later jobs decode there."""
    eager = _task(small_dir, WORKER_DECODE="eager")
    expected_first = _answer(eager, JOB)
    expected = _in_flight(eager)
    for s in expected:
        DEVICE_THREAD.submit(Engine(eager.loaded).run, [s]).result()

    with caplog.at_level(logging.INFO, logger="worker.graphs"):
        task = _task(small_dir, WORKER_DECODE="compiled",
                     WORKER_COMPILE_CACHE_DIR=str(compile_dir))
        engine = task.batcher.engine
        assert isinstance(engine, SwitchingEngine)
        assert task.loaded.stats.note.startswith("decode eager now, compiled once ready "
                                                 "(4 slots x 96 tokens"), task.loaded.stats.note
        first = _answer(task, JOB)
        assert engine.serving is None, "the first job waited for the compile"
        assert first == expected_first

        # Sequences decoding eagerly when the compiled step becomes ready: the first holds the
        # device thread after its third token until the compile thread is done.
        seqs = _in_flight(task)
        tokens_at_switch: list[int] = []

        def hold(_delta: str) -> None:
            if len(seqs[0].generated) == 3 and not tokens_at_switch:
                assert engine.prepared.wait(600), "the compile did not finish"
                tokens_at_switch.extend(len(s.generated) for s in seqs)

        seqs[0].on_text = hold
        DEVICE_THREAD.submit(engine.run, seqs, None, 4).result()
    assert engine.serving is not None, engine.why_eager
    assert engine.handed_over == len(seqs)
    assert all(0 < n < s.params.max_new_tokens for n, s in zip(tokens_at_switch, seqs,
                                                               strict=True))
    assert [s.generated for s in seqs] == [s.generated for s in expected]
    assert [s.finish_reason for s in seqs] == [s.finish_reason for s in expected]

    graph, steps = engine.serving, engine.serving.steps
    with caplog.at_level(logging.INFO, logger="worker.graphs"):
        assert _answer(task, JOB) == expected_first  # greedy: the same tokens after the switch
    assert engine.serving is graph and graph.steps > steps, "not decoded by the compiled step"
    switched = [r.getMessage() for r in caplog.records if "switched to the compiled" in
                r.getMessage()]
    assert len(switched) == 1, caplog.text           # one compile, one switch
    assert "off the job path" in switched[0] and "between two steps" in switched[0]
    assert any((compile_dir / "inductor").rglob("*")), "nothing was cached for the next worker"


# Loads the task as the worker does, then says which of torch's compiler modules the start-up
# imported (in a fresh process: this one has compiled before).
STARTUP_IMPORTS = """
import json, os, sys
from serving.config import ModelSettings, WorkerSettings
from tasks import TASKS
from tests.support.worker import load_task
task = load_task(ModelSettings.from_env(), WorkerSettings.from_env(), TASKS)
imported = {m: m in sys.modules for m in ("torch._dynamo", "torch._inductor.compile_fx")}
print(json.dumps({"note": task.loaded.stats.note, **imported}))
os._exit(0)
"""


@pytest.mark.slow
def test_a_compiled_workers_start_up_leaves_the_compiler_to_the_compile_thread(small_dir,
                                                                                tmp_path):
    """Pins a first answer 1.38x the eager one: importing inductor (torch.compile) at the end
    of the warm-up cost 1.1 s of a 4.5 s cold start; it belongs to the compile thread."""
    env = {**os.environ, "MODEL_PATH": str(small_dir), **SMALL_ENV, "WORKER_DECODE": "compiled",
           "WORKER_COMPILE_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", STARTUP_IMPORTS], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["note"].startswith("decode eager now, compiled once ready"), found["note"]
    assert (found["torch._dynamo"], found["torch._inductor.compile_fx"]) == (True, False)


@pytest.mark.slow
@pytest.mark.timeout(900)     # a compile on two busy cores: minutes
def test_a_compiled_step_that_drifts_from_eager_leaves_the_worker_eager_and_says_so_once(
        small_dir, compile_dir, monkeypatch, caplog):
    """The check against eager decoding (GraphEngine.drift) runs before the switch; with a
    limit no step can meet the worker never switches, logs the reason once, and serves on."""
    import serving.graphs

    monkeypatch.setattr(serving.graphs, "MAX_DRIFT", -1.0)
    with caplog.at_level(logging.WARNING, logger="worker.graphs"):
        task = _task(small_dir, WORKER_DECODE="compiled",
                     WORKER_COMPILE_CACHE_DIR=str(compile_dir))
        engine = task.batcher.engine
        assert engine.settled.wait(600)
        answer = _answer(task, JOB)
    assert engine.serving is None
    assert "away from eager decoding's" in (engine.why_eager or "")
    warned = [r for r in caplog.records if "will not serve" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert answer["usage"]["completion_tokens"] == 12


@pytest.mark.slow
def test_no_room_for_the_cache_decodes_eagerly_with_the_reason(small_dir, caplog):
    """Memory figures that leave no room for one row: no compile, eager decoding, the startup
    note says why, and jobs are answered (never a startup error)."""
    task = _task(small_dir, WORKER_DECODE="eager")
    engine = SwitchingEngine(task.loaded, WorkerSettings.from_env(SMALL_ENV), 2048, None)
    ids = list(task.tokenizer("Hello")["input_ids"])
    full = DeviceMemory(total=24 * GIB, free=GIB, warmup_peak=GIB)
    with caplog.at_level(logging.WARNING, logger="worker.graphs"):
        note = DEVICE_THREAD.submit(engine.start, ids, full).result()
    assert note.startswith("decode eager (no room for the compiled step's cache: one slot of "
                           "96 tokens needs"), note
    assert engine.settled.is_set() and not engine.prepared.is_set()
    assert engine._thread is None                   # nothing compiles
    seq = Sequence(list(ids), SamplingParams(max_new_tokens=5))
    DEVICE_THREAD.submit(engine.run, [seq]).result()
    assert len(seq.generated) == 5
    assert sum("will not serve" in r.getMessage() for r in caplog.records) == 1


def test_an_eager_pass_beside_the_compile_holds_the_lock_every_fx_trace_holds(small_dir):
    """Pins jobs failing while the step compiled (the gpu-check rehearsal's switch probe): a
    torch.fx trace in the compile thread swaps nn.Module's call for every thread, and an eager
    pass that ran meanwhile raised NameError. Each eager pass holds the traces' lock until the
    engine has switched or settled eager."""
    from concurrent.futures import ThreadPoolExecutor

    from serving import patches

    task = _task(small_dir, WORKER_DECODE="eager")
    engine = SwitchingEngine(task.loaded, WorkerSettings.from_env(SMALL_ENV), None, None)
    engine.plan = plan_cache(None, 1, engine.settings, None)   # start() not run: no compile
    engine._fx_tracing = lock = patches.guard_fx_tracing()    # as start() sets it
    held: list[bool] = []
    other = ThreadPoolExecutor(1)              # asks for the lock from another thread

    def check(*_: object) -> None:
        taken = other.submit(lock.acquire, False).result()
        if taken:
            other.submit(lock.release).result()
        held.append(not taken)

    hook = task.loaded.model.register_forward_pre_hook(check)
    ids = list(task.tokenizer(PROMPTS[0])["input_ids"])
    try:
        DEVICE_THREAD.submit(engine.run, [Sequence(ids, SamplingParams(max_new_tokens=3))]
                             ).result()
        assert held and all(held), held
        held.clear()
        engine.settled.set()                   # switched, or eager for good: no compile runs
        DEVICE_THREAD.submit(engine.run, [Sequence(ids, SamplingParams(max_new_tokens=3))]
                             ).result()
        assert held and not any(held), held
    finally:
        hook.remove()
        other.shutdown()

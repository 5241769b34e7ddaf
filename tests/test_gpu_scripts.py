"""``make gpu-check``'s own scripts, checked on the CPU: the whole run rehearsed
(``GPU_CHECK_DRY_RUN=1``: ~3M random models, the compiled decode step as a GPU would run it, the
GPU tests collected and skipped) from a copy of the repository as a GPU machine gets it, and the
summary of the goals that reads its results. The numbers mean nothing here; what is checked is
that every step runs and writes what the summary reads, so the script is ready when a GPU is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.project import copy_project

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_shell_scripts_parse() -> None:
    for script in ("scripts/gpu_check.sh", "scripts/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


def test_the_benches_read_the_decode_path_and_its_drift_from_the_startup_line() -> None:
    from bench.worker_bench import parse_startup_line

    line = ("INFO worker.model: model ready: default (generate) from MODEL_PATH (m) | import "
            "3.11s, read 0.08s (0.13 GiB), place 0.21s, warm-up 14.88s | device cuda:0 (one "
            "device), dtype bfloat16, peak memory 1.21 GiB | decode compiled (CUDA graphs, 32 "
            "slots x 5120 tokens, compile cache /c), 2.1e-02 from eager\n")
    found = parse_startup_line("other output\n" + line + "the answer\n")
    assert found["warmup_s"] == 14.88
    assert found["decode"] == ("decode compiled (CUDA graphs, 32 slots x 5120 tokens, compile "
                               "cache /c), 2.1e-02 from eager")
    eager = line.split("| decode")[0] + "| decode eager (WORKER_DECODE=auto on a CPU)\n"
    assert parse_startup_line(eager)["decode"] == "decode eager (WORKER_DECODE=auto on a CPU)"
    note = ("decode eager now, compiled once ready (CUDA graphs, 16 slots x 5120 tokens: 1.76 "
            "GiB of the 120.31 GiB left under WORKER_GPU_MEMORY_UTILIZATION=0.9; compile cache "
            "/c)")
    switching = line.split("| decode")[0] + "| " + note + "\n"
    assert parse_startup_line(switching)["decode"] == note


@pytest.mark.timeout(1600)     # the run's own limit is 1500 s
def test_gpu_check_rehearsed_on_the_cpu_measures_every_goal(default_model_dir, tmp_path):
    """``GPU_CHECK_DRY_RUN=1 make gpu-check`` from a copy of the repository as a GPU machine
    gets it (tracked files, no ``models/``) with the folder ``gpu_wheels.sh`` makes beside the
    wheels: every step runs, and the summary finds a measured value for every goal."""
    tree = copy_project(tmp_path / "tree")
    assert not (tree / "models").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "MODEL_"))}
    wheels = tmp_path / "wheels"
    subprocess.run(["bash", "scripts/gpu_wheels.sh", str(wheels), "--model-files-only"],
                   cwd=tree, env={**env, "MODEL_PATH": str(default_model_dir)}, check=True,
                   timeout=60)
    out = tmp_path / "results"
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=tree, capture_output=True, text=True, timeout=1500,
        env={**env, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_WHEELS": str(wheels),
             "GPU_CHECK_OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"),
             "GPU_CHECK_BUDGET_S": "1400", "PYTHON": sys.executable})
    log = (out / "gpu-check.log").read_text() if (out / "gpu-check.log").exists() else ""
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # Each step's two lines: "== NAME (limit Ns)" and "== NAME: ok in Ns"; none failed, was
    # cut for time or left out for a missing package.
    steps = [line for line in log.splitlines() if line.startswith("== ")]
    assert steps and all(re.search(r"\(limit \d+s\)$|: ok in \d+s$", line) for line in steps), steps
    assert re.search(r"^\d+ skipped in ", log, re.M)   # the GPU tests, collected without CUDA
    summary = json.loads((out / "summary.json").read_text())
    unmeasured = [g["goal"] for g in summary["goals"] if g["measured"] is None]
    assert not unmeasured, unmeasured
    assert summary["versions"]["gpu"] == "cpu (dry run)"
    for name in ("worker-bench.json", "bench-small.json", "bench-large.json", "peer.json",
                 "upscale.json"):
        assert (out / name).is_file(), name
    cold = json.loads((out / "worker-bench.json").read_text())["cold_start"]["by_decode"]
    assert cold["compiled"]["decode"].startswith("decode eager now, compiled once ready (")
    switch = json.loads((out / "worker-bench.json").read_text())["switch"]
    assert switch["compiled_empty_cache"]["serving_s"] > 0, switch     # it switched
    assert switch["compiled_cache_found"]["serving_s"] > 0, switch
    assert cold["eager"]["decode"] == "decode eager (WORKER_DECODE=eager)"
    # As auto does on a GPU, every worker (the engine bench's, the worker loop's, the peer
    # bench's) ran the compiled step, and it passed its start-up check against eager.
    small = json.loads((out / "bench-small.json").read_text())
    assert small["decode_path"].startswith("decode compiled (") and "from eager" in small[
        "decode_path"], small["decode_path"]

"""``make gpu-check``'s own scripts, checked on the CPU: the engine benchmark's dry run on a ~3M
random model, and the summary of the issue's goals that reads its results. The numbers mean
nothing here; what is checked is that the scripts run, write what the summary reads, and that
``scripts/gpu_check.sh`` and ``scripts/gpu_wheels.sh`` parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


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


def test_engine_bench_dry_run_feeds_the_summary(tmp_path: Path) -> None:
    model, out = tmp_path / "tiny", tmp_path / "results"
    _run("-m", "bench.gpu_bench", "--dry-run-on-cpu", "--make-model", str(model),
         "--arch", "tiny")
    _run("-m", "bench.gpu_bench", "--dry-run-on-cpu", "--model", str(model),
         "--measure", "first-batch", "decode", "throughput", "--concurrency", "1", "32",
         "--new-tokens", "4", "--graph-slots", "1", "--out", str(out / "bench-small.json"))
    result = json.loads((out / "bench-small.json").read_text())
    assert result["versions"]["torch"] and result["decode_path"].startswith("decode ")
    assert {"worker", "graph_1_slot"} <= set(result["decode_bandwidth"]["engines"])
    assert [r["concurrency"] for r in result["throughput"]["rows"]] == [1, 32]

    table = _run("-m", "bench.gpu_summary", str(out))
    summary = json.loads((out / "summary.json").read_text())
    by_goal = {g["goal"]: g for g in summary["goals"]}
    measured = [g for g in by_goal.values() if g["source"] == "bench-small.json"]
    assert measured and all(g["measured"] is not None for g in measured), measured
    assert all(g["measured"] is None and g["met"] is None
               for g in by_goal.values() if g["source"] != "bench-small.json")
    assert "versions: python" in table and "missing" in table

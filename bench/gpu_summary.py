"""The issue's GPU goals against what ``make gpu-check`` measured: reads the step results in one
results folder, writes ``summary.json`` there and prints a table. Not a benchmark itself.

    python -m bench.gpu_summary bench/results/gpu-2026-12-01

Each goal names the file and the figure it comes from; a figure whose step did not run (or
failed) is reported as missing, not as unmet. The files, as ``scripts/gpu_check.sh`` names them:

- ``bench-small.json`` (``gpu_bench`` on the default architecture): the decode step at batch 1
  of the worker's engine, the engine at 32 concurrent jobs against direct batched ``generate``,
  and the first runs after start-up;
- ``bench-large.json`` (``gpu_bench`` on the ~1.1B model): the decode step at batch 1 as a share
  of the device-to-device copy bandwidth;
- ``worker-bench.json``: the real worker loop at 32 concurrent jobs, cold start against the
  floor per WORKER_DECODE, and the eager and compiled paths (``worker_bench``'s ``switch``):
  first answer after process start, the compiled step serving with an empty and a filled
  compile cache, tokens/s at 1 and 32 concurrent jobs;
- ``peer.json``: our OpenAI route against ``transformers serve`` at each concurrency.

Also the versions every result was measured with; results measured with different versions are
flagged, since the GPU machine's torch is not the pinned one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Goal:
    name: str
    before: str
    target: str
    source: str                                    # file name in the results folder
    read: Callable[[dict[str, Any]], Any]          # the measured figure from that file
    met: Callable[[Any], bool] | None = None       # None: reported, no goal
    unit: str = ""
    context: Callable[[dict[str, Any]], Any] | None = None


def _row(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    return next(r for r in rows if r["concurrency"] == concurrency)


def _step(data: dict[str, Any], engine: str) -> dict[str, Any]:
    return data["decode_bandwidth"]["engines"][engine]


def _cold(data: dict[str, Any], setting: str) -> dict[str, Any]:
    return data["cold_start"]["by_decode"][setting]


GOALS = [
    Goal("batch-1 decode step, 135M default architecture (the worker's engine)", "22.5 ms",
         "<= 3 ms", "bench-small.json", lambda d: _step(d, "worker")["step_ms_batch1"],
         lambda v: v <= 3.0, " ms",
         lambda d: {name: {"step_ms": round(s["step_ms_batch1"], 3), "kind": s["kind"],
                           **({"slots": s["slots"], "columns": s["columns"]}
                              if "slots" in s else {})}
                    for name, s in d["decode_bandwidth"]["engines"].items()}),
    Goal("batch-1 decode step, 1.07B, share of device-to-device copy bandwidth "
         "(the worker's engine)", "0.056", ">= 0.5", "bench-large.json",
         lambda d: _step(d, "worker")["ratio_to_d2d"], lambda v: v >= 0.5, "",
         lambda d: {name: {"ratio_to_d2d": round(s["ratio_to_d2d"], 3),
                           "step_ms": round(s["step_ms_batch1"], 3), "kind": s["kind"],
                           **({"slots": s["slots"], "columns": s["columns"]}
                              if "slots" in s else {})}
                    for name, s in d["decode_bandwidth"]["engines"].items()}),
    Goal("engine + batcher at 32 concurrent jobs vs direct batched generate, 135M", "0.66x",
         ">= 1.0x", "bench-small.json",
         lambda d: _row(d["throughput"]["rows"], 32)["worker_ratio_to_direct_batched"],
         lambda v: v >= 1.0, "x",
         lambda d: {f"{r['concurrency']} jobs": {
             k.removesuffix("_ratio_to_direct_batched"): round(v, 3) for k, v in r.items()
             if k.endswith("_ratio_to_direct_batched")} for r in d["throughput"]["rows"]}),
    Goal("real worker loop at 32 concurrent jobs vs direct batched generate", "0.22x",
         ">= 0.8x", "worker-bench.json",
         lambda d: _row(d["throughput"]["rows"], 32)["ratio_to_direct_batched"],
         lambda v: v >= 0.8, "x",
         lambda d: {"decode": d.get("decode_path"),
                    "p50_s": _row(d["throughput"]["rows"], 32)["p50_s"],
                    "p95_s": _row(d["throughput"]["rows"], 32)["p95_s"]}),
    Goal("cold start (process start to ready) vs the floor, compiled, compile cache filled",
         "3.4x", "<= 1.5x", "worker-bench.json",
         lambda d: _cold(d, "compiled")["ratio_to_floor"], lambda v: v <= 1.5, "x",
         lambda d: {"floor_s": d["cold_start"]["floor_process_s"], **{
             name: {"ratio_to_floor": round(s["ratio_to_floor"], 2),
                    "process_s": round(s["process_s"], 2)}
             for name, s in d["cold_start"]["by_decode"].items()}}),
    Goal("cold start vs the floor, WORKER_DECODE=eager", "3.4x", "<= 1.5x",
         "worker-bench.json", lambda d: _cold(d, "eager")["ratio_to_floor"],
         lambda v: v <= 1.5, "x"),
    Goal("first runs after start-up, extra time over the second run (worst of 1, 8, 32 rows)",
         "1 to 2.5 s", "<= 0.2 s", "bench-small.json",
         lambda d: d["first_batch"]["max_extra_s"], lambda v: v <= 0.2, " s",
         lambda d: {"by_rows_s": {k: round(v, 3)
                                  for k, v in d["first_batch"]["extra_s_by_rows"].items()},
                    "engine": d["first_batch"]["engine"]}),
    Goal("our OpenAI route vs transformers serve, worst of 1, 8, 16 concurrent", "-",
         ">= 1.0x", "peer.json", lambda d: min(r["ratio"] for r in d["rows"]),
         lambda v: v >= 1.0, "x",
         lambda d: {"by_concurrency": {str(r["concurrency"]): round(r["ratio"], 3)
                                       for r in d["rows"]},
                    "peer": d.get("peer"), "ours": d.get("decode_path")}),
    Goal("first answer after process start, compiled path vs eager (worst of empty and "
         "filled compile cache)", "compile first", "<= 1.3x", "worker-bench.json",
         lambda d: max(d["switch"]["first_answer_ratio_to_eager"].values()),
         lambda v: v <= 1.3, "x",
         lambda d: {name: round(d["switch"][name]["first_answer_s"], 2) for name in
                    ("eager", "compiled_empty_cache", "compiled_cache_found")}),
    Goal("compiled step serving after process start, empty compile cache", "-", "reported",
         "worker-bench.json", lambda d: d["switch"]["compiled_empty_cache"]["serving_s"],
         None, " s", lambda d: d["switch"]["compiled_empty_cache"].get("switch")),
    Goal("compiled step serving after process start, compile cache filled by an earlier "
         "process", "-", "reported", "worker-bench.json",
         lambda d: d["switch"]["compiled_cache_found"]["serving_s"], None, " s",
         lambda d: d["switch"]["compiled_cache_found"].get("switch")),
    Goal("tokens/s at 32 concurrent jobs, compiled path vs eager", "-", "reported",
         "worker-bench.json",
         lambda d: (d["switch"]["compiled_cache_found"]["tokens_per_s"]["32"]
                    / d["switch"]["eager"]["tokens_per_s"]["32"]), None, "x",
         lambda d: {name: {n: round(r, 1) for n, r in d["switch"][name]["tokens_per_s"].items()}
                    for name in ("eager", "compiled_cache_found")}),
]


def summarize(folder: Path) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name != "summary.json":
            try:
                files[path.name] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
    goals = []
    for goal in GOALS:
        entry: dict[str, Any] = {"goal": goal.name, "before": goal.before,
                                 "target": goal.target, "source": goal.source}
        data = files.get(goal.source)
        try:
            if data is None:
                raise LookupError(f"{goal.source} is missing")
            value = goal.read(data)
        except (LookupError, TypeError, StopIteration, ValueError) as exc:
            entry.update({"measured": None, "met": None, "missing": str(exc) or repr(exc)})
        else:
            entry.update({"measured": value,
                          "met": None if goal.met is None else bool(goal.met(value))})
            if goal.context is not None:
                with contextlib.suppress(LookupError, TypeError, StopIteration, ValueError):
                    entry["context"] = goal.context(data)   # detail only: never fails a goal
        entry["unit"] = goal.unit
        goals.append(entry)
    versions = {name: data["versions"] for name, data in files.items() if "versions" in data}
    distinct = {json.dumps({k: v for k, v in found.items() if k != "driver"}, sort_keys=True)
                for found in versions.values()}
    return {"folder": str(folder), "goals": goals,
            "versions": next(iter(versions.values()), None),
            "versions_differ_between_files": len(distinct) > 1,
            "versions_by_file": versions if len(distinct) > 1 else None,
            "met": sum(1 for g in goals if g["met"] is True),
            "unmet": sum(1 for g in goals if g["met"] is False),
            "missing": sum(1 for g in goals if g["measured"] is None)}


def _format(value: Any, unit: str) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        digits = 3 if abs(value) < 10 else 1
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'goal':<90} {'before':>10} {'measured':>10} {'target':>9}  met"]
    for g in summary["goals"]:
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        lines.append(f"{g['goal'][:90]:<90} {g['before']:>10} "
                     f"{_format(g['measured'], g['unit']):>10} {g['target']:>9}  {met}")
    v = summary["versions"] or {}
    lines.append("versions: " + (", ".join(f"{k} {val}" for k, val in v.items()) or "none")
                 + (" (NOT the same in every file: see summary.json)"
                    if summary["versions_differ_between_files"] else ""))
    lines.append(f"{summary['met']} met, {summary['unmet']} not met, "
                 f"{summary['missing']} missing")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    summary = summarize(args.folder)
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()

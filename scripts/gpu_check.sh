#!/usr/bin/env bash
# make gpu-check: the GPU tests and benchmarks on a CUDA machine, results in one folder.
#
# Needs python3 with torch, transformers, accelerate and safetensors (what a GPU image has), plus
# this checkout. The worker's own packages (pydantic; runpod and boto3 for the worker loop;
# fastapi, uvicorn and openai for the peer) may come as wheels: GPU_CHECK_WHEELS=<dir> installs
# every wheel in <dir> (scripts/gpu_wheels.sh downloads them) into a folder of their own, first
# on PYTHONPATH, without an index or dependency resolution, so a machine offline and without
# our pins runs ours (transformers, tokenizers, huggingface_hub) over its own; torch stays the
# machine's, and every result records the versions it ran with. A step whose packages are
# missing is skipped and says so. Weights: models/default/model.safetensors if present (a
# user's GPU pod), else a model with random weights in the default architecture, made from the
# default model's config and tokenizer files (models/default, or the default-model folder that
# scripts/gpu_wheels.sh puts beside the wheels, for a machine without models/), plus a ~1.1B one
# for bandwidth figures that mean something on a large GPU. Every worker it starts serves that
# model (MODEL_PATH).
#
# GPU_CHECK_DRY_RUN=1 rehearses the whole run on a CPU, with tiny models and every worker on the
# compiled decode step (what WORKER_DECODE=auto picks on a GPU); the GPU tests are collected and
# skip. It checks the script and what it writes for the summary; its numbers mean nothing.
#
# Each step has its own time limit, cut to what is left of GPU_CHECK_BUDGET_S (default 540 s)
# for the whole run, so the run ends in time with its summary written; a failed step is
# reported and the rest still run. About 8 minutes on an H200. Results: $GPU_CHECK_OUT
# (default bench/results/gpu-<date>/): gpu-check.log, one JSON file per benchmark, and
# summary.json, the issue's goals against what was measured (bench/gpu_summary.py).
#
# Every worker here runs with WORKER_CONCURRENCY=WORKER_MAX_BATCH_SIZE=32 (the goals' 32 jobs
# at once) and one compile cache, so a step finds the compiled step an earlier one made; the
# eager-and-compiled step measures the compile itself, with an empty cache of its own.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-bench/results/gpu-$(date -u +%Y-%m-%d)}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
  export WORKER_DECODE=compiled   # what auto picks on a GPU: every worker runs the compiled step
  ARCHS=(tiny tiny); BENCH=(--dry-run-on-cpu); PEER=()
  UPSCALE=(--device cpu --size 32 --concurrency 2)
else
  ARCHS=(smollm 1b); BENCH=(); PEER=(--peer-cuda-graph --peer-compile-level 1)
  UPSCALE=(--device cuda --size 128 --concurrency 8)
fi
RESERVE=25                      # kept back for the summary
DEADLINE=$((SECONDS + BUDGET))
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu-check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WORKER_CONCURRENCY=32 WORKER_MAX_BATCH_SIZE=32
CACHE="$WORK/compile-cache"     # new every run: the first step times an empty one
rm -rf "$CACHE"
export WORKER_COMPILE_CACHE_DIR="$CACHE"
rm -f "$OUT"/*.json             # a step that fails leaves no older result behind
export PY
failed=()

step() {  # step NAME LIMIT_S COMMAND...: run one part, logged and timed
  local name=$1 limit=$2 start=$SECONDS left=$((DEADLINE - SECONDS - RESERVE))
  shift 2
  if [ "$left" -lt 30 ]; then
    echo "== $name: SKIPPED (${left}s left of GPU_CHECK_BUDGET_S=${BUDGET})" | tee -a "$LOG"
    failed+=("$name (no time left)")
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  if timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"; then
    echo "== $name: ok in $((SECONDS - start))s" | tee -a "$LOG"
  else
    echo "== $name: FAILED in $((SECONDS - start))s" | tee -a "$LOG"
    failed+=("$name")
    return 1
  fi
}

has() {  # has MODULE...: whether this Python imports them all
  "$PY" -c "import $(IFS=,; echo "$*")" 2>/dev/null
}

if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  SITE="$WORK/site"
  rm -rf "$SITE"
  wheels=("$GPU_CHECK_WHEELS"/*.whl)
  if [ ! -e "${wheels[0]}" ] && [ "$DRY" != 1 ]; then
    echo "gpu-check: no wheels in $GPU_CHECK_WHEELS" | tee -a "$LOG"
    exit 1
  fi
fi
if [ -n "${GPU_CHECK_WHEELS:-}" ] && [ -e "${wheels[0]}" ]; then
  # pip when the machine has it; else a wheel is a zip file that unpacks as it installs.
  step "install ${#wheels[@]} wheels" 120 bash -c '
    site=$1; shift
    if "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$@"
    else
      "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$site" "$@"
    fi' install "$SITE" "${wheels[@]}" || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

step device 60 env DRY="$DRY" "$PY" -c '
import os, torch, transformers
if os.environ["DRY"] == "1":
    print(f"dry run on the CPU: torch {torch.__version__}, transformers "
          f"{transformers.__version__} from {transformers.__file__}")
    raise SystemExit
assert torch.cuda.is_available(), "no CUDA device: gpu-check runs on a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__} from {transformers.__file__}, {torch.cuda.device_count()} x "
      f"{p.name} ({p.total_memory / 2**30:.0f} GiB), bf16 {torch.cuda.is_bf16_supported()}")' \
  || { echo "gpu-check: no usable GPU"; exit 1; }

# The default model's config and tokenizer: the random-weight models are made from them.
if [ -f models/default/config.json ]; then
  SOURCE=models/default
elif [ -f "${GPU_CHECK_WHEELS:-/nonexistent}/default-model/config.json" ]; then
  SOURCE="$GPU_CHECK_WHEELS/default-model"
else
  echo "gpu-check: no models/default/config.json and no default-model folder in" \
       "GPU_CHECK_WHEELS: run make model, or bring the folder scripts/gpu_wheels.sh makes" \
    | tee -a "$LOG"
  exit 1
fi
if [ -f models/default/model.safetensors ] && [ "$DRY" != 1 ]; then
  SMALL=models/default
else
  SMALL="$WORK/small"
  [ -f "$SMALL/model.safetensors" ] || step "make small model" 90 "$PY" -m bench.gpu_bench \
    "${BENCH[@]}" --make-model "$SMALL" --arch "${ARCHS[0]}" --source "$SOURCE" || exit 1
fi
LARGE="$WORK/large"
[ -f "$LARGE/model.safetensors" ] || [ -f "$LARGE/model.safetensors.index.json" ] \
  || step "make large model" 90 "$PY" -m bench.gpu_bench "${BENCH[@]}" --make-model "$LARGE" \
       --arch "${ARCHS[1]}" --source "$SOURCE"
export MODEL_PATH="$SMALL"       # the model every worker below serves

if has pydantic; then
  # First the cold start: the floor, WORKER_DECODE=eager and compiled (which answers eagerly at
  # once and exits before its step has compiled).
  step "cold start and compile cost (small)" 150 "$PY" -m bench.worker_bench --only cold \
    --decode eager compiled --compile-cache "$CACHE" --repeat 1 --no-worker-loop \
    --out "$OUT/worker-bench.json"
  # Eager against compiled: first answer, the compiled step serving (with an empty compile cache
  # of its own, then finding it, copied into $CACHE for the steps below), tokens/s at 1, 32 jobs.
  # Three fresh workers, one compiling from empty: on two busy CPU cores (the dry run) minutes.
  SWITCH_S=300; [ "$DRY" = 1 ] && SWITCH_S=600
  step "eager and compiled paths (small)" "$SWITCH_S" "$PY" -m bench.worker_bench --only switch \
    --compile-cache "$CACHE" --out "$OUT/worker-bench.json"
fi

# (A dry run collects them and each skips: no CUDA device.)
step "gpu tests" 180 env GPU_CHECK_MODEL="$SMALL" GPU_CHECK_LARGE_MODEL="$LARGE" \
  "$PY" -m pytest --noconftest -p no:cacheprovider -m gpu tests/test_gpu.py \
  tests/test_gpu_families.py -q -rA --durations=0

if has pydantic; then
  step "engine bench (small): first runs, decode step, throughput" 180 "$PY" -m bench.gpu_bench \
    "${BENCH[@]}" --model "$SMALL" --measure first-batch decode throughput --concurrency 1 8 32 \
    --out "$OUT/bench-small.json"
  step "engine bench (large): decode step" 150 "$PY" -m bench.gpu_bench "${BENCH[@]}" \
    --model "$LARGE" --measure decode --graph-slots 1 --out "$OUT/bench-large.json"
else
  echo "== engine and cold-start benches: skipped (pydantic is missing: GPU_CHECK_WHEELS," \
       "or pip install -r requirements.txt)" | tee -a "$LOG"
fi

if has runpod pydantic aiohttp; then
  # The worker answers eagerly until its compiled step is ready; the bench waits for it.
  LOOP_S=150; [ "$DRY" = 1 ] && LOOP_S=300
  step "worker bench (real worker loop)" "$LOOP_S" "$PY" -m bench.worker_bench --only throughput \
    --concurrency 1 32 --max-new-tokens 32 --repeat 2 --out "$OUT/worker-bench.json"
else
  echo "== worker bench: skipped (runpod, pydantic or aiohttp missing)" | tee -a "$LOG"
fi

if has runpod pydantic fastapi uvicorn openai aiohttp; then
  step "peer: transformers serve (CUDA graphs, compiled)" 210 "$PY" -m bench.peer_bench \
    --concurrency 1 8 16 --repeat 2 "${PEER[@]}" --out "$OUT/peer.json"
else
  echo "== peer bench: skipped (runpod, fastapi, uvicorn or openai missing)" | tee -a "$LOG"
fi

# Not one of the goals: only with time to spare.
if has pydantic && [ $((DEADLINE - SECONDS - RESERVE)) -gt 90 ]; then
  step "upscale bench" 60 "$PY" -m bench.upscale_bench "${UPSCALE[@]}" \
    --out "$OUT/upscale.json"
fi

"$PY" -m bench.gpu_summary "$OUT" 2>&1 | tee -a "$LOG"
echo "gpu-check: $((SECONDS))s in all" | tee -a "$LOG"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-check: FAILED: ${failed[*]} (log: $LOG)" | tee -a "$LOG"
  exit 1
fi
echo "gpu-check: all steps passed; results in $OUT" | tee -a "$LOG"

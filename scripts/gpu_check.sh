#!/usr/bin/env bash
# make gpu-check: the GPU tests and benchmarks on a CUDA machine, results in one folder.
#
# Needs python3 with torch, transformers, accelerate and safetensors (what a GPU image has), plus
# this checkout. With the worker's own requirements installed too (runpod, pydantic, boto3) it
# also answers a job through handler.py and benchmarks the real worker loop; without them those
# two steps are skipped and say so. Weights: models/default/model.safetensors if present (a
# user's GPU pod), else a model with random weights in the default architecture, made from
# models/default's config and tokenizer files, plus a ~1.1B one for bandwidth figures that mean
# something on a large GPU.
#
# Each step has its own time limit; a failed step is reported and the rest still run. About
# 7 minutes on an H200. Results: $GPU_CHECK_OUT (default gpu-results/): gpu-check.log and one
# JSON file per benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu-results}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu-check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
failed=()

step() {  # step NAME LIMIT_S COMMAND...: run one part, logged and timed
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  if timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; then
    echo "== $name: ok in $((SECONDS - start))s" | tee -a "$LOG"
  else
    echo "== $name: FAILED in $((SECONDS - start))s" | tee -a "$LOG"
    failed+=("$name")
    return 1
  fi
}

step device 60 "$PY" -c '
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device: gpu-check runs on a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB), "
      f"bf16 {torch.cuda.is_bf16_supported()}")' || { echo "gpu-check: no usable GPU"; exit 1; }

if [ -f models/default/model.safetensors ]; then
  SMALL=models/default
else
  SMALL="$WORK/small"
  [ -f "$SMALL/model.safetensors" ] \
    || step "make small model" 120 "$PY" -m bench.gpu_bench --make-model "$SMALL" --arch smollm
fi

LARGE="$WORK/large"
[ -f "$LARGE/model.safetensors" ] || [ -f "$LARGE/model.safetensors.index.json" ] \
  || step "make large model" 120 "$PY" -m bench.gpu_bench --make-model "$LARGE" --arch 1b

step "gpu tests" 240 env GPU_CHECK_MODEL="$SMALL" GPU_CHECK_LARGE_MODEL="$LARGE" \
  "$PY" -m pytest --noconftest -p no:cacheprovider -m gpu tests/test_gpu.py -q -rA --durations=0
step "engine bench (small)" 150 "$PY" -m bench.gpu_bench --model "$SMALL" \
  --out "$OUT/bench-small.json"

step "first runs after start-up (small)" 90 "$PY" -m bench.gpu_bench --model "$SMALL" \
  --first-batch --out "$OUT/first-batch.json"
step "first runs, expandable segments (small)" 90 env \
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" -m bench.gpu_bench --model "$SMALL" \
  --first-batch --out "$OUT/first-batch-expandable.json"
step "engine bench (large)" 150 "$PY" -m bench.gpu_bench --model "$LARGE" \
  --out "$OUT/bench-large.json"

if "$PY" -c "import runpod, pydantic, boto3" 2>/dev/null; then
  step "handler.py --test_input" 120 env MODEL_PATH="$SMALL" "$PY" handler.py --test_input \
    '{"input": {"prompt": "The capital of France is", "max_new_tokens": 16}}'
  step "worker bench (real worker loop)" 240 env MODEL_PATH="$SMALL" "$PY" -m bench.worker_bench \
    --concurrency 1 8 32 --max-new-tokens 32 --repeat 2 --out "$OUT/worker-bench.json" \
    --worker-env WORKER_CONCURRENCY=64 WORKER_MAX_BATCH_SIZE=32
  step "upscale bench" 120 "$PY" -m bench.upscale_bench --device cuda --size 128 \
    --concurrency 8 --out "$OUT/upscale.json"
else
  echo "== handler, worker and upscale benches: skipped (runpod, pydantic or boto3 not installed;" \
       "pip install -r requirements.txt)" | tee -a "$LOG"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-check: FAILED: ${failed[*]} (log: $LOG)" | tee -a "$LOG"
  exit 1
fi
echo "gpu-check: all steps passed; results in $OUT" | tee -a "$LOG"

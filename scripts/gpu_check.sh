#!/usr/bin/env bash
# make gpu-check: the GPU tests and benchmarks on a CUDA machine, results in one folder.
#
# Needs only python3 with torch, transformers and safetensors (what a GPU image has), plus this
# checkout. Weights: models/default/model.safetensors if present (a user's GPU pod), else a model
# with random weights in the default architecture, made from models/default's config and
# tokenizer files, plus a ~1.2B one for bandwidth figures that mean something on a large GPU.
# Budget: about 5 minutes on an H100/H200. Results: $GPU_CHECK_OUT (default gpu-results/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu-results}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$PY" - <<'PY' | tee "$OUT/device.txt"
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device: gpu-check runs on a GPU machine"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
PY

if [ -f models/default/model.safetensors ]; then
  SMALL=models/default
else
  SMALL="$WORK/small"
  [ -f "$SMALL/model.safetensors" ] || "$PY" -m bench.gpu_bench --make-model "$SMALL" --arch smollm
fi
LARGE="$WORK/large"
[ -f "$LARGE/model.safetensors" ] || [ -f "$LARGE/model.safetensors.index.json" ] \
  || "$PY" -m bench.gpu_bench --make-model "$LARGE" --arch 1b

status=0
GPU_CHECK_MODEL="$SMALL" "$PY" -m pytest --noconftest -p no:cacheprovider -m gpu \
  tests/test_gpu.py -q 2>&1 | tee "$OUT/tests.txt" || status=1
"$PY" -m bench.gpu_bench --model "$SMALL" --out "$OUT/bench-small.json" \
  2>&1 | tail -n 60 > "$OUT/bench-small.txt" || status=1
"$PY" -m bench.gpu_bench --model "$LARGE" --out "$OUT/bench-large.json" \
  2>&1 | tail -n 60 > "$OUT/bench-large.txt" || status=1
echo "gpu-check: results in $OUT (exit $status)"
exit $status

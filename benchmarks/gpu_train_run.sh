#!/usr/bin/env bash
# One prepared GPU run (<= 12 min on one H200): see benchmarks/gpu_train_run.py for the preparation step.
# Through the device tool:  run(command="bash benchmarks/gpu_train_run.sh", carry=["data/photos_gpu"], timeout_s=600)
# Prepare data/photos_gpu first (python benchmarks/gpu_train_run.py --prepare PHOTO_SET: 633 photos, ~41 MB).
# The stage checkpoints under $OUT/gpu_train/{teacher,distill} resume when the script runs again with them in place.
set -euo pipefail
OUT="${OUT:-runs}"
mkdir -p "$OUT"
if [ ! -d data/photos_gpu ]; then
  echo "data/photos_gpu missing: prepare it with python benchmarks/gpu_train_run.py --prepare PHOTO_SET" >&2
  exit 2
fi
if ! python -c "import tadsr" 2>/dev/null; then
  pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2  # offline: torch must be there
fi
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
# 1. throughput table (CUDA rows: bf16, channels-last, compile, batch sweep, TFLOP/s), capped at 170 s
timeout 170 python benchmarks/train_throughput.py --device cuda --steps 10 > "$OUT/train_throughput_cuda.txt" \
  2> "$OUT/train_throughput_cuda.err" || echo "throughput benchmark ended with $? (partial output kept)"
cat "$OUT/train_throughput_cuda.txt"
# 2. teacher (continued from the shipped weights) + distillation + sanity metrics, ~8 min
python benchmarks/gpu_train_run.py --photos data/photos_gpu --out "$OUT/gpu_train" "$@"

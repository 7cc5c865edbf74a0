#!/usr/bin/env bash
# One prepared GPU run (<= 12 min on one H200): see benchmarks/gpu_train_run.py for the preparation step.
# Through the device tool:  run(command="bash benchmarks/gpu_train_run.sh", carry=["data/photos_gpu"], timeout_s=600)
# and, if the budget allows a second call, the training alone resumes/continues from $OUT's checkpoints only
# within the same warm machine (a fresh machine starts bare: copy $OUT/gpu_train back as a carry to continue).
set -euo pipefail
OUT="${OUT:-runs}"
mkdir -p "$OUT"
if [ ! -d data/photos_gpu ]; then
  echo "data/photos_gpu missing: prepare it with python benchmarks/gpu_train_run.py --prepare PHOTO_SET" >&2
  exit 2
fi
if ! python -c "import tadsr" 2>/dev/null; then
  pip install -q -e . 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
# 1. throughput table (CUDA rows: bf16, channels-last, compile, batch sweep, TFLOP/s), capped at 170 s
timeout 170 python benchmarks/train_throughput.py --device cuda --steps 10 > "$OUT/train_throughput_cuda.txt" \
  2> "$OUT/train_throughput_cuda.err" || echo "throughput benchmark ended with $? (partial output kept)"
cat "$OUT/train_throughput_cuda.txt"
# 2. teacher (continued from the shipped weights) + distillation + sanity metrics, ~8 min
python benchmarks/gpu_train_run.py --photos data/photos_gpu --out "$OUT/gpu_train" "$@"

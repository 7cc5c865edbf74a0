#!/usr/bin/env bash
# The prepared GPU run (issue #17); details in benchmarks/gpu_train_run.py. One device-tool command is at most
# 10 min, so it is two calls:
#   run(command="bash benchmarks/gpu_train_run.sh train", carry=["data/photos_gpu"], timeout_s=600)   # ~8.5 min
#   run(command="bash benchmarks/gpu_train_run.sh throughput", timeout_s=240)                         # <= 3.5 min
# Prepare data/photos_gpu first: python benchmarks/gpu_train_run.py --prepare PHOTO_SET (633 photos, ~41 MB).
# The stage checkpoints under $OUT/gpu_train/{teacher,distill} resume when the script runs again with them in place.
set -euo pipefail
MODE="${1:-train}"
shift || true
OUT="${OUT:-runs}"
mkdir -p "$OUT"
if ! python -c "import tadsr.train" 2>/dev/null; then
  pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2  # offline: torch must already be installed
fi
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
case "$MODE" in
  train)
    if [ ! -d data/photos_gpu ]; then
      echo "data/photos_gpu missing: prepare it with python benchmarks/gpu_train_run.py --prepare PHOTO_SET" >&2
      exit 2
    fi
    # teacher continued from the shipped weights (4 min) + distillation (2 min) + sanity metrics
    python benchmarks/gpu_train_run.py --photos data/photos_gpu --out "$OUT/gpu_train" "$@"
    ;;
  throughput)
    # CUDA rows: fp32 / bf16 / bf16+channels-last, batch sweep, compile, TFLOP/s; capped at 200 s
    timeout 200 python benchmarks/train_throughput.py --device cuda --steps 10 \
      --stages teacher distill autoencoder compile > "$OUT/train_throughput_cuda.txt" \
      2> "$OUT/train_throughput_cuda.err" || echo "throughput benchmark ended with $? (partial output kept)"
    cat "$OUT/train_throughput_cuda.txt"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_train_run.sh [train|throughput] [gpu_train_run.py options]" >&2
    exit 2
    ;;
esac

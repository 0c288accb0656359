#!/usr/bin/env bash
# The GPU checks of mixed precision, channels-last and the explicit formulation tuning: ONE prepared
# script for ONE CUDA device, under 5 minutes on an H200-class GPU. Results go to ${OUT:-gpu-out}/.
#   1. every aggregation formulation under bf16 autocast on CUDA against float64 (hypothesis), and
#      the eval-cache invalidation tests;
#   2. the engine on CUDA: bf16 + channels-last, fp16 + GradScaler, timed formulations (CUDA
#      events) stored and read back on resume;
#   3. throughput at the paper's setting (ResNet-50 x 5, 224², batch 48, bf16): channels-last on
#      (the CUDA default) and off.
# Usage: OUT=gpu-out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
WORKERS=$(( $(nproc) > 12 ? 12 : $(nproc) ))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_layers_aggregate.py -k "bf16 or cache" 2>&1 \
  | tail -5 | tee "$OUT/tests.txt"
timeout 60 python benchmarks/gpu_engine_check.py 2>&1 | tee "$OUT/engine.txt"
for cl in on off; do
  timeout 80 python benchmarks/paper_setting.py --device cuda --precision bf16 --channels-last "$cl" \
    --steps 15 --warmup 3 --workers "$WORKERS" --data-batches 4 --json "$OUT/paper_setting_bf16_cl_$cl.json" 2>&1 \
    | tee "$OUT/paper_setting_bf16_cl_$cl.txt"
done

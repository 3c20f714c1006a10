#!/usr/bin/env bash
# One lent GPU's measurements, in the order they matter, each section bounded so that a slow or hung
# one cannot take the next one's time (about 9.5 minutes at most; sized for a 15-minute device lease
# with the machine's start):
#   1. the whole detector per bucket (1..64), the product's default torch path (static graphs, device
#      decoding, CUDA graphs) against the eager path it replaced;           <= 160 s
#   2. the pipeline: one shared detection stage, 1, 4, 8 and 14 worker processes, K 1080p30 streams; <= 240 s
#   3. per model and bucket, the torch paths (eager / static / graphed), host syncs counted;   <= 170 s
# Run from the repository root on the GPU machine (its python3 has torch). A folder .whl of wheels
# (onnx2torch, pydantic and its parts, for an image that lacks them) is installed first if present.
# Each section writes OUT/<section>/gpu_check.json after every step and OUT/<section>.log.
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu,clocks.sm \
  --format=csv >"$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, onnx2torch, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  || exit 1
quiet() { grep --line-buffered -v -e 'UserWarning' -e 'pos_axes_slices'; }
timeout 160 python3 benchmarks/gpu_check.py --out "$OUT/detector" \
  --skip correctness,models,decode,paths,pipeline 2>&1 | tee "$OUT/detector.log" | quiet
timeout 240 python3 benchmarks/gpu_check.py --out "$OUT/pipeline" \
  --skip correctness,models,preprocess,detector,decode,paths \
  --stage shared --procs 1,4,8,14 --ks 8,16,32,48,64,96,128 --seconds 4 --budget 215 2>&1 \
  | tee "$OUT/pipeline.log" | quiet
# a section cut off by its timeout leaves its spawned stage and workers behind: they would hold the GPU
pkill -9 -f 'multiprocessing.spawn' || true
timeout 170 python3 benchmarks/gpu_check.py --out "$OUT/paths" --backend torch --providers cuda \
  --skip correctness,models,preprocess,detector,decode,pipeline --paths-budget 140 2>&1 \
  | tee "$OUT/paths.log" | quiet
exit 0

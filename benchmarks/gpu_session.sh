#!/usr/bin/env bash
# One lent GPU's measurements, in the order they matter, each section bounded so that a slow or hung
# one cannot take the next one's time (about 9.5 minutes at most with the default sections; sized
# for a 15-minute device lease with the machine's start). SECTIONS picks and orders them:
#   detector      the whole detector per bucket (1..64), the product's default torch path (static
#                 graphs, device decoding, CUDA graphs) against the eager path it replaced    <= 160 s
#   breakdown     one batch split into host packing, upload, letterbox and each model's forward,
#                 BGR and I420 frames (buckets 1, 8, 32, 64)                                    <= 90 s
#   pipeline      one shared detection stage, 4 and 8 worker processes, K 1080p30 BGR streams  <= 170 s
#   pipeline-i420 the same with 8 workers and I420 frames, as the decoders give them            <= 130 s
#   paths         per model and bucket, the torch paths (eager / static / graphed), syncs       <= 170 s
#   ramp          the 2026-12-04 ramp: 1, 4, 8 and 14 worker processes                          <= 240 s
# Default: detector breakdown pipeline pipeline-i420 (about 9 minutes at most).
# Run from the repository root on the GPU machine (its python3 has torch). A folder .whl of wheels
# (onnx2torch, pydantic and its parts, for an image that lacks them) is installed first if present.
# Each section writes OUT/<section>/gpu_check.json after every step and OUT/<section>.log.
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
SECTIONS=${SECTIONS:-detector breakdown pipeline pipeline-i420}
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
ALL=correctness,models,preprocess,detector,decode,breakdown,paths,pipeline
only() { # the --skip list that leaves only the sections named
  local keep=",$1," out="" s
  for s in ${ALL//,/ }; do [[ $keep == *",$s,"* ]] || out="$out,$s"; done
  echo "${out#,}"
}
check() { # section name, time limit, gpu_check arguments...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 benchmarks/gpu_check.py --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log" | quiet
  # a section cut off by its timeout leaves its spawned stage and workers behind: they would hold the GPU
  pkill -9 -f '[m]ultiprocessing.spawn' || true
}
for section in $SECTIONS; do
  case $section in
    detector) check detector 160 --skip "$(only preprocess,detector)" ;;
    breakdown) check breakdown 90 --skip "$(only breakdown)" --buckets 1,8,32,64 ;;
    pipeline) check pipeline 170 --skip "$(only pipeline)" --stage shared --procs 4,8 \
      --ks 8,12,14,16,20,24,32 --seconds 4 --budget 150 ;;
    pipeline-i420) check pipeline-i420 130 --skip "$(only pipeline)" --frames i420 --stage shared --procs 8 \
      --ks 8,12,14,16,20,24,32 --seconds 4 --budget 115 ;;
    paths) check paths 170 --backend torch --providers cuda --skip "$(only paths)" --paths-budget 140 ;;
    ramp) check ramp 240 --skip "$(only pipeline)" --stage shared --procs 1,4,8,14 --ks 8,16,32,48,64,96,128 \
      --seconds 4 --budget 215 ;;
    *) echo "unknown section $section (detector breakdown pipeline pipeline-i420 paths ramp)" >&2; exit 2 ;;
  esac
done
exit 0

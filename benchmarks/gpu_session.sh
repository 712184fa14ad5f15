#!/usr/bin/env bash
# One prepared run for a session that is lent a GPU (issue 9). The device time is short (15 minutes a
# task, 10 a command, a machine start included), so everything that needs the GPU runs here in one
# call, most important first, each step time-boxed; logs and results land in $OUT (default
# benchmarks/results/gpu-session) as each step ends, so a step that runs out of time keeps what the
# earlier ones found. Run from the repository root on the GPU machine:
#
#     bash benchmarks/gpu_session.sh            # ~9 minutes at most; see summary.txt
#     STEPS="gpu_tests gemm" bash benchmarks/gpu_session.sh   # a subset, e.g. to rerun after a fix
#
# Needs nothing beyond the GPU image (torch, triton, transformers, accelerate, ninja, hypothesis,
# matplotlib): the project runs from the checkout through PYTHONPATH, no install.
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
STEPS=${STEPS:-"env build gpu_tests gemm e2e"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}

step() {  # step NAME SECONDS COMMAND...: run it time-boxed, log to $OUT/NAME.log, one line in summary.txt
    local name=$1 limit=$2 start rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit}s)"
    start=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start))s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
    tail -n 8 "$OUT/$name.log"
}

step env 60 bash -c "nvidia-smi; $PY -m quantkern.env; $PY -c 'import torch, triton, transformers; \
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__)'"
# the CUDA extension JIT-builds with ninja on first use: build it once, visibly, before anything times it
step build 240 "$PY" -c "from quantkern.kernels.cuda import build; ok, why = build.load_extension(); \
print('cuda extension:', 'ok' if ok else why); raise SystemExit(0 if ok else 1)"
step gpu_tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider -x --timeout 200 \
    tests/test_cuda_kernels.py tests/test_triton_kernels.py tests/test_devices.py tests/test_fp8.py \
    tests/test_io_gptq.py tests/test_env.py tests/test_smoothquant.py
step gemm 150 "$PY" benchmarks/bench_gemm.py --quick --out "$OUT"
step e2e 150 "$PY" benchmarks/bench_e2e.py --batch 1 8 --tokens 64 --out "$OUT"
echo "== done; results in $OUT"

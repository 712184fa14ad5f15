#!/usr/bin/env bash
# One prepared GPU run (issues 9, 18). GPU time comes in short slots (15 minutes a task, at most 10 a
# command, the machine start included), so everything that needs the GPU runs here in ONE command of at
# most 9 minutes, most valuable first, each step bounded by coreutils `timeout` (and by what is left of
# BUDGET_S, so the whole run ends within it even when an early step overran); every step writes
# $OUT/<step>.log as it goes and one line to $OUT/summary.txt when it ends, so a step that runs out of
# time keeps what the earlier ones found (and the benchmarks keep every row measured so far).
#
#     bash benchmarks/gpu_session.sh                            # <= 9 minutes; see $OUT/summary.txt
#     STEPS="cuda_tests gemm" bash benchmarks/gpu_session.sh    # a subset (build runs when a step needs it)
#     BUDGET_S=120 bash benchmarks/gpu_session.sh               # every limit scaled to a 120 s total
#
# Steps and their limits at the default BUDGET_S=540 (they add up to 540 s; BUDGET_S scales them all):
#   probe 15        torch / GPU / toolchain / compute-sanitizer found? (decides what the others skip)
#   env 20          nvidia-smi, python -m quantkern.env, versions; runs while the build runs
#   build 150       the CUDA extension's JIT build, started in the background before env; this step waits
#                   for it (bounded by its own timeout). A killed build leaves torch's lock file behind,
#                   which would make every later load wait forever: it is removed. After a failed build,
#                   QUANTKERN_CUDA_JIT=0 keeps the later steps from building again.
#   cuda_tests 70, triton_tests 85, other_tests 40
#                   the gpu-marked tests that are not slow (triton: the dense kernels', then the MoE kernel's
#                   conformance grid), one pytest run per backend
#                   (no -x, no plugins: the image has no pytest-timeout), -v so a killed run still shows
#                   every test it finished
#   memcheck 30, racecheck 25
#                   compute-sanitizer on benchmarks/sanitize_kernels.py (each CUDA kernel variant once,
#                   small awkward shapes); skipped with the reason when compute-sanitizer is missing
#   gemm 40         bench_gemm.py, decode-first points, each CSV row written as it is measured
#   moe 30          moe_kernels.py: the Triton grouped MoE kernel vs the reference on a Qwen3-30B-A3B layer
#                   (H 2048, I 768, 128 experts, top-8, W4 g128) at T = 1, 16, 256, a CSV row a point
#   e2e 35          bench_e2e.py decode (eager, batch 1), each row written as it is measured
#
# Needs nothing beyond the GPU image (torch, triton, transformers, ninja, an nvcc for the JIT build): the
# project runs from the checkout through PYTHONPATH, no install. On a machine without a GPU every GPU
# step is skipped with its reason and the script exits 0 in seconds (tests/benchmarks/test_gpu_session.py).
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
ALL_STEPS="probe env build cuda_tests triton_tests other_tests memcheck racecheck gemm moe e2e"
STEPS=${STEPS:-$ALL_STEPS}
BUDGET_S=${BUDGET_S:-540}
PY=${PY:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/quantkern-torch-extensions}
unset TRITON_INTERPRET
LOCK="$TORCH_EXTENSIONS_DIR/quantkern_cuda_kernels/lock"
T0=${SESSION_T0:-$(date +%s)}  # SESSION_T0: when the budget started (epoch seconds), if before this script

lim() {  # a step's limit: its share (of 540) of BUDGET_S, at least 1 s; the shares sum to BUDGET_S at most
    local v=$(($1 * BUDGET_S / 540))
    [ "$v" -lt 1 ] && v=1
    echo "$v"
}
L_PROBE=$(lim 15) L_ENV=$(lim 20) L_BUILD=$(lim 150) L_CUDA=$(lim 70) L_TRITON=$(lim 85) L_OTHER=$(lim 40)
L_MEMCHECK=$(lim 30) L_RACECHECK=$(lim 25) L_GEMM=$(lim 40) L_MOE=$(lim 30) L_E2E=$(lim 35)

wanted() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
record() { echo "$1" | tee -a "$OUT/summary.txt"; }

step() {  # step NAME LIMIT SKIP_REASON COMMAND...: run it time-boxed into $OUT/NAME.log, or say why not
    local name=$1 limit=$2 why=$3 start rc note=""
    shift 3
    if ! wanted "$name"; then record "$name skipped (limit ${limit}s): not in STEPS"; return 0; fi
    if [ -n "$why" ]; then record "$name skipped (limit ${limit}s): $why"; return 0; fi
    local left=$((T0 + BUDGET_S - $(date +%s)))  # never past the session's budget, whatever came before
    if [ "$left" -le 0 ]; then record "$name skipped (limit ${limit}s): the ${BUDGET_S}s budget is spent"; return 0; fi
    [ "$left" -lt "$limit" ] && note=" (cut to the ${left}s left of the budget)" && limit=$left
    echo "== $name (limit ${limit}s)"
    start=$(date +%s)
    timeout -k 2 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && note="$note (timed out)"
    record "$name rc=$rc $(($(date +%s) - start))s (limit ${limit}s)$note"
    tail -n 6 "$OUT/$name.log"
}

echo "# gpu_session $(date -u +%FT%TZ) BUDGET_S=$BUDGET_S STEPS=$STEPS" >>"$OUT/summary.txt"

# --- probe: what is there ---------------------------------------------------------------------------
GPU_WHY="" BUILD_WHY="" SAN_WHY=""
if wanted probe; then
    timeout -k 2 "$L_PROBE" "$PY" - >"$OUT/probe.log" 2>&1 <<'EOF'
import importlib.util, torch
# build.py imports only the standard library and torch: load it alone, not the quantkern package
spec = importlib.util.spec_from_file_location("qk_build", "quantkern/kernels/cuda/build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
gpu = ""
if not torch.cuda.is_available():
    gpu = f"no CUDA GPU (torch {torch.__version__}, torch.version.cuda={torch.version.cuda})"
elif torch.cuda.get_device_capability() < (8, 0):
    gpu = "compute capability %d.%d < 8.0" % torch.cuda.get_device_capability()
else:
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("gpu_problem=" + gpu)
print("build_problem=" + (build.toolchain_problem() or ""))
EOF
    rc=$?
    GPU_WHY=$(sed -n 's/^gpu_problem=//p' "$OUT/probe.log")
    BUILD_WHY=$(sed -n 's/^build_problem=//p' "$OUT/probe.log")
    note=${GPU_WHY:+: $GPU_WHY}
    if [ $rc -ne 0 ]; then  # no answer (a cold start can be slow): run the GPU steps, they say what fails
        GPU_WHY="" BUILD_WHY=""
        note=": the probe gave no answer (see probe.log); running every step"
    fi
    record "probe rc=$rc $(($(date +%s) - T0))s (limit ${L_PROBE}s)$note"
else
    record "probe skipped (limit ${L_PROBE}s): not in STEPS"
fi
[ -n "$GPU_WHY" ] && BUILD_WHY=${BUILD_WHY:-$GPU_WHY}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || true)}
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER=$c
done
[ -z "$SANITIZER" ] && SAN_WHY="compute-sanitizer not found (PATH, \$CUDA_HOME/bin, \$CUDA_HOME/compute-sanitizer)"

# --- build in the background while env runs -------------------------------------------------------------
needs_build=""
for s in build cuda_tests other_tests memcheck racecheck gemm e2e; do wanted "$s" && needs_build=1; done
BUILD_PID=""
left=$((T0 + BUDGET_S - $(date +%s)))
[ "$left" -le 0 ] && [ -n "$needs_build" ] && [ -z "$BUILD_WHY" ] && BUILD_WHY="the ${BUDGET_S}s budget is spent"
[ "$left" -lt "$L_BUILD" ] && [ "$left" -gt 0 ] && L_BUILD=$left
if [ -n "$needs_build" ] && [ -z "$BUILD_WHY" ]; then
    BUILD_T0=$(date +%s)
    (
        timeout -k 2 "$L_BUILD" "$PY" -c "from quantkern.kernels.cuda import build; ok, why = build.load_extension(); \
print('cuda extension:', 'ok' if ok else why); raise SystemExit(0 if ok else 1)" >"$OUT/build.log" 2>&1
        echo $? >"$OUT/build.rc"
    ) &
    BUILD_PID=$!
fi

# the env report asks every backend; with the build running it must not start (or wait on) another one
step env "$L_ENV" "" env QUANTKERN_CUDA_JIT=0 bash -c "nvidia-smi; $PY -m quantkern.env; $PY -c 'import torch, triton, \
transformers; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"triton\", triton.__version__, \
\"transformers\", transformers.__version__)'; echo '(the CUDA backend is being built in its own step)'"

EXT_WHY=$BUILD_WHY
if [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    rc=$(cat "$OUT/build.rc" 2>/dev/null || echo 1)
    note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note=" (timed out)"
        [ -e "$LOCK" ] && rm -f "$LOCK" && note="$note; removed torch's stale lock $LOCK"
    fi
    [ "$rc" -ne 0 ] && EXT_WHY="the CUDA extension did not build (build rc=$rc, see build.log)" && export QUANTKERN_CUDA_JIT=0
    record "build rc=$rc $(($(date +%s) - BUILD_T0))s (limit ${L_BUILD}s)$note"
    tail -n 6 "$OUT/build.log"
elif wanted build; then
    record "build skipped (limit ${L_BUILD}s): ${BUILD_WHY:-no later step needs it}"
else
    record "build skipped (limit ${L_BUILD}s): not in STEPS"
fi

PYTEST=("$PY" -m pytest -v --tb=short -rfEs -m "gpu and not slow" -p no:cacheprovider)
step cuda_tests "$L_CUDA" "${GPU_WHY:-$EXT_WHY}" "${PYTEST[@]}" tests/kernels/test_cuda_kernels.py
step triton_tests "$L_TRITON" "$GPU_WHY" "${PYTEST[@]}" tests/kernels/test_triton_kernels.py tests/api/test_smoothquant.py \
    tests/kernels/test_triton_moe.py
step other_tests "$L_OTHER" "$GPU_WHY" "${PYTEST[@]}" tests/test_devices.py tests/api/test_fp8.py tests/io/test_io_gptq.py \
    tests/test_env.py
SAN=("$SANITIZER" --error-exitcode 1)
step memcheck "$L_MEMCHECK" "${GPU_WHY:-${EXT_WHY:-$SAN_WHY}}" "${SAN[@]}" --tool memcheck "$PY" benchmarks/sanitize_kernels.py
step racecheck "$L_RACECHECK" "${GPU_WHY:-${EXT_WHY:-$SAN_WHY}}" "${SAN[@]}" --tool racecheck "$PY" \
    benchmarks/sanitize_kernels.py
step gemm "$L_GEMM" "$GPU_WHY" "$PY" benchmarks/bench_gemm.py --shape 4096x4096 --shape 4096x14336 --m 1,16,256,4096 \
    --bits 4,8 --dtypes fp16 --methods cuda,triton,torch_int4 --reps 20 --quick --out "$OUT"
step moe "$L_MOE" "$GPU_WHY" "$PY" benchmarks/moe_kernels.py --tokens 1,16,256 --reps 20 --out "$OUT"
step e2e "$L_E2E" "$GPU_WHY" "$PY" benchmarks/bench_e2e.py --batch 1 --prompt 32 --tokens 32 --compile none --out "$OUT"
record "total $(($(date +%s) - T0))s of a ${BUDGET_S}s budget; results in $OUT"
exit 0

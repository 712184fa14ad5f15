#!/usr/bin/env bash
# Re-measure the README's kernel and quality tables in one run, on one machine, one after the other:
#   1. CPU kernels + SmolLM2 decode (README "Kernels"):        bench_cpu.py --threads 2 (writes
#      cpu_*_2t_wall.*: on another CPU than the README table's, rename them with the machine, as
#      cpu_*_2t_wall_zen1_avx2.* were)
#   2. AWQ / SmoothQuant / W8A8 / FP8 (README "AWQ, SmoothQuant, W8A8, FP8"): quality_algorithms.py
#   3. RTN / GPTQ / GPTQ act-order grid (README "Quality on SmolLM2-135M-Instruct"): quality_smollm2.py,
#      one thread, 32 x 512 calibration tokens, as the table states. QUALITY_ONLY="w4g64s w3g64a" and
#      QUALITY_METHODS="rtn gptq-actorder" limit it (written to quality_smollm2_rerun.csv, next to the
#      full grid's CSV): the whole grid takes hours on a slow machine
# Each script writes its CSV (+ plot) under benchmarks/results/ with the machine and versions; this
# script logs start / end times and the load average to benchmarks/results/remeasure_readme.log.
set -euo pipefail
cd "$(dirname "$0")/.."
log=benchmarks/results/remeasure_readme.log
{
  echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
  python -c "import torch, transformers, platform; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', platform.python_version())"
  grep -m1 'model name' /proc/cpuinfo || true
} > "$log"
step() { echo "== $* : $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$log"; "$@"; }
step python benchmarks/bench_cpu.py --threads 2
step python benchmarks/quality_algorithms.py
if [ -n "${QUALITY_ONLY:-}" ]; then
  # shellcheck disable=SC2086  # one scheme name per word
  step env OMP_NUM_THREADS=1 python benchmarks/quality_smollm2.py --nsamples 32 --only $QUALITY_ONLY \
    --methods ${QUALITY_METHODS:-rtn gptq-actorder gptq} --out benchmarks/results/quality_smollm2_rerun.csv
else
  step env OMP_NUM_THREADS=1 python benchmarks/quality_smollm2.py --nsamples 32
fi
echo "end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$log"

"""Time the size-budget planner's measurement pass against one GPTQ act-order run of SmolLM2-135M, in
one process on the same calibration windows (issue #16: the measurement should cost about twice one
GPTQ run at most). Appends a row to benchmarks/results/time_budget.csv.

    python benchmarks/time_budget.py [--nsamples 32] [--fisher-samples 16]
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--fisher-samples", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "time_budget.csv"))
    a = p.parse_args()

    import transformers

    import quantkern as qk
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import tokenize_text
    from quantkern.models import load_model

    model, tok = load_model("smollm2")
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration")), a.nsamples, a.seq_len)
    base = qk.GPTQConfig(actorder=True, nsamples=a.nsamples, seq_len=a.seq_len)
    t = time.perf_counter()
    qk.GPTQQuantizer(copy.deepcopy(model), base, verbose=False).quantize(calib)
    gptq = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as cache:
        planner = qk.BudgetPlanner(target_bpw=3.5, fisher_samples=a.fisher_samples, cache_dir=cache, verbose=False)
        t = time.perf_counter()
        plan = planner.plan(model, calib, base)
        measure = time.perf_counter() - t
        t = time.perf_counter()
        qk.BudgetPlanner(target_bpw=4.0, cache_dir=cache, verbose=False,
                         fisher_samples=a.fisher_samples).plan(model, calib, base)
        replan = time.perf_counter() - t
    row = dict(gptq_seconds=f"{gptq:.1f}", measure_seconds=f"{measure:.1f}", ratio=f"{measure / gptq:.2f}",
               replan_seconds=f"{replan:.2f}", allocate_seconds=f"{plan.plan_seconds:.3f}",
               candidates=len(planner.candidates), sites=len(plan.sites), nsamples=a.nsamples,
               fisher_samples=a.fisher_samples, quantkern=qk.__version__, torch=torch.__version__,
               transformers=transformers.__version__, cpu=platform.processor() or platform.machine(),
               threads=torch.get_num_threads())
    out = Path(a.out)
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    print(row)


if __name__ == "__main__":
    main()

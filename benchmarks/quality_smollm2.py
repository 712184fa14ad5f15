"""Perplexity of SmolLM2-135M-Instruct: fp32 vs RTN vs GPTQ over the README's grid of schemes.

    python benchmarks/quality_smollm2.py                 # the full grid (CPU, ~1 h on 2 cores)
    python benchmarks/quality_smollm2.py --only w4g128s  # one scheme

Calibration: random 512-token windows of the built-in calibration text; evaluation: the first
``--eval-windows`` 512-token windows of the disjoint held-apart text. Results are appended row by row
to benchmarks/results/quality_smollm2.csv (with versions and the machine), so an interrupted run keeps
what it measured.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import time
from pathlib import Path

import torch

SCHEMES = {  # name: (bits, group_size, sym)
    "w4g64s": (4, 64, True), "w4g64a": (4, 64, False), "w4g128s": (4, 128, True), "w4g128a": (4, 128, False),
    "w3g64s": (3, 64, True), "w3g64a": (3, 64, False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(SCHEMES))
    p.add_argument("--methods", nargs="*", default=["rtn", "gptq-actorder", "gptq"])
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--mse", action="store_true", help="GPTQ with the clipping search")
    p.add_argument("--ppl-fp32", type=float, default=None, help="reuse a measured fp32 perplexity")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_smollm2.csv"))
    a = p.parse_args()

    import quantkern as qk
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text
    from quantkern.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration")), a.nsamples, a.seq_len)
    held = tokenize_text(tok, builtin_text("eval"))
    out = Path(a.out)
    new = not out.exists()
    f = out.open("a", newline="")
    w = csv.writer(f)
    if new:
        w.writerow(["scheme", "method", "bits", "group_size", "sym", "act_order", "mse", "ppl", "ppl_fp32",
                    "increase", "quant_seconds", "nsamples", "eval_tokens", "torch", "cpu", "threads"])
    meta = [torch.__version__, platform.processor() or platform.machine(), torch.get_num_threads()]
    ppl_fp = a.ppl_fp32 or perplexity(model, held, max_windows=a.eval_windows, progress=False)
    n_eval = a.eval_windows * 512
    print(f"fp32 perplexity {ppl_fp:.4f}", flush=True)
    w.writerow(["fp32", "none", 32, "", "", "", "", f"{ppl_fp:.4f}", f"{ppl_fp:.4f}", "0", "", "", n_eval, *meta])
    f.flush()
    for name in a.only:
        bits, gs, sym = SCHEMES[name]
        for method in a.methods:
            m = copy.deepcopy(model)
            t = time.perf_counter()
            act = method == "gptq-actorder"
            if method == "rtn":
                qk.RTNQuantizer(m, bits=bits, group_size=gs, sym=sym, verbose=False).quantize()
            else:
                qk.GPTQQuantizer(m, bits=bits, group_size=gs, sym=sym, actorder=act, mse=a.mse, nsamples=a.nsamples,
                                 seq_len=a.seq_len, verbose=False).quantize(calib)
            secs = time.perf_counter() - t
            ppl = perplexity(m, held, max_windows=a.eval_windows, progress=False)
            print(f"{name:8s} {method:14s} ppl {ppl:.4f} (+{ppl - ppl_fp:.4f}) in {secs:.0f} s", flush=True)
            w.writerow([name, method, bits, gs, sym, act, a.mse and method != "rtn", f"{ppl:.4f}", f"{ppl_fp:.4f}",
                        f"{ppl - ppl_fp:.4f}", f"{secs:.1f}", a.nsamples, n_eval, *meta])
            f.flush()
            del m
    f.close()
    from plot_quality import plot_csv  # (benchmarks/ is on the path when run as a script)

    print("plot:", plot_csv(out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

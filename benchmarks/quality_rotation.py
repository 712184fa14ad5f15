"""Perplexity of SmolLM2-135M-Instruct quantized with and without the offline Hadamard rotations of
``qk.rotate`` (issue #20): RTN and GPTQ (act-order) over a few schemes.

    python benchmarks/quality_rotation.py                          # the default grid (CPU, ~40 min on 2 cores)
    python benchmarks/quality_rotation.py --only w3g64a --methods gptq-actorder

Same calibration and held-apart text as benchmarks/quality_smollm2.py (random 512-token windows of the
built-in calibration text; the first ``--eval-windows`` 512-token windows of the disjoint eval text).
Rows are appended one by one to benchmarks/results/quality_rotation.csv with the machine and versions.
The rotated model's fp32 perplexity is measured too (it must equal the original's: the rotation is exact).
Runs are ordered rotated first, then the plain baselines, so that an interrupted run keeps the new ones.
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
    "w4g64s": (4, 64, True), "w4g128s": (4, 128, True), "w4g128a": (4, 128, False),
    "w3g64s": (3, 64, True), "w3g64a": (3, 64, False),
}
DEFAULT_GRID = [  # (method, scheme)
    ("rtn", "w4g64s"), ("rtn", "w4g128s"), ("rtn", "w3g64s"), ("rtn", "w3g64a"),
    ("gptq-actorder", "w3g64a"), ("gptq-actorder", "w3g64s"), ("gptq-actorder", "w4g128s"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="schemes (default: the grid)")
    p.add_argument("--methods", nargs="*", default=None, help="rtn, gptq-actorder, gptq")
    p.add_argument("--rotate", nargs="*", default=["yes", "no"], help="yes / no, in that order")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="rotation seed")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_rotation.csv"))
    a = p.parse_args()

    import transformers

    import quantkern as qk
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text
    from quantkern.models import load_model

    grid = [(m, s) for m, s in DEFAULT_GRID if (a.only is None or s in a.only) and (a.methods is None or m in a.methods)]
    if a.only is not None and a.methods is not None:
        grid = [(m, s) for m in a.methods for s in a.only]
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration")), a.nsamples, a.seq_len)
    held = tokenize_text(tok, builtin_text("eval"))
    out = Path(a.out)
    new = not out.exists()
    f = out.open("a", newline="")
    w = csv.writer(f)
    if new:
        w.writerow(["scheme", "method", "rotate", "bits", "group_size", "sym", "act_order", "ppl", "ppl_fp32",
                    "increase", "rotate_seconds", "quant_seconds", "nsamples", "eval_tokens", "quantkern", "torch",
                    "transformers", "cpu", "threads"])
    meta = [qk.__version__, torch.__version__, transformers.__version__,
            platform.processor() or platform.machine(), torch.get_num_threads()]
    n_eval = a.eval_windows * a.seq_len

    def ppl_of(m):
        return perplexity(m, held, seq_len=a.seq_len, max_windows=a.eval_windows, progress=False)

    ppl_fp = ppl_of(model)
    print(f"fp32 perplexity {ppl_fp:.4f}", flush=True)
    w.writerow(["fp32", "none", False, 32, "", "", "", f"{ppl_fp:.4f}", f"{ppl_fp:.4f}", "0", "", "", "", n_eval, *meta])
    t = time.perf_counter()
    rotated = qk.rotate(copy.deepcopy(model), seed=a.seed)
    rot_secs = time.perf_counter() - t
    if "yes" in a.rotate:
        ppl_rot = ppl_of(rotated)
        print(f"fp32 rotated perplexity {ppl_rot:.4f} (rotation {rot_secs:.1f} s)", flush=True)
        w.writerow(["fp32", "none", True, 32, "", "", "", f"{ppl_rot:.4f}", f"{ppl_fp:.4f}",
                    f"{ppl_rot - ppl_fp:.4f}", f"{rot_secs:.1f}", "", "", n_eval, *meta])
    f.flush()
    for rot in a.rotate:
        base = rotated if rot == "yes" else model
        for method, name in grid:
            bits, gs, sym = SCHEMES[name]
            m = copy.deepcopy(base)
            t = time.perf_counter()
            act = method == "gptq-actorder"
            if method == "rtn":
                qk.RTNQuantizer(m, bits=bits, group_size=gs, sym=sym, verbose=False).quantize()
            else:
                qk.GPTQQuantizer(m, bits=bits, group_size=gs, sym=sym, actorder=act, nsamples=a.nsamples,
                                 seq_len=a.seq_len, verbose=False).quantize(calib)
            secs = time.perf_counter() - t
            ppl = ppl_of(m)
            print(f"{name:8s} {method:14s} rotate={rot:3s} ppl {ppl:.4f} (+{ppl - ppl_fp:.4f}) in {secs:.0f} s",
                  flush=True)
            w.writerow([name, method, rot == "yes", bits, gs, sym, act, f"{ppl:.4f}", f"{ppl_fp:.4f}",
                        f"{ppl - ppl_fp:.4f}", f"{rot_secs:.1f}" if rot == "yes" else "", f"{secs:.1f}", a.nsamples,
                        n_eval, *meta])
            f.flush()
            del m
    f.close()
    from plot_quality import plot_csv  # (benchmarks/ is on the path when run as a script)

    print("plot:", plot_csv(out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

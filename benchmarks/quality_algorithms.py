"""Perplexity of SmolLM2-135M-Instruct under the algorithms beyond GPTQ: AWQ vs RTN (same settings),
SmoothQuant W8A8 vs plain W8A8, FP8 W8A8 / weight-only, against fp32 measured in the same run.

    python benchmarks/quality_algorithms.py                    # everything (CPU, ~15 min on 2 cores)
    python benchmarks/quality_algorithms.py --only awq rtn     # some methods
    python benchmarks/quality_algorithms.py --tiny             # a random tiny Llama: checks the script

Calibration: ``--nsamples`` random 512-token windows of the built-in calibration text; evaluation: the
first ``--eval-windows`` 512-token windows of the disjoint evaluation text. Rows are appended one by
one to benchmarks/results/quality_algorithms.csv (with torch / transformers versions, the machine and
the thread count), so an interrupted run keeps what it measured.
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

METHODS = ("rtn", "awq", "w8a8", "smoothquant", "fp8", "fp8-gptq", "smoothquant-all", "fp8-wo", "fp8-wo-gptq")  # run in this order


def build(method: str, bits: int, group_size: int, alpha: float, awq_grid: int):
    """(quantizer class, settings, needs data) of one row."""
    import quantkern as qk

    w4 = dict(bits=bits, group_size=group_size)
    return {
        "rtn": (qk.RTNQuantizer, dict(w4, sym=False), False),
        "awq": (qk.AWQQuantizer, dict(w4, zero_point=True, n_grid=awq_grid, max_search_tokens=512, clip_tokens=256),
                True),
        "w8a8": (qk.W8A8Quantizer, {}, False),
        "smoothquant": (qk.SmoothQuantQuantizer, dict(alpha=alpha), True),
        "smoothquant-all": (qk.SmoothQuantQuantizer, dict(alpha=alpha, smooth_linear_producers=True), True),
        "fp8": (qk.FP8Quantizer, {}, False),
        "fp8-gptq": (qk.FP8Quantizer, dict(weight_method="gptq"), True),
        "fp8-wo": (qk.FP8Quantizer, dict(act_dtype=None), False),
        "fp8-wo-gptq": (qk.FP8Quantizer, dict(act_dtype=None, weight_method="gptq"), True),
    }[method]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--awq-grid", type=int, default=20, help="AWQ alpha / clipping grid points (paper: 20)")
    p.add_argument("--tiny", action="store_true", help="random 2-block Llama instead of SmolLM2 (script check)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_algorithms.csv"))
    a = p.parse_args()

    import transformers

    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text

    torch.manual_seed(0)
    if a.tiny:  # random weights, byte-level "tokens": exercises every code path in seconds
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
        a.group_size = min(a.group_size, 32)
        model_name = "tiny-random-llama"
        calib_ids = torch.tensor(list(builtin_text("calibration").encode()))
        held = torch.tensor(list(builtin_text("eval").encode()))
    else:
        from quantkern.models import load_model

        model, tok = load_model("smollm2")
        model_name = "SmolLM2-135M-Instruct"
        calib_ids = tokenize_text(tok, builtin_text("calibration"))
        held = tokenize_text(tok, builtin_text("eval"))
    calib = sample_windows(calib_ids, a.nsamples, 512)
    out = Path(a.out if not a.tiny else "/tmp/quality_algorithms_tiny.csv")
    new = not out.exists()
    f = out.open("a", newline="")
    w = csv.writer(f)
    if new:
        w.writerow(["model", "method", "settings", "ppl", "ppl_fp32", "ratio_to_fp32", "quant_seconds", "nsamples",
                    "eval_tokens", "torch", "transformers", "cpu", "threads"])
    meta = [torch.__version__, transformers.__version__, platform.processor() or platform.machine(),
            torch.get_num_threads()]
    n_eval = a.eval_windows * 512
    ppl_fp = perplexity(model, held, max_windows=a.eval_windows, progress=False)
    print(f"fp32 perplexity {ppl_fp:.4f}", flush=True)
    w.writerow([model_name, "fp32", "", f"{ppl_fp:.4f}", f"{ppl_fp:.4f}", "1.0000", "", "", n_eval, *meta])
    f.flush()
    for method in a.only:
        cls, kw, needs_data = build(method, a.bits, a.group_size, a.alpha, a.awq_grid)
        m = copy.deepcopy(model)
        t = time.perf_counter()
        cls(m, verbose=False, **kw).quantize(calib if needs_data else None)
        secs = time.perf_counter() - t
        ppl = perplexity(m, held, max_windows=a.eval_windows, progress=False)
        settings = " ".join(f"{k}={v}" for k, v in kw.items())
        print(f"{method:12s} {settings:50s} ppl {ppl:.4f} (x{ppl / ppl_fp:.4f}) in {secs:.0f} s", flush=True)
        w.writerow([model_name, method, settings, f"{ppl:.4f}", f"{ppl_fp:.4f}", f"{ppl / ppl_fp:.4f}", f"{secs:.1f}",
                    a.nsamples if needs_data else 0, n_eval, *meta])
        f.flush()
        del m
    f.close()
    from plot_quality import plot_csv  # (benchmarks/ is on the path when run as a script)

    print("plot:", plot_csv(out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""What int8 activations cost in quality: SmolLM2-135M perplexity with the C++ CPU kernels' fp32
activations against their int8 ones (``int8_activations``: rows quantized per block of 32, as
llama.cpp's Q8_0 does for its Q4_0 / Q8_0 dot products), same weights, same text, one run.

RTN W4 g32 sym (GGUF Q4_0's numbers) and W8 g32 sym (Q8_0's), lm_head dense. Appends to
``benchmarks/results/quality_int8_activations.csv`` with the machine and versions.

    python benchmarks/quality_int8_activations.py [--eval-windows 32]
"""

from __future__ import annotations

import argparse
import csv
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "quality_int8_activations.csv"))
    a = p.parse_args()

    import transformers

    import quantkern as qk
    from quantkern.calibration import builtin_text
    from quantkern.eval import perplexity, tokenize_text
    from quantkern.kernels.cpu import ops
    from quantkern.kernels.cpu.backend import int8_activations
    from quantkern.models import load_model
    from quantkern.nn import build_kernels

    model, tok = load_model("smollm2")
    held = tokenize_text(tok, builtin_text("eval"))
    rows = [("fp32", "-", perplexity(model, held, max_windows=a.eval_windows, progress=False))]
    print(rows[-1], flush=True)
    for bits in (4, 8):
        m, _ = load_model("smollm2")
        qk.RTNQuantizer(m, bits=bits, group_size=32, sym=True, scale_dtype="float16", verbose=False).quantize()
        build_kernels(m, dtype=torch.float32)
        for int8 in (False, True):
            int8_activations(m, int8)
            rows.append((f"RTN W{bits} g32 sym", "int8" if int8 else "fp32",
                         perplexity(m, held, max_windows=a.eval_windows, progress=False)))
            print(rows[-1], flush=True)
    out = Path(a.out)
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["weights", "activations", "ppl", "eval_tokens", "cpu_isa", "threads", "torch", "transformers"])
        for r in rows:
            w.writerow([*r[:2], round(r[2], 4), a.eval_windows * 512, ops.best_isa(), torch.get_num_threads(),
                        torch.__version__, transformers.__version__])
    print(f"appended to {out} ({platform.processor() or platform.machine()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

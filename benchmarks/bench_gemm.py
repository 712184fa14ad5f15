"""Weight-only quantized GEMM benchmark: every registered quantkern kernel vs cuBLAS and torch's int4.

For each layer shape (K = in_features x N = out_features), activation dtype, bit width and M, this
times ``y = x @ dequant(W)`` through

- ``cublas``: ``torch.matmul`` with the dense weight in the activation dtype (the baseline of every
  ratio, measured in the same run),
- every backend in quantkern's kernel registry (Triton, CUDA, CPU, reference, ... whatever is
  registered) whose ``can_implement`` accepts the layer and input, through the backend's own
  repacked layout; a backend that declines is listed with its reason,
- ``torch_int4``: ``torch.ops.aten._weight_int4pack_mm`` (4-bit, group sizes 32..256, CUDA only),

and writes ``benchmarks/results/gemm_<gpu>[_quick].csv`` (one row per method and point, with the GPU
name and torch / triton / CUDA versions; each row is written and flushed as it is measured, so a run
stopped by a time limit keeps what it measured) and a PNG of the speedup over cuBLAS (needs matplotlib).

HBM roofline %: bytes a method must move (its weight format: packed codes + scales + zeros for the
quantized ones, the dense matrix for cuBLAS; plus activations in and out) / time / peak bandwidth.
Peak: 3.35 TB/s for H100 SXM, 4.8 TB/s for H200, ... detected from the device name; ``--peak-tbps``
overrides. Each time is the median of ``--reps`` runs with L2 flushed before each (a decode weight
must come from HBM, not from a 50 MB L2). ``rel_err`` is ``|y - ref| / |ref|`` against the fp32
reference, so a fast wrong kernel shows up in the same table.

    python benchmarks/bench_gemm.py                 # the full grid (tens of minutes on an H100)
    python benchmarks/bench_gemm.py --quick         # 2 shapes, W4/W8, 6 values of M
    python benchmarks/bench_gemm.py --shape 4096x14336 --m 1,16,256 --bits 4 --dtypes bf16
    python benchmarks/bench_gemm.py --quick --methods triton,torch_int4 --tag triton
    TRITON_INTERPRET=1 python benchmarks/bench_gemm.py --device cpu --shape 256x128 --m 1,17 --reps 2
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantkern.core import QuantizedWeight, WeightScheme  # noqa: E402
from quantkern.kernels import dequantize_gptq, registered_kernels  # noqa: E402
from quantkern.kernels.registry import CallShape, KernelDeclined, kernel_query  # noqa: E402
from quantkern.nn import QuantLinear  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK = dict(shapes=[(4096, 4096), (4096, 14336)], m=[1, 4, 16, 64, 256, 1024], bits=[4, 8])
PEAK_TBPS = [("H200", 4.8), ("H100 PCIE", 2.0), ("H100", 3.35), ("H800", 3.35), ("A100-SXM4-80GB", 2.039),
             ("A100 80GB PCIE", 1.935), ("A100", 1.555), ("L40S", 0.864), ("A10G", 0.6), ("RTX 4090", 1.008)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CsvRows:
    """Rows written to a CSV as they are measured (header first, each row flushed): a run killed by a
    time limit keeps every point it finished."""

    def __init__(self, path: str, append: bool = False):
        self.path, self.fields = path, None
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.new = not (append and os.path.exists(path) and os.path.getsize(path))
        self.f = open(path, "a" if not self.new else "w", newline="")

    def write(self, row: dict) -> None:
        if self.fields is None:
            self.fields = list(row)
            self.w = csv.DictWriter(self.f, fieldnames=self.fields)
            if self.new:
                self.w.writeheader()
        self.w.writerow(row)
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def peak_bandwidth(name: str) -> float | None:
    """Peak HBM bandwidth in TB/s from a device name, or None if unknown."""
    up = name.upper()
    return next((bw for key, bw in PEAK_TBPS if key.upper() in up), None)


def versions(device: torch.device) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # triton is optional for the baselines
        triton_v = "n/a"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(gpu=gpu, torch=torch.__version__, triton=triton_v, cuda=torch.version.cuda or "n/a")


class Timer:
    """Median wall time of ``fn`` in microseconds; on CUDA with events and an L2 flush before each run."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        fn()  # warm-up: compiles / autotunes / builds once
        times = []
        for _ in range(self.reps):
            if self.flush is not None:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)


def random_layer(k: int, n: int, bits: int, group_size: int, sym: bool, act_order: bool, device, seed=0):
    """A QuantizedWeight with uniform random codes / zeros and plausible scales (built on ``device``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    g = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, device=device, dtype=torch.int32)
    scales = torch.rand(g, n, generator=gen, device=device) * 0.002 + 0.001
    zeros = (torch.full((g, n), 1 << (bits - 1), device=device, dtype=torch.int32) if sym
             else torch.randint(0, 1 << bits, (g, n), generator=gen, device=device, dtype=torch.int32))
    g_idx = torch.arange(k, device=device, dtype=torch.int32) // (k if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen, device=device)]
    return QuantizedWeight(codes, scales, zeros, g_idx, WeightScheme(bits, group_size, sym, act_order))


def torch_int4(qw: QuantizedWeight, dtype: torch.dtype):
    """``fn(x)`` running ``aten._weight_int4pack_mm`` on ``qw`` (same weights), or a reason string."""
    s = qw.scheme
    if qw.codes.device.type != "cuda":
        return "CUDA only"
    if s.bits != 4 or s.act_order or s.group_size not in (32, 64, 128, 256):
        return "needs 4-bit, no act-order, group 32/64/128/256"
    try:
        q = qw.codes  # [N, K]; torch's layout: two codes a byte, even k in the high nibble
        w_uint8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
        scale = qw.scales.to(dtype)
        # ours: (q - z) * s = (q - 8) * s + (8 - z) * s; torch: (q - 8) * scale + zero
        zero = ((8 - qw.zeros).to(torch.float32) * qw.scales.float()).to(dtype)
        sz = torch.stack([scale, zero], dim=-1).contiguous()
        gs = s.group_size
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, gs, sz)
    except Exception as e:  # older / newer torch builds differ in what this private op accepts
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def triton_config(m, n, k, bits, dtype, method) -> str:
    """The launch config quantkern's Triton autotuner picked for this point ('' for other methods)."""
    if method != "quantkern_triton":
        return ""
    from quantkern.triton_kernels import DECODE_MAX_M, tuned_configs
    from quantkern.triton_kernels._tuning import bucket_m

    op = "gemv" if m <= DECODE_MAX_M else "gemm"
    for key, cfg in tuned_configs().items():
        if key[:5] == (op, bucket_m(m), n, k, bits) and key[7] == dtype:
            return " ".join(f"{a}={b}" for a, b in cfg.items())
    return ""


def quant_bytes(k, n, m, bits, group_size, sym, act_order, elt=2) -> int:
    g = 1 if group_size == -1 else -(-k // group_size)
    w = k * n * bits // 8 + g * n * elt + (0 if sym else g * n * bits // 8) + (4 * k if act_order else 0)
    return w + (m * k + m * n) * elt


def run(args) -> list[dict]:
    device = torch.device(args.device)
    info = versions(device)
    peak = args.peak_tbps or peak_bandwidth(info["gpu"])
    print(f"# {info['gpu']} | torch {info['torch']} | triton {info['triton']} | CUDA {info['cuda']} | "
          f"peak {peak if peak else '?'} TB/s")
    print(f"# registered backends: {[c.backend.value for c in registered_kernels('gptq')]}")
    timer = Timer(device, args.reps)
    rows, declined = [], set()
    sink = CsvRows(output_stem(info["gpu"], args) + ".csv")
    for k, n in args.shapes:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            dense = torch.randn(k, n, device=device, dtype=dtype) * 0.02
            for bits in args.bits:
                qw = random_layer(k, n, bits, args.group_size, args.sym, args.act_order, device)
                layer = QuantLinear.from_quantized(qw, dtype=dtype).to(device)
                w_ref = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, k,
                                        dtype=torch.float32)
                int4 = torch_int4(qw, dtype)
                built: dict = {}
                for m in args.m:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    ref = x.float() @ w_ref
                    methods = [("cublas", "torch.matmul", lambda x=x: x @ dense, k * n * 2, None)]
                    for cls in registered_kernels("gptq"):
                        if args.methods and cls.backend.value not in args.methods:
                            continue
                        ok, why = cls.can_implement(*kernel_query(layer, x))
                        if not ok:
                            if (cls.backend, why) not in declined:
                                declined.add((cls.backend, why))
                                print(f"#   {cls.backend.value} declines {layer.describe()} {dname}: {why}")
                            continue
                        if cls not in built:
                            try:  # repacks once per layer, like QuantLinear does
                                built[cls] = cls.prepare(layer.weight_tensors(), dtype)
                            except KernelDeclined as e:
                                built[cls] = e
                        kern = built[cls]
                        if isinstance(kern, KernelDeclined) or not CallShape(m, n, k).fits(kern.max_m):
                            print(f"#   {cls.backend.value} declines {layer.describe()} {dname} at M={m}: "
                                  f"{kern if isinstance(kern, KernelDeclined) else f'its layout runs M <= {kern.max_m}'}")
                            continue
                        methods.append((f"quantkern_{cls.backend.value}", cls.__name__,
                                        lambda kern=kern, x=x: kern.apply(x), None, True))
                    if args.methods and "torch_int4" not in args.methods:
                        pass
                    elif callable(int4):
                        methods.append(("torch_int4", "aten._weight_int4pack_mm", lambda x=x: int4(x), None, True))
                    elif m == args.m[0] and bits == 4:
                        print(f"#   torch_int4 skipped: {int4}")
                    cublas_us = None
                    for name, impl, fn, wbytes, _ in methods:
                        try:
                            y = fn()
                            us = timer(fn)
                        except Exception as e:  # one broken method must not hide the others
                            print(f"#   {name} failed at M={m}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                            continue
                        rel = float((y.float() - ref).norm() / ref.norm().clamp(min=1e-12))
                        if name == "cublas":
                            cublas_us = us
                            nbytes = wbytes + (m * k + m * n) * 2
                            rel = float("nan")  # a different (dense random) weight: no error to report
                        else:
                            nbytes = quant_bytes(k, n, m, bits, args.group_size, args.sym, args.act_order)
                        gbps = nbytes / us / 1e3
                        rows.append(dict(
                            **info, K=k, N=n, dtype=dname, bits=bits, group_size=args.group_size, sym=args.sym,
                            act_order=args.act_order, M=m, method=name, impl=impl, time_us=round(us, 2),
                            tflops=round(2 * m * n * k / us / 1e6, 2), gbps=round(gbps, 1),
                            roofline_pct=round(100 * gbps / (peak * 1e3), 1) if peak else "",
                            speedup_vs_cublas=round(cublas_us / us, 3) if cublas_us else "",
                            rel_err=f"{rel:.2e}", bytes=nbytes, config=triton_config(m, n, k, bits, dtype, name)))
                        r = rows[-1]
                        sink.write(r)
                        print(f"{k:>5}x{n:<5} {dname} W{bits} M={m:<5} {name:<18} {us:10.1f} us  "
                              f"{r['speedup_vs_cublas']!s:>6}x cuBLAS  {r['roofline_pct']!s:>5}% HBM  "
                              f"err {r['rel_err']}", flush=True)
                del layer, built, w_ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    sink.close()
    print(f"# wrote {sink.path} ({len(rows)} rows)")
    return rows


def output_stem(gpu: str, args) -> str:
    return os.path.join(args.out, "gemm_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
                        + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else ""))


def write(rows: list[dict], args) -> None:
    """The PNG of the speedups (the CSV is written row by row by :func:`run`)."""
    if not rows:
        return
    stem = output_stem(rows[0]["gpu"], args)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot (pip install matplotlib)")
        return
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes):
        series: dict = {}
        for r in rows:
            if (r["K"], r["N"]) == (k, n) and r["method"] != "cublas" and r["speedup_vs_cublas"] != "":
                series.setdefault((r["method"], r["dtype"], r["bits"]), []).append((r["M"], r["speedup_vs_cublas"]))
        for (meth, dname, bits), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    label=f"{meth.replace('quantkern_', '')} {dname} W{bits}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={k} x N={n}")
        ax.set_xlabel("M")
        ax.set_ylabel("speedup over cuBLAS (same dtype)")
        ax.legend(fontsize=6)
    r0 = rows[0]
    fig.suptitle(f"{r0['gpu']} | torch {r0['torch']} | triton {r0['triton']} | CUDA {r0['cuda']} | "
                 f"g{r0['group_size']} {'sym' if r0['sym'] else 'asym'}{' act-order' if r0['act_order'] else ''}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"# wrote {stem}.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 shapes, W4/W8, 6 values of M")
    p.add_argument("--shape", action="append", help="KxN (in x out features); repeatable; default: the LLM set")
    p.add_argument("--m", help="comma-separated M values")
    p.add_argument("--bits", help="comma-separated bit widths (default 2,3,4,8)")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated from fp16,bf16")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true", help="symmetric zeros (default asymmetric)")
    p.add_argument("--act-order", action="store_true", help="random act-order g_idx")
    p.add_argument("--methods", help="comma-separated subset of: triton, cuda, cpu, reference, torch_int4 "
                   "(default: all; cuBLAS always runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--peak-tbps", type=float, help="override the peak HBM bandwidth (TB/s)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default="", help="suffix of the output file names")
    a = p.parse_args(argv)
    a.shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in a.shape] if a.shape
                else QUICK["shapes"] if a.quick else SHAPES)
    a.m = [int(v) for v in a.m.split(",")] if a.m else QUICK["m"] if a.quick else M_VALUES
    a.bits = [int(v) for v in a.bits.split(",")] if a.bits else QUICK["bits"] if a.quick else [2, 3, 4, 8]
    a.dtypes = a.dtypes.split(",")
    a.methods = a.methods.split(",") if a.methods else None
    bad = [d for d in a.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtypes {bad}; choose from {list(DTYPES)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu (with TRITON_INTERPRET=1 to include Triton) for a smoke run")
    return a


if __name__ == "__main__":
    args = parse_args()
    write(run(args), args)

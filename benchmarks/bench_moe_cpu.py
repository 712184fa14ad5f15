"""CPU grouped expert kernel benchmark (issue #15): one MoE layer's two expert projections (gate/up on
the gathered tokens, down on the pair-ordered activations) with W4 g128 experts, three ways, in the
same run and interleaved round-robin (a busy machine slows every method alike):

- ``reference``: the grouped reference (``quantkern::moe_wna16_ref``: per routed expert, dequantize +
  matmul);
- ``cpu``: the C++ grouped kernel (``quantkern_cpu::moe_gemm``, one call per projection);
- ``loop``: a host loop over the routed experts calling the dense ``quantkern_cpu::gemm`` on each
  expert's rows (same packed weights, the stacked layout's slices).

Shapes: a Qwen3-30B-A3B layer (H 2048, I 768, 128 experts, top-8) and an upcycled SmolLM2-135M
(H 576, I 1536, 4 experts, top-2); T = 1 (a decode step) and T = 32 tokens; fp32 and bf16
activations. Each repetition draws a new random routing and reads a 96 MB buffer first (untimed), so
the experts' weights come from memory as in a decode step of a whole model. Reports the minimum and
median over repetitions and the ratios of the minima. Weights are random codes (the timing does not
depend on them); outputs of the three methods are checked against each other first.

Usage: ``python benchmarks/bench_moe_cpu.py [--threads N] [--reps R]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from quantkern.core import WeightScheme
from quantkern.kernels.cpu import build
from quantkern.kernels.cpu.moe import CpuGroupedKernel
from quantkern.kernels.moe import GroupedReferenceKernel, route
from quantkern.nn.quant_experts import StackedGPTQ

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "smollm2-upcycled": (576, 1536, 4, 2)}


def random_stacked(e, k, n, gen):
    proj = StackedGPTQ(e, k, n, WeightScheme(4, 128, False), dtype=torch.float16)
    with torch.no_grad():
        proj.qweight.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, proj.qweight.shape, generator=gen, dtype=torch.int32))
        proj.qzeros.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, proj.qzeros.shape, generator=gen, dtype=torch.int32))
        proj.scales.copy_((torch.rand(proj.scales.shape, generator=gen) + 0.5) * (0.125 / k ** 0.5))
    return proj


class Loop:
    """The routed experts one by one through the dense op, on slices of the stacked packed layout."""

    def __init__(self, grouped: CpuGroupedKernel):
        p = grouped.packed
        self.experts = [(p.w[i], p.scales[i], p.zs[i], p.gptr[i], None if p.src is None else p.src[i])
                        for i in range(p.num_experts)]
        self.cb, self.n = p.cb, p.out_features
        self.op = torch.ops.quantkern_cpu.gemm.default

    def apply(self, x, rows, offsets):
        p = rows.numel() if rows is not None else x.shape[0]
        out = x.new_zeros(p, self.n)
        off = offsets.tolist()
        for e, args in enumerate(self.experts):
            a, b = off[e], off[e + 1]
            if a < b:
                xe = x[rows[a:b]] if rows is not None else x[a:b]
                out[a:b] = self.op(xe, *args, self.cb, self.n, None, 0)
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build.load()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, best isa {torch.ops.quantkern_cpu.best_isa()}")
    flush = torch.ones(96 * 2 ** 20 // 4)
    gen = torch.Generator().manual_seed(0)
    for name, (h, i, e, top) in SHAPES.items():
        t0 = time.perf_counter()
        gate_up, down = random_stacked(e, h, 2 * i, gen), random_stacked(e, i, h, gen)
        for dtype in (torch.float32, torch.bfloat16):
            kern = {}
            kern["reference"] = [GroupedReferenceKernel(p.weight_tensors(), dtype) for p in (gate_up, down)]
            kern["cpu"] = [CpuGroupedKernel(p.weight_tensors(), dtype) for p in (gate_up, down)]
            kern["loop"] = [Loop(k) for k in kern["cpu"]]
            if dtype is torch.float32:
                print(f"\n{name}: H {h}, I {i}, {e} experts, top-{top}, W4 g128 (prepared in "
                      f"{time.perf_counter() - t0:.1f} s)")
            for t in (1, 32):
                x = torch.randn(t, h, generator=gen).to(dtype)
                reps = args.reps if name != "qwen3-30b-a3b" or t == 1 else max(3, args.reps // 3)
                times = {m: [] for m in kern}
                for rep in range(reps + 1):
                    idx = torch.stack([torch.randperm(e, generator=gen)[:top] for _ in range(t)])
                    r = route(idx, e)
                    xd = torch.randn(r.rows.numel(), i, generator=gen).to(dtype)  # the down projection's input
                    outs = {}
                    for m, (gu, dn) in kern.items():
                        flush.sum()
                        s = time.perf_counter()
                        y1 = gu.apply(x, r.rows, r.offsets)
                        y2 = dn.apply(xd, None, r.offsets)
                        if rep:  # the first round is a warm-up (and the cross-check)
                            times[m].append(time.perf_counter() - s)
                        outs[m] = (y1, y2)
                    if rep == 0:
                        for m in ("cpu", "loop"):
                            for a, b in zip(outs[m], outs["reference"]):
                                err = float((a.float() - b.float()).norm() / b.float().norm())
                                assert err < (1e-4 if dtype is torch.float32 else 3e-2), (name, dtype, t, m, err)
                best = {m: min(v) for m, v in times.items()}
                med = {m: statistics.median(v) for m, v in times.items()}
                row = ", ".join(f"{m} {best[m] * 1e3:.2f} ms (median {med[m] * 1e3:.2f})" for m in kern)
                print(f"  {str(dtype).split('.')[1]:8s} T={t:<3d} {row} | reference/cpu "
                      f"{best['reference'] / best['cpu']:.1f}x, loop/cpu {best['loop'] / best['cpu']:.2f}x "
                      f"[{reps} reps, {int((r.offsets[1:] > r.offsets[:-1]).sum())} experts routed]")


if __name__ == "__main__":
    main()

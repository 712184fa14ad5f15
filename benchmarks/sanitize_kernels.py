"""Run every CUDA kernel variant of csrc/cuda once on small, awkward shapes: the driver for
``compute-sanitizer --tool memcheck|racecheck`` in benchmarks/gpu_session.sh.

Each template instantiation is launched at least once: the GEMM for fp16 / bf16 x 4 / 8 bits x the
three M tiles (M = 1, 17, 33 -> MT 1, 2, 4), with K and N tails inside a tile, a ragged per-channel /
grouped scheme and, at M = 1, a K split (the workspace and the reduction kernel); the GEMV for fp16 /
bf16 x 2..8 bits at M = 3 with a K tail inside a chunk, an N tail inside a block, a group size that is
not a multiple of 32 (the per-code group branch) and two splits. Inputs are built on the CPU and
copied, so few other kernels run under the sanitizer. Each result is also checked against the fp32
reference (a sanitizer run that passes with wrong numbers would be no news); the exit status is 1 if
any is off, 2 if the extension is unavailable.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_kernels.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantkern.core import QuantizedWeight, WeightScheme  # noqa: E402
from quantkern.formats.gptq import pack_gptq  # noqa: E402
from quantkern.kernels.cuda import build, layout as L  # noqa: E402
from quantkern.kernels.reference import dequantize_gptq  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def qweight(k, n, bits, group_size, sym, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scheme = WeightScheme(bits, group_size, sym, False)
    g = scheme.num_groups(k)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32)
    zeros = (torch.full((g, n), 2 ** (bits - 1), dtype=torch.int32) if sym
             else torch.randint(0, 2**bits, (g, n), generator=gen, dtype=torch.int32))
    scales = ((torch.rand(g, n, generator=gen) + 0.5) * (2.0 / 2**bits) / k**0.5).to(dtype)
    g_idx = torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size)
    return QuantizedWeight(codes, scales, zeros, g_idx, scheme)


def reference(qw, x):
    t = pack_gptq(qw)
    w = dequantize_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, qw.scheme.bits, qw.in_features, dtype=x.dtype)
    return x.float() @ w.float()


def cases():
    for dname in DTYPES:
        for bits in (4, 8):
            for m, k, n, gs, splits in ((1, 200, 136, -1, 3), (17, 320, 264, 64, 1), (33, 136, 136, 128, 2)):
                yield "gemm", dname, bits, m, k, n, gs, splits
        for bits in range(2, 9):
            yield "gemv", dname, bits, 3, 1000, 100, 48, 2


def main() -> int:
    ok, why = build.load_extension()
    if not ok:
        print(f"CUDA extension unavailable: {why}")
        return 2
    dev = torch.device("cuda")
    bad = 0
    for path, dname, bits, m, k, n, gs, splits in cases():
        dtype = DTYPES[dname]
        qw = qweight(k, n, bits, gs, False, dtype, seed=bits * 100 + m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        if path == "gemm":
            p = L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, gs, dtype)
            y = torch.ops.quantkern.cuda_gemm_wna16(x.to(dev), p.qweight.to(dev), p.scales.to(dev), p.zeros.to(dev),
                                                    bits, p.group_size, n, splits)
        else:
            p = L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, dtype)
            y = torch.ops.quantkern.cuda_gemv_wna16(x.to(dev), p.qweight.to(dev), p.scales.to(dev), p.zeros.to(dev),
                                                    p.g_idx.to(dev), bits, splits)
        torch.cuda.synchronize()
        ref = reference(qw, x)
        err = float((y.cpu().float() - ref).norm() / ref.norm())
        good = err < 4 * torch.finfo(dtype).eps
        bad += not good
        print(f"{path} {dname} W{bits} M={m} K={k} N={n} g{gs} splits={splits}: rel err {err:.2e}"
              f"{'' if good else '  WRONG'}", flush=True)
    print(f"{bad} wrong result(s)" if bad else "all results match the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Grouped MoE kernels on a Qwen3-30B-A3B-shaped layer: the Triton fused kernel vs the reference.

One MoE layer (H=2048, I=768, E=128 experts, top-8, W4 g128 sym, fp16 by default) with random weights and
a random routing; for each T it times both projections as the grouped kernels run them in
``QuantExperts.forward`` (gate/up: ``[T, H]`` gathered through the pairs -> ``[8T, 2I]``; down: the
pair-ordered ``[8T, I]`` -> ``[8T, H]``) on ``triton`` and ``reference``, and writes one CSV row per
(T, projection, backend) as it is measured: median time (L2 flushed before each run, so the weights
come from HBM), the weight bytes of the experts the routing touched over that time, and the error
against the reference. The autotuner runs in the warm-up call of each point. Needs CUDA: without it
the script says so and exits 0 (``--device cpu`` is a smoke run of the script itself, on small shapes).

    python benchmarks/moe_kernels.py                            # T = 1, 16, 256
    python benchmarks/moe_kernels.py --tokens 1,64 --reps 50 --dtype bf16
    python benchmarks/moe_kernels.py --device cpu --hidden 64 --intermediate 32 --experts 4 --top-k 2 \
        --group-size 32 --backends reference --reps 1            # smoke run (TRITON_INTERPRET=1: add triton)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,16,256", help="comma-separated token counts T")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--backends", default="triton,reference", help="comma-separated grouped kernel backends")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    a.tokens = [int(v) for v in a.tokens.split(",")]
    a.backends = a.backends.split(",")
    return a


def random_projection(e, k, n, bits, group_size, dtype, device, seed):
    """A StackedGPTQ of ``e`` random experts (uniform codes, symmetric zeros, plausible scales), filled in place."""
    from quantkern.core import WeightScheme
    from quantkern.nn.quant_experts import StackedGPTQ

    proj = StackedGPTQ(e, k, n, WeightScheme(bits, group_size, True), dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        proj.qweight.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, proj.qweight.shape, generator=gen, device=device,
                                         dtype=torch.int64).to(torch.int32))
        word = 0
        for i in range(32 // bits):  # every zero 2**(bits-1) (the v2 symmetric zero), packed along N
            word |= (1 << (bits - 1)) << (i * bits)
        proj.qzeros.fill_(word - (1 << 32) if word >= 1 << 31 else word)
        proj.scales.copy_((torch.rand(proj.scales.shape, generator=gen, device=device) * 0.002 + 0.001).to(dtype))
    return proj


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("moe_kernels: skipped: no CUDA GPU (this benchmark times GPU kernels)")
        return 0
    from bench_gemm import CsvRows, Timer, peak_bandwidth, versions
    from quantkern.kernels.moe import route

    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    h, i, e, k = args.hidden, args.intermediate, args.experts, args.top_k
    gate_up = random_projection(e, h, 2 * i, args.bits, args.group_size, dtype, dev, seed=0)
    down = random_projection(e, i, h, args.bits, args.group_size, dtype, dev, seed=1)
    ver = versions(dev)
    peak = peak_bandwidth(ver["gpu"])
    name = f"moe_kernels_{ver['gpu'].replace(' ', '_')}.csv"
    out = CsvRows(os.path.join(args.out, name))
    timer = Timer(dev, args.reps)
    print(f"{ver['gpu']}: H={h} I={i} E={e} top-{k} W{args.bits} g{args.group_size} {args.dtype} -> {out.path}")
    for t in args.tokens:
        gen = torch.Generator(device=dev).manual_seed(t)
        x = torch.randn(t, h, generator=gen, device=dev).to(dtype)
        idx = torch.rand(t, e, generator=gen, device=dev).topk(k, dim=1).indices
        r = route(idx, e)
        active = int((r.offsets[1:] > r.offsets[:-1]).sum())
        xd = torch.randn(r.num_pairs, i, generator=gen, device=dev).to(dtype)
        for label, proj, inp, rows in (("gate_up", gate_up, x, r.rows), ("down", down, xd, None)):
            wbytes = active * (proj.qweight[0].numel() * 4 + proj.scales[0].numel() * proj.scales.element_size())
            proj.backend = "reference"
            ref = proj.grouped(inp, rows, r.offsets).float()
            for backend in args.backends:
                proj.backend = backend
                fn = lambda: proj.grouped(inp, rows, r.offsets)  # noqa: E731
                y = fn()
                us = timer(fn)
                tbps = wbytes / (us * 1e-6) / 1e12
                row = dict(T=t, pairs=r.num_pairs, active_experts=active, projection=label, backend=backend,
                           time_us=round(us, 2), weight_tbps=round(tbps, 3),
                           pct_peak=round(100 * tbps / peak, 1) if peak else "",
                           rel_err=f"{float((y.float() - ref).norm() / ref.norm()):.2e}", **ver)
                out.write(row)
                print(f"T={t:4d} {label:8s} {backend:10s} {us:10.1f} us {tbps:6.3f} TB/s")
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

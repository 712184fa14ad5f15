"""Where a decode step of quantkern's fast path goes: a torch.profiler table.

SmolLM2-135M, RTN W4 g32 sym decoder + W8 g32 lm_head (tied embeddings kept tied), FastDecoder
(static KV cache, compiled step), a ``--depth`` (256) token context, ``--steps`` (32) profiled
steps, ``--threads`` (2). Prints the table (sorted by self CPU time) and writes it to
``benchmarks/results/decode_profile_<threads>t.txt``.

    python benchmarks/profile_decode.py [--threads 2] [--eager]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--eager", action="store_true", help="profile the uncompiled static-cache step")
    ap.add_argument("--head", choices=["fp32", "w8"], default="w8")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import quantkern as qk
    from quantkern.generation import FastDecoder, quantize_output
    from quantkern.models import load_model

    model, _ = load_model("smollm2")
    qk.RTNQuantizer(model, bits=4, group_size=32, sym=True, scale_dtype="float32", verbose=False).quantize()
    if a.head == "w8":
        quantize_output(model, bits=8, group_size=32)
    dec = FastDecoder(model, max_len=a.depth + a.steps + 8, compile=not a.eager)
    ctx = torch.randint(0, model.config.vocab_size, (1, a.depth), generator=torch.Generator().manual_seed(0))
    dec.generate(ctx, 8)  # compile / warm
    _, tok = dec.prefill(ctx)
    for _ in range(4):
        _, tok = dec.step(tok)
    _, tok = dec.prefill(ctx)
    t = time.perf_counter()
    for _ in range(a.steps):
        _, tok = dec.step(tok)
    ms = (time.perf_counter() - t) * 1000 / a.steps
    _, tok = dec.prefill(ctx)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            _, tok = dec.step(tok)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    head = (f"SmolLM2-135M W4 g32 + {a.head} lm_head, FastDecoder ({'eager' if a.eager else 'compiled'}), "
            f"{a.threads} threads, {a.depth}-token context: {ms:.2f} ms/step unprofiled "
            f"({1000 / ms:.1f} tokens/s); {a.steps} profiled steps, torch {torch.__version__}")
    print(head)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"decode_profile_{'eager' if a.eager else 'compiled'}_{a.threads}t.txt"
    out.write_text(head + "\n" + table + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

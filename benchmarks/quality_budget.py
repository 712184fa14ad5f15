"""Size-perplexity curve of SmolLM2-135M-Instruct (issue #16): checkpoints planned by
``qk.BudgetPlanner`` at 2.5 / 3.0 / 3.5 / 4.0 / 4.5 bits per weight against every uniform GPTQ
act-order scheme (W2 / W3 / W4 / W8 x g32 / g64 / g128 x sym / asym), all in one run.

    python benchmarks/quality_budget.py                    # the whole grid (CPU: about 2 h on 2 cores)
    python benchmarks/quality_budget.py --uniform w3g64a w4g128s --bpw 3.0
    python benchmarks/quality_budget.py --plot-only        # redraw from the CSV

Every model is quantized with GPTQ act-order on the same calibration windows (random 512-token windows
of the built-in calibration text) and evaluated on the first ``--eval-windows`` windows of the disjoint
held-apart text. Bits per weight are read back from each written GPTQ checkpoint (``quantkern inspect``'s
count: codes, scales, zeros and g_idx of the quantized layers over the weights they replace) and
compared with the plan's prediction. Rows go to benchmarks/results/quality_budget.csv as they are
measured (with the machine and versions); the plot to quality_budget.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
UNIFORM = {f"w{b}g{g}{'s' if s else 'a'}": (b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128) for s in (True, False)}
# the uniform schemes nearest the planned range first, so an interrupted run keeps the ones that matter
ORDER = ["w3g64a", "w4g128s", "w3g64s", "w4g128a", "w3g128a", "w3g128s", "w3g32a", "w3g32s", "w4g64s", "w4g64a",
         "w2g32a", "w2g32s", "w4g32s", "w4g32a", "w2g64a", "w2g128a", "w2g64s", "w2g128s", "w8g128s", "w8g128a",
         "w8g64s", "w8g64a", "w8g32s", "w8g32a"]
FIELDS = ["kind", "name", "target_bpw", "bpw", "predicted_bpw", "ppl", "ppl_fp32", "quant_seconds",
          "plan_seconds", "measure_seconds", "schemes", "nsamples", "eval_tokens", "quantkern", "torch",
          "transformers", "cpu", "threads"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bpw", nargs="*", type=float, default=[2.5, 3.0, 3.5, 4.0, 4.5])
    p.add_argument("--uniform", nargs="*", default=ORDER)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--fisher-samples", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "quality_budget.csv"))
    p.add_argument("--cache", default=None, help="sensitivity cache directory (default: a fresh temporary one)")
    p.add_argument("--plot-only", action="store_true")
    a = p.parse_args()
    if a.plot_only:
        plot(Path(a.out))
        return

    import transformers

    import quantkern as qk
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text
    from quantkern.io.inspect import inspect_checkpoint
    from quantkern.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration")), a.nsamples, a.seq_len)
    held = tokenize_text(tok, builtin_text("eval"))
    out = Path(a.out)
    new = not out.exists()
    f = out.open("a", newline="")
    w = csv.DictWriter(f, FIELDS)
    if new:
        w.writeheader()
    meta = dict(quantkern=qk.__version__, torch=torch.__version__, transformers=transformers.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                nsamples=a.nsamples, eval_tokens=a.eval_windows * a.seq_len)

    def ppl_of(m):
        return perplexity(m, held, seq_len=a.seq_len, max_windows=a.eval_windows, progress=False)

    ppl_fp = ppl_of(model)
    print(f"fp32 perplexity {ppl_fp:.4f}", flush=True)
    w.writerow(dict(kind="fp32", name="fp32", bpw=32, ppl=f"{ppl_fp:.4f}", ppl_fp32=f"{ppl_fp:.4f}", **meta))
    f.flush()
    base = qk.GPTQConfig(actorder=True, nsamples=a.nsamples, seq_len=a.seq_len)
    cache = a.cache or tempfile.mkdtemp(prefix="quantkern-sensitivity-")

    def run(kind, name, config, target=None, plan=None):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        qk.GPTQQuantizer(m, config, verbose=False).quantize(calib)
        secs = time.perf_counter() - t
        ppl = ppl_of(m)
        with tempfile.TemporaryDirectory() as d:
            qk.save_quantized(m, Path(d) / "ck", tokenizer=tok)
            info = inspect_checkpoint(Path(d) / "ck")
        weights = sum(layer["in_features"] * layer["out_features"] for layer in info["layers"])
        bpw = 8 * info["quantized_bytes"] / weights
        row = dict(kind=kind, name=name, target_bpw="" if target is None else target, bpw=f"{bpw:.4f}",
                   predicted_bpw="" if plan is None else f"{plan.bpw:.4f}", ppl=f"{ppl:.4f}",
                   ppl_fp32=f"{ppl_fp:.4f}", quant_seconds=f"{secs:.1f}",
                   plan_seconds="" if plan is None else f"{plan.plan_seconds:.3f}",
                   measure_seconds="" if plan is None else f"{plan.sensitivity.seconds:.1f}",
                   schemes="" if plan is None else "; ".join(f"{n}x {d}" for d, n in plan.schemes().items()), **meta)
        w.writerow(row)
        f.flush()
        print(f"{kind:8s} {name:10s} bpw {bpw:.3f}{'' if plan is None else f' (plan {plan.bpw:.3f})'} "
              f"ppl {ppl:.4f} in {secs:.0f} s", flush=True)
        del m

    for target in a.bpw:
        planner = qk.BudgetPlanner(target_bpw=target, fisher_samples=a.fisher_samples, cache_dir=cache)
        plan = planner.plan(model, calib, base)
        run("planned", f"bpw{target:g}", plan.config, target, plan)
    for name in a.uniform:
        bits, gs, sym = UNIFORM[name]
        run("uniform", name, qk.GPTQConfig(bits=bits, group_size=gs, sym=sym, actorder=True, nsamples=a.nsamples,
                                           seq_len=a.seq_len))
    f.close()
    plot(out)


def plot(csv_path: Path) -> None:
    rows = list(csv.DictReader(csv_path.open()))
    planned = sorted((float(r["bpw"]), float(r["ppl"])) for r in rows if r["kind"] == "planned")
    uniform = [(float(r["bpw"]), float(r["ppl"]), r["name"]) for r in rows if r["kind"] == "uniform"]
    report(planned, uniform)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if uniform:
        ax.scatter([u[0] for u in uniform], [u[1] for u in uniform], marker="x", color="grey",
                   label="uniform GPTQ act-order")
        for x, y, n in uniform:
            if y < 60:
                ax.annotate(n, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if planned:
        ax.plot(*zip(*planned), marker="o", label="planned (BudgetPlanner)")
    fp = [float(r["ppl"]) for r in rows if r["kind"] == "fp32"]
    if fp:
        ax.axhline(fp[-1], color="black", lw=0.8, ls="--", label=f"fp32 {fp[-1]:.2f}")
    ax.set_xlabel("bits per quantized weight (stored codes + scales + zeros + g_idx)")
    ax.set_ylabel("perplexity (held-apart text)")
    ax.set_yscale("log")  # (2-bit points reach the thousands; the range that matters is 15-40)
    ax.set_ylim(bottom=(fp[-1] if fp else 10) * 0.95, top=60)
    last = rows[-1]
    ax.set_title(f"SmolLM2-135M: size vs perplexity ({last['cpu']}, {last['threads']} threads, torch {last['torch']})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(csv_path.with_suffix(".png"), dpi=120)
    print(f"wrote {csv_path.with_suffix('.png')}")


def report(planned, uniform) -> None:
    """For each uniform scheme inside the planned range: the planned curve's perplexity at its bpw
    (linear between planned points) and which is lower."""
    if len(planned) < 2:
        return
    for x, y, name in sorted(uniform):
        if not planned[0][0] <= x <= planned[-1][0]:
            continue
        for (x0, y0), (x1, y1) in zip(planned, planned[1:]):
            if x0 <= x <= x1:
                yp = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
                print(f"{name:8s} {x:.3f} bpw: uniform {y:.3f}, planned {yp:.3f} -> "
                      f"{'planned lower' if yp < y else 'UNIFORM LOWER'}")
                break


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

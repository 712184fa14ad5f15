"""Peak memory of streaming quantization (``quantkern.offload.quantize_streaming``) against model size.

For each size, a synthetic Llama (random weights, fp32) is saved with ``save_pretrained`` and quantized
with GPTQ in a fresh child process. The child first quantizes a tiny model (so that the code pages of
torch / LAPACK / safetensors it touches count as baseline, not as model memory), resets its peak RSS
(``/proc/self/clear_refs``), then quantizes the measured model and reports the peak RSS increment.
The increment should stay flat while the model grows.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--layers 4 8 16] [--method gptq|rtn]

Writes ``benchmarks/results/memory_streaming.csv`` and ``memory_streaming.png`` (if matplotlib is there).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: child-process source shared by the memory benchmarks: one /proc/self/status field, in bytes
PROC_STATUS = r"""
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
"""

CHILD = r"""
import json, sys, time
import torch, transformers, accelerate, safetensors  # noqa: F401  (library baseline)
import transformers.models.llama.modeling_llama  # noqa: F401
from quantkern import GPTQConfig, RTNConfig
from quantkern.offload import quantize_streaming
""" + PROC_STATUS + r"""

src, warm, out, method, offload = sys.argv[1:6]
g = torch.Generator().manual_seed(0)
data = [torch.randint(0, 256, (64,), generator=g) for _ in range(4)]
cfg = GPTQConfig(bits=4, group_size=128, batch_size=4) if method == "gptq" else RTNConfig(bits=4, group_size=128)
quantize_streaming(warm, cfg, data, out + ".warm", verbose=False, resume=False, offload=offload)
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the peak from here on
base = status("VmRSS")
t = time.perf_counter()
quantize_streaming(src, cfg, data, out, verbose=False, resume=False, offload=offload)
print(json.dumps({"baseline": base, "peak": status("VmHWM"), "seconds": time.perf_counter() - t}))
"""


def make_llama(path: Path, hidden: int, inter: int, layers: int, vocab: int, heads: int = 8) -> int:
    """Save a random-weight Llama; returns its fp32 parameter bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(src: Path, warm: Path, out: Path, method: str, offload: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(warm), str(out), method, offload],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    ap.add_argument("--offload", choices=["disk", "cpu"], default="disk")
    a = ap.parse_args()
    if not os.access("/proc/self/clear_refs", os.W_OK):
        sys.exit("needs Linux /proc/self/clear_refs to reset the peak RSS")
    import accelerate
    import safetensors
    import torch
    import transformers

    import quantkern

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_llama(tmp / "warm", 128, 256, 2, 256, heads=4)
        for n in a.layers:
            src = tmp / f"llama-{n}"
            size = make_llama(src, a.hidden, a.intermediate, n, a.vocab)
            m = measure(src, tmp / "warm", tmp / f"q-{n}", a.method, a.offload)
            inc = m["peak"] - m["baseline"]
            rows.append({"layers": n, "hidden": a.hidden, "intermediate": a.intermediate, "vocab": a.vocab,
                         "method": a.method, "offload": a.offload, "model_fp32_mib": round(size / 2**20, 1),
                         "baseline_rss_mib": round(m["baseline"] / 2**20, 1),
                         "peak_rss_mib": round(m["peak"] / 2**20, 1), "peak_increment_mib": round(inc / 2**20, 1),
                         "increment_over_model": round(inc / size, 3), "seconds": round(m["seconds"], 1)})
            print(rows[-1], flush=True)
    meta = {"device": f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}",
            "omp_threads": os.environ.get("OMP_NUM_THREADS", ""), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__, "quantkern": quantkern.__version__}
    RESULTS.mkdir(exist_ok=True)
    stem = f"memory_streaming_{a.method}" if a.method != "gptq" else "memory_streaming"
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    print(f"wrote {RESULTS / (stem + '.csv')}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["model_fp32_mib"] for r in rows]
    ax.plot(sizes, [r["peak_increment_mib"] for r in rows], "o-", label="peak RSS increment (streaming)")
    ax.plot(sizes, sizes, "--", color="gray", label="model size (fp32)")
    ax.set_xlabel("model size, fp32 (MiB)")
    ax.set_ylabel("MiB")
    ax.set_title(f"{a.method.upper()} streaming, offload={a.offload}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    print(f"wrote {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    main()

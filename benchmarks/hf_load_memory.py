"""Peak memory of transformers' ``from_pretrained`` with ``quantkern.hf.QuantkernConfig`` (on-the-fly RTN)
against the plain dense load, and against the size of what the quantized model keeps (issue #17: peak
memory should stay near the quantized size, the way ``load_in_4bit`` works).

A synthetic Llama (``bench_memory.make_llama``: random weights, fp32 safetensors, untied head) is
loaded in a fresh child process per mode. The child first loads a tiny model the same way (so code pages
of torch / transformers count as baseline), resets its peak RSS (``/proc/self/clear_refs``), then loads the
measured model and reports the peak RSS increment and the bytes the loaded model holds.

    python benchmarks/hf_load_memory.py [--hidden 1024] [--layers 8 16]

Writes ``benchmarks/results/hf_load_memory.csv`` and ``hf_load_memory.png`` (if matplotlib is there).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_memory import PROC_STATUS, make_llama  # (benchmarks/ is on the path when run as a script)

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys, threading, time
import torch, transformers
from transformers import AutoModelForCausalLM
import quantkern.hf
""" + PROC_STATUS + r"""
src, warm, mode = sys.argv[1:4]
def load(path):
    kw = {} if mode == "dense" else {"quantization_config": quantkern.hf.QuantkernConfig(bits=4, group_size=128)}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
m = load(warm); del m
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
anon0 = status("RssAnon")
peak_anon, done = [0], []
def poll():  # private memory (RssAnon) is what a load costs; the checkpoint's mmap pages are clean page cache
    while not done:
        peak_anon[0] = max(peak_anon[0], status("RssAnon") - anon0)
        time.sleep(0.002)
th = threading.Thread(target=poll, daemon=True)
th.start()
m = load(src)
done.append(1)
th.join()
peak_load = status("VmHWM") - base
held = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
with torch.no_grad():  # a forward touches every weight (a dense load may leave them in the unread mmap)
    ok = bool(torch.isfinite(m(torch.randint(0, 1000, (1, 8))).logits).all())
after = status("RssAnon") - anon0
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap returned to the OS: what stays is what the model holds
print(json.dumps({"peak_anon_load": peak_anon[0], "anon_after_forward": after,
                  "anon_after_trim": status("RssAnon") - anon0,
                  "peak_load": peak_load, "peak": status("VmHWM") - base, "resident": status("VmRSS") - base,
                  "model_bytes": held, "finite": ok}))
"""


def _measure(hidden: int, layers: int) -> list[dict]:
    import torch
    import transformers

    import quantkern

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = make_llama(tmp / "model", hidden, hidden * 4, layers, 8192, heads=hidden // 64) // 4
        make_llama(tmp / "warm", 128, 512, 1, 8192, heads=2)
        for mode in ("dense", "quantkern-w4g128"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "model"), str(tmp / "warm"), mode],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(dict(mode=mode, params=n, hidden=hidden, layers=layers,
                             dense_fp32_mib=f"{n * 4 / 2**20:.1f}", model_mib=f"{r['model_bytes'] / 2**20:.1f}",
                             peak_private_load_mib=f"{r['peak_anon_load'] / 2**20:.1f}",
                             private_after_forward_mib=f"{r['anon_after_forward'] / 2**20:.1f}",
                             private_after_trim_mib=f"{r['anon_after_trim'] / 2**20:.1f}",
                             peak_rss_load_mib=f"{r['peak_load'] / 2**20:.1f}",
                             peak_rss_increase_mib=f"{r['peak'] / 2**20:.1f}",
                             resident_after_forward_mib=f"{r['resident'] / 2**20:.1f}", finite=r["finite"],
                             quantkern=quantkern.__version__, torch=torch.__version__,
                             transformers=transformers.__version__, cpu=platform.processor() or platform.machine(),
                             threads=torch.get_num_threads()))
            print(rows[-1])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    a = p.parse_args()
    import torch
    import transformers

    rows = [row for layers in a.layers for row in _measure(a.hidden, layers)]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "hf_load_memory.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    for i, (key, label) in enumerate([("peak_rss_increase_mib", "peak RSS (incl. checkpoint mmap pages)"),
                                      ("peak_private_load_mib", "peak private memory while loading"),
                                      ("model_mib", "tensors the loaded model holds")]):
        ax.bar([x + (i - 1) * 0.27 for x in xs], [float(r[key]) for r in rows], 0.27, label=label)
    ax.set_xticks(list(xs), [f"{r['mode']}\n{int(r['params']) / 1e6:.0f}M" for r in rows], fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("from_pretrained of a random Llama (fp32 safetensors)\n"
                 f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "hf_load_memory.png", dpi=120)


if __name__ == "__main__":
    main()

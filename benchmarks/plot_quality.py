"""The README's quality tables as plots: perplexity per scheme and method from the CSVs the quality
benchmarks write (``quality_smollm2.csv``, ``quality_algorithms.csv``, ``quality_rotation.csv``), one
PNG beside each, titled with the model, the machine and the versions read from the rows.

    python benchmarks/plot_quality.py [CSV ...]      # default: every quality CSV in benchmarks/results

The quality scripts call :func:`plot_csv` after writing their rows. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEFAULT = ("quality_smollm2.csv", "quality_algorithms.csv", "quality_rotation.csv")


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _label(r: dict) -> tuple[str, str]:
    """(group on the x axis, series) of one row, whichever of the three layouts it has."""
    if "settings" in r:  # quality_algorithms: one method per row (its settings are in the CSV)
        return r["method"], "perplexity"
    method = r["method"] + ("+rotate" if r.get("rotate") == "True" else "")
    return r["scheme"], method


def plot_csv(path, out: Path | None = None) -> Path | None:
    """Draw ``path`` (a quality CSV) as a grouped bar chart of perplexity (log scale), the fp32
    perplexity as a line; the last row of each (group, series) wins (the scripts append). Returns the
    PNG written, or None without matplotlib or rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    rows = [r for r in _rows(path) if r.get("ppl")]
    quant = [r for r in rows if r.get("method") not in ("none", "fp32")]
    if not quant:
        return None
    cells: dict[tuple[str, str], float] = {}
    for r in quant:
        cells[_label(r)] = float(r["ppl"])
    groups = list(dict.fromkeys(g for g, _ in cells))
    series = list(dict.fromkeys(s for _, s in cells))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series) / 2)), 4.0))
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, g in enumerate(groups) if (g, s) in cells]
        ys = [cells[(g, s)] for g in groups if (g, s) in cells]
        ax.bar(xs, ys, width, label=s)
    fp = next((float(r["ppl_fp32"]) for r in rows if r.get("ppl_fp32")), None)
    if fp is not None:
        ax.axhline(fp, color="black", linewidth=1, linestyle="--", label=f"fp32 ({fp:.2f})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
    ax.set_ylabel("perplexity (log scale; lower is better)")
    r0 = rows[-1]
    model = r0.get("model", "SmolLM2-135M-Instruct")
    versions = ", ".join(f"{k} {r0[k]}" for k in ("torch", "transformers") if r0.get(k))
    ax.set_title(f"{model}, {path.stem}\n{r0.get('cpu', '')} CPU, {r0.get('threads', '?')} threads, {versions}",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = out or path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv] or [RESULTS / n for n in DEFAULT if (RESULTS / n).exists()]
    for p in paths:
        print(p, "->", plot_csv(p))


if __name__ == "__main__":
    main(sys.argv[1:])

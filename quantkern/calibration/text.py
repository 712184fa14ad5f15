"""Text that needs no network: calibration and held-apart evaluation splits.

The built-in corpus is the prose of the Python language reference and library topics that ship with
every CPython (``pydoc_data.topics``). Topics are split by name into two disjoint halves, so text used
for calibration is never used to measure perplexity. Users with network access can pass any text or
a Hugging Face dataset instead (see :func:`load_text`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def builtin_text(split: str = "calibration") -> str:
    """``split``: "calibration" or "eval" — disjoint halves of the built-in corpus."""
    if split not in ("calibration", "eval"):
        raise ValueError(f"split must be 'calibration' or 'eval', got {split!r}")
    from pydoc_data.topics import topics

    chosen = []
    for name in sorted(topics):
        h = hashlib.sha256(name.encode()).digest()[0]
        if (h % 2 == 0) == (split == "calibration"):
            chosen.append(topics[name].strip())
    return "\n\n".join(chosen)


def load_text(source: str, split: str = "calibration") -> str:
    """Text from ``source``: "builtin", a path to a .txt file, or "hf:<dataset>[:<config>]" (needs the
    ``datasets`` extra and network access; e.g. "hf:wikitext:wikitext-2-raw-v1")."""
    if source == "builtin":
        return builtin_text(split)
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise ImportError("loading a Hugging Face dataset needs `pip install quantkern[datasets]`") from e
        parts = source[3:].split(":")
        hf_split = {"calibration": "train", "eval": "test"}[split]
        ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 else None, split=hf_split)
        col = "text" if "text" in ds.column_names else ds.column_names[0]
        return "\n\n".join(ds[col])
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text source {source!r} is not 'builtin', 'hf:<name>' or an existing file")
    return path.read_text(encoding="utf-8")

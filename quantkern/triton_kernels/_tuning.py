"""Launch configurations, their validation, and a small autotuner shared by the WnA16 kernels.

Autotuning is keyed on ``(op, bucketed M, N, K, bits, group mode/size, dtypes, zero mode)``: M is
rounded up to a power of two (decode) or to one of a few buckets (GEMM) so that a serving run with
varying batch sizes tunes a handful of times, not once per M. Each candidate list is short (≤ 8) and
pruned by shape before timing. Under ``TRITON_INTERPRET=1`` nothing is timed: the first pruned
candidate is used. A config can be pinned (``config=dict(...)`` on the host wrappers), which
bypasses the autotuner entirely; it is validated here with messages that list the allowed keys.
"""

from __future__ import annotations

import os

import torch

_TRUE = ("1", "true", "yes", "on")


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def _cfg(bm, bn, bk, warps, stages, split_k=None):
    c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if split_k is not None:
        c["SPLIT_K"] = split_k
    return c


# Tensor-core GEMM (M > 16): tiles that keep the tensor cores fed for mid and large M.
GEMM_CONFIGS = [
    _cfg(32, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(64, 256, 32, 8, 4),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(32, 64, 128, 4, 5),
]

# Decode (M <= 16): BLOCK_M 1 is a GEMV on CUDA cores (one activation row per program), 16 uses
# tl.dot; SPLIT_K spreads a layer over enough programs to keep every SM streaming weights.
GEMV_CONFIGS = [
    _cfg(1, 64, 128, 4, 4, split_k=4),
    _cfg(1, 128, 128, 4, 3, split_k=2),
    _cfg(1, 32, 256, 4, 3, split_k=8),
    _cfg(1, 32, 128, 4, 4, split_k=1),  # no reduction kernels: for wide layers (N >= 8192)
    _cfg(16, 64, 128, 4, 4, split_k=4),
    _cfg(16, 128, 64, 4, 4, split_k=4),
    _cfg(16, 64, 256, 4, 3, split_k=8),
    _cfg(16, 128, 128, 4, 3, split_k=1),
    _cfg(16, 256, 64, 8, 3, split_k=2),
]

# Grouped MoE GEMM (every expert in one launch): BLOCK_M is a tile of one expert's pairs, so the
# small tiles serve decode (a pair or two an expert) and the large ones prefill; pruned by the mean
# number of pairs an active expert gets.
MOE_CONFIGS = [
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 128, 64, 4, 4),
    _cfg(32, 64, 128, 4, 4),
    _cfg(32, 128, 64, 4, 4),
    _cfg(64, 64, 128, 4, 3),
    _cfg(64, 128, 64, 4, 3),
    _cfg(128, 128, 64, 8, 3),
]

_GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
_GEMV_KEYS = _GEMM_KEYS + ("SPLIT_K",)


def validate_config(config: dict, split_k: bool) -> dict:
    """Return a complete config from a user's pin, or raise ``ValueError`` naming what is wrong.

    Required: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (powers of two; BLOCK_N and BLOCK_K >= 16;
    BLOCK_M >= 16, or 1 for the decode kernel's GEMV mode), ``SPLIT_K`` (decode kernel only, >= 1).
    Optional: ``num_warps`` (default 4), ``num_stages`` (default 3).
    """
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    allowed = _GEMV_KEYS if split_k else _GEMM_KEYS
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {list(allowed)}")
    missing = [key for key in allowed if key not in config and key not in ("num_warps", "num_stages")]
    if missing:
        raise ValueError(f"config is missing {missing}; required: {[k for k in allowed if not k.startswith('num_')]}")
    cfg = {"num_warps": 4, "num_stages": 3, **config}
    for key, value in cfg.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config[{key!r}] must be a positive int, got {value!r}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
        if cfg[key] & (cfg[key] - 1):
            raise ValueError(f"config[{key!r}] must be a power of two, got {cfg[key]}")
    for key in ("BLOCK_N", "BLOCK_K"):
        if cfg[key] < 16:
            raise ValueError(f"config[{key!r}] must be >= 16 (tl.dot / vector width), got {cfg[key]}")
    if cfg["BLOCK_M"] < 16 and not (split_k and cfg["BLOCK_M"] == 1):
        raise ValueError(f"config['BLOCK_M'] must be >= 16{' or exactly 1 (GEMV mode)' if split_k else ''}, "
                         f"got {cfg['BLOCK_M']}")
    return cfg


def bucket_m(m: int) -> int:
    """Autotune bucket of M: the next power of two up to 256, then 512 / 1024 / 4096 and above."""
    b = 1
    while b < m and b < 256:
        b *= 2
    if m <= b:
        return b
    return 512 if m <= 512 else 1024 if m <= 1024 else 4096


def min_block_k(bits: int) -> int:
    """Smallest BLOCK_K for ``bits``: a tile must cover whole words of every bit plane (a 1-bit
    plane holds 32 values a word, so odd widths need 32) and tl.dot needs 16."""
    return max(16, 32 // (bits & -bits))


def check_block_k(config: dict, bits: int) -> None:
    if config["BLOCK_K"] < min_block_k(bits):
        raise ValueError(f"config['BLOCK_K'] must be >= {min_block_k(bits)} for {bits}-bit weights, "
                         f"got {config['BLOCK_K']}")


def prune(configs: list[dict], m: int, k: int, group_size: int, bits: int) -> list[dict]:
    """Candidates sensible for this problem: no tile far larger than M or K, and (for regular
    groups) BLOCK_K shrunk to a power of two >= :func:`min_block_k` dividing the group, so that one
    scale row serves a whole K tile (group mode 1) instead of a per-column gather; no duplicates."""
    out: list[dict] = []
    for c in configs:
        if c["BLOCK_M"] > max(16, bucket_m(m)) or (c["BLOCK_M"] == 1 and m > 4):
            continue
        if c["BLOCK_K"] > max(32, 1 << (k - 1).bit_length()):
            continue
        bk = c["BLOCK_K"]
        if group_size > 0:
            while bk > min_block_k(bits) and group_size % bk:
                bk //= 2
            if group_size % bk:
                bk = c["BLOCK_K"]  # no aligned tile: gather (mode 2) with the original BLOCK_K
        c = dict(c, BLOCK_K=bk)
        if c not in out:
            out.append(c)
    return out or [c for c in configs if c["BLOCK_M"] != 1 or m <= 4][:1]


_CACHE: dict[tuple, dict] = {}


def pick_config(key: tuple, candidates: list[dict], launch) -> dict:
    """The fastest of ``candidates`` for ``key`` (timed once per key with ``launch(cfg)``, cached).

    Under the interpreter or with a single candidate nothing is timed and the first one is used;
    so is it during a CUDA graph capture (warm the layer up eagerly first to capture a tuned config).
    """
    cfg = _CACHE.get(key)
    if cfg is not None:
        return cfg
    if interpreting() or len(candidates) == 1:
        cfg = candidates[0]
    elif torch.cuda.is_current_stream_capturing():
        # timing inside a CUDA graph capture is impossible: use the first candidate for this
        # capture (not cached, so a later eager call still tunes); run once eagerly before capturing
        return candidates[0]
    else:
        from triton.testing import do_bench

        best = None
        for c in candidates:
            try:
                t = do_bench(lambda: launch(c), warmup=5, rep=25)
            except Exception as e:  # a config may run out of shared memory / registers on a small GPU
                if "out of resource" not in str(e).lower():
                    raise
                continue
            if best is None or t < best[0]:
                best = (t, c)
        if best is None:
            raise RuntimeError(f"every Triton config ran out of resources for {key}")
        cfg = best[1]
    _CACHE[key] = cfg
    return cfg


def tuned_configs() -> dict[tuple, dict]:
    """What the autotuner chose so far (for logs and benchmarks)."""
    return dict(_CACHE)

"""Bit-stream packing of small unsigned integers into int32 words.

Values are laid out as one contiguous little-endian bit stream along a dimension: value ``i`` occupies
bits ``[i*b, (i+1)*b)`` of the stream, word ``j`` holds stream bits ``[32j, 32j+32)``, lowest bits
first. For 2/4/8 bits this is the familiar "32/b values per word" layout; for 3 (5, 6, 7) bits values
straddle word boundaries, exactly as GPTQ's 3-bit layout does (32 values in 3 words).
"""

from __future__ import annotations

import torch

_MASK32 = (1 << 32) - 1


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` values of ``bits`` bits."""
    return -(-n * bits // 32)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` ([n, cols], ints in ``[0, 2**bits)``) along dim 0 into int32 ``[ceil(n*bits/32), cols]``."""
    if values.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(values.shape)}")
    n, cols = values.shape
    v = values.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) >= (1 << bits):
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    pad = (-n) % 32
    if pad:
        v = torch.cat([v, v.new_zeros(pad, cols)])
    v = v.view(-1, 32, cols)  # blocks of 32 values -> `bits` words each
    words = v.new_zeros(v.shape[0], bits, cols)
    for i in range(32):
        off = i * bits
        w, s = divmod(off, 32)
        words[:, w] |= (v[:, i] << s) & _MASK32
        if s + bits > 32:
            words[:, w + 1] |= v[:, i] >> (32 - s)
    out = _to_int32(words.view(-1, cols))
    return out[: packed_length(n, bits)].contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[ceil(n*bits/32), cols]`` -> int32 ``[n, cols]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != packed_length(n, bits):
        raise ValueError(f"{n} values of {bits} bits need {packed_length(n, bits)} words, got {packed.shape[0]}")
    cols = packed.shape[1]
    blocks = -(-n // 32)
    w = packed.to(torch.int64) & _MASK32
    full = blocks * bits
    if w.shape[0] < full:
        w = torch.cat([w, w.new_zeros(full - w.shape[0], cols)])
    w = w.view(blocks, bits, cols)
    mask = (1 << bits) - 1
    out = w.new_empty(blocks, 32, cols)
    for i in range(32):
        off = i * bits
        k, s = divmod(off, 32)
        val = w[:, k] >> s
        if s + bits > 32:
            val = val | (w[:, k + 1] << (32 - s))
        out[:, i] = val & mask
    return out.view(-1, cols)[:n].to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1: ``[rows, n]`` -> int32 ``[rows, ceil(n*bits/32)]``."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`."""
    return unpack_rows(packed.t().contiguous(), bits, n).t().contiguous()

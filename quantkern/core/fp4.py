"""FP4 E2M1 codec and nibble packing.

E2M1 magnitudes: ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (index 0..7, bits 0-2 of a code); bit 3 is the
sign. Two codes per byte along K, the even column in the low nibble (an odd K is padded with a zero
code).
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0


def e2m1_table(device=None) -> torch.Tensor:
    """fp32 ``[16]``: value of each 4-bit code."""
    mag = torch.tensor(E2M1_VALUES, device=device)
    return torch.cat([mag, -mag])


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8 in [0, 16)) of each value of ``x`` (already divided by its scale);
    magnitudes beyond 6 saturate, ties round to the larger magnitude."""
    mag = torch.tensor(E2M1_VALUES, device=x.device)
    mids = (mag[1:] + mag[:-1]) / 2
    a = x.float().abs()
    idx = torch.bucketize(a, mids, right=True).clamp_(max=7)  # right=True: a tie goes up
    sign = (x < 0) & (idx > 0)  # no negative zero code
    return (idx + 8 * sign).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` -> ``[N, ceil(K/2)]``, even column in the low nibble."""
    n, k = codes.shape
    if k % 2:
        codes = torch.cat([codes, torch.zeros(n, 1, dtype=codes.dtype, device=codes.device)], dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return out[:, :k]

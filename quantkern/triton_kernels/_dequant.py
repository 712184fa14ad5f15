"""Triton device helpers shared by the WnA16 kernels: unpack a [BLOCK_K, BLOCK_N] weight tile and
fetch its group parameters (layout: :mod:`quantkern.triton_kernels.layout`).

Group modes (a compile-time constant chosen by the host per launch):

- 0, one group: the scale row is the same for every K tile, so kernels multiply the finished fp32
  accumulator by it once, after the K loop.
- 1, regular groups aligned to BLOCK_K (``GROUP_SIZE % BLOCK_K == 0``): a whole K tile lies in group
  ``k0 // GROUP_SIZE``; the tile's ``dot(x, q - z)`` is scaled by one scale row.
- 2, gathered: each column's group comes from ``g_idx``; scales / zeros are gathered per element and
  the tile is dequantized fully (``(q - z) * s``) before the dot.

In modes 0 and 1 ``q - z`` is an integer of at most 8 bits plus sign, exact in fp16 and bf16, so
feeding it to the tensor cores loses nothing and the scale is applied in fp32.
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, k0, stride_qk, stride_sg, stride_zg,
              BITS: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr):
    """Returns ``(w, s)``: modes 0/1 ``w = q - z`` (int32 [BK, BN]) and ``s`` the fp32 scale row
    ([1, BN]); mode 2 ``w = (q - z) * s`` and ``s`` is unused (the row of group 0)."""
    VPW: tl.constexpr = 32 // BITS
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(qw_ptr + (offs_k // VPW)[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
    # arithmetic shift of int32 is fine: the mask drops the sign-extended bits
    q = (words >> ((offs_k % VPW) * BITS)[:, None]) & ((1 << BITS) - 1)
    if GROUP_MODE == 2:
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if ZERO_POINT >= 0:
            w = (q - ZERO_POINT).to(tl.float32) * s
        else:
            z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0).to(tl.int32)
            w = (q - z).to(tl.float32) * s
        s_row = tl.load(s_ptr + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
    else:
        if GROUP_MODE == 1:
            g0 = k0 // GROUP_SIZE
        else:
            g0 = 0
        s_row = tl.load(s_ptr + g0 * stride_sg + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
        if ZERO_POINT >= 0:
            w = q - ZERO_POINT
        else:
            z = tl.load(z_ptr + g0 * stride_zg + offs_n[None, :], mask=mask_n[None, :], other=0).to(tl.int32)
            w = q - z
    return w, s_row

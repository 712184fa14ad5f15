"""Triton device helpers shared by the WnA16 kernels: unpack a [BLOCK_K, BLOCK_N] tile of codes and
fetch group parameters (layout: :mod:`quantkern.triton_kernels.layout`).

Group modes (a compile-time constant the host picks per launch):

- 0, one group: the kernels accumulate ``dot(x, q)`` and ``sum(x)`` over all of K and apply
  ``(acc - sum(x) z) * s`` once at the end.
- 1, regular groups aligned to BLOCK_K (``GROUP_SIZE % BLOCK_K == 0``): a whole K tile lies in group
  ``k0 // GROUP_SIZE``, so the tile contributes ``(dot(x, q) - sum(x) z) * s``.
- 2, gathered: each column's group comes from ``g_idx``; the tile is dequantized element-wise,
  ``(q - z[g]) * s[g]``, before the dot.

In modes 0 and 1 the tensor cores see raw codes (integers <= 255, exact in fp16 and bf16), the zero
point leaves the inner loop through ``x . (q - z) = x . q - z sum(x)`` and the scale is applied in
fp32 to a [BLOCK_M, BLOCK_N] result rather than to every weight.
"""

import triton
import triton.language as tl


@triton.jit
def load_codes(qw_ptr, offs_n, K, N, k0, stride_qk, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw codes ``q`` (int32 [BLOCK_K, BLOCK_N]) of K rows ``k0 .. k0 + BLOCK_K``, 0 past K.

    ``k0`` must be a multiple of BLOCK_K, and BLOCK_K of every plane's values per word (see
    :func:`._tuning.min_block_k`). Each plane's words ([BLOCK_K / VPW, BLOCK_N], contiguous along
    N) are loaded once and their VPW values spread over K in registers; planes are OR-ed together.
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    mask_n = offs_n < N
    q = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
    row0 = 0  # first row of the current plane in qweight
    # plane p has width 1 << p and 32 >> p values a word (constexprs cannot be named inside the
    # unrolled loop: Triton forbids reassigning them)
    for p in tl.static_range(4):
        if BITS & (1 << p):
            offs_w = k0 // (32 >> p) + tl.arange(0, BLOCK_K // (32 >> p))
            words = tl.load(qw_ptr + (row0 + offs_w)[:, None] * stride_qk + offs_n[None, :],
                            mask=(offs_w[:, None] < tl.cdiv(K, 32 >> p)) & mask_n[None, :], other=0)
            # arithmetic shift of int32 is fine: the mask drops the sign-extended bits
            vals = (words[:, None, :] >> (tl.arange(0, 32 >> p) << p)[None, :, None]) & ((1 << (1 << p)) - 1)
            q |= tl.reshape(vals, (BLOCK_K, BLOCK_N)) << (BITS & ((1 << p) - 1))
            row0 += tl.cdiv(K, 32 >> p)
    return q


@triton.jit
def load_group(s_ptr, z_ptr, g, offs_n, N, stride_sg, stride_zg, ZERO_POINT: tl.constexpr):
    """Scale and zero rows of group ``g`` (a scalar) as fp32 [BLOCK_N] vectors."""
    mask_n = offs_n < N
    s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if ZERO_POINT >= 0:
        z = tl.full(offs_n.shape, ZERO_POINT, tl.float32)
    else:
        z = tl.load(z_ptr + g * stride_zg + offs_n, mask=mask_n, other=0).to(tl.float32)
    return s, z


@triton.jit
def load_dequant_gathered(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, k0, stride_qk, stride_sg, stride_zg,
                          BITS: tl.constexpr, ZERO_POINT: tl.constexpr):
    """Mode 2: ``(q - z[g_idx[k]]) * s[g_idx[k]]`` as fp32 [BLOCK_K, BLOCK_N]."""
    q = load_codes(qw_ptr, offs_n, K, N, k0, stride_qk, BITS, offs_k.shape[0])
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if ZERO_POINT >= 0:
        w = (q - ZERO_POINT).to(tl.float32) * s
    else:
        z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0).to(tl.int32)
        w = (q - z).to(tl.float32) * s
    return w


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; ``b`` (codes or dequantized weights) is cast to
    ``a``'s dtype, or both go in as fp32 under the interpreter's bf16 workaround (``DOT_FP32``)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def accumulate_tile(a, acc, x_sum, qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, k0, stride_qk, stride_sg,
                    stride_zg, BITS: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    ZERO_POINT: tl.constexpr, DOT_FP32: tl.constexpr):
    """One K tile of a tensor-core GEMM: ``acc += a @ W[k0 : k0 + BLOCK_K]`` in the launch's group mode.

    ``a`` [BLOCK_M, BLOCK_K]: the activation tile (0 past K and on masked rows); ``offs_k`` =
    ``k0 + arange(BLOCK_K)``. Returns ``(acc, x_sum)``: in mode 0 ``x_sum`` gathers ``sum(a)`` per row
    and the zero point / scale are applied once by :func:`finish_tile`; modes 1 and 2 leave it alone.
    """
    if GROUP_MODE == 2:
        w = load_dequant_gathered(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, k0, stride_qk, stride_sg,
                                  stride_zg, BITS, ZERO_POINT)
        acc = dot_acc(a, w, acc, DOT_FP32)
    else:
        q = load_codes(qw_ptr, offs_n, K, N, k0, stride_qk, BITS, offs_k.shape[0])
        if GROUP_MODE == 1:
            s, z = load_group(s_ptr, z_ptr, k0 // GROUP_SIZE, offs_n, N, stride_sg, stride_zg, ZERO_POINT)
            part = dot_acc(a, q, tl.zeros(acc.shape, dtype=tl.float32), DOT_FP32)
            a_sum = tl.sum(a.to(tl.float32), axis=1)
            acc += (part - a_sum[:, None] * z[None, :]) * s[None, :]
        else:
            acc = dot_acc(a, q, acc, DOT_FP32)
            x_sum += tl.sum(a.to(tl.float32), axis=1)
    return acc, x_sum


@triton.jit
def finish_tile(acc, x_sum, s_ptr, z_ptr, offs_n, N, stride_sg, stride_zg, GROUP_MODE: tl.constexpr,
                ZERO_POINT: tl.constexpr):
    """The end of :func:`accumulate_tile`'s K loop: mode 0 applies ``(acc - sum(x) z) * s`` here."""
    if GROUP_MODE == 0:
        s, z = load_group(s_ptr, z_ptr, 0, offs_n, N, stride_sg, stride_zg, ZERO_POINT)
        acc = (acc - x_sum[:, None] * z[None, :]) * s[None, :]
    return acc

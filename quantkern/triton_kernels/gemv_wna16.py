"""Decode GEMM ``y = x @ dequant(W) (+ bias)`` for W{2..8}A16 and M <= 16: split-K, GEMV or tl.dot.

At decode the whole weight is read once per token and M is tiny, so the job is to keep every SM
streaming weights: the grid is ``(N tiles, SPLIT_K, M tiles)``. Each program reduces one K slice
(a multiple of BLOCK_K) for one ``BLOCK_N`` column tile. Two inner products, a compile-time choice:

- ``BLOCK_M == 1``: GEMV on the CUDA cores, one activation row per program (no tensor-core padding
  waste at M = 1). For 2 / 4 / 8 bits the products accumulate element-wise in the unpacked
  ``[words, VPW, BLOCK_N]`` shape and K is reduced once at the end (:func:`_gemv_single_plane`); for
  multi-plane widths (3, 5, 6, 7) each tile is reduced over K as it comes.
- ``BLOCK_M == 16``: ``tl.dot`` on the tensor cores with the rows beyond M masked.

With ``SPLIT_K == 1`` the program writes the output (bias added, x's dtype). Otherwise each K slice
writes an fp32 partial ``[SPLIT_K, M, N]`` and a second small kernel sums them in a fixed order
(deterministic, unlike atomics), adds the bias and casts. Unpacking and group modes:
:mod:`._dequant`; layout: :mod:`.layout`. Constraints: as :mod:`.gemm_wna16`; the op is meant for
M <= 16 but is correct for any M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_inputs, dot_in_fp32, group_mode
from ._dequant import dot_acc, load_codes, load_dequant_gathered, load_group
from ._tuning import GEMV_CONFIGS, bucket_m, check_block_k, pick_config, prune, validate_config


@triton.jit
def _gemv_single_plane(x_row, qw_ptr, s_ptr, z_ptr, g_ptr, offs_n, K, N, k_begin, k_end, stride_qk, stride_sg,
                       stride_zg, BITS: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       ZERO_POINT: tl.constexpr, BLOCK_K: tl.constexpr):
    """One activation row times the K slice ``[k_begin, k_end)`` of a single-plane (2 / 4 / 8-bit)
    weight -> fp32 [BLOCK_N], fully dequantized.

    The words of a tile are unpacked in registers into ``[BLOCK_K / VPW, VPW, BLOCK_N]`` (each thread
    keeps the VPW codes of its own words: no reshape, no shared memory) and multiplied by the
    activations loaded in the same shape; products accumulate element-wise and K is reduced once,
    after the loop, instead of with shuffles and barriers in every tile.
    """
    VPW: tl.constexpr = 32 // BITS
    R: tl.constexpr = BLOCK_K // VPW
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    mask_n = offs_n < N
    offs_r = tl.arange(0, R)
    offs_i = tl.arange(0, VPW)
    acc = tl.zeros((R, VPW, BLOCK_N), dtype=tl.float32)
    if GROUP_MODE == 0:
        s, z = load_group(s_ptr, z_ptr, 0, offs_n, N, stride_sg, stride_zg, ZERO_POINT)
        zs = z * s
    for k0 in range(k_begin, k_end, BLOCK_K):
        rows = k0 // VPW + offs_r
        words = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :],
                        mask=(rows[:, None] < tl.cdiv(K, VPW)) & mask_n[None, :], other=0)
        q = ((words[:, None, :] >> (offs_i * BITS)[None, :, None]) & ((1 << BITS) - 1)).to(tl.float32)
        offs_k = k0 + offs_r[:, None] * VPW + offs_i[None, :]  # [R, VPW]: code (r, i) is column r * VPW + i
        mask_k = offs_k < K
        xv = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, :, None]
        if GROUP_MODE == 2:
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)[:, :, None]
            mask3 = mask_k[:, :, None] & mask_n[None, None, :]
            s3 = tl.load(s_ptr + g * stride_sg + offs_n[None, None, :], mask=mask3, other=0.0).to(tl.float32)
            if ZERO_POINT >= 0:
                acc += xv * ((q - ZERO_POINT) * s3)
            else:
                z3 = tl.load(z_ptr + g * stride_zg + offs_n[None, None, :], mask=mask3, other=0).to(tl.float32)
                acc += xv * ((q - z3) * s3)
        else:
            if GROUP_MODE == 1:
                s, z = load_group(s_ptr, z_ptr, k0 // GROUP_SIZE, offs_n, N, stride_sg, stride_zg, ZERO_POINT)
                zs = z * s
            acc += xv * (q * s[None, None, :] - zs[None, None, :])
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def _gemv_wna16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, p_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    if BLOCK_M == 1 and (BITS & (BITS - 1)) == 0:
        acc = _gemv_single_plane(x_ptr + pid_m.to(tl.int64) * stride_xm, qw_ptr, s_ptr, z_ptr, g_ptr, offs_n, K, N,
                                 k_begin, k_end, stride_qk, stride_sg, stride_zg,
                                 BITS, GROUP_MODE, GROUP_SIZE, ZERO_POINT, BLOCK_K)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # mode 0: sum of x over this K slice
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
            if GROUP_MODE == 2:
                w = load_dequant_gathered(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, k0, stride_qk, stride_sg,
                                          stride_zg, BITS, ZERO_POINT)
            else:
                w = load_codes(qw_ptr, offs_n, K, N, k0, stride_qk, BITS, BLOCK_K)
            if BLOCK_M == 1:
                part = tl.sum(tl.reshape(a, (BLOCK_K, 1)).to(tl.float32) * w.to(tl.float32), axis=0)[None, :]
            else:
                part = dot_acc(a, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32)
            if GROUP_MODE == 1:
                s, z = load_group(s_ptr, z_ptr, k0 // GROUP_SIZE, offs_n, N, stride_sg, stride_zg, ZERO_POINT)
                a_sum = tl.sum(a.to(tl.float32), axis=1)
                acc += (part - a_sum[:, None] * z[None, :]) * s[None, :]
            else:
                acc += part
                if GROUP_MODE == 0:
                    x_sum += tl.sum(a.to(tl.float32), axis=1)
        if GROUP_MODE == 0:
            s, z = load_group(s_ptr, z_ptr, 0, offs_n, N, stride_sg, stride_zg, ZERO_POINT)
            acc = (acc - x_sum[:, None] * z[None, :]) * s[None, :]
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        p_ptrs = p_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """``y = sum(partial[0:SPLIT_K]) (+ bias)`` cast to y's dtype, in a fixed order (deterministic);
    one launch instead of torch's sum, add and cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + i * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemv_wna16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int, zero_point: int,
               config: dict | None = None) -> torch.Tensor:
    """Decode-path ``x [M, K] @ dequant(W) [K, N] (+ bias)`` -> ``[M, N]`` in x's dtype.

    Arguments as :func:`~quantkern.triton_kernels.gemm_wna16.gemm_wna16`. ``config`` pins
    ``BLOCK_M`` (1 = GEMV, or >= 16 = tl.dot), ``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K`` (optional
    ``num_warps`` / ``num_stages``) and bypasses the autotuner. Raises ``ValueError`` /
    ``RuntimeError`` from :func:`._checks.check_inputs` or for a bad config.
    """
    m, n, k = check_inputs(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point)
    if config is not None:
        config = validate_config(config, split_k=True)
        check_block_k(config, bits)
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)

    def launch(cfg):
        bk = cfg["BLOCK_K"]
        k_per_split = triton.cdiv(triton.cdiv(k, bk), cfg["SPLIT_K"]) * bk
        split = triton.cdiv(k, k_per_split)  # no empty K slices
        mode = group_mode(group_size, bk)
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
        _gemv_wna16_kernel[grid](
            x, qweight, scales, zeros if zero_point < 0 else scales, g_idx, bias if bias is not None else scales,
            y, partial,
            m, n, k, k_per_split,
            x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0) if zero_point < 0 else 0, y.stride(0),
            BITS=bits, GROUP_MODE=mode, GROUP_SIZE=group_size if mode == 1 else 1, ZERO_POINT=max(zero_point, -1),
            HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x), SPLIT_K=split,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if split > 1:
            _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](
                partial, bias if bias is not None else scales, y, m * n, n,
                SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
        return y

    if config is None:
        key = ("gemv", bucket_m(m), n, k, bits, group_size, zero_point >= 0, x.dtype, scales.dtype,
               bias is not None, x.device.index)
        config = pick_config(key, prune(GEMV_CONFIGS, m, k, group_size, bits), launch)
    return launch(config)


@torch.library.custom_op("quantkern::gemv_wna16_triton", mutates_args=())
def gemv_wna16_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                      zero_point: int) -> torch.Tensor:
    """The autotuned :func:`gemv_wna16` as a ``torch.library`` op (visible to ``torch.compile``)."""
    return gemv_wna16(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point)


@gemv_wna16_triton.register_fake
def _(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    torch._check(qweight.dim() == 2 and scales.dim() == 2, lambda: "qweight and scales must be 2-D")
    return x.new_empty(x.shape[0], scales.shape[1])

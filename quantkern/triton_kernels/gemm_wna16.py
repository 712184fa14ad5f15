"""Tensor-core GEMM ``y = x @ dequant(W) (+ bias)`` for W{2..8}A16, the path for M > 16.

Algorithm: each program owns a ``BLOCK_M x BLOCK_N`` output tile and walks K in ``BLOCK_K`` steps:
load an activation tile, load the packed weight words of the tile once (bit planes, ``32 / w``
codes a word, packed along K), unpack them in registers with shifts and masks, and feed ``tl.dot``
(fp16 / bf16 operands, fp32 accumulator). With regular groups the raw codes go to the tensor cores
and zero point and scale are applied in fp32 to the tile's product; otherwise the tile is
dequantized per element first (see :mod:`._dequant` for the three group modes). Programs are
launched in ``GROUP_M``-row bands so that the weight column tiles a band needs stay in L2 while its
row tiles run.

Layout: :mod:`quantkern.triton_kernels.layout` (``TritonWeight``). Constraints: x fp16 / bf16
``[M, K]`` with unit stride along K; any M, N, K (edges are masked); scales fp16 / bf16 / fp32; the
output has x's dtype. Act-order: pass an arbitrary ``g_idx`` with ``group_size=0`` (gathered), or
sort K once at load and permute x per call (what the Triton backend does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_inputs, dot_in_fp32, group_mode
from ._dequant import accumulate_tile, finish_tile
from ._tuning import GEMM_CONFIGS, bucket_m, check_block_k, pick_config, prune, validate_config

GROUP_M = 8  # row tiles per launch band (L2 reuse of weight tiles)


@triton.jit
def _gemm_wna16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_pid_n
    first_m = (pid // band) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows
    pid_n = (pid % band) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # mode 0: sum of x over K, for the zero point
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        acc, x_sum = accumulate_tile(a, acc, x_sum, qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, k0, stride_qk,
                                     stride_sg, stride_zg, BITS, GROUP_MODE, GROUP_SIZE, ZERO_POINT, DOT_FP32)
    acc = finish_tile(acc, x_sum, s_ptr, z_ptr, offs_n, N, stride_sg, stride_zg, GROUP_MODE, ZERO_POINT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))


def gemm_wna16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int, zero_point: int,
               config: dict | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W) [K, N] (+ bias)`` -> ``[M, N]`` in x's dtype, on the tensor cores.

    Arguments are the fields of a :class:`~quantkern.triton_kernels.layout.TritonWeight` (x already
    permuted when the layout has ``perm``). ``config`` pins a launch config (keys ``BLOCK_M``,
    ``BLOCK_N``, ``BLOCK_K``, optional ``num_warps`` / ``num_stages``) and bypasses the autotuner.
    Raises ``ValueError`` / ``RuntimeError`` from :func:`._checks.check_inputs` or for a bad config.
    """
    m, n, k = check_inputs(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point)
    if config is not None:
        config = validate_config(config, split_k=False)
        check_block_k(config, bits)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y

    def launch(cfg):
        mode = group_mode(group_size, cfg["BLOCK_K"])
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _gemm_wna16_kernel[grid](
            x, qweight, scales, zeros if zero_point < 0 else scales, g_idx, bias if bias is not None else scales, y,
            m, n, k,
            x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0) if zero_point < 0 else 0, y.stride(0),
            BITS=bits, GROUP_MODE=mode, GROUP_SIZE=group_size if mode == 1 else 1, ZERO_POINT=max(zero_point, -1),
            HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    if config is None:
        key = ("gemm", bucket_m(m), n, k, bits, group_size, zero_point >= 0, x.dtype, scales.dtype,
               bias is not None, x.device.index)
        config = pick_config(key, prune(GEMM_CONFIGS, m, k, group_size, bits), launch)
    launch(config)
    return y


@torch.library.custom_op("quantkern::gemm_wna16_triton", mutates_args=())
def gemm_wna16_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                      zero_point: int) -> torch.Tensor:
    """The autotuned :func:`gemm_wna16` as a ``torch.library`` op (visible to ``torch.compile``)."""
    return gemm_wna16(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point)


@gemm_wna16_triton.register_fake
def _(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    torch._check(qweight.dim() == 2 and scales.dim() == 2, lambda: "qweight and scales must be 2-D")
    return x.new_empty(x.shape[0], scales.shape[1])

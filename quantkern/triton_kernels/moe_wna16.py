"""Fused MoE grouped GEMM for W{2..8}A16 experts: one launch computes one projection (gate/up or down)
of every routed expert, ``y[p] = x[rows[p]] @ dequant(W[e]) (+ bias[e])`` for the expert ``e`` owning
pair ``p`` (the pairs and their routing: :mod:`quantkern.kernels.moe`).

Launch design. The pairs are sorted by expert (``offsets [E + 1]`` on the device), but how many each
expert got is not known on the host, and reading it would cost a sync per projection. The grid is
therefore sized from what the host does know, the pair count ``P`` and ``E``::

    grid = (P // BLOCK_M + min(E, P) + 1, cdiv(N, BLOCK_N))

Expert ``e`` with ``c_e`` pairs needs ``ceil(c_e / BLOCK_M)`` row blocks; summed over the at most
``min(E, P)`` experts that have pairs this is ``<= P / BLOCK_M + min(E, P)``, and the pairs past
``offsets[E]`` (the "no expert" index) take at most one more block than their share of ``P``: the
bound covers both. Each program builds the block -> expert map itself from ``offsets`` (a vector load
of ``E + 1`` ints and a ``tl.cumsum`` of the per-expert block counts, a few hundred bytes that stay
in L2, then ``offsets[e]`` / ``offsets[e + 1]`` of its own expert as scalars): it finds its expert
by counting the experts whose blocks end at or before its block index,
so empty experts own no block and cost nothing, and every block holds pairs of one expert only
(its weight pointers are fixed for the whole K loop). Programs past the last expert block write
zero rows for the invalid tail (pairs ``offsets[E] .. P - 1``), the remaining ones return at once:
the output needs no memset, the routing no host read and no extra kernel (vLLM's
``moe_align_block_size`` pads a sorted copy of the pairs in a separate launch; here the padding is
implicit: a block's rows past its expert's end are masked).

Why not one program per (expert, M tile)? That grid is ``E * cdiv(P, BLOCK_M)``: for a 128-expert
layer at decode (``P = 8``) 128 M slots of which 120 exit at once, and at ``P = 2048`` with BLOCK_M
64 four thousand M slots for about 160 blocks of work. The map above launches at most
``min(E, P) + 1`` M slots more than there are blocks.

Inside a block: the pairs' token rows are gathered from ``x`` through ``rows`` (or read in pair
order when ``rows`` is None, as for the down projection's input), with act-order the activation
columns are gathered through the expert's permutation (K was sorted by group per expert at load, see
:func:`.layout.experts_from_gptq`), and the K loop is the dense GEMM's (:func:`._dequant.accumulate_tile`:
raw codes on the tensor cores for regular groups, zero point and scale applied in fp32; per-element
dequantization for gathered groups), fp32 accumulation, output in x's dtype. Axis 0 of the grid
walks the row blocks, so consecutive programs are usually blocks of one expert on the same weight
column tile (L2 reuse of the weight when an expert has several blocks).

Constraints: x fp16 / bf16 with unit stride along K; scales fp16 / bf16 / fp32; any P, N, K, E.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_moe_inputs, dot_in_fp32, group_mode
from ._dequant import accumulate_tile, finish_tile
from ._tuning import MOE_CONFIGS, bucket_m, check_block_k, interpreting, pick_config, prune, validate_config


@triton.jit
def _moe_wna16_kernel(
    x_ptr, rows_ptr, off_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, b_ptr, y_ptr,
    M, N, K, E,
    stride_xm, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_ge, stride_pe, stride_be,
    stride_ym,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
    HAS_ROWS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    # the block -> expert map, from the routing's offsets (M = P pairs; see the module docstring)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    lo = tl.load(off_ptr + offs_e, mask=mask_e, other=0)
    hi = tl.load(off_ptr + offs_e + 1, mask=mask_e, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M  # 0 for an empty expert and for the padding of BLOCK_E
    ends = tl.cumsum(blocks, 0)  # expert e owns row blocks ends[e] - blocks[e] .. ends[e] - 1
    n_blocks = tl.sum(blocks, 0)
    if pid_m >= n_blocks:
        # past the experts' blocks: zero rows for the pairs no expert owns (offsets[E] .. M - 1)
        offs_p = tl.load(off_ptr + E) + (pid_m - n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        y_ptrs = y_ptr + offs_p.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                 mask=(offs_p < M)[:, None] & mask_n[None, :])
        return
    e = tl.sum((ends <= pid_m).to(tl.int32), 0)  # the expert whose blocks cover pid_m
    first_block = tl.sum(tl.where(offs_e < e, blocks, 0), 0)
    offs_p = tl.load(off_ptr + e) + (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_p < tl.load(off_ptr + e + 1)
    if HAS_ROWS:
        tok = tl.load(rows_ptr + offs_p, mask=mask_m, other=0).to(tl.int64)
    else:
        tok = offs_p.to(tl.int64)
    x_rows = x_ptr + tok[:, None] * stride_xm

    e64 = e.to(tl.int64)
    qw_e = qw_ptr + e64 * stride_qe
    s_e = s_ptr + e64 * stride_se
    z_e = z_ptr + e64 * stride_ze
    g_e = g_ptr + e64 * stride_ge
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:  # act-order: kernel column k reads activation column perm[e, k]
            cols = tl.load(perm_ptr + e64 * stride_pe + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        a = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc, x_sum = accumulate_tile(a, acc, x_sum, qw_e, s_e, z_e, g_e, offs_k, offs_n, K, N, k0, stride_qk,
                                     stride_sg, stride_zg, BITS, GROUP_MODE, GROUP_SIZE, ZERO_POINT, DOT_FP32)
    acc = finish_tile(acc, x_sum, s_e, z_e, offs_n, N, stride_sg, stride_zg, GROUP_MODE, ZERO_POINT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e64 * stride_be + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_p.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def moe_grid_m(p: int, e: int, block_m: int) -> int:
    """M slots of the grid: enough for every expert's row blocks and the invalid tail's (module docstring)."""
    return p // block_m + min(e, p) + 1


def moe_wna16(x: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor, qweight: torch.Tensor,
              scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, perm: torch.Tensor | None,
              bias: torch.Tensor | None, bits: int, group_size: int, zero_point: int,
              config: dict | None = None) -> torch.Tensor:
    """The grouped projection ``[P, N]`` in x's dtype: pair ``p`` is ``x[rows[p]] @ dequant(W[e]) (+ bias[e])``
    for the expert ``e`` owning it (``rows`` None: ``x`` has one row per pair), zero past ``offsets[E]``.

    Weight arguments are the fields of a :class:`~quantkern.triton_kernels.layout.TritonExperts`.
    ``config`` pins a launch config (keys ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, optional
    ``num_warps`` / ``num_stages``) and bypasses the autotuner. Raises ``ValueError`` /
    ``RuntimeError`` from :func:`._checks.check_moe_inputs` or for a bad config. No host sync.
    """
    p, n, k, e = check_moe_inputs(x, rows, offsets, qweight, scales, zeros, g_idx, perm, bias, bits, group_size,
                                  zero_point)
    if config is not None:
        config = validate_config(config, split_k=False)
        check_block_k(config, bits)
    y = torch.empty(p, n, dtype=x.dtype, device=x.device)
    if p == 0 or n == 0:
        return y
    zs = zero_point < 0

    def launch(cfg):
        mode = group_mode(group_size, cfg["BLOCK_K"])
        grid = (moe_grid_m(p, e, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _moe_wna16_kernel[grid](
            x, rows if rows is not None else offsets, offsets, qweight, scales, zeros if zs else scales, g_idx,
            perm if perm is not None else g_idx, bias if bias is not None else scales, y,
            p, n, k, e,
            x.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            zeros.stride(0) if zs else 0, zeros.stride(1) if zs else 0, g_idx.stride(0),
            perm.stride(0) if perm is not None else 0, bias.stride(0) if bias is not None else 0, y.stride(0),
            BITS=bits, GROUP_MODE=mode, GROUP_SIZE=group_size if mode == 1 else 1, ZERO_POINT=max(zero_point, -1),
            HAS_ROWS=rows is not None, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
            DOT_FP32=dot_in_fp32(x), BLOCK_E=max(16, triton.next_power_of_2(e)),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    if config is None:
        key = ("moe", bucket_m(p), e, n, k, bits, group_size, zs, x.dtype, scales.dtype, bias is not None,
               perm is not None, rows is not None, x.device.index)
        # BLOCK_M is pruned by the mean pairs of an active expert. The first candidate is what runs untimed:
        # inside a CUDA graph capture the largest BLOCK_M left; under the interpreter, whose cost is per
        # program, the largest tile
        per_expert = -(-p // min(e, p))
        first = (lambda c: -c["BLOCK_M"] * c["BLOCK_N"]) if interpreting() else (lambda c: -c["BLOCK_M"])
        candidates = sorted(prune(MOE_CONFIGS, per_expert, k, group_size, bits), key=first)
        config = pick_config(key, candidates, launch)
    launch(config)
    return y


@torch.library.custom_op("quantkern::moe_wna16_triton", mutates_args=())
def moe_wna16_triton(x: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor, qweight: torch.Tensor,
                     scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, perm: torch.Tensor | None,
                     bias: torch.Tensor | None, bits: int, group_size: int, zero_point: int) -> torch.Tensor:
    """The autotuned :func:`moe_wna16` as one ``torch.library`` op (visible to ``torch.compile``)."""
    return moe_wna16(x, rows, offsets, qweight, scales, zeros, g_idx, perm, bias, bits, group_size, zero_point)


@moe_wna16_triton.register_fake
def _(x, rows, offsets, qweight, scales, zeros, g_idx, perm, bias, bits, group_size, zero_point):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    torch._check(qweight.dim() == 3 and scales.dim() == 3, lambda: "qweight and scales must be 3-D [E, ., N]")
    return x.new_empty(rows.shape[0] if rows is not None else x.shape[0], scales.shape[-1])


def moe_wna16_matmul(x: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor, w,
                     bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """:func:`moe_wna16` on a :class:`~quantkern.triton_kernels.layout.TritonExperts` ``w``: the
    registered ``quantkern::moe_wna16_triton`` op (autotuned), or the pinned ``config`` directly."""
    if x.dim() != 2 or x.shape[-1] != w.in_features:
        raise ValueError(f"x must be [R, {w.in_features}], got shape {tuple(x.shape)}")
    args = (x, rows, offsets, w.qweight, w.scales, w.zeros, w.g_idx, w.perm, bias, w.bits, w.group_size,
            w.zero_point)
    if config is not None:
        return moe_wna16(*args, config=config)
    return moe_wna16_triton(*args)

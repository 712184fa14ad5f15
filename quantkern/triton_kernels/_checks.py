"""Host-side checks shared by the WnA16 wrappers: every bad input is rejected here, by name, before
a kernel is launched (a wrong shape inside a Triton kernel reads out of bounds instead of failing)."""

from __future__ import annotations

import torch

from ._tuning import interpreting
from .layout import bit_planes, packed_rows

ACT_DTYPES = (torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point) -> tuple[int, int, int]:
    """Validate the arguments of the WnA16 ops (layout: :mod:`.layout`); return ``(M, N, K)``.

    Raises ``ValueError`` (shapes, dtypes, values) or ``RuntimeError`` (device: a CPU tensor
    without ``TRITON_INTERPRET=1``, or tensors on different devices).
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x must have unit stride along K (call .contiguous())")
    m, k = x.shape
    rows = packed_rows(k, bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != rows:
        raise ValueError(f"qweight must be int32 [{rows}, N] (bit planes {bit_planes(bits)} of K={k}), "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if qweight.stride(1) != 1:
        raise ValueError("qweight must be contiguous along N")
    n = qweight.shape[1]
    if scales.dtype not in SCALE_DTYPES or scales.dim() != 2 or scales.shape[1] != n or scales.shape[0] < 1:
        raise ValueError(f"scales must be fp16 / bf16 / fp32 [G, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if scales.stride(1) != 1:
        raise ValueError("scales must be contiguous along N")
    if group_size == -1 and scales.shape[0] != 1:
        raise ValueError(f"group_size -1 (one group) needs scales with 1 row, got {scales.shape[0]}")
    if group_size > 0 and scales.shape[0] != -(-k // group_size):
        raise ValueError(f"group_size {group_size} and K={k} give {-(-k // group_size)} groups, "
                         f"but scales has {scales.shape[0]} rows")
    if group_size < -1:
        raise ValueError(f"group_size must be -1, 0 (arbitrary g_idx) or positive, got {group_size}")
    if zero_point >= 0:
        if zero_point > (1 << bits) - 1:
            raise ValueError(f"zero_point {zero_point} is outside [0, {(1 << bits) - 1}] for {bits} bits")
    elif zeros.dtype != torch.uint8 or tuple(zeros.shape) != tuple(scales.shape) or zeros.stride(1) != 1:
        raise ValueError(f"zeros must be uint8 {tuple(scales.shape)} (like scales) when zero_point < 0, "
                         f"got {zeros.dtype} {tuple(zeros.shape)}")
    if g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx must be int32 [{k}], got {g_idx.dtype} {tuple(g_idx.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype not in SCALE_DTYPES):
        raise ValueError(f"bias must be float [{n}], got {bias.dtype} {tuple(bias.shape)}")
    tensors = [t for t in (qweight, scales, zeros, g_idx, bias) if t is not None and t.numel()]
    if any(t.device != x.device for t in tensors):
        raise RuntimeError(f"all tensors must be on {x.device}; got "
                           f"{sorted({str(t.device) for t in tensors})}")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError("Triton kernels need a CUDA device; CPU tensors run only under TRITON_INTERPRET=1 "
                           "(set before triton is imported, for tests)")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"Triton kernels run on CUDA devices, got {x.device}")
    return m, n, k


def group_mode(group_size: int, block_k: int) -> int:
    """Kernel group mode (see :mod:`._dequant`): 0 one group, 1 regular and BLOCK_K-aligned, 2 gather."""
    if group_size == -1:
        return 0
    if group_size > 0 and group_size % block_k == 0:
        return 1
    return 2


def dot_in_fp32(x: torch.Tensor) -> bool:
    """Triton 3.9's interpreter mishandles bf16: ``tl.dot`` on bf16 operands reinterprets their
    bits and int32 -> bf16 casts produce garbage. Under the interpreter the kernels then keep both
    dot operands in fp32 (exact for bf16 activations; the weight tile is not rounded to bf16, so the
    result is, if anything, closer to the fp32 reference). Its fp32 -> bf16 cast also truncates
    instead of rounding, so interpreted bf16 outputs carry up to one bf16 ulp of error."""
    return x.dtype == torch.bfloat16 and interpreting()


def check_moe_inputs(x, rows, offsets, qweight, scales, zeros, g_idx, perm, bias, bits, group_size,
                     zero_point) -> tuple[int, int, int, int]:
    """Validate the arguments of the grouped MoE op (layout: :class:`.layout.TritonExperts`); return
    ``(P, N, K, E)``. Expert 0's slices go through :func:`check_inputs` (every dense rule), the expert
    dim and the routing (``rows`` int ``[P]`` or None, ``offsets`` int64 ``[E + 1]``) are checked here.
    Reads no tensor value (no host sync)."""
    if qweight.dim() != 3 or qweight.shape[0] < 1:
        raise ValueError(f"qweight must be int32 [E, R, N] with E >= 1, got {qweight.dtype} {tuple(qweight.shape)}")
    e = qweight.shape[0]
    zeros_stacked = zero_point < 0
    for name, t, dims in (("scales", scales, 3), ("g_idx", g_idx, 2), ("zeros", zeros if zeros_stacked else None, 3),
                          ("perm", perm, 2), ("bias", bias, 2)):
        if t is not None and (t.dim() != dims or t.shape[0] != e):
            raise ValueError(f"{name} must be {dims}-D with {e} experts on dim 0 (like qweight), got {tuple(t.shape)}")
    _, n, k = check_inputs(x, qweight[0], scales[0], zeros[0] if zeros_stacked else zeros, g_idx[0],
                           None if bias is None else bias[0], bits, group_size, zero_point)
    if perm is not None and (perm.dtype != torch.int32 or tuple(perm.shape) != (e, k) or perm.stride(1) != 1):
        raise ValueError(f"perm must be int32 [{e}, {k}], got {perm.dtype} {tuple(perm.shape)}")
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (e + 1,) or not offsets.is_contiguous():
        raise ValueError(f"offsets must be int64 [{e + 1}] (E + 1), got {offsets.dtype} {tuple(offsets.shape)}")
    if rows is not None and (rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1
                             or not rows.is_contiguous()):
        raise ValueError(f"rows must be a contiguous 1-D int32 / int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    routing = [t for t in (rows, offsets, perm) if t is not None]
    if any(t.device != x.device for t in routing):
        raise RuntimeError(f"the routing must be on {x.device}; got {sorted({str(t.device) for t in routing})}")
    return (rows.numel() if rows is not None else x.shape[0]), n, k, e

"""Fake (meta) implementations of the CUDA ops, registered once the extension has defined them.

The schemas live in csrc/cuda/qk_binding.cpp (``TORCH_LIBRARY_FRAGMENT(quantkern, ...)``):

- ``quantkern::cuda_gemm_wna16(x, qweight, scales, zeros, bits, group_size, n, splits) -> [M, n]``
- ``quantkern::cuda_gemv_wna16(x, qweight, scales, zeros, g_idx, bits, splits) -> [M, qweight.shape[1]]``

Both return a new tensor in ``x.dtype`` on ``x.device``; the fakes let torch.compile / export trace
through them without running a kernel.
"""

from __future__ import annotations

import torch

_registered = False


def gemm_fake(x, qweight, scales, zeros, bits, group_size, n, splits):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    return x.new_empty(x.shape[0], n)


def gemv_fake(x, qweight, scales, zeros, g_idx, bits, splits):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    torch._check(x.shape[0] <= 8, lambda: f"cuda_gemv_wna16 handles up to 8 rows, got {x.shape[0]}")
    return x.new_empty(x.shape[0], qweight.shape[1])


def register_fakes() -> None:
    """Attach the fakes to the ops the extension defined (idempotent)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("quantkern::cuda_gemm_wna16")(gemm_fake)
    torch.library.register_fake("quantkern::cuda_gemv_wna16")(gemv_fake)
    _registered = True

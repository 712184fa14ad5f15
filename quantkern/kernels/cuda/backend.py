"""The CUDA backend: the tensor-core GEMM (4 / 8 bits) or the GEMV (2..8 bits, M <= 8) of csrc/cuda.

At construction the kernel object repacks the layer once (``layout.py``): the GEMM layout when the
scheme fits it (4 / 8 bits, group -1 or a multiple of 64, contiguous groups after the act-order sort),
else the GEMV layout. Per call it permutes the activations' columns for act-order layers, picks the
K-split, and calls the ``quantkern::cuda_*`` op. A GEMV-only layer (2/3/5/6/7 bits, small groups) that
later sees more than 8 rows falls back to dequantize + matmul (cuBLAS), which is the better choice for
large M anyway.
"""

from __future__ import annotations

import torch

from ..reference import gptq_gemm_reference
from ..registry import Backend, QuantKernel, register_kernel
from . import layout as L
from .build import extension_status, require_extension

_DTYPES = (torch.float16, torch.bfloat16)


def _plan(layer) -> tuple[str, str | None]:
    """("gemm", None) or ("gemv", why not the GEMM)."""
    why = L.gemm_unsupported(layer.in_features, layer.out_features, layer.bits, layer.group_size, layer.g_idx)
    return ("gemm", None) if why is None else ("gemv", why)


def gemm_splits(m: int, kp: int, np_: int, sms: int) -> int:
    """K-splits for the GEMM: enough blocks for about two per SM, each split at least 4 k-tiles deep."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    tiles = (np_ // L.GEMM_BN) * max(1, -(-m // bm))
    k_tiles = kp // L.GEMM_BK
    if tiles >= sms:
        return 1
    return max(1, min(k_tiles // 4, -(-2 * sms // tiles)))


def gemv_splits(n: int, k: int, sms: int) -> int:
    """K-splits for the GEMV: about three blocks per SM, each split at least 8 chunks (one per warp)."""
    blocks = -(-n // 32)
    chunks = -(-k // L.GEMV_CHUNK)
    return max(1, min(chunks // 8, -(-3 * sms // blocks)))


@register_kernel
class CudaKernel(QuantKernel):
    """fp16 / bf16 activations on sm_80+ CUDA devices; see the module docstring for the paths."""

    backend = Backend.CUDA
    priority = 10

    @classmethod
    def can_implement(cls, layer, x):
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} has no CUDA support"
        if x.device.type != "cuda":
            return False, f"input is on {x.device.type}, not a CUDA device"
        cap = torch.cuda.get_device_capability(x.device)
        if cap < (8, 0):
            return False, f"compute capability {cap[0]}.{cap[1]} < 8.0 (mma.sync / cp.async need sm_80+)"
        if x.dtype not in _DTYPES:
            return False, f"activation dtype {x.dtype} is not fp16 / bf16"
        if layer.scales.dtype != x.dtype:
            return False, f"scales are {layer.scales.dtype} but activations are {x.dtype} (they must match)"
        if layer.bits not in range(2, 9):
            return False, f"bits={layer.bits} outside 2..8"
        path, why = _plan(layer)
        if path == "gemv" and x.shape[0] > L.GEMV_MAX_M:
            return False, f"{why}, and the GEMV handles M <= {L.GEMV_MAX_M}, got M={x.shape[0]}"
        ok, reason = extension_status(load=True)
        if not ok:
            return False, f"CUDA extension unavailable: {reason}"
        return True, None

    def __init__(self, layer):
        super().__init__(layer)
        require_extension()
        dev = layer.qweight.device
        dtype = layer.scales.dtype
        self.sms = torch.cuda.get_device_properties(dev).multi_processor_count
        self.path, _ = _plan(layer)
        qw = layer.to_quantized()
        if self.path == "gemm":
            self.packed = L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, layer.bits, layer.group_size, dtype)
        else:
            self.packed = L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, layer.bits, dtype)
        self.perm = None if self.packed.perm is None else self.packed.perm.to(dev)
        # the GEMV path hands M > GEMV_MAX_M to the reference, which reads the canonical buffers
        self.owns_weights = self.path == "gemm"

    def __call__(self, layer, x):
        m = x.shape[0]
        if m == 0:
            return x.new_empty(0, layer.out_features)
        if self.path == "gemv" and m > L.GEMV_MAX_M:
            return gptq_gemm_reference(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                       layer.bias)
        xp = x if self.perm is None else x.index_select(1, self.perm)
        if xp.data_ptr() % 16:  # cp.async reads 16-byte chunks
            xp = xp.clone()
        p = self.packed
        if self.path == "gemm":
            y = torch.ops.quantkern.cuda_gemm_wna16(xp, p.qweight, p.scales, p.zeros, p.bits, p.group_size, p.n,
                                                    gemm_splits(m, p.kp, p.np, self.sms))
        else:
            y = torch.ops.quantkern.cuda_gemv_wna16(xp, p.qweight, p.scales, p.zeros, p.g_idx, p.bits,
                                                    gemv_splits(p.qweight.shape[1], p.k, self.sms))
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y

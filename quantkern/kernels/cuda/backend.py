"""The CUDA backend: the tensor-core GEMM (4 / 8 bits) or the GEMV (2..8 bits, M <= 8) of csrc/cuda.

When prepared, the kernel repacks the weight once (``layout.py``): the GEMM layout when the weight
fits it (4 / 8 bits, group -1 or a multiple of 64, contiguous groups after the act-order sort), else
the GEMV layout, which serves M <= 8 only (``max_m``): larger calls of such a weight go to the next
backend (Triton, or the reference), chosen per M bucket. Each call is one ``quantkern::cuda_wna16_linear``
op: inside it the activations' columns are permuted for act-order weights, copied when not 16-byte
aligned (cp.async reads 16-byte chunks), the K-split is picked and the ``quantkern::cuda_*`` kernel op
runs, then the bias is added, so ``torch.compile`` sees one op with a fake implementation.
"""

from __future__ import annotations

import torch

from ...formats.gptq import GPTQTensors, unpack_gptq
from ..registry import Backend, QuantKernel, register_kernel
from . import layout as L
from .build import extension_status, require_extension

_DTYPES = (torch.float16, torch.bfloat16)


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


@torch.library.custom_op("quantkern::cuda_wna16_linear", mutates_args=())
def cuda_wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor | None, perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                      group_size: int, n: int, k: int, sms: int) -> torch.Tensor:
    """A whole weight-only Linear on the CUDA kernels: the GEMM layout when ``g_idx`` is None, else the
    GEMV's (M <= 8). ``n`` / ``k``: the layout's output features and (unpadded) input features."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, n)
    xp = x if perm is None else x.index_select(1, perm)
    if xp.data_ptr() % 16:  # cp.async reads 16-byte chunks
        xp = xp.clone()
    if g_idx is None:
        y = torch.ops.quantkern.cuda_gemm_wna16(xp, qweight, scales, zeros, bits, group_size, n,
                                                gemm_splits(m, L._ceil_to(k, L.GEMM_BK), scales.shape[1], sms))
    else:
        y = torch.ops.quantkern.cuda_gemv_wna16(xp, qweight, scales, zeros, g_idx, bits,
                                                gemv_splits(qweight.shape[1], k, sms))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


@cuda_wna16_linear.register_fake
def _(x, qweight, scales, zeros, g_idx, perm, bias, bits, group_size, n, k, sms):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    if g_idx is not None:
        torch._check(x.shape[0] <= L.GEMV_MAX_M, lambda: f"the CUDA GEMV handles up to {L.GEMV_MAX_M} rows")
    return x.new_empty(x.shape[0], n)


@register_kernel
class CudaKernel(QuantKernel):
    """fp16 / bf16 activations on sm_80+ CUDA devices; see the module docstring for the paths."""

    backend = Backend.CUDA
    priority = 10

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} has no CUDA support"
        if device.type != "cuda":
            return False, f"input is on {device.type}, not a CUDA device"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return False, f"compute capability {cap[0]}.{cap[1]} < 8.0 (mma.sync / cp.async need sm_80+)"
        if dtype not in _DTYPES:
            return False, f"activation dtype {dtype} is not fp16 / bf16"
        if spec.scale_dtype != dtype:
            return False, f"scales are {spec.scale_dtype} but activations are {dtype} (they must match)"
        s = spec.scheme
        if s.bits not in range(2, 9):
            return False, f"bits={s.bits} outside 2..8"
        why = L.gemm_unsupported(spec.in_features, spec.out_features, s.bits, s.group_size)
        if why is not None and not shape.fits(L.GEMV_MAX_M):
            rows = f"up to {shape.m_max}" if shape.m_max is not None else "of any number"
            return False, f"{why}, and the GEMV handles M <= {L.GEMV_MAX_M}, got M {rows}"
        ok, reason = extension_status(load=True)
        if not ok:
            return False, f"CUDA extension unavailable: {reason}"
        return True, None

    owns_weights = True

    def __init__(self, tensors, dtype=None):
        super().__init__(tensors, dtype)
        require_extension()
        t, spec = tensors, tensors.spec
        s = spec.scheme
        self.sms = torch.cuda.get_device_properties(t.qweight.device).multi_processor_count
        why = L.gemm_unsupported(spec.in_features, spec.out_features, s.bits, s.group_size, t.g_idx)
        self.path = "gemm" if why is None else "gemv"
        qw = unpack_gptq(GPTQTensors(t.qweight, t.qzeros, t.scales, t.g_idx), s, spec.in_features, spec.out_features)
        if self.path == "gemm":
            self.packed = p = L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, s.bits, s.group_size, t.scales.dtype)
            self._args = (p.qweight, p.scales, p.zeros, None)
            self._dims = (p.bits, p.group_size, p.n, p.k)
        else:
            self.packed = p = L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, s.bits, t.scales.dtype)
            self.max_m = L.GEMV_MAX_M  # larger calls of this weight are another backend's
            self._args = (p.qweight, p.scales, p.zeros, p.g_idx)
            self._dims = (p.bits, 0, p.qweight.shape[1], p.k)
        self.perm = None if p.perm is None else p.perm.to(t.qweight.device)
        self.bias = t.bias

    def apply(self, x):
        return cuda_wna16_linear(x, *self._args, self.perm, self.bias, *self._dims, self.sms)

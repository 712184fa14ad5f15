"""The AWQ GEMM checkpoint layout (AutoAWQ ``WQLinear_GEMM``, read by transformers / vLLM / TGI).

Per Linear with ``K`` = in_features, ``N`` = out_features, 4 bits, ``G`` = K / group_size groups:

- ``qweight``: int32 ``[K, N/8]`` — codes packed along the *output* dim, 8 nibbles per word
- ``qzeros``:  int32 ``[G, N/8]`` — zero points, packed the same way, stored as-is (no ``- 1``)
- ``scales``:  ``[G, N]`` (fp16 in practice)

No ``g_idx``: group ``k // group_size`` (no act-order). Inside each word the 8 output columns
``8c .. 8c+7`` are interleaved: nibble ``i`` (bits ``4i .. 4i+3``) holds column ``8c + AWQ_ORDER[i]``,
with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``; readers undo it with the inverse permutation
``AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)`` (column ``j`` sits in nibble ``AWQ_REVERSE_ORDER[j]``).
This reading matches AutoAWQ's packing loop and the ``reverse_awq_order`` helpers of vLLM's tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import QuantizedWeight, WeightScheme
from .bitpack import pack_cols, unpack_cols

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
AWQ_BITS = 4


@dataclass
class AWQTensors:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor


def awq_unsupported(scheme: WeightScheme, in_features: int, out_features: int) -> str | None:
    """``None`` if a layer of this scheme and shape is representable in AWQ GEMM, else the reason."""
    reasons = []
    if scheme.bits != AWQ_BITS:
        reasons.append(f"AWQ GEMM stores 4-bit weights only, not {scheme.bits}-bit")
    if out_features % 8:
        reasons.append(f"out_features={out_features} is not a multiple of 8")
    if scheme.group_size != -1 and in_features % scheme.group_size:
        reasons.append(f"group_size={scheme.group_size} does not divide in_features={in_features}")
    return "; ".join(reasons) or None


def _interleave(values: torch.Tensor) -> torch.Tensor:
    """[rows, N] columns reordered so that plain nibble packing puts column 8c+ORDER[i] in nibble i."""
    rows, n = values.shape
    order = torch.tensor(AWQ_ORDER, device=values.device)
    return values.reshape(rows, n // 8, 8)[:, :, order].reshape(rows, n)


def _deinterleave(values: torch.Tensor) -> torch.Tensor:
    rows, n = values.shape
    rev = torch.tensor(AWQ_REVERSE_ORDER, device=values.device)
    return values.reshape(rows, n // 8, 8)[:, :, rev].reshape(rows, n)


def pack_awq(qw: QuantizedWeight) -> AWQTensors:
    """Pack a :class:`QuantizedWeight` into AWQ GEMM tensors. Raises ``ValueError`` when the scheme or
    shape is not representable (see :func:`awq_unsupported`) or ``g_idx`` is not ``k // group_size``."""
    k, n = qw.in_features, qw.out_features
    reason = awq_unsupported(qw.scheme, k, n)
    if reason:
        raise ValueError(reason)
    gs = qw.scheme.group_size if qw.scheme.group_size != -1 else k
    plain = torch.arange(k, device=qw.g_idx.device, dtype=torch.int32) // gs
    if not torch.equal(qw.g_idx.to(torch.int32), plain):
        raise ValueError("AWQ GEMM has no g_idx: act-order (a permuted group map) cannot be stored")
    return AWQTensors(
        qweight=pack_cols(_interleave(qw.codes.t().contiguous()), AWQ_BITS),
        qzeros=pack_cols(_interleave(qw.zeros), AWQ_BITS),
        scales=qw.scales.contiguous(),
    )


def unpack_awq(t: AWQTensors, group_size: int, in_features: int, out_features: int) -> QuantizedWeight:
    """Inverse of :func:`pack_awq`; the scheme is marked asymmetric (AWQ zeros are arbitrary)."""
    scheme = WeightScheme(bits=AWQ_BITS, group_size=group_size, sym=False, act_order=False)
    codes = _deinterleave(unpack_cols(t.qweight, AWQ_BITS, out_features)).t().contiguous()
    zeros = _deinterleave(unpack_cols(t.qzeros, AWQ_BITS, out_features))
    gs = group_size if group_size != -1 else in_features
    g_idx = torch.arange(in_features, dtype=torch.int32, device=t.qweight.device) // gs
    return QuantizedWeight(codes=codes, scales=t.scales, zeros=zeros, g_idx=g_idx, scheme=scheme)


def awq_shapes(in_features: int, out_features: int, num_groups: int) -> dict[str, tuple[int, int]]:
    return {"qweight": (in_features, out_features // 8), "qzeros": (num_groups, out_features // 8),
            "scales": (num_groups, out_features)}

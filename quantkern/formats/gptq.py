"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers / vLLM / TGI).

Per Linear with ``K`` = in_features, ``N`` = out_features, ``b`` bits, ``G`` groups:

- ``qweight``: int32 ``[K*b/32, N]``, codes packed along the input dim (see :mod:`.bitpack`)
- ``qzeros``:  int32 ``[G, N*b/32]``, zero points packed along the output dim
- ``scales``:  ``[G, N]`` in the model dtype
- ``g_idx``:   int32 ``[K]``

``checkpoint_format`` "gptq" (v1) stores ``zero - 1`` in qzeros, and readers add 1 back; a zero of 0
therefore cannot be stored in v1 (it would wrap to ``2**b``). "gptq_v2" stores zeros as they are.
In memory quantkern always holds the v2 convention; the conversion happens only at save / load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import QuantizedWeight, WeightScheme
from .bitpack import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def packable(in_features: int, out_features: int, bits: int) -> str | None:
    """``None`` if a Linear of this shape packs exactly into the GPTQ layout, else the reason."""
    need = 32 // bits if 32 % bits == 0 else 32
    bad = [f"{name}={v} is not a multiple of {need}" for name, v in
           (("in_features", in_features), ("out_features", out_features)) if v % need]
    return "; ".join(bad) or None


@dataclass
class GPTQTensors:
    """The four packed tensors of one Linear, zeros in the v2 (as-is) convention."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def pack_gptq(qw: QuantizedWeight) -> GPTQTensors:
    """Pack a :class:`QuantizedWeight` into the GPTQ layout (v2 zeros)."""
    b = qw.scheme.bits
    return GPTQTensors(
        qweight=pack_rows(qw.codes.t(), b),
        qzeros=pack_cols(qw.zeros, b),
        scales=qw.scales.contiguous(),
        g_idx=qw.g_idx.to(torch.int32).contiguous(),
    )


def unpack_gptq(t: GPTQTensors, scheme: WeightScheme, in_features: int, out_features: int) -> QuantizedWeight:
    """Inverse of :func:`pack_gptq`."""
    b = scheme.bits
    codes = unpack_rows(t.qweight, b, in_features).t().contiguous()
    zeros = unpack_cols(t.qzeros, b, out_features)
    return QuantizedWeight(codes=codes, scales=t.scales, zeros=zeros, g_idx=t.g_idx, scheme=scheme)


def zeros_v2_to_v1(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Convert packed v2 zeros to v1 (``zero - 1``); raises if a zero is 0 (not representable)."""
    z = unpack_cols(qzeros, bits, out_features)
    if int(z.min()) < 1:
        raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (checkpoint_format='gptq'); "
                         "write checkpoint_format='gptq_v2'")
    return pack_cols(z - 1, bits)


def zeros_v1_to_v2(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Convert packed v1 zeros (``zero - 1``) to v2. A stored ``2**b - 1`` (a v1 zero of ``2**b``) is
    out of range and raises rather than silently wrapping."""
    z = unpack_cols(qzeros, bits, out_features) + 1
    if int(z.max()) > (1 << bits) - 1:
        raise ValueError(f"qzeros hold a v1 zero of {1 << bits}, outside the {bits}-bit range: the "
                         "checkpoint was written with the v1 zero-1 overflow and cannot be read exactly")
    return pack_cols(z, bits)


def gptq_shapes(in_features: int, out_features: int, bits: int, num_groups: int) -> dict[str, tuple[int, ...]]:
    """The shapes each packed tensor must have (for validating files before a kernel sees them)."""
    return {
        "qweight": (packed_length(in_features, bits), out_features),
        "qzeros": (num_groups, packed_length(out_features, bits)),
        "scales": (num_groups, out_features),
        "g_idx": (in_features,),
    }

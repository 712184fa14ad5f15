"""What a quantized Linear costs in a checkpoint, per format: the one definition of bits per weight.

``stored_bytes`` counts the tensors a format writes for one quantized layer (codes, scales, zeros,
``g_idx``), the bias excluded: a bias is dense and is reported with the dense tensors. Bits per weight
is ``8 * stored bytes / (in_features * out_features)``, summed over the quantized layers; dense layers
(embeddings, ``lm_head``, routers) are reported beside it, never folded in. ``quantkern inspect``
reads the same tensors from a file's headers, so a plan's prediction and the written checkpoint agree.
"""

from __future__ import annotations

from ..core import WeightScheme
from .bitpack import packed_length

#: formats whose integer-layer cost this module knows
SIZED_FORMATS = ("gptq", "compressed-tensors")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def stored_bytes(fmt: str, scheme: WeightScheme, in_features: int, out_features: int, scale_bytes: int = 2) -> int:
    """Bytes ``fmt`` stores for one ``in_features -> out_features`` Linear quantized with ``scheme``
    (``scale_bytes``: 2 for fp16 / bf16 scales, 4 for fp32).

    - ``gptq``: ``qweight`` int32 ``[K*b/32, N]``, ``qzeros`` int32 ``[G, N*b/32]`` (symmetric schemes
      too), ``scales`` ``[G, N]``, ``g_idx`` int32 ``[K]``.
    - ``compressed-tensors`` (pack-quantized): ``weight_packed`` int32 ``[N, K*b/32]``, ``weight_scale``
      ``[N, G]``, and ``weight_zero_point`` int32 ``[N*b/32, G]`` for asymmetric schemes only; no
      ``g_idx`` (quantkern writes groups in column order).
    """
    k, n, b = in_features, out_features, scheme.bits
    g = num_groups(k, scheme.group_size)
    if fmt == "gptq":
        return 4 * packed_length(k, b) * n + 4 * g * packed_length(n, b) + scale_bytes * g * n + 4 * k
    if fmt == "compressed-tensors":
        zeros = 0 if scheme.sym else 4 * packed_length(n, b) * g
        return 4 * n * packed_length(k, b) + scale_bytes * g * n + zeros
    raise ValueError(f"no size model for format {fmt!r}; sized formats: {SIZED_FORMATS}")


def overhead_bytes(fmt: str) -> int:
    """Bytes ``fmt`` stores per quantized layer besides codes, scales, zeros and ``g_idx`` (counted with
    the dense tensors, as ``quantkern inspect`` counts them): compressed-tensors' int64 ``weight_shape``."""
    return 16 if fmt == "compressed-tensors" else 0


def bits_per_weight(stored: int, weights: int) -> float:
    """``8 * stored / weights`` (0.0 for no weights)."""
    return 8.0 * stored / weights if weights else 0.0

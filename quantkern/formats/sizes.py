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
from .gguf import BLOCK as GGUF_BLOCK

#: formats whose integer-layer cost this module knows and the size-budget planner plans for
SIZED_FORMATS = ("gptq", "compressed-tensors")
#: every format :func:`stored_bytes` sizes: the above, and GGUF, which the planner does not plan for
#: (its 2-, 3- and 4-bit layers cost the same 4.5 bits a weight, and it writes dense tensors at its own
#: dtypes, norms in F32 whatever the model's)
STORED_BYTES_FORMATS = SIZED_FORMATS + ("gguf",)

#: bytes per 32-weight GGUF block: fp16 d + 16 nibble bytes (Q4_0), + fp16 m (Q4_1), fp16 d + 32 int8 (Q8_0)
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


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
    - ``gguf``: ``in_features / 32`` blocks a row of the type the scheme maps to (:data:`GGUF_BLOCK_BYTES`):
      bits <= 4 symmetric -> ``Q4_0``, bits <= 4 asymmetric -> ``Q4_1``, bits 5..8 -> ``Q8_0``, as
      :mod:`quantkern.io.gguf_export` writes them, exact or re-quantized alike; the block scale is fp16
      whatever ``scale_bytes``. (A layer whose asymmetric zeros all happen to be ``2**(b-1)`` is
      written exactly as ``Q4_0``, 2 bytes a block less.) ``in_features`` must be a multiple of 32.
    """
    k, n, b = in_features, out_features, scheme.bits
    g = num_groups(k, scheme.group_size)
    if fmt == "gptq":
        return 4 * packed_length(k, b) * n + 4 * g * packed_length(n, b) + scale_bytes * g * n + 4 * k
    if fmt == "compressed-tensors":
        zeros = 0 if scheme.sym else 4 * packed_length(n, b) * g
        return 4 * n * packed_length(k, b) + scale_bytes * g * n + zeros
    if fmt == "gguf":
        if k % GGUF_BLOCK:
            raise ValueError(f"GGUF blocks hold {GGUF_BLOCK} columns: in_features {k} is not a multiple of {GGUF_BLOCK}")
        qtype = "Q8_0" if b > 4 else "Q4_0" if scheme.sym else "Q4_1"
        return GGUF_BLOCK_BYTES[qtype] * (k // GGUF_BLOCK) * n
    raise ValueError(f"no size model for format {fmt!r}; sized formats: {STORED_BYTES_FORMATS}")


def overhead_bytes(fmt: str) -> int:
    """Bytes ``fmt`` stores per quantized layer besides codes, scales, zeros and ``g_idx`` (counted with
    the dense tensors, as ``quantkern inspect`` counts them): compressed-tensors' int64 ``weight_shape``."""
    return 16 if fmt == "compressed-tensors" else 0


def bits_per_weight(stored: int, weights: int) -> float:
    """``8 * stored / weights`` (0.0 for no weights)."""
    return 8.0 * stored / weights if weights else 0.0

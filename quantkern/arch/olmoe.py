"""OLMoE: Llama-like blocks with q/k norms over the whole projection, router ``mlp.gate`` and fused
experts in the standard layout."""

from __future__ import annotations

from .base import Architecture
from .llama import NORMS, moe_scales
from .moe import STANDARD

OLMOE = Architecture("olmoe", ("olmoe",), blocks="model.layers", norms=NORMS + ("q_norm", "k_norm"),
                     routers=("mlp.gate",), experts=STANDARD, scales=moe_scales())

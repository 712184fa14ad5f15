"""Qwen2-MoE and Qwen3-MoE: Llama-like attention (Qwen3-MoE with q/k norms), a sparse MoE block
``mlp`` with router ``mlp.gate`` and fused experts ``mlp.experts`` in the standard layout; Qwen2-MoE adds
a shared expert scaled by ``mlp.shared_expert_gate`` (a ``Linear(H, 1)``, kept dense as a router)."""

from __future__ import annotations

from .base import LINEAR, Architecture, ScaleGroup
from .llama import NORMS, moe_scales
from .moe import STANDARD

QWEN2_MOE = Architecture("qwen2_moe", ("qwen2_moe",), blocks="model.layers", norms=NORMS,
                         routers=("mlp.gate", "mlp.shared_expert_gate"), experts=STANDARD,
                         scales=moe_scales(("mlp.experts", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                           (ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",),
                                                       LINEAR),)))
QWEN3_MOE = Architecture("qwen3_moe", ("qwen3_moe",), blocks="model.layers", norms=NORMS + ("q_norm", "k_norm"),
                         routers=("mlp.gate",), experts=STANDARD, scales=moe_scales())

"""Qwen3: a Llama-like block with per-head RMSNorms ``self_attn.q_norm`` / ``k_norm`` on the queries
and keys (after the projections, so they produce no Linear's input and take no scale group)."""

from __future__ import annotations

from .base import Architecture
from .llama import NORMS, llama_scales

QWEN3 = Architecture("qwen3", ("qwen3",), blocks="model.layers", scales=llama_scales(),
                     norms=NORMS + ("q_norm", "k_norm"), routers=())

"""Gemma: Llama-like blocks whose RMSNorms scale by ``1 + w`` (so AWQ / SmoothQuant divide ``1 + w``);
Gemma-2 / Gemma-3 add sandwich norms (``pre_feedforward_layernorm`` before the MLP,
``post_feedforward_layernorm`` after it), Gemma-3 q/k norms."""

from __future__ import annotations

from .base import GEMMA_NORM, Architecture
from .llama import NORMS, llama_scales

GEMMA = Architecture("gemma", ("gemma",), blocks="model.layers", scales=llama_scales(GEMMA_NORM), norms=NORMS,
                     routers=())

_SANDWICH = NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
GEMMA2 = Architecture("gemma2", ("gemma2",), blocks="model.layers",
                      scales=llama_scales(GEMMA_NORM, "pre_feedforward_layernorm"), norms=_SANDWICH, routers=())
GEMMA3 = Architecture("gemma3", ("gemma3_text",), blocks="model.layers",
                      scales=llama_scales(GEMMA_NORM, "pre_feedforward_layernorm"),
                      norms=_SANDWICH + ("q_norm", "k_norm"), routers=())

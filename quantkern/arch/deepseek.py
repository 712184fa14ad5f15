"""DeepSeek-V2 / V3 and GLM-4.5 MoE: the first ``first_k_dense_replace`` blocks have a dense MLP, the
others a router ``mlp.gate``, fused routed experts ``mlp.experts`` (standard layout) and shared experts
(plain Linears). DeepSeek's low-rank attention adds ``q_a_layernorm`` / ``kv_a_layernorm``, GLM-4.5's
optional ``q_norm`` / ``k_norm``."""

from __future__ import annotations

from .base import Architecture
from .llama import NORMS
from .moe import STANDARD

DEEPSEEK = Architecture("deepseek", ("deepseek_v2", "deepseek_v3"), blocks="model.layers",
                        norms=NORMS + ("q_a_layernorm", "kv_a_layernorm"), routers=("mlp.gate",), experts=STANDARD)
GLM4_MOE = Architecture("glm4_moe", ("glm4_moe",), blocks="model.layers", norms=NORMS + ("q_norm", "k_norm"),
                        routers=("mlp.gate",), experts=STANDARD)

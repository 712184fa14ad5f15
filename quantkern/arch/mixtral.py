"""Mixtral-style MoE (Mixtral, MiniMax, PhiMoE): router and fused experts in ``mlp``, whose original
checkpoints name the sparse block ``block_sparse_moe`` and the experts' projections ``w1`` (gate), ``w3``
(up), ``w2`` (down); PhiMoE's router is ``mlp.router`` (``block_sparse_moe.gate`` in its checkpoints)."""

from __future__ import annotations

from .base import Architecture
from .llama import NORMS, moe_scales
from .moe import ExpertsLayout

MIXTRAL_EXPERTS = ExpertsLayout(checkpoint_names=("w1", "w3", "w2"),
                                checkpoint_renames=((".mlp.", ".block_sparse_moe."),))
PHIMOE_EXPERTS = ExpertsLayout(checkpoint_names=("w1", "w3", "w2"),
                               checkpoint_renames=((".mlp.", ".block_sparse_moe."),
                                                   (".block_sparse_moe.router.", ".block_sparse_moe.gate.")))

MIXTRAL = Architecture("mixtral", ("mixtral",), blocks="model.layers", norms=NORMS, routers=("mlp.gate",),
                       experts=MIXTRAL_EXPERTS, scales=moe_scales())
#: MiniMax: Mixtral's MoE blocks, but lightning (linear) attention in most layers: no AWQ scale groups
MINIMAX = Architecture("minimax", ("minimax",), blocks="model.layers", norms=NORMS, routers=("mlp.gate",),
                       experts=MIXTRAL_EXPERTS)
PHIMOE = Architecture("phimoe", ("phimoe",), blocks="model.layers", norms=NORMS, routers=("mlp.router",),
                      experts=PHIMOE_EXPERTS, scales=moe_scales())

"""gpt-oss: router ``mlp.router``; fused experts stored transposed (``gate_up_proj [E, H, 2I]``, used as
``x @ W[e]``) with gate and up interleaved (rows ``0::2`` / ``1::2``) and per-expert biases. Its checkpoints
ship the experts fused only: there are no per-expert names to write."""

from __future__ import annotations

from .base import Architecture
from .llama import NORMS
from .moe import ExpertsLayout

GPT_OSS_EXPERTS = ExpertsLayout(gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias", transposed=True,
                                interleaved=True, checkpoint_names=None)

GPT_OSS = Architecture("gpt_oss", ("gpt_oss",), blocks="model.layers", norms=NORMS, routers=("mlp.router",),
                       experts=GPT_OSS_EXPERTS)

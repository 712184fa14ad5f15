"""Llama-like families: pre-norm decoder blocks at ``model.layers``, RMSNorms ``input_layernorm`` /
``post_attention_layernorm`` before ``q/k/v_proj`` and ``gate/up_proj``, the final ``model.norm``.
Llama itself is the one family GGUF export supports (llama.cpp's ``LLAMA`` tensor names)."""

from __future__ import annotations

from .base import LINEAR, NORM, Architecture, GGUFNames, ScaleGroup, ScaleSpec

NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


def llama_scales(norm_kind: str = NORM, mlp_norm: str = "post_attention_layernorm") -> ScaleSpec:
    """The scale groups of a Llama-like block (``norm_kind``: how its norms scale, ``mlp_norm``: the
    norm before the MLP)."""
    return ScaleSpec(
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm_kind),
            # only applied when v_proj's outputs are o_proj's inputs one to one (MHA, not GQA)
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), LINEAR),
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), norm_kind),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), LINEAR),
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    )


def moe_scales(consumers: tuple[str, ...] = ("mlp.experts",), extra: tuple[ScaleGroup, ...] = ()) -> ScaleSpec:
    """The scale groups of a block with Llama-like attention and a sparse MoE block ``mlp``: the attention
    groups, and one group whose first "Linear" is the fused experts module: ``post_attention_layernorm``
    feeds the router (dense, scaled exactly), every expert's gate/up and the other ``consumers`` (a shared
    expert's gate/up); AWQ of experts searches it with each expert's routed tokens
    (:mod:`quantkern.api.awq_experts`) and each expert's down projection folds into its own up rows."""
    attn = llama_scales().groups[:2]
    return ScaleSpec(groups=attn + (ScaleGroup("post_attention_layernorm", consumers),) + extra,
                     no_clip=("self_attn.q_proj", "self_attn.k_proj"))


LLAMA = Architecture(
    "llama", ("llama",), blocks="model.layers", scales=llama_scales(), norms=NORMS, routers=(),
    gguf=GGUFNames("LLAMA", "llama", permute=(("attn_q", "num_attention_heads"), ("attn_k", "num_key_value_heads"))))

#: same blocks, scale groups and norms as Llama; no GGUF export
LLAMA_LIKE = Architecture("llama-like", ("mistral", "qwen2", "smollm3", "granite"), blocks="model.layers",
                          scales=llama_scales(), norms=NORMS, routers=())

#: OLMo-2 normalises the *outputs* of attention and MLP (``post_attention_layernorm`` /
#: ``post_feedforward_layernorm``, no ``input_layernorm``), so no norm produces a block's Linear inputs:
#: no scale groups (the Llama ones named a norm it does not have), plus per-projection q/k norms
OLMO2 = Architecture("olmo2", ("olmo2",), blocks="model.layers",
                     norms=("post_attention_layernorm", "post_feedforward_layernorm", "q_norm", "k_norm", "norm"),
                     routers=())

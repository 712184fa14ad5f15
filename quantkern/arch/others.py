"""Families known by their decoder blocks and norms only: no scale groups (AWQ and SmoothQuant refuse
them, naming the family), no GGUF export. The data-free and GPTQ-style quantizers need no more."""

from __future__ import annotations

from .base import Architecture

_LAYERS = "model.layers"
_PRE_POST = ("input_layernorm", "post_attention_layernorm", "norm")

PHI = Architecture("phi", ("phi",), blocks=_LAYERS, norms=("input_layernorm", "final_layernorm"), routers=())
LAYERS_PRE_POST = Architecture("model.layers pre/post-norm", ("phi3", "stablelm", "starcoder2", "olmo"),
                               blocks=_LAYERS, norms=_PRE_POST + ("q_layernorm", "k_layernorm"), routers=())
COHERE = Architecture("cohere", ("cohere",), blocks=_LAYERS, norms=("input_layernorm", "norm", "q_norm", "k_norm"),
                      routers=())
#: remote code (not in transformers): its norms are found by the generic rule
INTERNLM2 = Architecture("internlm2", ("internlm2",), blocks=_LAYERS)

GPTJ = Architecture("gptj", ("gptj", "codegen"), blocks="transformer.h", norms=("ln_1", "ln_f"), routers=())
GPT_BIGCODE = Architecture("gpt_bigcode", ("gpt_bigcode",), blocks="transformer.h", norms=("ln_1", "ln_2", "ln_f"),
                           routers=())
BLOOM = Architecture("bloom", ("bloom",), blocks="transformer.h",
                     norms=("word_embeddings_layernorm", "input_layernorm", "post_attention_layernorm", "ln_f"),
                     routers=())
FALCON = Architecture("falcon", ("falcon",), blocks="transformer.h",
                      norms=("input_layernorm", "ln_attn", "ln_mlp", "post_attention_layernorm", "ln_f"), routers=())
GPT_NEOX = Architecture("gpt_neox", ("gpt_neox",), blocks="gpt_neox.layers",
                        norms=("input_layernorm", "post_attention_layernorm", "final_layer_norm"), routers=())

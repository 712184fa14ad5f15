"""Per-architecture AWQ specs: which Linears share an input, and which op produces that input.

AWQ scales the input channels of a group of Linears fed the same tensor by ``s`` (``W·diag(s)``) and
divides the producing op's output by ``s``, so the float model is unchanged. The producer is a
norm (its weight and bias are divided), a Gemma-style norm (``y = n(x)·(1 + w)``: ``1 + w`` is
divided), or a Linear whose output rows feed the group directly or through a ReLU (positively
homogeneous: ``relu(x/s) = relu(x)/s``), or the V part of a fused QKV Linear (attention output
channels are weighted sums of V's channels). A SiLU/GELU between two Linears is not homogeneous, so e.g.
GPT-2's ``c_fc -> c_proj`` has no scale group (its weights are still clipped and quantized).

Names are relative to one decoder block. GPT-2 stores its projections as ``transformers`` ``Conv1D``
(``y = x @ W + b`` with ``W [in, out]``). The quantizers refuse ``Conv1D`` layers (see
:func:`quantkern.api.targets.plan_targets`: their quantized checkpoints could not be loaded back);
:func:`conv1d_to_linear` turns them into equivalent ``nn.Linear`` layers, after which the GPT-2 spec
below applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORM, GEMMA_NORM, LINEAR = "norm", "gemma_norm", "linear"


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # producer of the shared input (module name in the block)
    linears: tuple[str, ...]  # Linears reading it (first one is used to capture the input)
    prev_kind: str = NORM  # NORM | GEMMA_NORM | LINEAR
    # for a LINEAR producer, which part of its output rows feeds the group: (index, count) of equal
    # parts, e.g. (2, 3) for the V third of GPT-2's fused c_attn ([q | k | v])
    prev_part: tuple[int, int] = (0, 1)

    def prev_rows(self, out_features: int) -> slice:
        i, c = self.prev_part
        n = out_features // c
        return slice(i * n, (i + 1) * n)


@dataclass(frozen=True)
class AWQSpec:
    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...] = ()  # Linears whose range is not clipped (q/k: attention logits are sensitive)
    conv1d: bool = False  # projections are transformers Conv1D (GPT-2)


def _llama_like(norm_kind: str = NORM, mlp_norm: str = "post_attention_layernorm") -> AWQSpec:
    return AWQSpec(
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm_kind),
            # only applied when v_proj's outputs are o_proj's inputs one to one (MHA, not GQA)
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), LINEAR),
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), norm_kind),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), LINEAR),
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    )


AWQ_SPECS: dict[str, AWQSpec] = {
    **{t: _llama_like() for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2")},
    "gemma": _llama_like(GEMMA_NORM),
    **{t: _llama_like(GEMMA_NORM, "pre_feedforward_layernorm") for t in ("gemma2", "gemma3_text")},
    "gpt2": AWQSpec(
        groups=(ScaleGroup("ln_1", ("attn.c_attn",)),
                # attention output channels are linear in V's channels: scale through c_attn's V rows
                ScaleGroup("attn.c_attn", ("attn.c_proj",), LINEAR, prev_part=(2, 3)),
                ScaleGroup("ln_2", ("mlp.c_fc",))),
        no_clip=("attn.c_attn",),  # holds q and k
        conv1d=True,
    ),
    "opt": AWQSpec(
        groups=(
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), LINEAR),
            ScaleGroup("final_layer_norm", ("fc1",)),
            ScaleGroup("fc1", ("fc2",), LINEAR),  # through ReLU
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    ),
}


def awq_spec_for(model: nn.Module, method: str = "AWQ") -> AWQSpec:
    """The spec for ``model.config.model_type``; ``ValueError`` naming the architecture (and ``method``,
    the algorithm asking: AWQ or SmoothQuant) if there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = AWQ_SPECS.get(model_type)
    if spec is None:
        raise ValueError(f"{method} has no spec for architecture model_type={model_type!r} ({type(model).__name__}); "
                         f"supported: {sorted(AWQ_SPECS)}. Add an AWQSpec in quantkern.calibration.awq_specs")
    if model_type == "opt" and getattr(model.config, "activation_function", "relu") != "relu":
        # fc1 -> fc2 folding relies on ReLU being positively homogeneous
        groups = tuple(g for g in spec.groups if g.prev != "fc1")
        spec = AWQSpec(groups, spec.no_clip, spec.conv1d)
    return spec


def conv1d_to_linear(root: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` under ``root`` by an equivalent ``nn.Linear`` (weight
    transposed to ``[out, in]``); returns how many were replaced."""
    count = 0
    for name, mod in list(root.named_modules()):
        if type(mod).__name__ != "Conv1D" or not hasattr(mod, "nf"):
            continue
        w = mod.weight.data  # [in, out]
        lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.data)
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, lin)
        count += 1
    return count

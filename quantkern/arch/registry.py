"""``config.model_type`` -> :class:`~.base.Architecture`, and the look-ups the rest of quantkern makes.

A model whose ``model_type`` no architecture covers gets :data:`~.base.GENERIC` (the generic rules:
the longest ``ModuleList`` of identical modules as the decoder blocks, logged; norms and routers by
class name; the experts layout from transformers' flags)."""

from __future__ import annotations

from torch import nn

from . import deepseek, gemma, gpt2, gpt_oss, llama, mixtral, olmoe, opt, others, qwen3, qwen_moe
from .base import GENERIC, Architecture, ScaleSpec

ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Make ``arch`` the architecture of each of its ``model_types``; ``ValueError`` if one is taken."""
    for t in arch.model_types:
        if t in ARCHITECTURES and ARCHITECTURES[t] is not arch:
            raise ValueError(f"model_type {t!r} is already covered by architecture {ARCHITECTURES[t].name!r}")
        ARCHITECTURES[t] = arch
    return arch


for _arch in (llama.LLAMA, llama.LLAMA_LIKE, llama.OLMO2, qwen3.QWEN3, gemma.GEMMA, gemma.GEMMA2, gemma.GEMMA3,
              gpt2.GPT2, opt.OPT, qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, mixtral.MIXTRAL, mixtral.MINIMAX, mixtral.PHIMOE,
              deepseek.DEEPSEEK, deepseek.GLM4_MOE, olmoe.OLMOE, gpt_oss.GPT_OSS,
              others.PHI, others.LAYERS_PRE_POST, others.COHERE, others.INTERNLM2, others.GPTJ, others.GPT_BIGCODE,
              others.BLOOM, others.FALCON, others.GPT_NEOX):
    register(_arch)


def model_type_of(model_or_config) -> str | None:
    """``config.model_type`` of a model (or of a config)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "model_type", None)


def architecture_for(model_or_config) -> Architecture:
    """The architecture of a model (or config) by its ``model_type``; :data:`~.base.GENERIC` if none covers it."""
    return ARCHITECTURES.get(model_type_of(model_or_config), GENERIC)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_name, ModuleList)`` of the decoder blocks; raises ``ValueError`` if none."""
    return architecture_for(model).find_blocks(model)


def scale_spec_for(model: nn.Module, method: str = "AWQ") -> ScaleSpec:
    """The AWQ / SmoothQuant scale groups of ``model``; ``ValueError`` naming the architecture (and
    ``method``, the algorithm asking: AWQ or SmoothQuant) if its family has none."""
    model_type = model_type_of(model)
    spec = architecture_for(model).scale_spec(getattr(model, "config", None))
    if spec is None:
        supported = sorted(t for t, a in ARCHITECTURES.items() if a.scales is not None)
        raise ValueError(f"{method} has no spec for architecture model_type={model_type!r} ({type(model).__name__}); "
                         f"supported: {supported}. Add scale groups in its file under quantkern/arch")
    return spec

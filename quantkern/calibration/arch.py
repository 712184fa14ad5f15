"""Per-architecture knowledge: where a model's decoder blocks are.

A small table keyed by ``config.model_type``; for an unknown architecture the longest ``ModuleList``
of identical modules is taken as the stack of decoder blocks (and the choice is logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger("quantkern")


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of decoder blocks


_LAYERS = ArchSpec("model.layers")
ARCH_SPECS: dict[str, ArchSpec] = {
    **{t: _LAYERS for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                            "gemma2", "gemma3_text", "phi", "phi3", "stablelm", "starcoder2", "olmo", "olmo2",
                            "cohere", "granite", "internlm2", "deepseek_v2", "deepseek_v3", "smollm3")},
    **{t: ArchSpec("transformer.h") for t in ("gpt2", "gptj", "bloom", "falcon", "gpt_bigcode", "codegen")},
    "opt": ArchSpec("model.decoder.layers"),
    "gpt_neox": ArchSpec("gpt_neox.layers"),
}


def _get(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_name, ModuleList)`` of the decoder blocks; raises ``ValueError`` if none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCH_SPECS.get(model_type)
    if spec is not None:
        blocks = _get(model, spec.blocks)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return spec.blocks, blocks
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}); "
                         "add an ArchSpec for it in quantkern.calibration.arch.ARCH_SPECS")
    logger.info("quantkern: no ArchSpec for model_type=%r, using %s (%d blocks)", model_type, best[0], len(best[1]))
    return best

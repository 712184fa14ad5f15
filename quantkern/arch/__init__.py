"""Architecture knowledge, one file per model family (see :mod:`.base` for what a family says, and
README "Adding an architecture"): decoder blocks, AWQ / SmoothQuant scale groups, norms, MoE routers
and experts layouts (:mod:`.moe`), GGUF names. :func:`architecture_for` finds a model's."""

from .base import GEMMA_NORM, GENERIC, LINEAR, NORM, Architecture, GGUFNames, ScaleGroup, ScaleSpec
from .moe import STANDARD, ExpertsLayout, experts_layout, is_router_name
from .registry import ARCHITECTURES, architecture_for, find_decoder_blocks, register, scale_spec_for

__all__ = [
    "Architecture", "ARCHITECTURES", "architecture_for", "register", "find_decoder_blocks", "scale_spec_for",
    "ScaleGroup", "ScaleSpec", "GGUFNames", "GENERIC", "NORM", "GEMMA_NORM", "LINEAR",
    "ExpertsLayout", "STANDARD", "experts_layout", "is_router_name",
]

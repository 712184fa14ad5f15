"""What quantkern knows about one model family: :class:`Architecture`, and the rules used for a model
no architecture file covers.

An :class:`Architecture` covers one or more ``config.model_type`` values and says

- ``blocks``: the dotted path of the ``ModuleList`` of decoder blocks;
- ``scales``: the AWQ / SmoothQuant scale groups (:class:`ScaleSpec`): which Linears of a block share an
  input and which op produces it (its output is divided by the smoothing factors ``s``);
- ``norms``: the leaf names of the family's norm modules (in the blocks and after them);
- ``routers``: the MoE routers, as names relative to one block (``"mlp.gate"``), kept dense;
- ``experts``: the fused 3-D experts layout and per-expert checkpoint names (:mod:`.moe`);
- ``gguf``: the llama.cpp architecture and tensor-name map (:class:`GGUFNames`), where export is supported.

A field left ``None`` means "not known for this family": the generic rule decides (the longest
``ModuleList`` of identical modules as the blocks, a norm by its class name, a router by its class
name or by a ``gate`` / ``router`` beside ``experts``, the experts layout from transformers' flags).
:data:`GENERIC` is the architecture of a model no file covers: every field ``None``.

AWQ scales the input channels of a group of Linears fed the same tensor by ``s`` (``W·diag(s)``) and
divides the producing op's output by ``s``, so the float model is unchanged. The producer is a
norm (its weight and bias are divided), a Gemma-style norm (``y = n(x)·(1 + w)``: ``1 + w`` is
divided), or a Linear whose output rows feed the group directly or through a ReLU (positively
homogeneous: ``relu(x/s) = relu(x)/s``), or the V part of a fused QKV Linear (attention output
channels are weighted sums of V's channels). A SiLU/GELU between two Linears is not homogeneous, so e.g.
GPT-2's ``c_fc -> c_proj`` has no scale group (its weights are still clipped and quantized).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from .moe import ExpertsLayout, experts_layout, is_router_name

logger = logging.getLogger("quantkern")

NORM, GEMMA_NORM, LINEAR = "norm", "gemma_norm", "linear"


@dataclass(frozen=True)
class ScaleGroup:
    """Linears of one block that read the same input, and the op producing it (names relative to a block)."""

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
class ScaleSpec:
    """The scale groups of one family, for AWQ and SmoothQuant."""

    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...] = ()  # Linears whose range is not clipped (q/k: attention logits are sensitive)
    conv1d: bool = False  # projections are transformers Conv1D (GPT-2)


@dataclass(frozen=True)
class GGUFNames:
    """How llama.cpp names a family: ``arch`` is the ``gguf.MODEL_ARCH`` member whose tensor-name map
    is used, ``name`` the architecture string of the file, ``permute`` the GGUF tensors whose rows
    llama.cpp's converter permutes into its rotary layout, with the config attribute giving their
    number of heads."""

    arch: str
    name: str
    permute: tuple[tuple[str, str], ...] = ()

    def permute_heads(self, gguf_name: str, cfg) -> int | None:
        """The head count of ``gguf_name``'s rotary permutation (``attn_q`` / ``attn_k``), else None."""
        leaf = gguf_name.split(".")[-1]
        return next((getattr(cfg, attr) for t, attr in self.permute if t == leaf), None)


@dataclass(frozen=True)
class Architecture:
    """One model family (see the module docstring). Register it with
    :func:`quantkern.arch.registry.register`."""

    name: str
    model_types: tuple[str, ...] = ()
    blocks: str | None = None
    scales: ScaleSpec | None = None
    norms: tuple[str, ...] | None = None
    routers: tuple[str, ...] | None = None
    experts: ExpertsLayout | None = None
    gguf: GGUFNames | None = None

    # -- decoder blocks ------------------------------------------------------------------------------
    def find_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """``(dotted_name, ModuleList)`` of the decoder blocks: ``blocks`` when it names a non-empty
        ``ModuleList``, else the longest ``ModuleList`` of identical modules (logged); ``ValueError`` if none."""
        if self.blocks is not None:
            blocks = _get(model, self.blocks)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return self.blocks, blocks
        return _longest_module_list(model, self)

    # -- AWQ / SmoothQuant ---------------------------------------------------------------------------
    def scale_spec(self, config) -> ScaleSpec | None:
        """The scale groups for a model of ``config`` (a family may drop groups its config breaks)."""
        return self.scales

    # -- norms ---------------------------------------------------------------------------------------
    def is_norm(self, name: str, mod: nn.Module) -> bool:
        """Whether module ``name`` is a norm: by its leaf name for a known family, else by class name."""
        if self.norms is None:
            return generic_is_norm(mod)
        return name.rpartition(".")[2] in self.norms

    # -- MoE -----------------------------------------------------------------------------------------
    def is_router(self, name: str, mod: nn.Module, model: nn.Module) -> bool:
        """Whether module ``name`` is an MoE router (kept dense): one of ``routers`` in a decoder block
        for a known family, else :func:`generic_is_router`; in any family a ``gate`` / ``router`` beside
        ``experts`` too (custom MoE code on a dense family's blocks)."""
        if self.routers is None or self.blocks is None:
            return generic_is_router(name, mod, model)
        m = re.fullmatch(re.escape(self.blocks) + r"\.\d+\.(.+)", name)
        if m is not None and m.group(1) in self.routers:
            return True
        parent, _, leaf = name.rpartition(".")
        return is_router_name(leaf, model.get_submodule(parent) if parent else model)

    def experts_layout(self, mod: nn.Module) -> ExpertsLayout | None:
        """The layout of ``mod`` if it is a fused 3-D experts module, else None (see :func:`.moe.experts_layout`)."""
        return experts_layout(mod, self.experts)


# -- the generic rules (a model no architecture file covers) --------------------------------------------
def generic_is_norm(mod: nn.Module) -> bool:
    """A norm by its class name (``LlamaRMSNorm``, ``LayerNorm``...)."""
    return "norm" in type(mod).__name__.lower()


def generic_is_router(name: str, mod: nn.Module, model: nn.Module) -> bool:
    """An MoE router by its class (``Qwen3MoeTopKRouter``, DeepSeek's ``MoEGate``) or by its name (a
    ``gate`` / ``router`` beside ``experts``, a shared-expert gate)."""
    kind = type(mod).__name__
    if "Router" in kind or kind.endswith("Gate"):
        return True
    parent, _, leaf = name.rpartition(".")
    return is_router_name(leaf, model.get_submodule(parent) if parent else model)


def _get(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _longest_module_list(model: nn.Module, arch: Architecture) -> tuple[str, nn.ModuleList]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}); "
                         "add an architecture for it in quantkern/arch (README: Adding an architecture)")
    if arch.blocks is None:
        logger.info("quantkern: no architecture for model_type=%r, using %s (%d blocks)", model_type, best[0],
                    len(best[1]))
    else:
        logger.info("quantkern: %s has no decoder blocks at %s (model_type=%r), using %s (%d blocks)", arch.name,
                    arch.blocks, model_type, best[0], len(best[1]))
    return best


#: the architecture of a model no file covers: every rule generic
GENERIC = Architecture("generic")

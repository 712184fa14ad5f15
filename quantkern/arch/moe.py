"""Mixture-of-Experts architecture knowledge, in one place: which module holds the experts, how its
fused 3-D parameters are laid out, and the per-expert names the models' original Hugging Face
checkpoints use (the names transformers 5's conversion mappings read, and vLLM's GPTQ MoE path and
GPTQModel expect).

transformers 5 stores the routed experts of every MoE family as one ``...Experts`` module with fused
parameters ``gate_up_proj`` and ``down_proj`` whose forward is ``forward(hidden_states, top_k_index,
top_k_weights)``. The class decorator ``transformers.integrations.use_experts_implementation`` records the
layout on each instance (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``); quantkern reads
those flags, so a family without an architecture file works too when it has the standard layout (with
the ``gate_proj`` / ``up_proj`` / ``down_proj`` checkpoint names of the Qwen2-MoE conversion mapping).
The families' own layouts are in their architecture files (``mixtral.py``, ``gpt_oss.py``...).

Layout, with ``E`` experts, hidden size ``H`` and expert intermediate size ``I``:

- not transposed (Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, GLM-4.5, PhiMoE): ``gate_up_proj [E, 2I, H]``
  and ``down_proj [E, H, I]``, used as ``F.linear(x, W[e])``;
- transposed (gpt-oss): ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, used as ``x @ W[e]``;
- concatenated: ``gate = rows [0, I)``, ``up = rows [I, 2I)`` of the ``[2I, H]`` projection; interleaved
  (gpt-oss): ``gate = rows 0::2``, ``up = rows 1::2``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ExpertsLayout:
    """How one family's experts module stores its weights and how its checkpoints name them.

    ``checkpoint_names``: the per-expert module names under ``experts.{e}.`` for (gate, up, down) in the
    original HF checkpoints, or None when the family has none (gpt-oss ships fused experts only).
    ``checkpoint_renames``: ``(module-tree text, checkpoint text)`` substitutions of the family's
    conversion mapping, applied to every key at save (and undone at load): Mixtral checkpoints name the
    sparse MoE block ``block_sparse_moe``."""

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    gate_up_bias: str | None = None
    down_bias: str | None = None
    transposed: bool = False
    interleaved: bool = False
    checkpoint_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")
    checkpoint_renames: tuple[tuple[str, str], ...] = ()


#: the layout transformers 5 uses for most families, with the Qwen2-MoE conversion mapping's names
STANDARD = ExpertsLayout()

#: the generic router rule (families without an architecture file): leaf names of MoE routers (kept
#: dense), ``gate`` / ``router`` beside ``experts``, Qwen2-MoE's ``shared_expert_gate`` (a ``Linear(H, 1)``
#: scaling the shared expert)
ROUTER_LEAVES = ("gate", "router")
SHARED_EXPERT_GATES = ("shared_expert_gate",)


def is_router_name(leaf: str, parent: nn.Module) -> bool:
    """A router by its name: ``gate`` / ``router`` in a module that has ``experts``, or a shared-expert gate."""
    return (leaf in ROUTER_LEAVES and hasattr(parent, "experts")) or \
        (leaf in SHARED_EXPERT_GATES and hasattr(parent, "shared_expert"))


def experts_layout(mod: nn.Module, layout: ExpertsLayout | None = None) -> ExpertsLayout | None:
    """The layout of ``mod`` if it is a fused 3-D experts module (transformers 5), else None.

    ``layout``: the family's (:attr:`quantkern.arch.Architecture.experts`); None reads it from the flags
    transformers records on the module.

    Raises ``ValueError`` for a fused experts module whose layout quantkern cannot follow (no gate,
    post-expert norms, a different activation interface), naming its type."""
    gu, dn = getattr(mod, "_parameters", {}).get("gate_up_proj"), getattr(mod, "_parameters", {}).get("down_proj")
    if gu is None or dn is None or gu.dim() != 3 or dn.dim() != 3:
        return None
    if layout is None:
        flags_bias = bool(getattr(mod, "has_bias", False))
        layout = ExpertsLayout(
            gate_up_bias="gate_up_proj_bias" if flags_bias else None,
            down_bias="down_proj_bias" if flags_bias else None,
            transposed=bool(getattr(mod, "is_transposed", False)),
            interleaved=not bool(getattr(mod, "is_concatenated", True)),
            checkpoint_names=STANDARD.checkpoint_names if not flags_bias and getattr(mod, "is_concatenated", True)
            and not getattr(mod, "is_transposed", False) else None)
    kind = type(mod).__name__
    if not getattr(mod, "has_gate", True):
        raise ValueError(f"{kind}: experts without a gate projection (has_gate=False) are not supported yet")
    if getattr(mod, "has_post_expert_norm", False):
        raise ValueError(f"{kind}: experts with a post-expert norm are not supported yet")
    if not hasattr(mod, "act_fn") and "_apply_gate" not in type(mod).__dict__:
        raise ValueError(f"{kind}: fused experts without act_fn or _apply_gate: the activation is unknown")
    return layout


def experts_shape(mod: nn.Module, layout: ExpertsLayout) -> tuple[int, int, int]:
    """``(E, H, I)`` of a fused experts module."""
    gu, dn = getattr(mod, layout.gate_up), getattr(mod, layout.down)
    if layout.transposed:
        e, h, two_i = gu.shape
        if tuple(dn.shape) != (e, two_i // 2, h):
            raise ValueError(f"{type(mod).__name__}: down_proj {list(dn.shape)} does not match gate_up_proj {list(gu.shape)}")
    else:
        e, two_i, h = gu.shape
        if tuple(dn.shape) != (e, h, two_i // 2):
            raise ValueError(f"{type(mod).__name__}: down_proj {list(dn.shape)} does not match gate_up_proj {list(gu.shape)}")
    if two_i % 2:
        raise ValueError(f"{type(mod).__name__}: gate_up_proj has an odd fused size {two_i}")
    return e, h, two_i // 2


def linear_weight(param, e: int, layout: ExpertsLayout):
    """Expert ``e``'s weight as an ``nn.Linear`` weight ``[out, in]``."""
    w = param[e]
    return w.t() if layout.transposed else w


def split_gate_up(rows, layout: ExpertsLayout, dim: int = 0):
    """``(gate, up)`` of a fused ``[2I, ...]`` tensor along ``dim`` (the fused output dim)."""
    n = rows.shape[dim]
    if layout.interleaved:
        idx = slice(0, None, 2), slice(1, None, 2)
        sl = [slice(None)] * rows.dim()
        sl[dim] = idx[0]
        g = rows[tuple(sl)]
        sl[dim] = idx[1]
        return g, rows[tuple(sl)]
    return rows.narrow(dim, 0, n // 2), rows.narrow(dim, n // 2, n // 2)


def fuse_gate_up(gate, up, layout: ExpertsLayout, dim: int = 0):
    """Inverse of :func:`split_gate_up`."""
    import torch

    if layout.interleaved:
        return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)
    return torch.cat([gate, up], dim=dim)

"""Where a decoder block's tensors are in the dense source checkpoint, and reading only those.

Most tensors are stored under their module-tree names. Fused MoE experts (transformers 5 holds them as
``mlp.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``) are stored either

- fused, as the module holds them (a checkpoint written from the model's state dict), or
- per expert under the original Hugging Face names (``mlp.experts.{e}.gate_proj.weight`` / ``up_proj`` /
  ``down_proj``, Mixtral ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``): what the Hub checkpoints
  hold, and what transformers 5's ``save_pretrained`` writes (it reverses its conversion mapping).

Every name is looked up as the module tree spells it and with the family's ``checkpoint_renames``
(Mixtral's router is ``block_sparse_moe.gate.weight`` in its checkpoints). Per-expert tensors are
stacked into the fused parameter one expert at a time (gate and up fused with the layout's
:func:`~quantkern.arch.moe.fuse_gate_up`), so a block costs its own size and one expert more.
:func:`plan_block` resolves every name from the safetensors headers alone, before any block is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch.moe import ExpertsLayout, experts_shape, fuse_gate_up
from ..io.experts import expert_prefix, rename
from .source import SourceCheckpoint


@dataclass(frozen=True)
class Stacked:
    """A fused experts parameter of ``shape`` made of per-expert source tensors: ``parts[e]`` is
    ``(gate, up)`` (fused with ``fuse_gate_up``) or ``(down,)``; ``weight``: Linear weights ``[out, in]``
    (transposed into the parameter for a transposed layout), else 1-D biases."""

    parts: tuple[tuple[str, ...], ...]
    layout: ExpertsLayout
    shape: tuple[int, ...]
    weight: bool


def _experts_modules(block: nn.Module, arch) -> dict[str, tuple[nn.Module, ExpertsLayout]]:
    out = {}
    for name, mod in block.named_modules():
        layout = arch.experts_layout(mod)
        if layout is not None:
            out[name] = (mod, layout)
    return out


def _per_expert(source: SourceCheckpoint, full_module: str, mod: nn.Module, layout: ExpertsLayout, pname: str,
                where: str) -> Stacked | None:
    """The per-expert source tensors of fused parameter ``pname`` of experts module ``full_module``, or
    None when the source has none of them (expert 0's first tensor absent under both spellings).
    Raises ``ValueError`` naming the first missing tensor or the first wrong shape."""
    if layout.checkpoint_names is None:
        return None
    e_n, h, i = experts_shape(mod, layout)
    gate_n, up_n, down_n = layout.checkpoint_names
    kinds = [(layout.gate_up, "weight", (gate_n, up_n), (i, h)), (layout.down, "weight", (down_n,), (h, i)),
             (layout.gate_up_bias, "bias", (gate_n, up_n), (i,)), (layout.down_bias, "bias", (down_n,), (h,))]
    found = next((k[1:] for k in kinds if k[0] is not None and k[0] == pname), None)
    if found is None:
        return None
    suffix, projs, shape = found
    bases = dict.fromkeys([expert_prefix(full_module, layout), full_module])  # checkpoint spelling first
    base = next((b for b in bases if f"{b}.0.{projs[0]}.{suffix}" in source.headers), None)
    if base is None:
        return None
    parts = tuple(tuple(f"{base}.{e}.{p}.{suffix}" for p in projs) for e in range(e_n))
    for e, names in enumerate(parts):
        for n in names:
            if n not in source.headers:
                raise ValueError(f"the source checkpoint {source.path} lacks tensor {n!r} ({where}: expert {e} of "
                                 f"{full_module}, {e_n} experts stored per expert)")
            got = tuple(source.shape(n))
            if got != shape:
                raise ValueError(f"the source checkpoint {source.path}: tensor {n!r} has shape {list(got)}, the "
                                 f"config.json gives {list(shape)} ({where}: expert {e} of {full_module})")
    return Stacked(parts, layout, tuple(getattr(mod, pname).shape), suffix == "weight")


def plan_block(block: nn.Module, prefix: str, arch, source: SourceCheckpoint, where: str
               ) -> dict[str, str | Stacked]:
    """``{block state-dict key (relative): source tensor name, or Stacked}`` for the block at ``prefix``
    (``"model.layers.3."``) of a skeleton of family ``arch``. Reads headers only. Raises ``ValueError``
    naming the first tensor the source lacks (for fused experts: naming both spellings looked for) or
    whose shape differs from the skeleton's."""
    experts = _experts_modules(block, arch)
    renames = next((lay.checkpoint_renames for _, lay in experts.values()), None)
    if renames is None:
        renames = arch.experts.checkpoint_renames if getattr(arch, "experts", None) is not None else ()
    params = {f"{m}.{p}": (m, mod, lay, p) for m, (mod, lay) in experts.items()
              for p in (lay.gate_up, lay.down, lay.gate_up_bias, lay.down_bias) if p is not None}
    out: dict[str, str | Stacked] = {}
    for k, t in block.state_dict(keep_vars=True).items():
        full = prefix + k
        names = list(dict.fromkeys([full, rename(full, renames)]))
        hit = next((n for n in names if n in source.headers), None)
        if hit is not None:
            got = tuple(source.shape(hit))
            if got != tuple(t.shape):
                raise ValueError(f"the source checkpoint {source.path}: tensor {hit!r} has shape {list(got)}, the "
                                 f"config.json gives {list(t.shape)} ({where})")
            out[k] = hit
            continue
        if k in params:
            m, mod, lay, p = params[k]
            st = _per_expert(source, prefix + m, mod, lay, p, where)
            if st is not None:
                out[k] = st
                continue
            per = ""
            if lay.checkpoint_names is not None and p in (lay.gate_up, lay.down):
                projs = lay.checkpoint_names[:2] if p == lay.gate_up else lay.checkpoint_names[2:]
                per = " nor per-expert tensors " + " / ".join(
                    f"{expert_prefix(prefix + m, lay)}.{{e}}.{x}.weight" for x in projs)
            raise ValueError(f"the source checkpoint {source.path} lacks tensor {names[-1]!r} ({where}: fused "
                             f"experts of {prefix + m}; found neither {' / '.join(map(repr, names))}{per})")
        raise ValueError(f"the source checkpoint {source.path} lacks tensor {' / '.join(map(repr, names))} ({where})")
    return out


def load_block(plan: dict[str, str | Stacked], source: SourceCheckpoint, dtype: torch.dtype
               ) -> dict[str, torch.Tensor]:
    """The block's tensors (CPU, floating ones in ``dtype``) under their relative names, per-expert
    tensors stacked into the fused parameters one expert at a time; reads only the tensors in ``plan``."""
    out: dict[str, torch.Tensor] = {}
    direct = {k: n for k, n in plan.items() if isinstance(n, str)}
    loaded = source.load(list(direct.values()), dtype)
    out.update({k: loaded[n] for k, n in direct.items()})
    del loaded
    with source.reader(dtype) as get:
        for k, st in plan.items():
            if isinstance(st, str):
                continue
            fused = torch.empty(st.shape, dtype=dtype)
            for e, names in enumerate(st.parts):
                ts = [get(n) for n in names]
                w = fuse_gate_up(*ts, st.layout, dim=0) if len(ts) == 2 else ts[0]
                fused[e] = w.t() if st.weight and st.layout.transposed else w
                del ts, w
            out[k] = fused
    return out

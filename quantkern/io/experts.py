"""Quantized MoE experts in GPTQ checkpoints: per-expert tensors under the names of the model's
original Hugging Face checkpoints (``mlp.experts.{e}.gate_proj.qweight`` ..., Mixtral
``block_sparse_moe.experts.{e}.w1.qweight`` ...; see :mod:`quantkern.arch.moe`), the fused gate/up
projection split back into gate and up. That is what vLLM's GPTQ / Marlin MoE path and GPTQModel read.

In memory a :class:`~quantkern.nn.quant_experts.QuantExperts` holds every expert stacked; at save each
expert becomes three ordinary GPTQ Linears' tensors, at load they are validated one by one as any GPTQ
Linear (:func:`~quantkern.io.validate.validate_gptq_layer`) and stacked again.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..arch import architecture_for
from ..arch.moe import experts_shape, fuse_gate_up, split_gate_up
from ..core import QuantizedWeight
from ..formats.bitpack import pack_cols, unpack_cols


def rename(key: str, renames, reverse: bool = False) -> str:
    """Apply a family's ``checkpoint_renames`` to ``key`` (module tree -> checkpoint, or back)."""
    pairs = [(b, a) for a, b in reversed(renames)] if reverse else renames
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def quant_experts(model: nn.Module) -> dict:
    from ..nn.quant_experts import QuantExperts

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}


def routers(model: nn.Module) -> list[str]:
    """The names of the MoE routers (and shared-expert gates) of ``model``: kept dense, and Linears in
    the families' original checkpoints (so compressed-tensors lists them as ignored)."""
    from ..arch.moe import is_router_name

    out = []
    for name, mod in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        w = getattr(mod, "weight", None)
        if leaf and isinstance(w, torch.Tensor) and w.dim() == 2 and is_router_name(leaf, model.get_submodule(parent)):
            out.append(name)
    return out


def expert_prefix(name: str, layout) -> str:
    """The checkpoint name of the experts module ``name`` (e.g. Mixtral's ``block_sparse_moe.experts``)."""
    return rename("." + name, layout.checkpoint_renames)[1:]


def expert_modules(name: str, m) -> list[tuple[str, tuple]]:
    """``[(checkpoint module name, scheme key)]`` of every per-expert Linear of QuantExperts ``m``."""
    p = expert_prefix(name, m.layout)
    key = (m.bits, m.group_size, m.sym, m.desc_act)
    return [(f"{p}.{e}.{proj}", key) for e in range(m.num_experts) for proj in m.layout.checkpoint_names]


def experts_dynamic_pattern(name: str, m) -> str:
    """One GPTQModel ``dynamic`` regex for all the per-expert Linears of ``m``."""
    names = "|".join(re.escape(n) for n in m.layout.checkpoint_names)
    return rf"^{re.escape(expert_prefix(name, m.layout))}\.\d+\.({names})$"


def expert_weights(name: str, m):
    """``[(checkpoint Linear name, QuantizedWeight [out, in])]`` of every per-expert Linear of
    QuantExperts ``m`` (gate and up split back out of the fused projection), in checkpoint order."""
    gate_n, up_n, down_n = m.layout.checkpoint_names
    p = expert_prefix(name, m.layout)
    out = []
    for e in range(m.num_experts):
        gu = m.gate_up_proj.to_quantized(e)
        halves = [split_gate_up(t, m.layout, dim=0) for t in (gu.codes, gu.scales.t(), gu.zeros.t())]
        for j, proj in enumerate((gate_n, up_n)):
            codes, scales, zeros = (h[j].contiguous() for h in halves)
            out.append((f"{p}.{e}.{proj}", QuantizedWeight(codes, scales.t().contiguous(), zeros.t().contiguous(),
                                                          gu.g_idx, gu.scheme)))
        out.append((f"{p}.{e}.{down_n}", m.down_proj.to_quantized(e)))
    return out


def stacked_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of every QuantExperts' stacked tensors (replaced by per-expert ones at save)."""
    return {f"{n}.{proj}.{part}" for n in quant_experts(model) for proj in ("gate_up_proj", "down_proj")
            for part in ("qweight", "qzeros", "scales", "g_idx", "bias")}


def experts_to_checkpoint(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the stacked QuantExperts tensors in state dict ``sd`` by per-expert GPTQ tensors (v2
    zeros) under the checkpoint names, and apply the family's key renames to every key."""
    experts = quant_experts(model)
    if not experts:
        return sd
    renames = next(iter(experts.values())).layout.checkpoint_renames
    out = {}
    stacked = stacked_keys(model)
    for k, t in sd.items():
        if k not in stacked:
            out[rename(k, renames)] = t
    for name, m in experts.items():
        gate_n, up_n, down_n = m.layout.checkpoint_names
        p = expert_prefix(name, m.layout)
        b, i = m.bits, m.intermediate_size
        gu, dn = m.gate_up_proj, m.down_proj
        for e in range(m.num_experts):
            qw = gu.qweight[e].cpu()
            z = unpack_cols(gu.qzeros[e].cpu(), b, 2 * i)
            s = gu.scales[e].cpu()
            parts = zip((gate_n, up_n), split_gate_up(qw, m.layout, dim=1), split_gate_up(z, m.layout, dim=1),
                        split_gate_up(s, m.layout, dim=1))
            for proj, q_, z_, s_ in parts:
                out[f"{p}.{e}.{proj}.qweight"] = q_.contiguous()
                out[f"{p}.{e}.{proj}.qzeros"] = pack_cols(z_.contiguous(), b)
                out[f"{p}.{e}.{proj}.scales"] = s_.contiguous()
                out[f"{p}.{e}.{proj}.g_idx"] = gu.g_idx[e].cpu().clone()
            out[f"{p}.{e}.{down_n}.qweight"] = dn.qweight[e].cpu().contiguous()
            out[f"{p}.{e}.{down_n}.qzeros"] = dn.qzeros[e].cpu().contiguous()
            out[f"{p}.{e}.{down_n}.scales"] = dn.scales[e].cpu().contiguous()
            out[f"{p}.{e}.{down_n}.g_idx"] = dn.g_idx[e].cpu().clone()
    return out


def experts_from_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor], cfg, checkpoint_format, dtype,
                            backend) -> tuple[dict, set[str]]:
    """Rebuild the fused experts modules of skeleton ``model`` whose per-expert GPTQ tensors ``tensors``
    holds (``checkpoint_format``: "gptq" / "gptq_v2", or a callable giving it, called only if needed; the
    format must be stated by the config: expert zeros are not used as evidence yet). Returns ``({experts
    module name: (QuantExperts, its state-dict tensors)}, checkpoint keys used)``, ready for
    :func:`~quantkern.io.load.assemble`. Raises :class:`~quantkern.io.validate.CheckpointTensorError`
    naming the tensor for a missing expert, a scheme that differs between the experts of one module, or
    gate / up with different ``g_idx``."""
    from .validate import CheckpointTensorError, validate_gptq_layer

    fmt = [checkpoint_format]

    def layer(lname: str, k: int, n: int):
        scheme = cfg.scheme_for(lname)
        if scheme is None:
            raise CheckpointTensorError(f"{lname}.qweight: the config excludes {lname!r} from quantization, "
                                        "yet the file holds packed weights for it")
        if f"{lname}.bias" in tensors:
            raise CheckpointTensorError(f"{lname}.bias: biases of quantized experts are not supported")
        if callable(fmt[0]):  # resolved only for a checkpoint that has quantized experts
            fmt[0] = fmt[0]()
        v2 = validate_gptq_layer(lname, tensors, scheme, k, n, fmt[0])
        return scheme, v2, {f"{lname}.{part}" for part in ("qweight", "qzeros", "scales", "g_idx")}

    return stack_experts(model, tensors, layer, dtype, "qweight")


def stack_experts(model: nn.Module, keys, layer, dtype, marker: str) -> tuple[dict, set[str]]:
    """The format-independent half of loading experts: for every fused experts module of skeleton
    ``model`` whose per-expert Linears ``keys`` holds (``{name}.{marker}``, e.g. ``qweight`` or
    ``weight_packed``), ``layer(checkpoint Linear name, in_features, out_features) -> (scheme, GPTQ v2
    tensors under that name, checkpoint keys used)`` validates and converts each expert projection; they
    are checked to share one scheme (and gate / up one ``g_idx``) and stacked into a QuantExperts on the
    meta device with its state-dict tensors. Returns ``({name: (QuantExperts, tensors)}, keys used)``."""
    from ..nn.quant_experts import QuantExperts, gating_owner
    from .validate import CheckpointTensorError

    out, used = {}, set()
    for name, mod, layout, p, (n_exp, h, i) in _experts_in_file(model, keys, marker):
        schemes = set()
        per: dict[str, list] = {"gate": [], "up": [], "down": []}
        for e in range(n_exp):
            for role, proj, (k, n) in zip(("gate", "up", "down"), layout.checkpoint_names, ((h, i), (h, i), (i, h))):
                lname = f"{p}.{e}.{proj}"
                if f"{lname}.{marker}" not in keys:
                    raise CheckpointTensorError(f"{lname}.{marker}: missing; the checkpoint holds other experts of {p} "
                                                f"({n_exp} experts expected)")
                scheme, v2, names = layer(lname, k, n)
                schemes.add(scheme)
                if len(schemes) > 1:
                    raise CheckpointTensorError(f"{lname}: scheme {scheme.describe()} differs from the other experts "
                                                f"of {p}; quantkern holds one scheme per experts module")
                used |= names
                per[role].append((lname, v2))
        scheme = schemes.pop()
        q = QuantExperts(n_exp, h, i, scheme.bits, scheme.group_size, scheme.sym, scheme.act_order, layout=layout,
                         gate_owner=None, dtype=dtype or per["gate"][0][1][f"{per['gate'][0][0]}.scales"].dtype,
                         device="meta", name=name)
        q.__dict__["_gate_owner"] = gating_owner(mod)
        state = {}
        cols = {"qweight": [], "qzeros": [], "scales": [], "g_idx": []}
        for (gn, g), (un, u) in zip(per["gate"], per["up"]):
            if not torch.equal(g[f"{gn}.g_idx"], u[f"{un}.g_idx"]):
                raise CheckpointTensorError(f"{un}.g_idx: differs from {gn}.g_idx; quantkern fuses gate and up and needs "
                                            "one g_idx for both (quantize them from the same inputs)")
            cols["qweight"].append(fuse_gate_up(g[f"{gn}.qweight"], u[f"{un}.qweight"], layout, dim=1))
            zg, zu = (unpack_cols(t, scheme.bits, i) for t in (g[f"{gn}.qzeros"], u[f"{un}.qzeros"]))
            cols["qzeros"].append(pack_cols(fuse_gate_up(zg, zu, layout, dim=1).contiguous(), scheme.bits))
            cols["scales"].append(fuse_gate_up(g[f"{gn}.scales"], u[f"{un}.scales"], layout, dim=1))
            cols["g_idx"].append(g[f"{gn}.g_idx"])
        for part, ts in cols.items():
            state[f"{name}.gate_up_proj.{part}"] = torch.stack(ts).contiguous()
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            state[f"{name}.down_proj.{part}"] = torch.stack([d[f"{dn}.{part}"] for dn, d in per["down"]]).contiguous()
        for proj in ("gate_up_proj", "down_proj"):
            k = f"{name}.{proj}.scales"
            state[k] = state[k].to(q.gate_up_proj.scales.dtype)
        out[name] = (q, state)
    return out, used


def checkpoint_renames(model: nn.Module):
    """The key renames of ``model``'s family (empty for most)."""
    layout = architecture_for(model).experts
    return layout.checkpoint_renames if layout is not None else ()


def expert_linears(model: nn.Module, headers, marker: str = "qweight") -> tuple[dict, set[str], tuple, dict]:
    """For ``quantkern inspect``: ``({checkpoint per-expert Linear name: stand-in with in_features /
    out_features}, fused experts modules quantized in the file, the family's key renames, {checkpoint
    experts module: number of experts})`` of skeleton ``model`` and safetensors ``headers``."""
    from types import SimpleNamespace

    per, fused, counts = {}, set(), {}
    for name, mod, layout, p, (n_exp, h, i) in _experts_in_file(model, headers, marker):
        fused.add(name)
        counts[p] = n_exp
        for e in range(n_exp):
            for proj, (k, n) in zip(layout.checkpoint_names, ((h, i), (h, i), (i, h))):
                per[f"{p}.{e}.{proj}"] = SimpleNamespace(in_features=k, out_features=n)
    return per, fused, checkpoint_renames(model) if fused else (), counts


def _experts_in_file(model: nn.Module, keys, marker: str = "qweight"):
    """``(name, module, layout, checkpoint prefix, (E, H, I))`` of every fused experts module of ``model``
    whose experts ``keys`` (tensor names of the checkpoint) hold quantized (a ``{expert 0's gate}.{marker}``
    tensor); experts kept dense are written fused, as the model holds them, and are not listed."""
    arch = architecture_for(model)
    for name, mod in model.named_modules():
        layout = arch.experts_layout(mod)
        if layout is None or layout.checkpoint_names is None:
            continue
        p = expert_prefix(name, layout)
        if f"{p}.0.{layout.checkpoint_names[0]}.{marker}" in keys:
            yield name, mod, layout, p, experts_shape(mod, layout)

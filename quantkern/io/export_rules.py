"""What each checkpoint format can store, as rules over layer *plans* (kind, shape, scheme).

The same rules run twice: before calibration on the layers a quantizer is about to produce
(:meth:`quantkern.api.base.BaseQuantizer.check_export`, the CLI's ``quantize --format``), so that no
calibration time is spent on a model that cannot be written in the format asked for, and at save time
on the layers the model really holds (:func:`quantkern.io.save_quantized`). Every offending layer is
listed in one error, with what to do about it.

Value-dependent limits (a GPTQ v1 zero of 0, a permuted ``g_idx`` found in the tensors) stay with the
exporters, which see the values. The rules import no exporter: what a format can hold lives in
:mod:`quantkern.formats` (``formats.awq``, ``formats.gguf``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core import WeightScheme
from ..formats.awq import awq_unsupported
from ..formats.gguf import BLOCK as GGUF_BLOCK
from ..formats.gguf import gguf_model_problem
from ..nn import QuantLinear

#: the quantkern module types each format describes; any other quantkern layer is refused
FORMAT_KINDS = {
    "gptq": ("QuantLinear", "QuantExperts"),
    "awq": ("QuantLinear",),
    "gguf": ("QuantLinear",),
    "compressed-tensors": ("QuantLinear", "QuantExperts", "W8A8Linear", "FP8Linear"),
}


@dataclass(frozen=True)
class LayerPlan:
    """A quantized layer, planned or built. ``kind``: the quantkern module type (``"QuantLinear"``,
    ``"W8A8Linear"``, ``"FP8Linear"``, ...); ``scheme``: its integer weight scheme (QuantLinear only);
    ``permuted_groups``: act-order whose groups follow the visiting order (``g_idx`` is not
    ``k // group_size``; act-order with static groups keeps the plain map)."""

    kind: str
    in_features: int
    out_features: int
    scheme: WeightScheme | None = None
    permuted_groups: bool = False
    released: bool = False  # QuantLinear.release_canonical() dropped the tensors a checkpoint holds
    problem: str | None = None  # why no format can store it (QuantExperts of a family without per-expert names)


def experts_export_problem(layout) -> str | None:
    """Why the experts of ``layout`` (:class:`quantkern.arch.moe.ExpertsLayout`) cannot be saved, or None."""
    if layout.checkpoint_names is None:
        return ("holds experts of a family whose checkpoints have no per-expert tensor names (gpt-oss ships fused "
                "experts): no quantized checkpoint layout for them yet; keep them dense (skip_layers=['experts']) "
                "to save")
    return None


def _layer_problem(fmt: str, p: LayerPlan) -> str | None:
    kinds = FORMAT_KINDS[fmt]
    if p.kind not in kinds:
        hint = "; save with format='compressed-tensors'" if p.kind in FORMAT_KINDS["compressed-tensors"] else ""
        if p.kind == "QuantExperts":
            hint = " (quantized MoE experts are saved in format='gptq' or 'compressed-tensors')"
        return f"is a {p.kind}: format {fmt!r} cannot store it{hint}"
    if p.released:
        return ("had its canonical weights released for inference (release_canonical); load the checkpoint "
                "again to save it")
    if p.problem:
        return p.problem
    if p.kind not in ("QuantLinear", "QuantExperts"):
        return None
    s, k, n = p.scheme, p.in_features, p.out_features
    reasons = []
    if fmt == "awq":
        unsupported = awq_unsupported(s, k, n)
        if unsupported:
            reasons.append(unsupported)
        if p.permuted_groups:
            reasons.append("AWQ GEMM has no g_idx: act-order with a permuted g_idx cannot be stored (quantize "
                           "with static_groups=True, which keeps groups in column order)")
    elif fmt == "compressed-tensors":
        ins = (k, n) if p.kind == "QuantExperts" else (k,)  # experts: gate/up take H (k), down takes I (n)
        for kk in ins:
            if s.group_size != -1 and kk % s.group_size:
                reasons.append(f"group_size={s.group_size} does not divide in_features={kk}")
        if p.permuted_groups:
            reasons.append("act-order with a permuted g_idx cannot be stored (quantize with actorder=True and "
                           "static_groups=True: groups in the original column order, as llm-compressor's "
                           "actorder='weight' stores them; or save as GPTQ)")
    elif fmt == "gguf" and k % GGUF_BLOCK:
        reasons.append(f"in_features={k} is not a multiple of {GGUF_BLOCK} (GGUF blocks)")
    return "; ".join(reasons) or None


def can_store(fmt: str, scheme: WeightScheme, in_features: int, out_features: int, permuted_groups: bool = False
              ) -> str | None:
    """``None`` if format ``fmt`` can store one ``in_features -> out_features`` QuantLinear quantized with
    ``scheme`` (``permuted_groups``: act-order groups in visiting order), else why not: the per-layer rule
    the size-budget planner filters its candidates with, so that every plan it makes can be written."""
    if fmt not in FORMAT_KINDS:
        raise ValueError(f"format must be one of {tuple(FORMAT_KINDS)}, got {fmt!r}")
    return _layer_problem(fmt, LayerPlan("QuantLinear", in_features, out_features, scheme, permuted_groups))


def _model_problems(fmt: str, layers: dict[str, LayerPlan], model: nn.Module | None) -> list[str]:
    out = []
    if fmt == "awq":
        sizes = sorted({p.scheme.group_size for p in layers.values() if p.kind == "QuantLinear"})
        if len(sizes) > 1:
            out.append(f"AWQ stores one group_size for the whole model; the layers use {sizes}")
    if fmt == "gguf" and model is not None:
        problem = gguf_model_problem(getattr(model, "config", None))
        if problem:
            out.append(problem)
    return out


def group_size_hint(layers: dict[str, LayerPlan], fmt: str) -> str:
    """What to do when ``fmt`` cannot store a ragged last group: the group sizes that divide every
    quantized layer's in_features, or the format that can store this model as it is."""
    ks = sorted({p.in_features for p in layers.values() if p.kind == "QuantLinear"})
    fits = [g for g in (16, 32, 64, 128, 256) if all(k % g == 0 for k in ks)]
    what = f"group_size {' or '.join(map(str, fits))} (divides every in_features: {ks})" if fits else \
        f"group_size -1 (no group size in 16..256 divides every in_features: {ks})"
    return f"{fmt} has no ragged last group: quantize with {what}, or save as format='gptq' (which has one)"


def _collapse(names: list[str]) -> str:
    """``model.layers.*.mlp.up_proj (30x), lm_head``: names that differ only by block index, once."""
    counts: dict[str, list[str]] = {}
    for n in names:
        counts.setdefault(re.sub(r"\.\d+\.", ".*.", n), []).append(n)
    return ", ".join(ns[0] if len(ns) == 1 else f"{pat} ({len(ns)}x)" for pat, ns in counts.items())


def _line(names: str, reason: str) -> str:
    return f"{names} {reason}" if reason.startswith("is a ") else f"{names}: {reason}"


def check_exportable(fmt: str, layers: dict[str, LayerPlan], model: nn.Module | None = None) -> None:
    """Raise ``ValueError`` naming every layer (and model-level fact) that format ``fmt`` cannot store,
    grouped by reason. ``layers``: ``{module name: LayerPlan}``; ``model`` (optional): architecture checks."""
    if fmt not in FORMAT_KINDS:
        raise ValueError(f"format must be one of {tuple(FORMAT_KINDS)}, got {fmt!r}")
    problems = _model_problems(fmt, layers, model)
    by_reason: dict[str, list[str]] = {}
    for name, p in layers.items():
        r = _layer_problem(fmt, p)
        if r:
            by_reason.setdefault(r, []).append(name)
    if not problems and not by_reason:
        return
    n = sum(len(v) for v in by_reason.values())
    if n <= 1 and len(problems) + len(by_reason) == 1:
        msg = problems[0] if problems else _line(*next((names[0], r) for r, names in by_reason.items()))
    else:
        lines = problems + [_line(_collapse(names), r) for r, names in by_reason.items()]
        msg = f"format {fmt!r} cannot store this model{f' ({n} layer(s))' if n else ''}:\n  " + "\n  ".join(lines)
    if any("does not divide in_features" in r for r in by_reason):
        msg += f"\n{group_size_hint(layers, 'AWQ GEMM' if fmt == 'awq' else fmt)}"
    raise ValueError(msg)


def model_layer_plans(model: nn.Module) -> dict[str, LayerPlan]:
    """The plans of the quantized layers ``model`` holds (every module type from ``quantkern.nn``)."""
    out = {}
    for name, m in model.named_modules():
        if not type(m).__module__.startswith("quantkern.nn") or type(m).__name__ == "StackedGPTQ":
            continue  # (StackedGPTQ: the tensors of a QuantExperts, planned with it)
        k, n = getattr(m, "in_features", 0), getattr(m, "out_features", 0)
        if type(m).__name__ == "QuantExperts":
            permuted = False
            for proj in (m.gate_up_proj, m.down_proj):
                gs = m.group_size if m.group_size != -1 else proj.in_features
                plain = torch.arange(proj.in_features, dtype=torch.int32, device=proj.g_idx.device) // gs
                permuted |= not bool((proj.g_idx.to(torch.int32) == plain).all())
            out[name] = LayerPlan("QuantExperts", m.hidden_size, m.intermediate_size, m.scheme, permuted,
                                  problem=experts_export_problem(m.layout))
        elif isinstance(m, QuantLinear) and m.released:
            out[name] = LayerPlan("QuantLinear", k, n, m.scheme, released=True)
        elif isinstance(m, QuantLinear):
            s = m.scheme
            gs = s.group_size if s.group_size != -1 else k
            plain = torch.arange(k, dtype=torch.int32, device=m.g_idx.device) // gs
            permuted = not torch.equal(m.g_idx.to(torch.int32), plain)  # the values decide, not the flag
            out[name] = LayerPlan("QuantLinear", k, n, s, permuted)
        else:
            out[name] = LayerPlan(type(m).__name__, k, n)
    return out

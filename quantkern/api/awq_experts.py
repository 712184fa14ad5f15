"""AWQ of fused MoE experts (issue #15), inside :class:`~quantkern.api.awq.AWQQuantizer`'s block step.

The family's scale spec names the norm that feeds the sparse MoE block and the Linears that read it
besides the experts (a shared expert's gate/up): one :class:`~quantkern.arch.ScaleGroup` whose first
entry is the experts module (:func:`quantkern.arch.llama.moe_scales`). For such a block:

1. during the block's one float forward, a pre-hook on the experts module keeps its inputs (padding
   excluded) and the model's own routing (``top_k_index``);
2. **one input-channel scale** ``s`` for everything that reads the norm: searched with each expert's
   gate/up on the tokens routed to it, a shared expert on every token
   (:func:`~quantkern.algorithms.awq.search_scale_routed`), then ``1/s`` is folded into the norm and
   ``s`` into every reader: the experts' gate/up, the shared expert, and the routers (dense; their
   logits are unchanged exactly, so is the routing);
3. **each expert's down projection**: a scale searched on its routed gated activations and folded into
   that expert's own up rows (``act(gate) * up / s`` is the gated output divided by ``s``);
4. a clipping search per expert projection on its routed inputs, then RTN into a
   :class:`~quantkern.nn.QuantExperts`.

Experts routed fewer tokens than the threshold follow the config's
:class:`~quantkern.api.config.ExpertCalibrationFields`: calibrated on every token, or rounded with RTN
(no clipping, ``s = 1`` for their down projection; their gate/up still carry the shared ``s``, with
which the search did not weigh them). ``expert_calibration="all"`` calibrates every expert on every
token. Layouts whose gating is not ``act(gate) * up`` (gpt-oss's clamped SwiGLU) have no spec here.
"""

from __future__ import annotations

import torch

from ..algorithms import quantize_rtn
from ..algorithms.awq import (apply_clip, fold_into_norm, scale_input_channels, search_clip, search_scale,
                              search_scale_routed)
from ..arch import GEMMA_NORM
from ..arch.moe import is_router_name, linear_weight, split_gate_up
from ..calibration import moe_inputs
from ..core import WeightScheme, naming_layer
from ..nn.quant_experts import QuantExperts, apply_gate

class RoutedCapture:
    """Pre-hooks on a block's experts modules keeping each batch's inputs and routing (padding removed;
    on the CPU with ``offload``). Pass :meth:`on_batch` to :func:`~quantkern.calibration.run_block`."""

    def __init__(self, block, names: list[str], offload: bool = False):
        self.block, self.names, self.offload = block, names, offload
        self.rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
        self._mask = None
        self._hooks = []

    def on_batch(self, inp) -> None:
        self._mask = inp.token_mask

    def __enter__(self):
        for n in self.names:
            def hook(m, args, kwargs, _n=n):
                x, idx = moe_inputs(args, kwargs, self._mask)
                x = x.detach().float()
                self.rows[_n].append((x.cpu(), idx.cpu()) if self.offload else (x, idx))
            self._hooks.append(self.block.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def take(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [T, H] fp32, top_k_index [T, k])`` over every batch, on ``device``."""
        rows = self.rows.pop(name)
        return torch.cat([x for x, _ in rows]).to(device), torch.cat([i for _, i in rows]).to(device)


def fold_moe_input_scale(block, group, layout, s: torch.Tensor, writable=lambda t: None) -> None:
    """Divide the output of the norm ``group.prev`` of ``block`` by ``s`` and multiply the input channels
    of everything that reads it by ``s``: the fused experts ``group.linears[0]`` (every expert's gate/up),
    the routers beside them (dense: their logits, so the routing, are unchanged) and the other Linears of
    the group (a shared expert's gate/up). The block computes the same function afterwards.
    ``writable(t)`` is called before each tensor is written (the quantizer's snapshot)."""
    name = group.linears[0]
    mod = block.get_submodule(name)
    norm = block.get_submodule(group.prev)
    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    routers = [m for leaf, m in parent.named_children() if is_router_name(leaf, parent)
               and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    linears = [block.get_submodule(n) for n in group.linears[1:] if n in dict(block.named_modules())]
    gu = getattr(mod, layout.gate_up)
    for t in [norm.weight, getattr(norm, "bias", None), gu] + [m.weight for m in routers + linears]:
        if t is not None:
            writable(t)
    with torch.no_grad():
        fold_into_norm(norm.weight.data, getattr(norm, "bias", None), s.to(norm.weight.device),
                       offset=1.0 if group.prev_kind == GEMMA_NORM else 0.0)
        for m in routers + linears:
            scale_input_channels(m.weight.data, s.to(m.weight.device))
        gu.data.mul_((s[None, :, None] if layout.transposed else s[None, None, :]).to(gu))


def _subsample(x: torch.Tensor, idx: torch.Tensor, n: int, seed: int = 0):
    if x.shape[0] <= n:
        return x, idx
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].to(x.device)
    return x[keep], idx[keep]


def awq_experts(q, block, prefix: str, name: str, site, group, x: torch.Tensor, idx: torch.Tensor, targets: dict,
                x_all: dict, owner: dict, schemes: dict, errors: dict) -> QuantExperts:
    """AWQ of the experts module ``name`` of ``block`` (see the module docstring) on its captured inputs
    ``x`` / routing ``idx``. Folds the shared scale into the norm ``group.prev``, the routers, the
    shared expert's Linears (``group.linears[1:]``, whose captured inputs in ``x_all`` are divided to
    match) and the experts; returns the QuantExperts (the experts module computes with its dequantized
    weights from here on). ``q``: the AWQQuantizer (config, report, ``writable``)."""
    c = q.config.for_layer(prefix + name)
    scheme = c.scheme()
    rtn_scheme = WeightScheme(scheme.bits, scheme.group_size, scheme.sym)
    mod, lay = site.module, site.layout
    n_exp, h_size, i_size = site.num_experts, site.hidden_size, site.intermediate_size
    sel = [(idx == e).any(-1) for e in range(n_exp)]
    tokens = [int(s.sum()) for s in sel]
    q.report.setdefault("expert_tokens", {})[prefix + name] = tokens
    fallbacks = q.report.setdefault("expert_fallbacks", {})

    src_gu, src_dn = (c.expert_sources(prefix + name, label, k, tokens, x.shape[0], fallbacks)
                      for label, k in (("gate_up_proj", h_size), ("down_proj", i_size)))
    xs, idxs = _subsample(x, idx, max(c.max_search_tokens, c.clip_tokens))
    routed = [xs[(idxs == e).any(-1)] for e in range(n_exp)]
    rows = [xs if src == "all" else routed[e] for e, src in enumerate(src_gu)]
    gu_param, dn_param = getattr(mod, lay.gate_up), getattr(mod, lay.down)

    # 1. one scale for every reader of the norm, folded into it
    shared = [n for n in group.linears[1:] if n in targets]  # (all of group.linears[1:] are scaled)
    parts = [(rows[e][:c.max_search_tokens], linear_weight(gu_param, e, lay).detach(), scheme)
             for e in range(n_exp) if src_gu[e] != "rtn"]
    parts += [(xs[:c.max_search_tokens], targets[n].weight.detach(), schemes[n]) for n in shared]
    s, err, rtn_err = search_scale_routed(parts, c.torch_scale_dtype, x.abs().mean(0), c.n_grid, c.duo_scaling)
    errors[prefix + ",".join((name, *shared))] = (err, rtn_err)
    fold_moe_input_scale(block, group, lay, s, q.writable)
    for n in shared:
        x_all[owner[n]] = x_all[owner[n]] / s.to(x_all[owner[n]].device)
    xs, rows, routed = xs / s, [r / s for r in rows], [r / s for r in routed]

    # 2. each expert's down projection, its scale folded into its own up rows
    def gated(e, xe):
        y = xe @ linear_weight(gu_param, e, lay).t().float()
        if lay.gate_up_bias:
            y = y + getattr(mod, lay.gate_up_bias)[e].float()
        return apply_gate(mod, y)

    q.writable(dn_param)
    if lay.gate_up_bias:
        q.writable(getattr(mod, lay.gate_up_bias))
    h_rows = []
    for e in range(n_exp):
        he = gated(e, xs if src_dn[e] == "all" else routed[e])
        if src_dn[e] != "rtn" and he.shape[0]:
            se, err, rtn_err = search_scale(he[:c.max_search_tokens], linear_weight(dn_param, e, lay).detach(),
                                            scheme, c.torch_scale_dtype, n_grid=c.n_grid,
                                            duo_scaling=c.duo_scaling)
            errors[f"{prefix}{name}.{e}.down_proj"] = (err, rtn_err)
            with torch.no_grad():
                up = split_gate_up(gu_param.data[e], lay, dim=1 if lay.transposed else 0)[1]
                up.div_((se[None, :] if lay.transposed else se[:, None]).to(up))
                if lay.gate_up_bias:
                    split_gate_up(getattr(mod, lay.gate_up_bias).data[e], lay)[1].div_(se.to(gu_param))
                dn_param.data[e].mul_((se[:, None] if lay.transposed else se[None, :]).to(dn_param))
            he = he / se
        h_rows.append(he)

    # 3. clipping and RTN, expert by expert
    def quantize(param, e, xe, src, label):
        w = linear_weight(param, e, lay).detach().float().clone()
        with naming_layer(f"{prefix}{name}.{e}.{label}"):
            if src != "rtn" and c.clip and xe.shape[0]:
                apply_clip(w, search_clip(xe[:c.clip_tokens], w, scheme, c.torch_scale_dtype, n_grid=c.n_grid,
                                          max_shrink=c.max_shrink), scheme.group_size)
            return quantize_rtn(w, scheme if src != "rtn" else rtn_scheme, c.torch_scale_dtype)

    gate_up = [quantize(gu_param, e, rows[e], src_gu[e], "gate_up_proj") for e in range(n_exp)]
    down = [quantize(dn_param, e, h_rows[e], src_dn[e], "down_proj") for e in range(n_exp)]
    with torch.no_grad():  # the block runs with exactly the dequantized weights from here on
        for param, qws in ((gu_param, gate_up), (dn_param, down)):
            dense = [qw.dequantize(param.dtype) for qw in qws]
            param.data = torch.stack([w.t() if lay.transposed else w for w in dense]).to(param.device).contiguous()
    return QuantExperts.from_quantized(mod, lay, gate_up, down, dtype=c.torch_scale_dtype, name=prefix + name,
                                       scheme=scheme)

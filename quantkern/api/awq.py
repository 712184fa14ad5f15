"""``AWQQuantizer``: AWQ block by block, output in :class:`~quantkern.nn.QuantLinear` (GPTQ layout).

For each decoder block: one forward (hooks capture the input of each scale group and of every other
target Linear, and the block's float outputs, which feed the next block), then per
:class:`~quantkern.arch.ScaleGroup` a scale search whose ``1/s`` is folded into
the producing norm / Linear (captured inputs are divided by ``s`` to match), then a clipping search
and RTN per Linear.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..algorithms import quantize_rtn
from ..algorithms.awq import (apply_clip, fold_into_linear_outputs, fold_into_norm, scale_input_channels,
                              search_clip, search_scale)
from ..arch import GEMMA_NORM, LINEAR, scale_spec_for
from ..calibration import find_decoder_blocks, run_block
from ..calibration.loop import run_blocks
from ..kernels.reference import dequantize_gptq
from .calibrated import BlockwiseQuantizer, check_no_quantized_modules
from .configs import AWQConfig
from .registry import register_quantizer
from .targets import plan_targets

logger = logging.getLogger("quantkern")


def _subsample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n].to(x.device)]


@register_quantizer(AWQConfig)
class AWQQuantizer(BlockwiseQuantizer):
    """``AWQQuantizer(model, bits=4, group_size=128, zero_point=True, ...).quantize(data)``.

    Each block is calibrated on the float outputs of the previous float block (as AutoAWQ), or with
    ``propagate_quantized=True`` on the outputs of the already quantized blocks (as GPTQ).

    Raises ``ValueError`` in ``prepare`` for an architecture without an AWQ spec (see
    :mod:`quantkern.arch`). ``report["awq_errors"]`` holds, per scale group, the
    group's output MSE with the chosen scales and with ``s = 1`` (plain RTN)."""

    def _prepare(self) -> None:
        self.plan_blocks()
        self.install_catcher(self.blocks[0])

    def plan_blocks(self) -> None:
        """The scale spec, the decoder blocks and the plan inside them, validated (no data needed)."""
        c = self.config
        self.spec = scale_spec_for(self.model)
        check_no_quantized_modules(self.model)
        self.blocks_name, self.blocks = find_decoder_blocks(self.model)
        self.plan = plan_targets(self.model, c.skip_layers, c.bits, c.group_size, within=self.blocks_name,
                                 experts=True, layer_config=c.for_layer)
        for name in self.plan.experts:  # the family's spec must say which norm feeds the experts
            self._experts_group(name.split(f"{self.blocks_name}.", 1)[1].split(".", 1)[1])

    def _convert(self) -> None:
        self.report["awq_errors"] = {}
        run_blocks(self, self.blocks, self.take_inputs(), self.calibration_device(), self.replace_module,
                   desc="AWQ blocks", verbose=self.verbose)

    def _groups(self, block: nn.Module, prefix: str, targets: dict[str, nn.Linear]):
        """The spec's groups that apply to this block: all Linears present and quantized, and for a
        Linear producer, its outputs exactly the group's inputs (not so for GQA's v_proj -> o_proj)."""
        out = []
        for g in self.spec.groups:
            if not all(n in targets for n in g.linears):
                logger.debug("quantkern: AWQ group %s%s skipped (not all quantized)", prefix, g.linears)
                continue
            prev = block.get_submodule(g.prev)
            k = targets[g.linears[0]].in_features
            if g.prev_kind == LINEAR:
                rows = g.prev_rows(prev.out_features) if isinstance(prev, nn.Linear) else None
                if rows is None or rows.stop - rows.start != k or prev.out_features % g.prev_part[1]:
                    continue
            elif getattr(prev, "weight", None) is None or prev.weight.shape != (k,):
                raise ValueError(f"AWQ spec: {prefix}{g.prev} is not a norm with a [{k}] weight")
            out.append((g, prev))
        return out

    def _experts_group(self, name: str):
        """The scale group whose first entry is the experts module ``name`` (relative to its block)."""
        group = next((g for g in self.spec.groups if g.linears[0] == name), None)
        if group is None:
            raise ValueError(f"AWQ: the {type(self.model).__name__} scale spec names no norm feeding the MoE experts "
                             f"{name!r}; add a ScaleGroup(norm, ({name!r}, ...)) to its file under quantkern/arch "
                             "(see moe_scales), or keep the experts dense (skip_layers=['experts'])")
        return group

    def process_block(self, block, prefix, targets, experts, inputs, device):
        """AWQ of one block (the :class:`~quantkern.calibration.loop.BlockProcessor` method): one observing
        forward, the scale search and fold per group, the experts, clipping and RTN per Linear. Returns the
        float outputs of that forward (AutoAWQ's order), or None with ``propagate_quantized``."""
        from .awq_experts import RoutedCapture, awq_experts

        c = self.config
        errors = self.report.setdefault("awq_errors", {})
        schemes = {n: c.for_layer(prefix + n).scheme() for n in targets}
        groups = self._groups(block, prefix, targets)
        owner = {n: n for n in targets}  # Linear -> the Linear whose captured input it shares
        for g, _ in groups:
            for n in g.linears:
                owner[n] = g.linears[0]
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in set(owner.values())}
        sums: dict[str, torch.Tensor] = {}

        def on_input(name, x):
            x = x.detach().float()
            feats[name].append(x.to("cpu") if c.offload else x)
            sums[name] = sums.get(name, 0) + x.abs().sum(dim=0)

        # AutoAWQ's order: the float block's outputs feed the next block, from this same forward;
        # with propagate_quantized they come from the quantized block instead (one more forward)
        with RoutedCapture(block, list(experts), offload=c.offload) as routed:
            fp_outputs = run_block(block, inputs, device, collect={n: targets[n] for n in feats}, on_input=on_input,
                                   keep_outputs=not c.propagate_quantized, on_batch=routed.on_batch)
        x_all = {n: torch.cat(v) for n, v in feats.items() if v}
        feats.clear()
        bad = [prefix + n for n in x_all if not bool(torch.isfinite(sums[n]).all())]  # one sync per Linear
        if bad:
            raise ValueError(f"{', '.join(bad)}: non-finite inputs (inf/NaN) reached these layers during calibration; "
                             "a layer before them in the block produces inf/NaN on the calibration data")
        for n in list(x_all):
            x_all[n] = _subsample(x_all[n], max(c.max_search_tokens, c.clip_tokens), seed=0).to(device)
        counts = {n: sum(int(inp.token_mask.sum()) for inp in inputs) for n in x_all}

        for g, prev in groups:
            first = g.linears[0]
            if first not in x_all:
                continue
            lins = [targets[n] for n in g.linears]
            w = torch.cat([m.weight.detach().to(device) for m in lins])
            x = x_all[first][:c.max_search_tokens]
            segs = [(m.out_features, schemes[n]) for n, m in zip(g.linears, lins)]
            s, err, rtn_err = search_scale(x, w, segs, c.torch_scale_dtype, x_mean=sums[first] / counts[first],
                                           n_grid=c.n_grid, duo_scaling=c.duo_scaling)
            errors[prefix + ",".join(g.linears)] = (err, rtn_err)
            s = s.to(prev.weight.device)
            for t in [prev.weight, getattr(prev, "bias", None)] + [m.weight for m in lins]:
                self.writable(t)  # folded in place below: keep the originals for a restore
            if g.prev_kind == LINEAR:
                rows = g.prev_rows(prev.out_features)
                fold_into_linear_outputs(prev.weight.data[rows], None if prev.bias is None else prev.bias.data[rows], s)
            else:
                fold_into_norm(prev.weight.data, getattr(prev, "bias", None), s,
                               offset=1.0 if g.prev_kind == GEMMA_NORM else 0.0)
            for m in lins:
                scale_input_channels(m.weight.data, s.to(m.weight.device))
            x_all[first] = x_all[first] / s.to(x_all[first].device)

        done = {}
        for name, site in experts.items():  # before the clipping of a shared expert that shares their scale
            x, idx = routed.take(name, device)
            done[prefix + name] = awq_experts(self, block, prefix, name, site, self._experts_group(name), x, idx,
                                              targets, x_all, owner, schemes, errors)
        for n, lin in targets.items():
            if c.clip and n not in self.spec.no_clip and owner[n] in x_all:
                x = x_all[owner[n]][:c.clip_tokens]
                max_val = search_clip(x, lin.weight.detach().to(x.device), schemes[n], c.torch_scale_dtype,
                                      n_grid=c.n_grid, max_shrink=c.max_shrink)
                self.writable(lin.weight)
                apply_clip(lin.weight.data, max_val.to(lin.weight.device), schemes[n].group_size)
            qw = quantize_rtn(lin.weight, schemes[n], c.torch_scale_dtype)
            ql = self.make_quant_linear(lin, qw, prefix + n)
            # until the block's outputs are computed, run it dense with exactly the dequantized weights
            lin.weight.data = dequantize_gptq(ql.qweight, ql.qzeros, ql.scales, ql.g_idx, ql.bits, ql.in_features,
                                              dtype=lin.weight.dtype).t().contiguous()
            done[prefix + n] = ql
        return done, (None if c.propagate_quantized else fp_outputs)

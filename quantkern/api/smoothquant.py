"""``W8A8Quantizer`` (int8 weights and activations), ``SmoothQuantQuantizer`` (smoothing first) and
``FP8Quantizer`` (fp8 E4M3 weight-only or W8A8).

Calibration (when needed: smoothing or static activation scales) runs the block loop of
:mod:`quantkern.calibration.loop`: each decoder block is run on the float outputs of the one before,
an observer per target Linear records its input (per-channel abs-max for SmoothQuant, as in the
paper: statistics of the float model), then the block's smoothing factors are folded into its norms
and every target Linear is replaced by a :class:`~quantkern.nn.w8a8_linear.W8A8Linear` (or the
subclass's module). Without data (dynamic activations, no smoothing) every target is replaced at once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..algorithms.awq import fold_into_linear_outputs, fold_into_norm, scale_input_channels
from ..algorithms.observers import AbsMaxObserver
from ..algorithms.smoothquant import smoothing_factors
from ..arch import GEMMA_NORM, LINEAR, scale_spec_for
from ..calibration import find_decoder_blocks, run_block
from ..calibration.loop import run_blocks
from ..core.fp8 import FP8_MAX
from ..core.int8 import INT8_MAX
from ..core.qparams import static_input_scale
from ..nn.fp8_linear import FP8Linear
from ..nn.w8a8_linear import W8A8Linear
from .calibrated import BlockwiseQuantizer, check_no_quantized_modules
from .configs import FP8Config, SmoothQuantConfig, W8A8Config
from .quantizers import GPTQBlockDriver
from .registry import register_quantizer
from .targets import plan_targets

logger = logging.getLogger("quantkern")


def plan_unpacked(model: nn.Module, skip_layers, within: str):
    """Targets for layouts without packing constraints (int8 / fp8 stored one value per byte)."""
    check_no_quantized_modules(model)
    return plan_targets(model, skip_layers, bits=32, group_size=-1, within=within)  # 32 bits: no packing rule


@register_quantizer(W8A8Config)
class W8A8Quantizer(BlockwiseQuantizer):
    """``W8A8Quantizer(model, act_static=False).quantize(data=None)``: plain W8A8 int8."""

    smoothing = False
    produces = "W8A8Linear"

    @property
    def needs_data(self) -> bool:
        return self.smoothing or self.config.any_layer("act_static")

    def _prepare(self) -> None:
        self.plan_blocks()
        if self.needs_data:
            self.install_catcher(self.blocks[0])

    def plan_blocks(self) -> None:
        """The decoder blocks and the plan inside them (and the smoothing spec), validated."""
        if self.smoothing:
            self.spec = scale_spec_for(self.model, method="SmoothQuant")
        self.blocks_name, self.blocks = find_decoder_blocks(self.model)
        self.plan = plan_unpacked(self.model, self.config.skip_layers, self.blocks_name)

    def new_observer(self, name: str):
        return AbsMaxObserver()

    def _convert(self) -> None:
        if not self.needs_data:
            for name, lin in list(self.plan.quantize.items()):
                self.replace_module(name, self._replacement(lin, None, name))
            return
        if self.smoothing:
            self.report["smoothed"] = []
        run_blocks(self, self.blocks, self.take_inputs(), self.calibration_device(), self.replace_module,
                   desc=f"{self.config.method} blocks", verbose=self.verbose)

    def process_block(self, block, prefix, targets, experts, inputs, device):
        """The :class:`~quantkern.calibration.loop.BlockProcessor` method: one forward of the float
        block observing each target's input rows (padding removed), the smoothing folded into the
        block's norms / producers, the quantized modules; returns the float outputs (the statistics
        are those of the float model, as in the SmoothQuant paper). ``inputs=None`` (a data-free
        config, streamed): the modules only."""
        if inputs is None:  # data-free (dynamic activations, no smoothing): the modules only
            return {prefix + n: self._replacement(lin, None, prefix + n) for n, lin in targets.items()}, None
        observers = {n: self.new_observer(prefix + n) for n in targets}

        def on_input(name, x):
            try:
                observers[name].update(x.detach())
            except ValueError as e:
                if "inf/NaN" not in str(e):
                    raise
                raise ValueError(f"{prefix}{name}: non-finite inputs (inf/NaN) reached this layer during calibration; "
                                 "a layer before it produces inf/NaN on the calibration data") from None

        outputs = run_block(block, inputs, device, collect=targets, on_input=on_input)
        amax = {n: o.amax for n, o in observers.items() if o.amax is not None}
        bad = [prefix + n for n, a in amax.items() if not bool(torch.isfinite(a).all())]  # one sync per Linear
        if bad:
            raise ValueError(f"{', '.join(bad)}: non-finite inputs (inf/NaN) reached these layers during "
                             "calibration; a layer before them produces inf/NaN on the calibration data")
        if self.smoothing:
            self._smooth(block, prefix, targets, amax)
        done = {}
        for n, lin in targets.items():
            done[prefix + n] = self._replacement(lin, amax.get(n), prefix + n, observers[n])
        return done, outputs

    def _replacement(self, lin, act_amax, name, observer=None) -> nn.Module:
        q = self.make_module(lin, act_amax, name, observer)
        q.name, q.backend = name, getattr(self.config, "backend", "auto")
        return q

    def make_module(self, lin: nn.Linear, act_amax: torch.Tensor | None, name: str = "", observer=None) -> nn.Module:
        """The quantized replacement of ``lin``; ``act_amax``: its observed per-channel input abs-max
        (after smoothing), ``observer``: the observer that saw its inputs (None without calibration)."""
        scale = None
        if self.config.for_layer(name).act_static:
            scale = static_input_scale(act_amax, INT8_MAX)
        return W8A8Linear.from_linear(lin, input_scale=scale)

    def _smooth(self, block: nn.Module, prefix: str, targets: dict[str, nn.Linear], amax: dict[str, torch.Tensor]
                ) -> None:
        """Fold the smoothing factors of the block's scale groups into their producers and Linears;
        ``amax`` (relative names) is divided by them, as the Linears' inputs now are."""
        alpha = self.config.alpha
        for g in self.spec.groups:
            if not all(n in targets and n in amax for n in g.linears):
                continue
            prev = block.get_submodule(g.prev)
            lins = [targets[n] for n in g.linears]
            if g.prev_kind == LINEAR and not (self.config.smooth_linear_producers
                                              and prev.out_features == lins[0].in_features):
                continue
            s = smoothing_factors(amax[g.linears[0]], torch.cat([m.weight for m in lins]), alpha)
            for t in [prev.weight, getattr(prev, "bias", None)] + [m.weight for m in lins]:
                self.writable(t)  # folded in place below: keep the originals for a restore
            if g.prev_kind == LINEAR:
                # the producer is itself quantized later: its (now divided) rows are what it stores
                fold_into_linear_outputs(prev.weight.data, None if prev.bias is None else prev.bias.data,
                                         s.to(prev.weight.device))
            else:
                fold_into_norm(prev.weight.data, getattr(prev, "bias", None), s.to(prev.weight.device),
                               offset=1.0 if g.prev_kind == GEMMA_NORM else 0.0)
            for m in lins:
                scale_input_channels(m.weight.data, s.to(m.weight.device))
            for n in g.linears:  # the inputs these Linears now see (for static scales)
                amax[n] = amax[n] / s.to(amax[n].device)
            self.report.setdefault("smoothed", []).append(prefix + g.prev)


@register_quantizer(SmoothQuantConfig)
class SmoothQuantQuantizer(W8A8Quantizer):
    """``SmoothQuantQuantizer(model, alpha=0.5).quantize(data)``; raises ``ValueError`` in ``prepare``
    for an architecture without a spec (the norms to fold into are architecture knowledge)."""

    smoothing = True


@register_quantizer(FP8Config)
class FP8Quantizer(GPTQBlockDriver, W8A8Quantizer):
    """``FP8Quantizer(model, act_dtype="float8_e4m3fn" | None, act_static=False, weight_method="rtn" |
    "gptq").quantize(data=None)``: FP8 E4M3 weight-only or W8A8 (see
    :class:`~quantkern.api.configs.FP8Config`). ``weight_method="gptq"`` runs the GPTQ block
    sweep (:class:`~quantkern.api.quantizers.GPTQBlockDriver`) on the fp8 grid."""

    produces = "FP8Linear"

    @property
    def gptq(self) -> bool:
        return self.config.weight_method == "gptq"

    @property
    def needs_data(self) -> bool:
        return self.gptq or super().needs_data

    def _prepare(self) -> None:
        if not self.gptq:
            return super()._prepare()
        self.plan_blocks()
        self.install_catcher(self.blocks[0])

    def _convert(self) -> None:
        if not self.gptq:
            return super()._convert()
        self.report["gptq_losses"] = {}
        run_blocks(self, self.blocks, self.take_inputs(), self.calibration_device(), self.replace_module,
                   desc="GPTQ fp8 blocks", verbose=self.verbose)

    def process_block(self, block, prefix, targets, experts, inputs, device):
        if self.gptq:
            return GPTQBlockDriver.process_block(self, block, prefix, targets, experts, inputs, device)
        return W8A8Quantizer.process_block(self, block, prefix, targets, experts, inputs, device)

    def _quantize_layer(self, g, mod: nn.Linear, name: str):
        c = self.config.for_layer(name)
        mode = c.act_mode
        scale = None
        if g.nsamples:
            g.check_finite()  # inf/NaN inputs: name the layer before the scale or the Hessian maths fail
        if mode == "static":
            scale = static_input_scale(g.input_amax, FP8_MAX)
        if g.nsamples == 0:  # never reached by calibration: plain rounding
            logger.warning("quantkern: %s saw no calibration tokens; fp8 weights rounded without GPTQ", name)
            q = FP8Linear.from_linear(mod, act=mode, input_scale=scale)
            loss = None
        else:
            w8, w_scale, loss = g.quantize_fp8(c.damp_percent, act_order=c.actorder)
            q = FP8Linear.from_fp8(w8, w_scale, bias=mod.bias, act=mode, input_scale=scale, dtype=mod.weight.dtype)
        q.name, q.backend = name, c.backend
        return q, q.dequantized_weight(), None, loss

    def make_module(self, lin: nn.Linear, act_amax: torch.Tensor | None, name: str = "", observer=None) -> nn.Module:
        mode = self.config.for_layer(name).act_mode
        scale = None
        if mode == "static":
            scale = static_input_scale(act_amax, FP8_MAX)
        return FP8Linear.from_linear(lin, act=mode, input_scale=scale)

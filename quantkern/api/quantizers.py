"""The weight-only quantizers: RTN (no data) and GPTQ (block by block on calibration data)."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import GPTQ, quantize_rtn
from ..calibration import BlockInput, InputCatcher, StopForward, find_decoder_blocks, moe_inputs, run_block
from ..calibration.loop import run_blocks
from ..core import WeightScheme, naming_layer
from ..kernels.reference import dequantize_gptq
from ..kernels.registry import warn_once
from ..arch.moe import linear_weight
from ..nn.quant_experts import QuantExperts, apply_gate
from .base import BaseQuantizer
from .config import GPTQConfig, RTNConfig
from .registry import register_quantizer
from .targets import ExpertsSite, plan_targets

logger = logging.getLogger("quantkern")

#: ``(experts module, expert index)`` of a Linear inside a per-expert ``ModuleList`` (``...experts.3.w1``)
_EXPERT_LINEAR = re.compile(r"^(.*\.experts)\.(\d+)\.[^.]+$")


def _warn_if_no_gpu(use_triton: bool) -> None:
    if use_triton and not torch.cuda.is_available():
        warn_once("quantkern: use_triton=True but no CUDA GPU is available; QuantLinear layers will run on "
                  "the best CPU path (the pure-PyTorch reference where no CPU kernel fits)")


def rtn_experts(site: ExpertsSite, name: str, scheme: WeightScheme, scale_dtype, mse: bool = False,
                experts=None) -> tuple[list, list]:
    """RTN of every expert of ``site`` (or of the expert indices in ``experts``): ``(gate_up, down)``
    lists of :class:`~quantkern.core.QuantizedWeight` (None where not asked)."""
    e_all = range(site.num_experts) if experts is None else experts
    gate_up, down = [None] * site.num_experts, [None] * site.num_experts
    scheme = WeightScheme(scheme.bits, scheme.group_size, scheme.sym)
    for e in e_all:
        for out, pname, label in ((gate_up, site.layout.gate_up, "gate_up_proj"), (down, site.layout.down, "down_proj")):
            with naming_layer(f"{name}.{e}.{label}"):
                out[e] = quantize_rtn(linear_weight(getattr(site.module, pname), e, site.layout), scheme, scale_dtype,
                                      mse=mse)
    return gate_up, down


class GPTQBlockDriver:
    """GPTQ's :class:`~quantkern.calibration.loop.BlockProcessor`, shared by every quantizer that runs
    GPTQ's error feedback (integer grids: :class:`GPTQQuantizer`; fp8:
    :class:`~quantkern.api.smoothquant.FP8Quantizer` with ``weight_method="gptq"``). It returns no
    outputs, so block ``i`` is calibrated on the outputs of blocks ``0..i-1`` already quantized.
    Subclasses set ``blocks_name``, ``blocks``, ``plan`` and implement :meth:`_quantize_layer`; GPTQ
    losses go to ``report["gptq_losses"]``."""

    def process_block(self, block, prefix: str, targets: dict[str, nn.Module], experts: dict[str, ExpertsSite],
                      inputs: list[BlockInput], device) -> tuple[dict[str, nn.Module], None]:
        """Quantize the block's planned Linears (stage by stage, see :meth:`_stages`), then its experts
        modules, calibrated on the outputs of the already quantized stages. Until the block is swapped,
        its Linears hold exactly the dequantized weights the quantized modules compute with."""
        losses = self.report.setdefault("gptq_losses", {})
        done: dict[str, nn.Module] = {}
        if targets:
            for stage, shared_input in self._stages(block, targets, inputs[0]):
                losses.update(self._quantize_stage(block, prefix, stage, inputs, device, done, shared_input))
        for name, site in experts.items():  # after the block's Linears: calibrated on their quantized outputs
            losses.update(self._quantize_experts(block, prefix + name, site, inputs, device, done))
        return done, None

    def _quantize_stage(self, block, prefix, stage, inputs, device, done: dict, shared_input: bool = False
                        ) -> dict[str, float]:
        """Collect H for the stage's Linears (stopping each forward once they have all run) and quantize
        them, so later stages are calibrated on quantized outputs.

        Until the block is finished each Linear keeps running as a dense layer holding exactly the
        weights the reference kernel dequantizes (no per-call unpacking); its QuantLinear goes into
        ``done`` and is swapped in by the caller. When the stage's Linears are fed one tensor
        (``shared_input``: q/k/v, gate/up), H is accumulated once and shared."""
        gptq = {name: GPTQ(mod.weight, prefix + name) for name, mod in stage.items()}
        collect = dict([next(iter(stage.items()))]) if shared_input else stage
        run_block(block, inputs, device, collect=collect, keep_outputs=False, stop_after=set(collect),
                  on_input=lambda name, x: gptq[name].add_batch(x))
        if shared_input:
            first = gptq[next(iter(stage))]
            for g in gptq.values():
                g.H, g.nsamples, g.input_amax = first.H, first.nsamples, first.input_amax  # read-only
        losses = {}
        for name, mod in stage.items():
            g = gptq.pop(name)
            with naming_layer(prefix + name):
                q, w, bias, loss = self._quantize_layer(g, mod, prefix + name)
            g.free()
            if loss is not None:
                losses[prefix + name] = loss
            mod.weight.data = w.to(mod.weight.dtype).contiguous()
            if bias is not None:
                mod.bias.data = bias.to(mod.bias.dtype)
            done[prefix + name] = q
        return losses

    # MoE experts ---------------------------------------------------------------------------------
    def _quantize_experts(self, block, name: str, site: ExpertsSite, inputs, device, done: dict) -> dict[str, float]:
        """GPTQ of every expert of a fused experts module, each calibrated on the tokens routed to it.

        A pre-hook on the experts module reads its routing (``top_k_index``) and, for each expert, adds
        the rows routed there (padding excluded) to that expert's Hessian, then stops the forward: no
        expert's inputs are kept, only one ``H x H`` (gate/up) Hessian per expert, then one ``I x I``
        (down). Gate/up are quantized first (one fused ``[2I, H]`` GPTQ per expert: the rows share the
        input), then the down projections on the gated outputs of the quantized gate/up. Meanwhile the
        module runs with exactly the dequantized weights; the :class:`QuantExperts` goes into ``done``.

        ``expert_calibration="all"``: every (non-padding) token feeds every expert's statistics (one
        shared gate/up Hessian; each expert's down Hessian from its own gated outputs of all tokens),
        while the block's outputs still follow the real routing. An expert routed fewer tokens than
        ``min_expert_tokens`` (default: its in_features) is calibrated on all tokens
        (``expert_fallback="all_tokens"``, the default) or quantized with RTN (``"rtn"``, and where the
        whole calibration set has fewer tokens than that); ``report["expert_fallbacks"]`` names each."""
        c = self.config.for_layer(name)
        mod, lay = site.module, site.layout
        n_exp = site.num_experts
        tokens = [0] * n_exp
        total = [0]
        mask_now: list = [None]
        losses: dict[str, float] = {}
        fallbacks = self.report.setdefault("expert_fallbacks", {})

        def collect(gptqs: dict, rows_fn, source: list, shared: GPTQ | None = None, count: bool = False):
            """Run the block's calibration batches up to the experts module, adding to ``gptqs[e]``
            ``rows_fn(e, rows)`` of the tokens routed to expert ``e`` (``source[e] == "routed"``) or of all
            tokens (``"all"``); ``shared`` gets every token as is; ``count``: count the tokens."""
            def hook(m, args, kwargs):
                x2, idx2 = moe_inputs(args, kwargs, mask_now[0])
                if count:
                    total[0] += x2.shape[0]
                for e in range(n_exp):
                    sel = (idx2 == e).any(-1)
                    if count:
                        tokens[e] += int(sel.sum())
                    if source[e] == "all":
                        gptqs[e].add_batch(rows_fn(e, x2))
                    elif source[e] == "routed" and bool(sel.any()):
                        gptqs[e].add_batch(rows_fn(e, x2[sel]))
                if shared is not None and x2.shape[0]:
                    shared.add_batch(x2)
                raise StopForward
            h = mod.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                run_block(block, inputs, device, keep_outputs=False, on_batch=lambda inp: mask_now.__setitem__(
                    0, inp.token_mask))
            finally:
                h.remove()

        def experts_gptq(pname: str, label: str, which) -> tuple:
            param = getattr(mod, pname)
            return param, {e: GPTQ(linear_weight(param, e, lay), f"{name}.{e}.{label}") for e in which}

        def quantize_all(param, gptqs: dict, label: str, source: list) -> list:
            out, dense = [], []
            for e in range(n_exp):
                site_name = f"{name}.{e}.{label}"
                with naming_layer(site_name):
                    if source[e] == "rtn":
                        qw = quantize_rtn(linear_weight(param, e, lay), WeightScheme(c.bits, c.group_size, c.sym),
                                          c.torch_scale_dtype, mse=c.mse)
                    else:
                        g = gptqs.pop(e)
                        qw, loss = g.quantize(c.scheme(), c.damp_percent, c.blocksize, c.static_groups, c.mse,
                                              c.torch_scale_dtype)
                        losses[site_name] = loss
                        g.free()
                out.append(qw)
                w = qw.dequantize(param.dtype)  # [out, in]: what the QuantExperts computes with
                dense.append(w.t() if lay.transposed else w)
            param.data = torch.stack(dense).to(param.device).contiguous()  # runs dequantized from here on
            return out

        every = c.expert_calibration == "all"

        def sources(label: str, k: int) -> list[str]:
            return c.expert_sources(name, label, k, tokens, total[0], fallbacks)

        # gate/up on the routed hidden states (or on all of them: one Hessian shared by every expert)
        shared = GPTQ(linear_weight(getattr(mod, lay.gate_up), 0, lay), f"{name}.*.gate_up_proj") \
            if every or c.expert_fallback == "all_tokens" else None
        param, gptqs = experts_gptq(lay.gate_up, "gate_up_proj", [] if every else range(n_exp))
        collect(gptqs, lambda e, xe: xe, ["none" if every else "routed"] * n_exp, shared, count=True)
        source = sources("gate_up_proj", site.hidden_size)
        for e in range(n_exp):
            if source[e] == "all":
                if e in gptqs:
                    gptqs[e].free()
                g = gptqs[e] = GPTQ(linear_weight(param, e, lay), f"{name}.{e}.gate_up_proj")
                g.H, g.nsamples, g.input_amax = shared.H, shared.nsamples, shared.input_amax  # read-only
        if shared is not None:
            shared.free()
        gate_up = quantize_all(param, gptqs, "gate_up_proj", source)
        del gptqs

        # down on the gated outputs of the quantized gate/up
        def gated(e, xe):
            w = linear_weight(getattr(mod, lay.gate_up), e, lay)
            y = xe @ w.t().to(xe.dtype)
            if lay.gate_up_bias:
                y = y + getattr(mod, lay.gate_up_bias)[e].to(y.dtype)
            return apply_gate(mod, y)

        source = sources("down_proj", site.intermediate_size)
        param, gptqs = experts_gptq(lay.down, "down_proj", [e for e in range(n_exp) if source[e] != "rtn"])
        collect(gptqs, gated, source)
        down = quantize_all(param, gptqs, "down_proj", source)
        self.report.setdefault("expert_tokens", {})[name] = list(tokens)
        done[name] = QuantExperts.from_quantized(mod, lay, gate_up, down, dtype=c.torch_scale_dtype, name=name,
                                                 scheme=c.scheme())
        return losses

    def _quantize_layer(self, g: GPTQ, mod: nn.Linear, name: str):
        """Quantize one Linear from its collected statistics. Returns ``(quantized module, the weight
        [N, K] it computes with, its bias (None: unchanged), GPTQ loss (None: not run))``; the Linear
        runs with that weight and bias for the rest of its block's calibration."""
        raise NotImplementedError

    # stages ---------------------------------------------------------------------------------------
    def _stages(self, block: nn.Module, targets: dict[str, nn.Module], sample
                ) -> list[tuple[dict[str, nn.Module], bool]]:
        """Group the block's target Linears into stages by execution order: Linears fed the same input
        tensor (q/k/v, gate/up) form one stage. Returns ``(stage, shared_input)`` pairs. Without
        ``true_sequential``, one stage holds them all."""
        if not getattr(self.config, "true_sequential", True):
            return [(targets, False)]
        # keep the input tensors themselves alive: comparing ids of freed tensors could merge stages
        order: list[tuple[str, torch.Tensor]] = []
        by_module = {id(m): n for n, m in targets.items()}
        hooks = [m.register_forward_pre_hook(lambda mod, args: order.append((by_module[id(mod)], args[0])))
                 for m in targets.values()]
        try:
            run_block(block, [sample], keep_outputs=False)
        finally:
            for h in hooks:
                h.remove()
        stages: list[dict[str, nn.Module]] = []
        last_input = None
        done = set()
        for name, inp in order:
            if name in done:
                continue
            if inp is not last_input or not stages:
                stages.append({})
            stages[-1][name] = targets[name]
            done.add(name)
            last_input = inp
        result = [(st, True) for st in stages]
        missed = [n for n in targets if n not in done]
        if missed:  # never called on this sample (e.g. an unused expert): quantize them last
            result.append(({n: targets[n] for n in missed}, False))
        return result


@register_quantizer(RTNConfig)
class RTNQuantizer(BaseQuantizer):
    """Round-to-nearest weight quantization; needs no data.

    ``RTNQuantizer(model, bits=4, group_size=128, sym=True).quantize()`` returns ``model`` with its
    Linear layers (except ``skip_layers``) replaced by :class:`~quantkern.nn.QuantLinear`.
    """

    needs_data = False

    def __init__(self, model: nn.Module, config: RTNConfig | None = None, *, use_triton: bool = False, **kwargs):
        super().__init__(model, config, **kwargs)
        self.use_triton = use_triton

    def _prepare(self) -> None:
        c = self.config
        self.plan = plan_targets(self.model, c.skip_layers, c.bits, c.group_size, experts=True,
                                 layer_config=c.for_layer)
        _warn_if_no_gpu(self.use_triton)

    def plan_blocks(self) -> None:
        """The plan inside the decoder blocks only (what the streaming driver quantizes; the in-memory
        :meth:`_prepare` plans the whole model)."""
        c = self.config
        self.blocks_name, self.blocks = find_decoder_blocks(self.model)
        self.plan = plan_targets(self.model, c.skip_layers, c.bits, c.group_size, within=self.blocks_name,
                                 experts=True, layer_config=c.for_layer)

    def _convert(self) -> None:
        done, _ = self.process_block(None, "", self.plan.quantize, self.plan.experts, None, None)
        for name, q in done.items():
            self.replace_module(name, q)

    def process_block(self, block, prefix, targets, experts, inputs, device):
        """RTN of ``targets`` / ``experts`` (names relative to ``prefix``; data-free, ``inputs`` unused):
        ``({full name: QuantLinear / QuantExperts}, None)``. The in-memory path calls it once for the
        whole plan (``prefix=""``), the streaming driver once per block."""
        done: dict[str, nn.Module] = {}
        for n, lin in tqdm(list(targets.items()), desc="RTN", disable=not self.verbose, leave=False):
            name = prefix + n
            c = self.config.for_layer(name)
            with naming_layer(name):
                qw = quantize_rtn(lin.weight, c.scheme(), c.torch_scale_dtype, mse=c.mse)
            done[name] = self.make_quant_linear(lin, qw, name)
        for n, site in experts.items():
            name = prefix + n
            c = self.config.for_layer(name)
            gate_up, down = rtn_experts(site, name, c.scheme(), c.torch_scale_dtype, c.mse)
            done[name] = QuantExperts.from_quantized(site.module, site.layout, gate_up, down,
                                                     dtype=c.torch_scale_dtype, name=name)
        return done, None


@register_quantizer(GPTQConfig)
class GPTQQuantizer(GPTQBlockDriver, BaseQuantizer):
    """GPTQ, block by block: block ``i`` is calibrated on the outputs of blocks ``0..i-1`` already
    quantized, and only one block's activations are held at a time.

    ``GPTQQuantizer(model, bits=4, group_size=128, actorder=False, sym=True, damp_percent=0.01,
    blocksize=128, static_groups=False, use_triton=True, ...).quantize(data, tokenizer=None)``
    """

    needs_data = True

    def __init__(self, model: nn.Module, config: GPTQConfig | None = None, *, use_triton: bool = True, **kwargs):
        super().__init__(model, config, **kwargs)
        self.use_triton = use_triton
        self.catcher: InputCatcher | None = None

    def _prepare(self) -> None:
        self.plan_blocks()
        _warn_if_no_gpu(self.use_triton)
        self.catcher = InputCatcher(self.model, self.blocks[0]).install()

    def plan_blocks(self) -> None:
        """Find the decoder blocks and validate the Linears to quantize in them (no data, no weights
        needed: works on a model whose parameters are on the meta device)."""
        c = self.config
        self.blocks_name, self.blocks = find_decoder_blocks(self.model)
        self.plan = plan_targets(self.model, c.skip_layers, c.bits, c.group_size, within=self.blocks_name,
                                 experts=True, layer_config=c.for_layer)

    def _convert(self) -> None:
        self.report["gptq_losses"] = {}
        run_blocks(self, self.blocks, self.take_inputs(), self.calibration_device(), self.replace_module,
                   desc="GPTQ blocks", verbose=self.verbose)

    def _quantize_layer(self, g: GPTQ, mod: nn.Linear, name: str):
        c = self.config.for_layer(name)
        loss = None
        expert = _EXPERT_LINEAR.match(name)  # a Linear of a per-expert ModuleList (older / custom MoE code)
        if expert:
            tokens = self.report.setdefault("expert_tokens", {}).setdefault(expert[1], [])
            e = int(expert[2])
            tokens.extend([0] * (e + 1 - len(tokens)))
            tokens[e] = max(tokens[e], g.nsamples)
            need = max(1, mod.in_features if c.min_expert_tokens is None else c.min_expert_tokens)
            if g.nsamples < need:  # its router sent it too few tokens: RTN, named (the all-tokens
                self.report.setdefault("expert_fallbacks", {})[name] = (  # fallback needs fused experts)
                    f"RTN: {g.nsamples} calibration token(s) routed to expert {e}, fewer than {need} "
                    f"({'in_features' if c.min_expert_tokens is None else 'min_expert_tokens'})")
                logger.warning("quantkern: %s: %s", name, self.report["expert_fallbacks"][name])
        if g.nsamples == 0 or (expert and name in self.report.get("expert_fallbacks", {})):
            if not expert:  # never reached by calibration
                logger.warning("quantkern: %s saw no calibration tokens; quantized with RTN", name)
            qw = quantize_rtn(mod.weight, WeightScheme(c.bits, c.group_size, c.sym), c.torch_scale_dtype)
        else:
            qw, loss = g.quantize(c.scheme(), c.damp_percent, c.blocksize, c.static_groups, c.mse,
                                  c.torch_scale_dtype)
        ql = self.make_quant_linear(mod, qw, name)
        w = dequantize_gptq(ql.qweight, ql.qzeros, ql.scales, ql.g_idx, ql.bits, ql.in_features,
                            dtype=mod.weight.dtype)
        return ql, w.t(), ql.bias, loss

"""``BaseQuantizer`` and the ``prepare`` -> calibrate -> ``convert`` front door.

A quantizer owns one model and one config. ``prepare`` validates everything that can be validated
without data (so bad settings fail before calibration) and installs whatever must watch the
calibration forwards; ``convert`` does the work and swaps in ``QuantLinear`` layers; ``quantize(data)``
is ``prepare`` + one forward per calibration batch + ``convert``, so both front doors run the same code.

A failed run leaves the model as it was: ``prepare`` records the model (:class:`~quantkern.api.restore.
ModelSnapshot`, no copy of the weights) and any exception raised by ``prepare``, by a calibration forward
(either door) or by ``convert`` restores it before propagating (modules, parameters and buffers, hooks,
``forward``), with a note saying so; ``prepare`` can then be called again.
"""

from __future__ import annotations

import copy
import logging
import time
import types
from collections import Counter

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import check_token_ids, group_batches, normalize_calibration_data
from ..core.spec import Plan, Site
from ..devices import check_devices, check_not_offloaded, is_dispatched
from ..io.export_rules import LayerPlan, check_exportable, experts_export_problem
from ..nn import QuantLinear
from .config import BaseConfig
from .registry import quantizer_for
from .restore import ModelSnapshot
from .targets import TargetPlan, check_overrides_apply, set_module

logger = logging.getLogger("quantkern")
_MISSING = object()

_STATE_ATTR = "_quantkern_quantizer"
_RESTORED_NOTE = ("quantkern: the model was restored to its state before prepare() (modules, weights, hooks and "
                  "forward as they were); fix the cause and quantize again")


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding (``get_input_embeddings()``), if it is an ``nn.Embedding``."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return emb if isinstance(emb, nn.Embedding) else None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed weights count at their packed size; shared once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class BaseQuantizer:
    """Subclasses set ``config_cls`` (via ``register_quantizer``), ``needs_data`` and implement
    :meth:`_prepare` / :meth:`_convert`."""

    config_cls: type[BaseConfig]
    needs_data: bool = True
    #: the quantkern module type that replaces each planned Linear (see :meth:`layer_plan`)
    produces: str = "QuantLinear"

    def __init__(self, model: nn.Module, config: BaseConfig | None = None, *, tokenizer=None, verbose: bool = True,
                 **kwargs):
        if config is None:
            config = self.config_cls(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a config or keyword settings, not both (got {sorted(kwargs)})")
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.verbose = verbose
        self.plan: TargetPlan | None = None
        self.sites: Plan = {}  # {Site: Spec}, made by prepare() (see site_plan)
        self.report: dict = {}
        self._prepared = False
        self._failed = False
        self._snapshot: ModelSnapshot | None = None
        self._ids_checked = False  # calibrate() feeds data that quantize() validated already
        self._forwards = 0

    # -- the two-step door -------------------------------------------------------------------------
    def prepare(self, export_format: str | None = None) -> nn.Module:
        """Validate and install what calibration needs. ``export_format`` (``"gptq"``, ``"awq"``,
        ``"compressed-tensors"``, ``"gguf"``): also check now, before any calibration, that the layers
        this quantizer will produce can be saved in that format (see :meth:`check_export`)."""
        if self._prepared:
            raise RuntimeError("prepare() was already called on this model")
        other = self.model.__dict__.get(_STATE_ATTR)
        if other is not None:
            raise RuntimeError(f"model is already prepared for {other.config.method} (prepare() was called and "
                               "convert() not yet); convert() it first, or start from the dense model")
        self._t0 = time.perf_counter()
        self.report["bytes_before"] = weight_bytes(self.model)
        check_not_offloaded(self.model)
        check_devices(self.model, self.config.device)
        self._failed = False
        self._forwards = 0
        # from here on any exception puts the model back exactly as it is now (see _abort)
        self._snapshot = ModelSnapshot(self.model)
        self._forward_before = self.model.__dict__.get("forward", _MISSING)
        try:
            self._prepare()
            if self.plan is not None:
                check_overrides_apply(self.config, self.plan)
            self.sites = self.site_plan()
            if export_format is not None:
                self.check_export(export_format)
            self._install_guard()
        except BaseException as e:
            self._abort(e)
            raise
        self._prepared = True
        setattr(self.model, _STATE_ATTR, self)
        return self.model

    def convert(self) -> nn.Module:
        if not self._prepared:
            if self._failed:
                raise RuntimeError("this quantization failed earlier and the model was restored to its state "
                                   "before prepare(); call prepare() again")
            raise RuntimeError("convert() called before prepare()")
        try:
            with torch.no_grad():
                self._convert()
        except BaseException as e:
            self._abort(e)
            raise
        self._finish()
        self.model.quantkern_config = self.config.to_dict()
        self.report["bytes_after"] = weight_bytes(self.model)
        self.report["seconds"] = time.perf_counter() - self._t0
        self.report["skipped"] = list(self.plan.skipped) if self.plan else []
        self.report["quantized_share"] = self.plan.quantized_share if self.plan else None
        self.report["specs"] = dict(Counter(spec.describe() for spec in self.sites.values()))
        if self.verbose and self.plan is not None:
            specs = "; ".join(f"{n} x {d}" for d, n in self.report["specs"].items())
            tqdm.write(f"[quantkern] {self.config.method}: {self.plan.summary()}\n"
                       f"[quantkern] weight sites: {specs}\n"
                       f"[quantkern] weights {self.report['bytes_before'] / 2**20:.1f} MiB -> "
                       f"{self.report['bytes_after'] / 2**20:.1f} MiB in {self.report['seconds']:.1f} s")
            if self.report.get("expert_tokens"):
                tqdm.write(self.experts_summary())
        return self.model

    def experts_summary(self) -> str:
        """The MoE expert report in a few lines: routed calibration tokens per expert (fewest, median,
        most, over every experts module) and each fallback with its reason."""
        counts = sorted(t for ts in self.report.get("expert_tokens", {}).values() for t in ts)
        if not counts:
            return "[quantkern] experts: none calibrated"
        fb = self.report.get("expert_fallbacks", {})
        lines = [f"[quantkern] experts: {len(counts)} in {len(self.report['expert_tokens'])} modules, routed "
                 f"calibration tokens per expert: fewest {counts[0]}, median {counts[len(counts) // 2]}, most "
                 f"{counts[-1]}; {len(fb)} projection(s) with a fallback"]
        lines += [f"[quantkern]   {site}: {why}" for site, why in fb.items()]
        return "\n".join(lines)

    # -- the one-call door -------------------------------------------------------------------------
    def quantize(self, data=None, tokenizer=None, export_format: str | None = None) -> nn.Module:
        """Quantize in place and return the model. ``data``: see
        :func:`quantkern.calibration.normalize_calibration_data`; not needed by data-free methods.
        ``export_format``: fail before calibration if the result could not be saved in that format."""
        tokenizer = tokenizer or self.tokenizer
        batches = None
        if self.needs_data:
            # validate the data before prepare() touches the model
            items = self.calibration_items(data, tokenizer)
            self.check_calibration_ids(items)
            batches = group_batches(items, self.calibration_batch_size())
        elif data is not None:
            logger.info("quantkern: %s needs no calibration data; ignoring it", self.config.method)
        self.prepare(export_format)
        try:
            if batches:
                self._ids_checked = True
                try:
                    self.calibrate(batches)
                finally:
                    self._ids_checked = False
            return self.convert()
        except BaseException as e:
            self._abort(e)
            raise

    def calibration_items(self, data, tokenizer=None) -> list:
        """``data`` as calibration items (see :func:`~quantkern.calibration.normalize_calibration_data`),
        as this method takes them (subclasses cut them to their config's limits)."""
        return normalize_calibration_data(data, tokenizer)

    # -- validation and the restore guarantee ---------------------------------------------------------
    def check_calibration_ids(self, batches) -> None:
        """Raise, before calibration, for token ids outside the model's input embedding (naming the
        calibration item, row, position and id)."""
        emb = input_embedding(self.model)
        vocab = emb.num_embeddings if emb is not None else None
        for i, b in enumerate(batches):
            check_token_ids(b.input_ids, vocab, f"calibration item {i}")

    def _install_guard(self) -> None:
        """Wrap ``model.forward`` while prepared: check each calibration forward's ``input_ids`` (integer,
        inside the embedding, on the embedding's device) and restore the model if the forward raises."""
        inner = self.model.forward
        q = self
        emb = input_embedding(self.model)
        dispatched = is_dispatched(self.model)

        def forward(model_self, *args, **kwargs):
            try:
                ids = kwargs.get("input_ids", args[0] if args else None)
                if isinstance(ids, torch.Tensor) and not q._ids_checked:
                    where = f"calibration forward {q._forwards}"
                    check_token_ids(ids, emb.num_embeddings if emb is not None else None, where)
                    if emb is not None and not dispatched and ids.device != emb.weight.device:
                        raise ValueError(f"{where}: input_ids are on {ids.device} but the model's input embedding "
                                         f"is on {emb.weight.device}; move the inputs there")
                q._forwards += 1
                return inner(*args, **kwargs)
            except BaseException as e:
                q._abort(e)
                raise

        self._guard = forward
        self.model.forward = types.MethodType(forward, self.model)

    def _abort(self, exc: BaseException | None = None) -> None:
        """A step failed: put the model back as it was before :meth:`prepare` (idempotent)."""
        snap, self._snapshot = self._snapshot, None
        if snap is None:
            return
        snap.restore()
        noted = self._prepared  # a failure inside prepare() itself changed nothing the user could see
        self._prepared = False
        self._failed = True
        for attr in ("catcher", "observers"):
            if getattr(self, attr, None) is not None:
                setattr(self, attr, None)
        notes = getattr(exc, "__notes__", ())
        if noted and exc is not None and hasattr(exc, "add_note") and _RESTORED_NOTE not in notes:
            exc.add_note(_RESTORED_NOTE)

    def _finish(self) -> None:
        """``convert`` succeeded: drop the guard, the prepared state and the snapshot."""
        if self.model.__dict__.get(_STATE_ATTR) is self:
            del self.model.__dict__[_STATE_ATTR]
        if self._forward_before is _MISSING:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.__dict__["forward"] = self._forward_before
        self._snapshot = None

    def writable(self, t) -> None:
        """Call before writing a model tensor in place (scale folding): keeps its original for a restore."""
        if self._snapshot is not None:
            self._snapshot.writable(t)

    def replace_module(self, name: str, new: nn.Module) -> None:
        """Swap ``new`` in for module ``name`` (see :func:`~quantkern.api.targets.set_module`); the old
        module's tensors go back to their original data, so its working copies are freed now."""
        old = self.model.get_submodule(name)
        set_module(self.model, name, new)
        if self._snapshot is not None:
            self._snapshot.release(old)

    # -- what the result will be ---------------------------------------------------------------------
    def layer_config(self, name: str) -> BaseConfig:
        """The config module ``name`` is quantized with: per-layer overrides applied where the config has them."""
        for_layer = getattr(self.config, "for_layer", None)
        return for_layer(name) if for_layer is not None else self.config

    def site_plan(self) -> Plan:
        """``{Site: Spec}``: every weight this quantizer will quantize and how (per-layer overrides
        applied), from the plan :meth:`prepare` made; each expert of a fused MoE experts module is two
        sites (its gate/up and down tensors). Available as ``self.sites`` after :meth:`prepare`."""
        if self.plan is None:
            return {}
        sites: Plan = {Site(name): self.layer_config(name).spec() for name in self.plan.quantize}
        for name, ex in self.plan.experts.items():
            s = self.layer_config(name).spec()
            for e in range(ex.num_experts):
                sites[Site(name, ex.layout.gate_up, e)] = s
                sites[Site(name, ex.layout.down, e)] = s
        return sites

    def layer_plan(self, name: str, linear: nn.Linear) -> LayerPlan:
        """The quantized layer that ``convert`` will put in place of ``linear`` (kind, shape and, for a
        QuantLinear, its weight scheme with any per-layer override applied)."""
        k, n = linear.in_features, linear.out_features
        if self.produces != "QuantLinear":
            return LayerPlan(self.produces, k, n)
        c = self.layer_config(name)
        s = c.scheme()
        return LayerPlan("QuantLinear", k, n, s, permuted_groups=s.act_order and not getattr(c, "static_groups", False))

    def check_export(self, export_format: str) -> None:
        """Raise ``ValueError`` (listing every layer, with what to do) if the planned quantized model
        could not be saved in ``export_format``; needs the plan that :meth:`prepare` makes."""
        if self.plan is None:
            raise RuntimeError("check_export() needs the layer plan: call prepare() first")
        plans = {name: self.layer_plan(name, lin) for name, lin in self.plan.quantize.items()}
        for name, site in self.plan.experts.items():
            c = self.layer_config(name)
            s = c.scheme()
            plans[name] = LayerPlan("QuantExperts", site.hidden_size, site.intermediate_size, s,
                                    permuted_groups=s.act_order and not getattr(c, "static_groups", False),
                                    problem=experts_export_problem(site.layout))
        check_exportable(export_format, plans, self.model)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        device = self.calibration_device()
        for b in tqdm(batches, desc="calibration forwards", disable=not self.verbose, leave=False):
            self.model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device))

    # -- helpers for subclasses --------------------------------------------------------------------
    def calibration_batch_size(self) -> int:
        return getattr(self.config, "batch_size", 1)

    def take_inputs(self) -> list:
        """Remove ``self.catcher`` (the first block's :class:`~quantkern.calibration.InputCatcher`)
        and return what the block received; raises if no calibration forward came."""
        self.catcher.remove()
        inputs, self.catcher = self.catcher.inputs, None
        if not inputs:
            raise RuntimeError("no calibration forwards reached the model between prepare() and convert(); "
                               "run model(input_ids=...) on calibration batches first")
        return inputs

    def calibration_device(self) -> torch.device:
        if self.config.device is not None:
            return torch.device(self.config.device)
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def make_quant_linear(self, linear: nn.Linear, qw, name: str) -> QuantLinear:
        return QuantLinear.from_quantized(qw, bias=linear.bias, dtype=self.layer_dtype(linear),
                                          backend=getattr(self.config, "backend", "auto"), name=name)

    def layer_dtype(self, linear: nn.Linear) -> torch.dtype:
        """Scales/bias dtype of the QuantLinear: the checkpoint's scale dtype (fp16 by default)."""
        return getattr(self.config, "torch_scale_dtype", linear.weight.dtype)

    def _prepare(self) -> None:
        raise NotImplementedError

    def _convert(self) -> None:
        raise NotImplementedError


def prepare(model: nn.Module, quant_config: BaseConfig, args=(), kwargs=None, inplace: bool = True,
            export_format: str | None = None) -> nn.Module:
    """Validate ``quant_config`` against ``model`` and install calibration observers.

    Everything checkable without data (bits, group sizes against every layer's shape, an already
    quantized model, ...) is checked here. Then run calibration forwards on the returned model
    (``model(input_ids=..., attention_mask=...)``; while prepared, a forward stops at the first decoder
    block and returns None) and call :func:`convert`. ``args`` / ``kwargs``, when given, are example
    forward inputs run once right away as the first calibration batch. ``inplace=False`` prepares a
    deep copy and leaves ``model`` untouched. ``export_format`` ("gptq", "awq", "compressed-tensors",
    "gguf"): also refuse now a result that could not be saved in that format.
    """
    if not isinstance(quant_config, BaseConfig):
        raise TypeError(f"quant_config must be a quantkern config (e.g. GPTQConfig), got {type(quant_config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    cls = quantizer_for(quant_config)
    model = cls(model, quant_config).prepare(export_format)
    if args or kwargs:
        with torch.no_grad():
            model(*tuple(args), **dict(kwargs or {}))
    return model


def convert(model: nn.Module, quant_config: BaseConfig | None = None) -> nn.Module:
    """Finish what :func:`prepare` started: quantize with the collected statistics."""
    q = model.__dict__.get(_STATE_ATTR)
    if q is None:
        raise RuntimeError("convert() needs a model returned by prepare() (a failed calibration forward restores "
                           "the model to its state before prepare(): call prepare() again)")
    if quant_config is not None and quant_config != q.config:
        raise ValueError(f"convert() got a different config than prepare(): {quant_config} != {q.config}")
    return q.convert()

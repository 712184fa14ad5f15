"""quantkern inside transformers' ``from_pretrained`` (issue #17), through transformers' ``HfQuantizer``
API (``register_quantization_config`` / ``register_quantizer``, as bitsandbytes, quanto and torchao plug in):

    from transformers import AutoModelForCausalLM
    import quantkern

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantkern.hf.QuantkernConfig(bits=4))

**On the fly**: a dense checkpoint is quantized while it loads, tensor by tensor (each Linear's weight is
rounded when transformers reads it and only its packed form is kept, so peak memory stays near the
quantized size): RTN at any bit width and group size, sym / asym, the MSE clipping search,
``skip_layers`` and per-layer ``overrides`` (the keys and patterns of :class:`quantkern.RTNConfig`).

**Load**: a GPTQ (v1 / v2), AWQ or compressed-tensors checkpoint, quantkern's or another tool's, comes
up with quantkern modules (``QuantkernConfig()``; only its ``backend`` applies). quantkern's own loader
reads and validates the quantized tensors (every scheme and module ``load_quantized`` reads: int2..8,
asym, act-order, W8A8, fp8, fused MoE experts), so the modules and logits are ``load_quantized``'s;
transformers loads the dense tensors with its ``dtype`` and ``device_map``. transformers refuses a
``quantization_config`` of another class than the checkpoint's; importing this module makes
QuantkernConfig the one exception (``AutoHfQuantizer.merge_quantization_configs`` is wrapped; every
other combination goes to transformers' own method unchanged).

**Save**: ``save_pretrained`` writes the tensors ``quantkern.save_quantized`` writes (GPTQ where the
format holds every layer, else compressed-tensors) and config.json's ``quantization_config`` says so;
``quantize_config.json`` and the tokenizer are not written (``save_quantized`` writes both).

Kernels are prepared at load for the model's dtype, so ``torch.compile(model, fullgraph=True)`` traces
it; the modules are differentiable in their inputs, so LoRA adapters train on top
(:func:`quantkern.lora.get_peft_model`). Not yet: fused MoE experts on the fly, HQQ-style rounding.
Importing this module registers the ``"quantkern"`` method with transformers once.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn

from .api import RTNConfig
from .api.targets import plan_targets, set_module
from .algorithms import quantize_rtn
from .formats.gptq import pack_gptq
from .nn import QuantLinear
from .nn.base import build_kernels

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer
    from transformers.quantizers.quantizers_utils import get_module_from_name
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # pragma: no cover - transformers is a dependency; an old one lacks the API
    raise ImportError("quantkern.hf needs transformers >= 5 (its HfQuantizer registration and weight conversion "
                      f"API): {e}") from e

METHOD = "quantkern"
#: the checkpoint formats ``from_pretrained(..., quantization_config=QuantkernConfig())`` loads with quantkern
LOADABLE_METHODS = ("gptq", "awq", "compressed-tensors")
_KEYS = ("bits", "group_size", "sym", "mse", "skip_layers", "overrides", "scale_dtype", "backend")


class QuantkernConfig(QuantizationConfigMixin):
    """``quantization_config`` for ``from_pretrained``: quantize a dense checkpoint with quantkern's RTN
    while it loads. Arguments as :class:`quantkern.RTNConfig` (validated now, before any loading)."""

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = True, mse: bool = False,
                 skip_layers=("lm_head",), overrides=(), scale_dtype: str = "float16", backend: str = "auto",
                 **kwargs):
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"QuantkernConfig got unknown settings {unknown}; allowed: {list(_KEYS)}")
        self.quant_method = METHOD
        self.rtn = RTNConfig(bits=bits, group_size=group_size, sym=sym, mse=mse, skip_layers=skip_layers,
                             overrides=overrides, scale_dtype=scale_dtype, backend=backend)
        #: the standard ``quantization_config`` of the checkpoint this model was loaded from or saved to
        #: (GPTQ / AWQ / compressed-tensors); when set, it is what ``to_dict`` (and so config.json) says
        self.checkpoint_config: dict | None = None

    @classmethod
    def for_checkpoint(cls, checkpoint_config, loading: "QuantkernConfig") -> "QuantkernConfig":
        """The config of a pre-quantized load: the checkpoint's own ``quantization_config`` (a dict or a
        transformers config object) read with ``loading``'s backend. Raises ``ValueError`` for a method
        quantkern does not read, naming it."""
        d = checkpoint_config if isinstance(checkpoint_config, dict) else checkpoint_config.to_dict()
        method = d.get("quant_method")
        method = getattr(method, "value", method)
        if method not in LOADABLE_METHODS:
            raise ValueError(f"this checkpoint is quantized with {method!r}; quantkern loads {list(LOADABLE_METHODS)} "
                             "checkpoints (or quantizes dense ones on the fly)")
        cfg = cls(backend=loading.backend)
        cfg.checkpoint_config = dict(d)
        return cfg

    def __getattr__(self, name):
        if name in _KEYS and "rtn" in self.__dict__:
            return getattr(self.rtn, name)
        raise AttributeError(name)

    def to_dict(self) -> dict:
        if self.__dict__.get("checkpoint_config") is not None:
            return dict(self.checkpoint_config)
        d = self.rtn.to_dict()
        d.pop("method", None)
        d.pop("device", None)
        d["overrides"] = [[p, dict(s)] for p, s in self.rtn.overrides]
        return {"quant_method": METHOD, **d}

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        d = {k: v for k, v in dict(config_dict).items() if k != "quant_method"}
        cfg = cls(**d)
        return (cfg, kwargs) if return_unused_kwargs else cfg


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc


def _return_freed_heap() -> None:
    """Give the heap pages freed by the load's fp32 temporaries back to the OS (glibc ``malloc_trim``;
    elsewhere nothing): glibc keeps them otherwise, and the process stays at about the dense size
    (measured in benchmarks/hf_load_memory.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _RoundOnLoad(ConversionOps):
    """transformers hands each planned Linear's weight here as it reads it: round it (RTN) and return
    the packed tensors of the QuantLinear shell in its place (and an empty placeholder for ``weight``)."""

    def __init__(self, quantizer: "QuantkernHfQuantizer"):
        self.quantizer = quantizer

    def convert(self, input_dict, full_layer_name: str | None = None, **kwargs):
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, (list, tuple)) else value
        name = full_layer_name.rpartition(".")[0]
        c = self.quantizer.quantization_config.rtn.for_layer(name)
        qw = quantize_rtn(value, c.scheme(), c.torch_scale_dtype, mse=c.mse)
        t = pack_gptq(qw)
        return {f"{name}.qweight": t.qweight, f"{name}.qzeros": t.qzeros, f"{name}.scales": t.scales,
                f"{name}.g_idx": t.g_idx, full_layer_name: torch.empty(0, dtype=value.dtype, device=value.device)}


class _Pending(nn.Module):
    """Stands where a quantized module goes while transformers loads the rest of a pre-quantized
    checkpoint (it holds no tensors, so transformers loads none into it)."""


class QuantkernHfQuantizer(HfQuantizer):
    """The ``"quantkern"`` method of ``from_pretrained`` (see the module text)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.shells: list[str] = []
        self.loaded: dict[str, nn.Module] = {}

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized and self.quantization_config.checkpoint_config is None:
            raise ValueError("this checkpoint is already quantized: pass quantization_config=QuantkernConfig() to "
                             "load it with quantkern's kernels, or load it with quantkern.load_quantized(path)")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name == "weight" and "weight" in module._parameters

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            return self._take_quantized_modules(model, checkpoint_files)
        # Plan (every check of ``plan_targets``: shapes, skips, unaccounted tensors) and put a QuantLinear
        # shell, with a placeholder ``weight`` for transformers to fill, in place of each planned Linear.
        cfg = self.quantization_config.rtn
        plan = plan_targets(model, cfg.skip_layers, cfg.bits, cfg.group_size, layer_config=cfg.for_layer,
                            on_load=True)
        for name, lin in plan.quantize.items():
            c = cfg.for_layer(name)
            w = lin.weight
            shell = QuantLinear(lin.in_features, lin.out_features, c.bits, c.group_size, c.sym,
                                bias=lin.bias is not None, dtype=c.torch_scale_dtype, backend=c.backend,
                                device=w.device)
            shell.name = name
            shell.register_parameter("weight", nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"),
                                                            requires_grad=False))
            set_module(model, name, shell)
            self.shells.append(name)
        model.quantkern_config = cfg.to_dict()
        return model

    def _take_quantized_modules(self, model, checkpoint_files):
        """A pre-quantized checkpoint: quantkern's own loader reads and validates it (every format and
        scheme ``load_quantized`` reads, the same modules, so the same logits); its quantized modules
        wait here while transformers loads the dense tensors, and take their places afterwards."""
        from .io.load import _load

        if not checkpoint_files:
            raise ValueError("quantkern: from_pretrained gave no checkpoint files to read")
        files = [Path(f) for f in checkpoint_files]
        if any(f.suffix != ".safetensors" for f in files):
            raise ValueError(f"quantkern reads safetensors checkpoints only, got {[f.name for f in files]}")
        with torch.device("cpu"):  # (from_pretrained calls this inside its meta-device init context)
            self.loaded = _load(files[0].parent, "cpu", None, self.quantization_config.backend, modules_only=True)
        for name in self.loaded:
            set_module(model, name, _Pending())
        ignore = {rf"^{re.escape(name)}\." for name in self.loaded}  # their tensors were read above
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignore
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, m in self.loaded.items():
            set_module(model, name, m.to(_device_near(model, name)))
        self.loaded = {}
        for name in self.shells:
            m = model.get_submodule(name)
            m._parameters.pop("weight", None)  # the placeholder: the packed tensors replaced it
            if m.bias is not None:
                m.bias = m.bias.to(m.scales.dtype)
        build_kernels(model)  # chosen now, for the model's dtype, so that torch.compile finds them ready
        _return_freed_heap()
        return model

    def get_quantize_ops(self):
        return _RoundOnLoad(self)

    def get_state_dict_and_metadata(self, model):
        """``save_pretrained``: the tensors ``quantkern.save_quantized`` writes (GPTQ where it can store
        every layer, else compressed-tensors), and config.json's ``quantization_config`` set to match."""
        from .io.export_rules import check_exportable, model_layer_plans
        from .io.save import checkpoint_tensors

        plans = model_layer_plans(model)
        try:
            check_exportable("gptq", plans, model)
            fmt = "gptq"
        except ValueError:
            check_exportable("compressed-tensors", plans, model)
            fmt = "compressed-tensors"
        sd, qcfg, _ = checkpoint_tensors(model, fmt)
        for cfg in {id(c): c for c in (self.quantization_config, getattr(model.config, "quantization_config", None))
                    if isinstance(c, QuantkernConfig)}.values():
            cfg.checkpoint_config = qcfg
        return sd, {}

    def is_serializable(self):
        return True

    @property
    def is_compileable(self) -> bool:
        return True  # every forward is one registered custom op, its kernels prepared at load

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA adapters on top (quantkern.lora); the quantized weights stay frozen


def _device_near(model: nn.Module, name: str) -> torch.device:
    """Where transformers (and its ``device_map``) put the module around ``name``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:i])) if i else model
        t = next(iter(owner.parameters()), None)
        if t is not None and t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    """transformers refuses a ``quantization_config`` of another class than the checkpoint's; a
    QuantkernConfig is the one exception: it loads the checkpoint's own format with quantkern."""
    if isinstance(quantization_config_from_args, QuantkernConfig):
        return QuantkernConfig.for_checkpoint(quantization_config, quantization_config_from_args)
    return _transformers_merge(quantization_config, quantization_config_from_args)


# (kept on the class, so that a second import of this module wraps transformers' method, not its own)
if not hasattr(AutoHfQuantizer, "_merge_before_quantkern"):
    AutoHfQuantizer._merge_before_quantkern = AutoHfQuantizer.merge_quantization_configs
_transformers_merge = AutoHfQuantizer._merge_before_quantkern


def _register() -> None:
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(QuantkernConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(QuantkernHfQuantizer)
    if getattr(AutoHfQuantizer.merge_quantization_configs, "__func__", None) is not _merge_quantization_configs:
        AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_quantization_configs)


_register()

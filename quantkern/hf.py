"""quantkern inside transformers' ``from_pretrained`` (issue #17), through transformers' ``HfQuantizer``
API (``register_quantization_config`` / ``register_quantizer``, as bitsandbytes, quanto and torchao plug in):

    from transformers import AutoModelForCausalLM
    import quantkern

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantkern.hf.QuantkernConfig(bits=4))

**On the fly** (this slice): a dense checkpoint is quantized while it loads, tensor by tensor (each
Linear's weight is rounded when transformers reads it and only its packed form is kept, so peak memory
stays near the quantized size): RTN at any bit width and group size, sym / asym, the MSE clipping search,
``skip_layers`` and per-layer ``overrides`` (the keys and patterns of :class:`quantkern.RTNConfig`). The
Linears become :class:`quantkern.QuantLinear` and run quantkern's kernels; ``qk.save_quantized(model,
out)`` writes the standard checkpoint.

Training on top: the quantized modules are differentiable in their inputs (weights frozen), so LoRA
adapters train on the loaded model with :func:`quantkern.lora.get_peft_model`.

Not yet: loading an already quantized checkpoint through ``from_pretrained`` (use
``quantkern.load_quantized``), fused MoE experts on the fly and ``save_pretrained`` (refused with a
message). Importing this module registers the ``"quantkern"`` method with transformers once.
"""

from __future__ import annotations

import torch
from torch import nn

from .api import RTNConfig
from .api.targets import plan_targets, set_module
from .algorithms import quantize_rtn
from .formats.gptq import pack_gptq
from .nn import QuantLinear

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizers_utils import get_module_from_name
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # pragma: no cover - transformers is a dependency; an old one lacks the API
    raise ImportError("quantkern.hf needs transformers >= 5 (its HfQuantizer registration and weight conversion "
                      f"API): {e}") from e

METHOD = "quantkern"
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

    def __getattr__(self, name):
        if name in _KEYS and "rtn" in self.__dict__:
            return getattr(self.rtn, name)
        raise AttributeError(name)

    def to_dict(self) -> dict:
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


class QuantkernHfQuantizer(HfQuantizer):
    """The ``"quantkern"`` method of ``from_pretrained`` (see the module text)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.shells: list[str] = []

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            raise ValueError("this checkpoint is already quantized: from_pretrained(quantization_config="
                             "QuantkernConfig(...)) quantizes dense checkpoints on load; load a quantized one "
                             "with quantkern.load_quantized(path)")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name == "weight" and "weight" in module._parameters

    def _process_model_before_weight_loading(self, model, **kwargs):
        """Plan (every check of ``plan_targets``: shapes, skips, unaccounted tensors) and put a QuantLinear
        shell, with a placeholder ``weight`` for transformers to fill, in place of each planned Linear."""
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

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in self.shells:
            m = model.get_submodule(name)
            m._parameters.pop("weight", None)  # the placeholder: the packed tensors replaced it
            if m.bias is not None:
                m.bias = m.bias.to(m.scales.dtype)
        return model

    def get_quantize_ops(self):
        return _RoundOnLoad(self)

    def is_serializable(self):
        return False  # save with quantkern.save_quantized(model, path) (GPTQ / compressed-tensors / GGUF)

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA adapters on top (quantkern.lora); the quantized weights stay frozen


def _register() -> None:
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(QuantkernConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(QuantkernHfQuantizer)


_register()

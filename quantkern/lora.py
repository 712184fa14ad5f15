"""LoRA adapters on quantkern's quantized modules with PEFT (QLoRA-style training, issue #17).

The quantized weights stay frozen and packed; the adapters train in full precision on top::

    from peft import LoraConfig
    import quantkern as qk

    model = qk.lora.get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))

:func:`get_peft_model` is ``peft.get_peft_model`` with quantkern's modules registered as LoRA targets
(:func:`register`, for callers who build the PEFT model themselves). Gradients reach the adapters through
the quantized layers' backward pass (``grad_x = grad_y @ W_dequantized``, see
:class:`quantkern.nn.base.QuantModule`). Merging an adapter into a quantized weight is refused: it
would need a new quantization; :func:`merged_dense` gives the merged fp weight of a layer instead.
``peft`` is an optional dependency (``pip install quantkern[train]``), imported only here.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from .nn.base import QuantModule


def _peft():
    try:
        import peft
        from peft.tuners.lora import LoraLayer
    except ImportError as e:
        raise ImportError("quantkern.lora needs peft (pip install peft): " + str(e)) from e
    return peft, LoraLayer


@functools.cache
def _layer_class():
    """The LoRA layer class for quantkern modules (built once, when peft is first needed)."""
    _, LoraLayer = _peft()

    class QuantLoraLinear(nn.Module, LoraLayer):
        """``base(x) + B(A(dropout(x))) * scaling`` over a frozen quantized ``base`` (a QuantModule)."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            super().__init__()
            with warnings.catch_warnings():  # peft warns of layer types it does not know: this one is handled
                warnings.filterwarnings("ignore", "Unsupported layer type")
                LoraLayer.__init__(self, base_layer)
            if getattr(config, "use_dora", False):
                raise ValueError("quantkern.lora: DoRA on a quantized layer is not supported; set use_dora=False")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def resolve_lora_variant(self, *, config, **kwargs):
            return None  # vanilla LoRA only (DoRA refused above)

        def merge(self, *args, **kwargs):
            raise ValueError(f"{self.get_base_layer().describe()}: merging a LoRA adapter into a quantized weight "
                             "needs a new quantization; use quantkern.lora.merged_dense(layer) for the merged fp "
                             "weight and quantize that")

        def unmerge(self, *args, **kwargs):
            raise ValueError("quantkern.lora: nothing is merged into a quantized layer")

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                h = self._cast_input_dtype(x, a.weight.dtype)
                result = result + (b(a(self.lora_dropout[name](h))) * self.scaling[name]).to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuantLoraLinear


def register(lora_config):
    """Make ``lora_config`` (a ``peft.LoraConfig``) wrap quantkern's quantized modules; returns it."""
    lora_config._register_custom_module({QuantModule: _layer_class()})
    return lora_config


def get_peft_model(model: nn.Module, lora_config, **kwargs):
    """``peft.get_peft_model(model, lora_config)`` with quantkern's modules as LoRA targets: the
    quantized weights stay frozen, the adapters train. Raises ``ValueError`` for a config that is not a
    ``LoraConfig``."""
    peft, _ = _peft()
    if not isinstance(lora_config, peft.LoraConfig):
        raise ValueError(f"quantkern.lora.get_peft_model takes a peft.LoraConfig, got {type(lora_config).__name__}")
    return peft.get_peft_model(model, register(lora_config), **kwargs)


def merged_dense(layer, adapter: str = "default") -> torch.Tensor:
    """The fp32 weight ``W_dequantized + B @ A * scaling`` of a LoRA-wrapped quantized layer ``[N, K]``
    (to quantize again, e.g. with :func:`quantkern.algorithms.quantize_rtn`)."""
    base = layer.get_base_layer()
    w = base.dequantized_weight()
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    return w + (b @ a).to(w.device) * layer.scaling[adapter]

"""quantkern: quantize Hugging Face causal LMs to packed low-bit weights and run them fast.

Two front doors::

    GPTQQuantizer(model, bits=4, group_size=128, actorder=True).quantize(data)

    model = prepare(model, GPTQConfig(bits=4))
    for batch in data: model(**batch)
    model = convert(model, GPTQConfig(bits=4))
"""

from ._version import __version__

from .api import (BaseConfig, BaseQuantizer, GPTQConfig, GPTQQuantizer, RTNConfig, RTNQuantizer, convert, prepare,
                  register_quantizer)
from .api import (AWQConfig, AWQQuantizer, FP8Config, FP8Quantizer, PTQConfig, PTQQuantizer, SmoothQuantConfig,
                  SmoothQuantQuantizer, W8A8Config, W8A8Quantizer, ZeroQuantConfig, ZeroQuantQuantizer)
from .api import FP4Config, FP4Quantizer
from .api import BudgetPlan, BudgetPlanner, Sensitivity
from .nn.fp4_linear import FP4Linear
from .nn.fp8_linear import FP8Linear
from .nn.w8a8_linear import W8A8Linear
from .core import QuantizedWeight, WeightScheme
from .kernels import Backend
from .nn import QuantLinear, release_canonical


def rotate(model, seed=0, heads=True):
    """Fold norms and Hadamard rotations into a dense Llama-like model before quantizing it (see
    :func:`quantkern.transforms.rotate`); returns the same, equivalent model."""
    from .transforms import rotate as _rotate

    return _rotate(model, seed=seed, heads=heads)


def save_quantized(model, path, tokenizer=None, **kwargs):
    """Write ``model`` as a checkpoint serving engines load (see :func:`quantkern.io.save_quantized`)."""
    from .io import save_quantized as _save

    return _save(model, path, tokenizer=tokenizer, **kwargs)


def load_quantized(path, device="cpu", **kwargs):
    """Load a quantized checkpoint into QuantLinear layers (see :func:`quantkern.io.load_quantized`)."""
    from .io import load_quantized as _load

    return _load(path, device=device, **kwargs)


def __getattr__(name):
    if name in ("hf", "lora"):  # from_pretrained integration (importing it registers the method); PEFT LoRA
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'quantkern' has no attribute {name!r}")


__all__ = [
    "__version__", "BaseConfig", "BaseQuantizer", "GPTQConfig", "RTNConfig", "GPTQQuantizer", "RTNQuantizer",
    "prepare", "convert", "register_quantizer", "QuantizedWeight", "WeightScheme", "Backend", "QuantLinear",
    "save_quantized", "load_quantized", "rotate", "release_canonical",
    "AWQConfig", "AWQQuantizer", "W8A8Config", "W8A8Quantizer", "SmoothQuantConfig", "SmoothQuantQuantizer",
    "W8A8Linear", "FP8Config", "FP8Quantizer", "FP8Linear",
    "PTQConfig", "PTQQuantizer", "ZeroQuantConfig", "ZeroQuantQuantizer",
    "FP4Config", "FP4Quantizer", "FP4Linear", "BudgetPlanner", "BudgetPlan", "Sensitivity",
]

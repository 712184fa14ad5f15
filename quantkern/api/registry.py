"""Config type -> quantizer class."""

from __future__ import annotations

_QUANTIZERS: dict[type, type] = {}


def register_quantizer(config_cls: type):
    """Class decorator: ``@register_quantizer(GPTQConfig) class GPTQQuantizer(BaseQuantizer): ...``."""

    def deco(cls):
        if config_cls in _QUANTIZERS and _QUANTIZERS[config_cls] is not cls:
            raise ValueError(f"{config_cls.__name__} already has quantizer {_QUANTIZERS[config_cls].__name__}")
        _QUANTIZERS[config_cls] = cls
        cls.config_cls = config_cls
        return cls

    return deco


def quantizer_for(config) -> type:
    for klass in type(config).__mro__:
        if klass in _QUANTIZERS:
            return _QUANTIZERS[klass]
    raise TypeError(f"no quantizer registered for config type {type(config).__name__}; "
                    f"known: {sorted(c.__name__ for c in _QUANTIZERS)}")


def registered_configs() -> list[type]:
    return list(_QUANTIZERS)


def needs_data(config) -> bool:
    """Whether quantizing with ``config`` takes calibration data (a property for some methods:
    W8A8 only with static scales, FP8 only with GPTQ weights or static scales)."""
    from torch import nn

    return bool(quantizer_for(config)(nn.Module(), config, verbose=False).needs_data)

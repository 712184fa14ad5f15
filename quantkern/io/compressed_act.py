"""compressed-tensors "int-quantized" (W8A8 int8) and "float-quantized" (fp8 E4M3) layers.

quantkern's :class:`~quantkern.nn.w8a8_linear.W8A8Linear` and :class:`~quantkern.nn.fp8_linear.FP8Linear`
already hold their tensors under compressed-tensors' names, so export writes their state dict as is
and only describes it with the package's ``QuantizationArgs`` / ``QuantizationScheme``:

- ``weight``: int8 / float8_e4m3fn ``[N, K]``; ``weight_scale``: fp32 ``[N, 1]`` (per output channel,
  symmetric: no zero point)
- ``input_scale``: fp32 ``[1]`` for static per-tensor activations; absent for dynamic per-token ones
- ``bias``: ``[N]`` (optional)

Import accepts exactly those schemes (8-bit symmetric per-channel weights; activations none,
per-token dynamic or per-tensor static, symmetric) and refuses the rest with the group's name.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CheckpointConfigError
from .validate import CheckpointTensorError, check_bias, check_scales, check_tensor

ACT_FORMATS = ("int-quantized", "float-quantized")


def _modules():
    from ..nn.fp8_linear import FP8Linear
    from ..nn.w8a8_linear import W8A8Linear

    return W8A8Linear, FP8Linear


def act_layers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{name: (format, activation mode)}`` for the W8A8 / FP8 layers of ``model``; mode is
    ``"static"``, ``"dynamic"`` or ``"none"`` (weight-only fp8)."""
    W8A8Linear, FP8Linear = _modules()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            out[name] = ("int-quantized", "static" if m.input_scale is not None else "dynamic")
        elif isinstance(m, FP8Linear):
            out[name] = ("float-quantized", m.act)
    return out


def act_scheme(fmt: str, act: str, targets: list[str]):
    """The package's ``QuantizationScheme`` for one (format, activation mode) group."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind = "int" if fmt == "int-quantized" else "float"
    weights = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="channel", dynamic=False)
    acts = None
    if act == "dynamic":
        acts = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
    elif act == "static":
        acts = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="tensor", dynamic=False)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts, format=fmt)


def check_act_scheme(where: str, fmt: str, s) -> str:
    """Validate a parsed int-/float-quantized scheme; returns the activation mode."""
    kind = "int" if fmt == "int-quantized" else "float"
    w = s.weights
    if w is None or w.type != kind or w.num_bits != 8 or not w.symmetric or w.strategy != "channel":
        raise CheckpointConfigError(f"{where}: {fmt} weights must be 8-bit {kind}, symmetric, per channel; got {w}")
    if s.output_activations is not None:
        raise CheckpointConfigError(f"{where}: output activation quantization is not supported")
    a = s.input_activations
    if a is None:
        if fmt == "int-quantized":
            raise CheckpointConfigError(f"{where}: int8 weights without activation quantization (W8A16 int) "
                                        "are not supported; expected input_activations")
        return "none"
    if a.type != kind or a.num_bits != 8 or not a.symmetric:
        raise CheckpointConfigError(f"{where}: activations must be 8-bit {kind} symmetric, got {a}")
    if a.dynamic is True and a.strategy == "token":
        return "dynamic"
    if a.dynamic is False and a.strategy == "tensor":
        return "static"
    raise CheckpointConfigError(f"{where}: activations must be per-token dynamic or per-tensor static, "
                                f"got strategy={a.strategy!r} dynamic={a.dynamic!r}")


def build_act_layer(name: str, fmt: str, act: str, lin: nn.Linear, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype | None, backend: str):
    """Validate ``name``'s tensors and return ``(module on meta, {tensor name: tensor}, used names)``."""
    W8A8Linear, FP8Linear = _modules()
    n, k = lin.out_features, lin.in_features
    wdt = torch.int8 if fmt == "int-quantized" else torch.float8_e4m3fn
    for part in ("weight", "weight_scale") + (("input_scale",) if act == "static" else ()):
        if f"{name}.{part}" not in tensors:
            raise CheckpointTensorError(f"{name}.{part}: missing ({fmt}, activations {act})")
    check_tensor(f"{name}.weight", tensors[f"{name}.weight"], (wdt,), (n, k))
    if wdt is torch.float8_e4m3fn and not bool(torch.isfinite(tensors[f"{name}.weight"].float()).all()):
        raise CheckpointTensorError(f"{name}.weight: holds NaN fp8 codes")
    scale = tensors[f"{name}.weight_scale"]
    if scale.dim() == 1:
        scale = scale.reshape(n, 1) if scale.numel() == n else scale
    check_tensor(f"{name}.weight_scale", scale, (torch.float32, torch.float16, torch.bfloat16), (n, 1))
    check_scales(f"{name}.weight_scale", scale)
    has_bias = f"{name}.bias" in tensors
    bias_dtype = dtype or (tensors[f"{name}.bias"].dtype if has_bias else torch.float16)
    out = {f"{name}.weight": tensors[f"{name}.weight"], f"{name}.weight_scale": scale.float()}
    if act == "static":
        ins = tensors[f"{name}.input_scale"].reshape(-1)
        check_tensor(f"{name}.input_scale", ins, (torch.float32, torch.float16, torch.bfloat16), (1,))
        check_scales(f"{name}.input_scale", ins)
        out[f"{name}.input_scale"] = ins.float()
    if has_bias:
        check_bias(f"{name}.bias", tensors[f"{name}.bias"], n)
        out[f"{name}.bias"] = tensors[f"{name}.bias"].to(bias_dtype)
    if fmt == "int-quantized":
        mod = W8A8Linear(k, n, bias=has_bias, static=act == "static", dtype=bias_dtype, device="meta")
        mod.backend = "reference" if backend == "reference" else "auto"
    else:
        mod = FP8Linear(k, n, bias=has_bias, act=act, dtype=bias_dtype, device="meta")
        mod.backend = "emulated" if backend == "reference" else "auto"
    mod.name = name
    used = {f"{name}.{p}" for p in ("weight", "weight_scale", "input_scale", "bias")}
    return mod, out, used

"""Scale / zero computation and (de)quantization in plain torch.

Everything here works on a weight laid out as ``[out_features, in_features]`` (``nn.Linear``'s
layout) and on groups of its columns. Scales are rounded to ``scale_dtype`` (the dtype the checkpoint
stores them in) *before* codes are computed, so dequantizing with the stored scales reproduces exactly
what the quantizer optimised.

:func:`static_input_scale` is the one activation qparam shared by int8 and fp8: a per-tensor scale from
an observed abs-max.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class ScaleOverflowError(ValueError):
    """Quantization scales (or a bias) that the dtype they are stored in cannot hold: casting them
    would give ``inf`` and a model that computes NaN."""


@contextmanager
def naming_layer(name: str):
    """Prefix a :class:`ScaleOverflowError` raised inside with the layer ``name`` (once)."""
    try:
        yield
    except ScaleOverflowError as e:
        if str(e).startswith(f"{name}: "):
            raise
        raise ScaleOverflowError(f"{name}: {e}") from None


def dtype_overflow(values: torch.Tensor, dtype: torch.dtype) -> str | None:
    """``None`` if the finite ``values`` stay finite in ``dtype``, else what overflows: the largest
    magnitude and ``dtype``'s limit (one host sync; for construction / save time, not forwards)."""
    if not dtype.is_floating_point or values.numel() == 0:
        return None
    if bool(torch.isfinite(values.detach().to(dtype).float()).all()):  # fp8 E4M3 overflows to NaN, not inf
        return None
    amax = float(values.detach().float().abs().amax())
    return (f"values up to {amax:.4g} overflow {str(dtype).replace('torch.', '')} "
            f"(largest finite value {torch.finfo(dtype).max:.6g})")


def find_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
    clip_ratio: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max quantization parameters of ``w`` ([rows, cols]).

    Returns ``scale`` (fp32 values representable in ``scale_dtype``) and integer ``zero`` (int32,
    in ``[0, maxq]``), both of shape ``[rows]``. ``clip_ratio`` (scalar or [rows]) shrinks the range,
    as in an MSE clipping search. Rows that are all zero get scale 1 instead of a division by zero.
    Raises :class:`ScaleOverflowError` (naming the largest ``|w|`` and ``scale_dtype``'s limit) when a
    scale does not fit ``scale_dtype`` (e.g. ``|w|`` ~ 1e5 at 2 bits in fp16).
    """
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    wmax = torch.maximum(xmin.abs(), xmax)
    if sym:
        xmin, xmax = -wmax, wmax
    xmin = xmin * clip_ratio
    xmax = xmax * clip_ratio
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    raw = (xmax - xmin) / maxq
    scale = raw.to(scale_dtype).float()
    if scale_dtype != torch.float32 and bool(torch.isinf(scale).any()):  # one sync: quantization time only
        bad = torch.isinf(scale)
        raise ScaleOverflowError(
            f"{bits}-bit scales overflow {str(scale_dtype).replace('torch.', '')}: weights with max |w| = "
            f"{float(wmax[bad].max()):.4g} need scales up to {float(raw[bad].max()):.4g}, above its largest finite "
            f"value {torch.finfo(scale_dtype).max:.6g}; quantize with scale_dtype='float32' (not every engine "
            "loads fp32 GPTQ scales) or rescale the weights")
    # an fp16 scale can underflow to zero for tiny ranges; keep it the smallest positive normal
    tiny = torch.finfo(scale_dtype).tiny
    scale = scale.clamp(min=tiny)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int32)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of ``w`` ([rows, cols]) for per-row ``scale`` / ``zero``; int32 in [0, maxq]."""
    q = torch.round(w.float() / scale.unsqueeze(1)) + zero.unsqueeze(1)
    return q.clamp_(0, maxq).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize` (fp32)."""
    return (q.float() - zero.unsqueeze(1).float()) * scale.unsqueeze(1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


def find_qparams_mse(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
    grid: int = 20,
    max_shrink: float = 0.2,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`find_qparams`, but each row's range is shrunk by the factor in
    ``[1 - max_shrink, 1]`` that minimises the ``norm``-power error of its fake-quantized values
    (the clipping search of the GPTQ reference implementation)."""
    maxq = (1 << bits) - 1
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_scale, best_zero = find_qparams(w, bits, sym, scale_dtype)
    for i in range(int(max_shrink * grid) + 1):
        ratio = 1.0 - i / grid
        scale, zero = find_qparams(w, bits, sym, scale_dtype, clip_ratio=ratio)
        err = (fake_quantize(w, scale, zero, maxq) - w.float()).abs_().pow_(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def static_input_scale(amax, qmax: float) -> float:
    """One per-tensor activation scale from an observed abs-max (a float, a tensor of any shape, or
    None): ``max / qmax``, or 1.0 when nothing (or only zeros) was observed."""
    m = 0.0 if amax is None else float(amax.max() if isinstance(amax, torch.Tensor) else amax)
    return m / qmax if m > 0 else 1.0

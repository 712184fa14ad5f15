"""Validation of tensors read from a file, before any kernel sees them.

Every check raises :class:`CheckpointTensorError` whose message starts with the full tensor name
(``model.layers.0.mlp.down_proj.scales: ...``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core import WeightScheme
from ..formats.gptq import gptq_shapes, packable, zeros_v1_to_v2

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CheckpointTensorError(ValueError):
    """A tensor in a checkpoint with the wrong dtype, shape or values."""


def checkpoint_headers(path: Path) -> tuple[list[Path], dict, list[str]]:
    """``(safetensors files, their headers, problems)`` of checkpoint directory ``path``, reading no
    tensor data. ``problems`` lists what makes the files disagree with each other: a ``*.safetensors``
    file that is not read (not in the index, or next to ``model.safetensors``), a tensor the index maps
    to a shard that does not hold it, or one a shard holds that the index does not list. Unreadable
    files and indexes raise :class:`~quantkern.io.files.CheckpointFileError`."""
    from .config import read_config_json
    from .files import SAFE_WEIGHTS_INDEX_NAME, CheckpointFileError, read_headers, safetensors_files

    try:
        files = safetensors_files(path)
    except RecursionError:
        raise CheckpointFileError(f"{path / SAFE_WEIGHTS_INDEX_NAME}: safetensors index is nested too deeply") from None
    headers = read_headers(files)
    problems = []
    index = path / SAFE_WEIGHTS_INDEX_NAME
    read = {f.name for f in files}
    for stray in sorted(p.name for p in path.glob("*.safetensors") if p.is_file() and p.name not in read):
        why = f"the index {index.name} does not list it" if index.exists() else f"{files[0].name} is read instead"
        problems.append(f"{path / stray}: safetensors file that is not read ({why}); remove it, or list its "
                        "tensors in the index")
    if index.exists():
        wm = read_config_json(index, "safetensors index")["weight_map"]
        wrong = [f"{index}: maps {k!r} to {v}, but "
                 f"{'it is in ' + headers[k][0].name if k in headers else 'no shard holds it'}"
                 for k, v in wm.items() if k not in headers or headers[k][0].name != v]
        unlisted = [f"{headers[k][0]}: holds {k!r}, which the index {index.name} does not list"
                    for k in headers if k not in wm]
        for group in (wrong, unlisted):
            problems += group[:4] + ([f"... and {len(group) - 4} more like it"] if len(group) > 4 else [])
    return files, headers, problems


def check_tensor(name: str, t: torch.Tensor, dtypes, shape: tuple[int, ...]) -> None:
    if t.dtype not in dtypes:
        raise CheckpointTensorError(f"{name}: dtype {t.dtype} is not one of {[str(d) for d in dtypes]}")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointTensorError(f"{name}: shape {tuple(t.shape)} does not match the config, "
                                    f"expected {tuple(shape)}")


def check_scales(name: str, scales: torch.Tensor) -> None:
    """Finite and strictly positive (a zero / negative / NaN scale is a corrupt file, not a choice)."""
    s = scales.float()
    if not bool(torch.isfinite(s).all()):
        raise CheckpointTensorError(f"{name}: holds non-finite values")
    if not bool((s > 0).all()):
        raise CheckpointTensorError(f"{name}: holds values <= 0 (scales must be positive)")


def check_bias(name: str, bias: torch.Tensor, out_features: int) -> None:
    check_tensor(name, bias, FLOAT_DTYPES, (out_features,))
    if not bool(torch.isfinite(bias.float()).all()):
        raise CheckpointTensorError(f"{name}: holds non-finite values")


def check_g_idx(name: str, g_idx: torch.Tensor, num_groups: int) -> None:
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
        raise CheckpointTensorError(f"{name}: values must lie in [0, {num_groups}), got "
                                    f"[{int(g_idx.min())}, {int(g_idx.max())}]")


def check_linear_scheme(name: str, scheme: WeightScheme, in_features: int, out_features: int) -> None:
    reason = packable(in_features, out_features, scheme.bits)
    if reason:
        raise CheckpointTensorError(f"{name}: a {scheme.bits}-bit layer of shape {in_features}->{out_features} "
                                    f"cannot be packed: {reason}")
    if scheme.group_size != -1 and scheme.group_size > in_features:
        raise CheckpointTensorError(f"{name}: group_size={scheme.group_size} is larger than in_features={in_features}")


def validate_gptq_layer(name: str, tensors: dict[str, torch.Tensor], scheme: WeightScheme, in_features: int,
                        out_features: int, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """Check the GPTQ tensors ``{name}.qweight/.qzeros/.scales/.g_idx/.bias`` of one Linear and return
    them with zeros converted to v2. ``g_idx`` may be absent (then ``k // group_size``)."""
    check_linear_scheme(name, scheme, in_features, out_features)
    g = scheme.num_groups(in_features)
    shapes = gptq_shapes(in_features, out_features, scheme.bits, g)
    out = {}
    for part in ("qweight", "qzeros", "scales"):
        if f"{name}.{part}" not in tensors:
            raise CheckpointTensorError(f"{name}.{part}: missing (a quantized layer needs qweight, qzeros, scales)")
    check_tensor(f"{name}.qweight", tensors[f"{name}.qweight"], (torch.int32,), shapes["qweight"])
    check_tensor(f"{name}.qzeros", tensors[f"{name}.qzeros"], (torch.int32,), shapes["qzeros"])
    check_tensor(f"{name}.scales", tensors[f"{name}.scales"], FLOAT_DTYPES, shapes["scales"])
    check_scales(f"{name}.scales", tensors[f"{name}.scales"])
    if f"{name}.g_idx" in tensors:
        g_idx = tensors[f"{name}.g_idx"]
        check_tensor(f"{name}.g_idx", g_idx, (torch.int32, torch.int64), shapes["g_idx"])
        check_g_idx(f"{name}.g_idx", g_idx, g)
        g_idx = g_idx.to(torch.int32)
    else:
        if scheme.act_order:
            raise CheckpointTensorError(f"{name}.g_idx: missing, but desc_act=True needs it")
        gs = scheme.group_size if scheme.group_size != -1 else in_features
        g_idx = (torch.arange(in_features, dtype=torch.int32) // gs)
    qzeros = tensors[f"{name}.qzeros"]
    if checkpoint_format == "gptq":
        try:
            qzeros = zeros_v1_to_v2(qzeros, scheme.bits, out_features)
        except ValueError as e:
            raise CheckpointTensorError(f"{name}.qzeros: {e}") from None
    out[f"{name}.qweight"] = tensors[f"{name}.qweight"]
    out[f"{name}.qzeros"] = qzeros
    out[f"{name}.scales"] = tensors[f"{name}.scales"]
    out[f"{name}.g_idx"] = g_idx
    if f"{name}.bias" in tensors:
        check_bias(f"{name}.bias", tensors[f"{name}.bias"], out_features)
        out[f"{name}.bias"] = tensors[f"{name}.bias"]
    return out


def validate_dense(name: str, t: torch.Tensor, expected: torch.Tensor) -> None:
    """A non-quantized tensor must have the skeleton's shape and a float dtype where it is a float."""
    if tuple(t.shape) != tuple(expected.shape):
        raise CheckpointTensorError(f"{name}: shape {tuple(t.shape)} does not match the model config, "
                                    f"expected {tuple(expected.shape)}")
    if expected.is_floating_point():
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointTensorError(f"{name}: dtype {t.dtype} is not a float dtype "
                                        f"{[str(d) for d in FLOAT_DTYPES]}")
        if not bool(torch.isfinite(t.float()).all()):
            raise CheckpointTensorError(f"{name}: holds non-finite values")
    elif t.dtype != expected.dtype:
        raise CheckpointTensorError(f"{name}: dtype {t.dtype}, expected {expected.dtype}")

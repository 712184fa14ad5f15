"""AWQ GEMM export and import (the tensors; the config lives in :mod:`.config`).

Export writes ``quantization_config`` = ``{"quant_method": "awq", "bits": 4, "group_size",
"zero_point": true, "version": "gemm"}`` (what transformers / vLLM read) plus AutoAWQ's own
``quant_config.json``. Zeros are written as-is, so symmetric models (zero 8) are exact too; a model
is exportable only if every quantized layer is 4-bit, shares one group size that divides its
in_features, and keeps its groups in column order (act-order with static groups does; a permuted
``g_idx`` cannot be stored).
"""

from __future__ import annotations

import torch
from torch import nn

from .._version import __version__
from ..core import WeightScheme
from ..formats.awq import AWQTensors, awq_shapes, awq_unsupported, pack_awq, unpack_awq
from ..formats.gptq import pack_gptq
from .hf import dense_state_dict, quant_layers
from .validate import FLOAT_DTYPES, CheckpointTensorError, check_bias, check_scales, check_tensor


def awq_export(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state dict in AWQ GEMM layout, quantization_config, {extra json files})``.

    What AWQ cannot hold is refused before this runs, by
    :func:`~quantkern.io.export_rules.check_exportable` in ``save_quantized``."""
    layers = quant_layers(model)
    sd = dense_state_dict(model)
    for name, m in layers.items():
        try:
            t = pack_awq(m.to_quantized())
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        sd.pop(f"{name}.g_idx", None)
        sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"] = t.qweight, t.qzeros, t.scales
    group_size = next(iter(layers.values())).group_size  # one for the whole model (checked)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not out_emb]
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "quantizer": [f"quantkern:{__version__}"]}
    if skip:
        qcfg["modules_to_not_convert"] = skip
    autoawq = {"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}
    return sd, qcfg, {"quant_config.json": autoawq}


def awq_layer_to_gptq(name: str, tensors: dict[str, torch.Tensor], scheme: WeightScheme, in_features: int,
                      out_features: int) -> dict[str, torch.Tensor]:
    """Validate one Linear's AWQ tensors and return them repacked in the GPTQ v2 layout."""
    reason = awq_unsupported(scheme, in_features, out_features)
    if reason:
        raise CheckpointTensorError(f"{name}: {reason}")
    for part in ("qweight", "qzeros", "scales"):
        if f"{name}.{part}" not in tensors:
            raise CheckpointTensorError(f"{name}.{part}: missing (an AWQ layer needs qweight, qzeros, scales)")
    g = scheme.num_groups(in_features)
    shapes = awq_shapes(in_features, out_features, g)
    check_tensor(f"{name}.qweight", tensors[f"{name}.qweight"], (torch.int32,), shapes["qweight"])
    check_tensor(f"{name}.qzeros", tensors[f"{name}.qzeros"], (torch.int32,), shapes["qzeros"])
    check_tensor(f"{name}.scales", tensors[f"{name}.scales"], FLOAT_DTYPES, shapes["scales"])
    check_scales(f"{name}.scales", tensors[f"{name}.scales"])
    qw = unpack_awq(AWQTensors(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]),
                    scheme.group_size, in_features, out_features)
    t = pack_gptq(qw)
    out = {f"{name}.qweight": t.qweight, f"{name}.qzeros": t.qzeros, f"{name}.scales": t.scales,
           f"{name}.g_idx": t.g_idx}
    if f"{name}.bias" in tensors:
        check_bias(f"{name}.bias", tensors[f"{name}.bias"], out_features)
        out[f"{name}.bias"] = tensors[f"{name}.bias"]
    return out


"""What every Hugging Face style checkpoint directory quantkern writes is made of, shared by the writers
(:mod:`.save` for GPTQ, :mod:`.awq`, :mod:`.compressed`, and :mod:`quantkern.offload`): the model's
QuantLinear layers, its dense state dict, ``config.json`` and the side files.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..nn import QuantLinear
from .experts import quant_experts

_FINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """``{module name: QuantLinear}``; raises ``ValueError`` if the model has none (and no QuantExperts)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers and not quant_experts(model):
        raise ValueError("the model has no QuantLinear layers: quantize it before saving")
    return layers


def dense_state_dict(model: nn.Module, skip_modules=()) -> dict[str, torch.Tensor]:
    """The model's state dict, CPU and contiguous, without the tied output embedding (safetensors
    refuses shared storage, and HF readers re-tie it from ``tie_word_embeddings``) and without the
    tensors of ``skip_modules``. Any other shared storage is copied. Raises ``ValueError`` naming a
    float tensor that holds inf / NaN (overflowed scales or bias), which the loader would refuse."""
    sd = model.state_dict()
    drop = set()
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None and getattr(out, "weight", None) is not None \
                and out.weight.data_ptr() == inp.weight.data_ptr():
            out_name = next(n for n, m in model.named_modules() if m is out)
            drop.add(f"{out_name}.weight")
    prefixes = tuple(f"{s}." for s in skip_modules)
    result, storages = {}, set()
    for k, t in sd.items():
        if k in drop or k.startswith(prefixes):
            continue
        if t.device.type == "meta":
            raise ValueError(f"tensor {k} is on the meta device (offloaded?); load the whole model before saving")
        t = t.detach().to("cpu").contiguous()
        if t.dtype in _FINITE_DTYPES and not bool(torch.isfinite(t).all()):
            # load_quantized refuses non-finite tensors: never write a checkpoint its own loader rejects
            raise ValueError(f"tensor {k} holds inf/NaN values; refusing to save (the checkpoint would not load)")
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()  # a view of a tensor already written (fused projections): store a copy
        storages.add(t.untyped_storage().data_ptr())
        result[k] = t
    return result


def hf_config_dict(model: nn.Module, quantization_config: dict) -> dict:
    """``model.config`` as a dict with ``quantization_config`` replaced (a GGUF loader's GgufConfig
    must not survive) and ``architectures`` filled in so that Auto* classes can load it."""
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = quantization_config
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    d = cfg.to_dict()
    d["quantization_config"] = quantization_config
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and not isinstance(out_emb, nn.Embedding) and getattr(out_emb, "weight", None) is None:
        d["tie_word_embeddings"] = False  # a quantized lm_head is no longer the embedding
    dense = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if dense:
        d["dtype"] = str(Counter(dense).most_common(1)[0][0]).replace("torch.", "")
        d.pop("torch_dtype", None)
    return d


def write_side_files(model: nn.Module, tmp: Path, tokenizer, config_dict: dict, extra_json: dict | None = None) -> None:
    """generation_config, tokenizer, extra json files, then config.json (last: without it nothing loads)."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, data in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")

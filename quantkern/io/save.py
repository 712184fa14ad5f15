"""``save_quantized``: write a quantized model as a checkpoint other engines read.

Formats: ``"gptq"`` (here; v1 or v2 zeros), ``"awq"`` (:mod:`.awq`), ``"compressed-tensors"``
(:mod:`.compressed`) and ``"gguf"`` (:mod:`.gguf_export`, a single ``.gguf`` file). Directory formats
are written atomically (:func:`.files.atomic_directory`): weights, then the side files, then
``config.json`` last, all into a temporary directory that is renamed into place only when complete.
The destination is checked first (:func:`check_save_destination`): nothing is replaced but a previous
checkpoint, and that only with ``overwrite=True``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..formats.bitpack import unpack_cols
from ..formats.gptq import zeros_v2_to_v1
from ..nn import QuantLinear
from .experts import (checkpoint_renames, experts_dynamic_pattern, experts_to_checkpoint, expert_modules,
                      quant_experts, rename)
from .export_rules import FORMAT_KINDS, check_exportable, model_layer_plans
from .files import GGUF_DIR_NAME, atomic_directory, check_destination, write_safetensors
from .hf import dense_state_dict, hf_config_dict, quant_layers, write_side_files

log = logging.getLogger(__name__)

SAVE_FORMATS = tuple(FORMAT_KINDS)
_INFO_DEFAULTS = {"damp_percent": 0.01, "static_groups": False, "true_sequential": True}


def _scheme_key(m: QuantLinear) -> tuple:
    return (m.bits, m.group_size, m.sym, m.desc_act)


def gptq_quantization_config(model: nn.Module, layers: dict[str, QuantLinear], checkpoint_format: str) -> dict:
    """The ``quantization_config`` dict for GPTQ: the most common scheme is the base; layers with
    another scheme get GPTQModel ``dynamic`` overrides, dense Linears a ``-:`` exclusion."""
    experts = quant_experts(model)
    renames = checkpoint_renames(model) if experts else ()
    keys = [_scheme_key(m) for m in layers.values()] + [k for n, m in experts.items() for _, k in expert_modules(n, m)]
    base = Counter(keys).most_common(1)[0][0]
    bits, group_size, sym, desc_act = base
    dynamic = {}
    for name, m in layers.items():
        if _scheme_key(m) != base:
            dynamic[f"+:^{re.escape(rename(name, renames))}$"] = dict(zip(("bits", "group_size", "sym", "desc_act"),
                                                                          _scheme_key(m)))
    for name, m in experts.items():
        key = (m.bits, m.group_size, m.sym, m.desc_act)
        if key != base:
            dynamic[f"+:{experts_dynamic_pattern(name, m)}"] = dict(zip(("bits", "group_size", "sym", "desc_act"), key))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if type(m) is nn.Linear and m is not out_emb:
            dynamic[f"-:^{re.escape(rename(name, renames))}$"] = {}
    qk = dict(getattr(model, "quantkern_config", None) or {})
    info = {k: qk.get(k, v) for k, v in _INFO_DEFAULTS.items()}
    d = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
         "checkpoint_format": checkpoint_format, **info,
         "lm_head": isinstance(out_emb, QuantLinear), "quantizer": [f"quantkern:{__version__}"]}
    if qk.get("modules_in_block_to_quantize"):
        d["modules_in_block_to_quantize"] = qk["modules_in_block_to_quantize"]
    if dynamic:
        d["dynamic"] = dynamic
    return d


def _min_zero(m: QuantLinear) -> int:
    return int(unpack_cols(m.qzeros.cpu(), m.bits, m.out_features).min())


def gptq_tensors(model: nn.Module, checkpoint_format: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """State dict in the GPTQ layout and the checkpoint format actually written.

    ``checkpoint_format=None`` picks v1 ("gptq", widest compatibility) when every zero is >= 1, else
    v2; an explicit "gptq" with a zero of 0 raises ``ValueError`` naming the layer."""
    if checkpoint_format not in (None, "gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be None, 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    layers = quant_layers(model)
    experts = quant_experts(model)
    if checkpoint_format is None:
        bad = next((n for n, m in layers.items() if _min_zero(m) < 1), None)
        bad = bad or next((n for n, m in experts.items() if any(
            int(unpack_cols(p.qzeros.cpu().flatten(0, 1), m.bits, p.out_features).min()) < 1 for p in (m.gate_up_proj, m.down_proj))),
            None)
        checkpoint_format = "gptq" if bad is None else "gptq_v2"
        if bad is not None:
            log.info("writing checkpoint_format='gptq_v2': layer %s has a zero point of 0, which GPTQ v1 "
                     "(zero - 1) cannot store", bad)
    sd = dense_state_dict(model)
    renames = checkpoint_renames(model) if experts else ()
    sd = experts_to_checkpoint(model, sd)  # per-expert tensors under the HF names (v2 zeros)
    if checkpoint_format == "gptq":
        for name, m in layers.items():
            try:
                sd[rename(f"{name}.qzeros", renames)] = zeros_v2_to_v1(m.qzeros.cpu(), m.bits, m.out_features)
            except ValueError as e:
                raise ValueError(f"{name}.qzeros: {e}") from None
        for name, m in experts.items():
            for lname, _ in expert_modules(name, m):
                n_out = m.hidden_size if lname.endswith("." + m.layout.checkpoint_names[2]) else m.intermediate_size
                try:
                    sd[f"{lname}.qzeros"] = zeros_v2_to_v1(sd[f"{lname}.qzeros"], m.bits, n_out)
                except ValueError as e:
                    raise ValueError(f"{lname}.qzeros: {e}") from None
    return sd, checkpoint_format


def checkpoint_tensors(model: nn.Module, format: str = "gptq", checkpoint_format: str | None = None):
    """What a directory checkpoint of ``format`` ("gptq", "awq", "compressed-tensors") stores, without
    writing it: ``(state dict, quantization_config, {side file name: json})``. The model must pass
    :func:`~quantkern.io.export_rules.check_exportable` for ``format`` (``save_quantized`` checks first)."""
    if format == "awq":
        from .awq import awq_export

        return awq_export(model)
    if format == "compressed-tensors":
        from .compressed import compressed_export

        return compressed_export(model)
    if format != "gptq":
        raise ValueError(f"checkpoint_tensors: format must be 'gptq', 'awq' or 'compressed-tensors', got {format!r}")
    sd, fmt = gptq_tensors(model, checkpoint_format)
    qcfg = gptq_quantization_config(model, quant_layers(model), fmt)
    return sd, qcfg, {"quantize_config.json": qcfg}


def check_save_destination(path, format: str = "gptq", overwrite: bool = False) -> Path:
    """:func:`~quantkern.io.files.check_destination` for a save in ``format``: a ``.gguf`` path of
    ``format="gguf"`` is a file, anything else a checkpoint directory. Call it before calibration (the
    CLI does); :func:`save_quantized` calls it again. Raises ``CheckpointFileError`` naming ``path``."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    return check_destination(path, overwrite, file=format == "gguf" and Path(path).suffix == ".gguf")


def save_quantized(model: nn.Module, path, tokenizer=None, format: str = "gptq", checkpoint_format: str | None = None,
                   max_shard_size="2GB", overwrite: bool = False, *, source_gguf=None,
                   gguf_embedding_type: str | None = None) -> Path:
    """Write ``model`` (with :class:`QuantLinear` layers) to ``path``; returns the path written.

    - ``format="gptq"``: ``model.safetensors`` (or shards + index), ``config.json`` with
      ``quantization_config``, ``quantize_config.json``, ``generation_config.json`` and the tokenizer
      files. ``checkpoint_format``: None (v1 when every zero >= 1, else v2), "gptq" or "gptq_v2".
    - ``format="awq"``: AWQ GEMM (4-bit, no act-order), see :mod:`quantkern.io.awq`.
    - ``format="compressed-tensors"``: QuantLinear as pack-quantized, W8A8Linear as int-quantized,
      FP8Linear as float-quantized; see :mod:`quantkern.io.compressed`.
    - ``format="gguf"``: ``path`` is a ``.gguf`` file (or a directory that gets ``model.gguf``), see
      :mod:`quantkern.io.gguf_export`. ``source_gguf``: the GGUF file the model was loaded from, whose
      tokenizer / general / hyperparameter keys are copied (default: found next to the model's
      ``config._name_or_path``, else derived from ``tokenizer``); ``gguf_embedding_type="Q8_0"``
      quantizes the token embeddings and an untied output matrix.

    ``path`` must be new, an empty directory, or (with ``overwrite=True``) a previous checkpoint of
    quantkern's files only, replaced as a whole; an existing file, any other directory or an unwritable
    place is refused before anything is written (``CheckpointFileError``, see
    :func:`check_save_destination`). A save killed between its two renames is undone by the next save
    or load of ``path``.

    Raises ``ValueError`` for a model without quantized layers, a layer type or scheme the format cannot
    store (named), or an unknown format. An exception leaves ``path`` as it was.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    if format != "gptq" and checkpoint_format is not None:
        raise ValueError(f"checkpoint_format applies to format='gptq' only, got {checkpoint_format!r} with {format!r}")
    # every quantkern layer type has its own tensors: a format that does not describe them, or a scheme
    # it cannot hold, would write a checkpoint that loads wrongly, so refuse (naming every such layer)
    if format != "gguf" and (source_gguf is not None or gguf_embedding_type is not None):
        raise ValueError(f"source_gguf / gguf_embedding_type apply to format='gguf' only, got format={format!r}")
    check_exportable(format, model_layer_plans(model), model)
    check_save_destination(path, format, overwrite)
    path = Path(path)
    if format == "gguf":
        from .gguf_export import save_gguf

        opts = dict(tokenizer=tokenizer, source_gguf=source_gguf, embedding_type=gguf_embedding_type)
        if path.suffix == ".gguf":
            return save_gguf(model, path, **opts).path
        with atomic_directory(path) as tmp:  # a directory: replaced as a whole, like the other formats
            save_gguf(model, tmp / GGUF_DIR_NAME, **opts)
        return path / GGUF_DIR_NAME
    sd, qcfg, extra = checkpoint_tensors(model, format, checkpoint_format)
    config_dict = hf_config_dict(model, qcfg)
    with atomic_directory(path) as tmp:
        write_safetensors(sd, tmp, max_shard_size)
        write_side_files(model, tmp, tokenizer, config_dict, extra)
    return path

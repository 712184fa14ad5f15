"""GGUF export (llama.cpp) through the ``gguf`` package, for the architectures whose file in
:mod:`quantkern.arch` gives GGUF names (Llama).

Quantized Linears map onto GGUF block types (32 weights along the input dim per block) *exactly*
whenever each 32-column block lies inside one quantization group — any group size that is a
multiple of 32, per-channel, a ragged last group on the 32 grid, act-order with static groups — and
the scales fit fp16 (the block scale ``d`` is the group's scale):

- bits <= 4, symmetric (every zero ``2**(b-1)``) → ``Q4_0`` (``w = (q4 - 8) * d``, ``q4 = q - zero + 8``):
  exact
- bits <= 4, asymmetric → ``Q4_1`` (``w = q * d + m``): codes and ``d`` exact, ``m = -zero * d`` rounded
  to fp16 (GGUF stores the block minimum, not an integer zero)
- bits 5..8 → ``Q8_0`` (``w = q8 * d``, ``q8 = q - zero``) when every ``q - zero`` fits int8 (all but
  8-bit codes far from an asymmetric zero): exact

2- and 3-bit layers thus cost 4.5 bits a weight in GGUF, and 5..7-bit ones 8.5, but keep the very
weights quantkern computed (re-quantizing them would throw away GPTQ's error compensation).
Anything else (group size 16, act-order with a permuted ``g_idx``, bf16 scales that fp16 cannot hold,
8-bit offsets outside int8) is dequantized and re-quantized by the ``gguf`` package to ``Q4_0``
(bits <= 4, symmetric), ``Q4_1`` (bits <= 4, asymmetric) or ``Q8_0`` (bits > 4), and the export says
so (a log warning, the returned report and the ``quantkern.requantized`` metadata key).

Blocks are written from the integer codes (not re-quantized) following the ggml block layouts:
``Q4_0`` = fp16 d + 16 bytes where byte j holds element j (low nibble) and element j + 16 (high
nibble); ``Q4_1`` = fp16 d + fp16 m + the same 16 bytes; ``Q8_0`` = fp16 d + 32 int8. As llama.cpp's
converter does, the rows of ``attn_q`` / ``attn_k`` are permuted into its rotary layout (readers undo
it). Dense tensors are written as F32 (norms, and everything of an fp32 model) or F16 (or, asked for,
the embeddings as ``Q8_0``).

The metadata llama.cpp reads (tokenizer, chat template, hyperparameters, ``general.*``) comes from
:mod:`.gguf_meta`: copied from the source GGUF when the model was loaded from one, else derived from
the HF tokenizer and config as llama.cpp's converter does; ``general.file_type`` and
``general.quantization_version`` describe the export.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..arch import architecture_for
from ..core import QuantizedWeight
from ..formats.gguf import BLOCK, gguf_model_problem
from ..nn import QuantLinear
from .files import publish_modes
from .gguf_meta import file_type, model_metadata

log = logging.getLogger(__name__)


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the `gguf` package (pip install gguf)") from e
    return gguf


def _block_groups(qw: QuantizedWeight) -> torch.Tensor | None:
    """The group of each 32-column block (int64 ``[K/32]``), or None when a block spans two groups
    (group size 16, act-order with a permuted ``g_idx``, a group boundary off the 32 grid)."""
    if qw.in_features % BLOCK:
        return None
    g = qw.g_idx.cpu().to(torch.int64).reshape(-1, BLOCK)
    if not bool((g == g[:, :1]).all()):
        return None
    return g[:, 0]


def _block_offsets(qw: QuantizedWeight, groups: torch.Tensor) -> torch.Tensor:
    """int32 ``[N, K]``: each code minus its group's zero point."""
    zeros = qw.zeros.cpu().to(torch.int32)[groups].t().repeat_interleave(BLOCK, dim=1)  # [N, K]
    return qw.codes.cpu().to(torch.int32) - zeros


def exact_gguf_type(qw: QuantizedWeight) -> str | None:
    """The GGUF type that stores ``qw`` without re-quantization ("Q4_0" / "Q4_1" / "Q8_0"), else None.

    Exact whenever every 32-column block lies inside one group (any group size that is a multiple
    of 32, per-channel, ragged last groups on the 32 grid, act-order with static groups) and the
    scales fit fp16 (the block scale): bits <= 4 with every zero at ``2**(b-1)`` -> ``Q4_0``
    (``q - zero + 8``), other bits <= 4 -> ``Q4_1`` (the codes as they are, ``m = -zero * d`` rounded to
    fp16), bits 5..8 -> ``Q8_0`` when every ``q - zero`` fits int8 (always, except 8-bit codes far from
    an asymmetric zero)."""
    s = qw.scheme
    groups = _block_groups(qw)
    if groups is None:
        return None
    if qw.scales.dtype not in (torch.float16, torch.float32) or not torch.equal(
            qw.scales.float(), qw.scales.to(torch.float16).float()):
        return None  # the block scale is fp16
    if s.bits <= 4:
        return "Q4_0" if bool((qw.zeros == (1 << (s.bits - 1))).all()) else "Q4_1"
    off = _block_offsets(qw, groups)
    if int(off.min()) >= -128 and int(off.max()) <= 127:
        return "Q8_0"
    return None


def fallback_gguf_type(qw: QuantizedWeight) -> str:
    if qw.scheme.bits > 4:
        return "Q8_0"
    return "Q4_0" if qw.scheme.sym else "Q4_1"


def encode_blocks(qw: QuantizedWeight, qtype: str) -> np.ndarray:
    """uint8 ``[N, K/32 * block_bytes]`` blocks of ``qtype`` built from the codes (exact types only,
    see :func:`exact_gguf_type`)."""
    groups = _block_groups(qw)
    if groups is None:
        raise ValueError("a 32-column block spans two groups: no exact GGUF encoding")
    n, k = qw.codes.shape
    nb = k // BLOCK
    scales = qw.scales.cpu().float()[groups].t().numpy()  # [N, K/32]: each block's group scale
    d = scales.astype(np.float16).reshape(n, nb, 1).view(np.uint8)  # [N, nb, 2] little-endian
    if qtype == "Q4_1":
        codes = qw.codes.cpu().to(torch.int32)
    else:
        codes = _block_offsets(qw, groups) + (8 if qtype == "Q4_0" else 0)
    codes = codes.reshape(n, nb, BLOCK).numpy()
    if qtype in ("Q4_0", "Q4_1"):
        if codes.min() < 0 or codes.max() > 15:
            raise ValueError(f"codes do not fit the 4-bit blocks of {qtype}")
        qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
        if qtype == "Q4_0":
            blocks = np.concatenate([d, qs], axis=-1)
        else:
            zeros = qw.zeros.cpu().float()[groups].t().numpy()
            m = (-zeros * scales).astype(np.float16).reshape(n, nb, 1).view(np.uint8)
            blocks = np.concatenate([d, m, qs], axis=-1)
    elif qtype == "Q8_0":
        if codes.min() < -128 or codes.max() > 127:
            raise ValueError("q - zero does not fit the int8 blocks of Q8_0")
        blocks = np.concatenate([d, codes.astype(np.int8).view(np.uint8)], axis=-1)
    else:
        raise ValueError(f"no exact encoder for GGUF type {qtype}")
    return np.ascontiguousarray(blocks.reshape(n, -1))


def _permute_rows(t: torch.Tensor, n_head: int, dim: int = 0) -> torch.Tensor:
    """llama.cpp's q/k row permutation (interleaved -> half-split rotary pairs), along ``dim``."""
    if dim == 1:
        return _permute_rows(t.t(), n_head).t()
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _permuted(qw: QuantizedWeight, n_head: int) -> QuantizedWeight:
    return QuantizedWeight(codes=_permute_rows(qw.codes, n_head), scales=_permute_rows(qw.scales, n_head, 1),
                           zeros=_permute_rows(qw.zeros, n_head, 1), g_idx=qw.g_idx, scheme=qw.scheme)


def _summary(names: list[str], report: dict, sources: dict) -> str:
    """``"W4 g128 asym -> Q4_1: 210 layers (model.layers.0.self_attn.q_proj, ...)"``, one entry per
    (scheme, type), so that a whole model does not print one name per layer."""
    by: dict[tuple[str, str], list[str]] = {}
    for n in names:
        by.setdefault((sources[n], report[n][0]), []).append(n)
    return "; ".join(f"{src} -> {qtype}: {len(ns)} layer(s) ({ns[0]}{', ...' if len(ns) > 1 else ''})"
                     for (src, qtype), ns in by.items())


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`save_gguf` wrote: ``path``, the file; ``report``, the per-layer types chosen
    (``{hf module: (gguf type, "exact" | "re-quantized")}``); ``source``, the GGUF file whose metadata
    was kept (None when derived)."""

    path: Path
    report: dict[str, tuple[str, str]]
    source: Path | None


def save_gguf(model: nn.Module, path, tokenizer=None, source_gguf=None, embedding_type: str | None = None
              ) -> GGUFExport:
    """Write ``model`` as one GGUF file at ``path`` (``<path>/model.gguf`` if ``path`` does not end in
    ``.gguf``); atomic (temporary file, fsync, rename). Returns a :class:`GGUFExport`: the file path
    and the per-layer types chosen.

    Metadata (:mod:`.gguf_meta`): a model loaded from a GGUF file (``source_gguf``, or found from
    ``config._name_or_path``) keeps that file's tokenizer, ``general.*`` and hyperparameter keys;
    otherwise they are derived from ``tokenizer`` and the config as llama.cpp's converter does.
    ``general.file_type`` names the type holding most of the weights, ``general.quantization_version``
    is 2. The source used is ``GGUFExport.source`` (None when derived).

    ``embedding_type="Q8_0"``: the token embeddings and a dense (untied) output matrix are quantized to
    ``Q8_0`` by the gguf package (as llama.cpp's quantizer does for small models) instead of written
    dense; tied embeddings stay tied (one ``token_embd`` tensor, no ``output``).

    What GGUF cannot hold (a non-Llama architecture, non-default RoPE, in_features not a multiple of
    32) is refused before this runs, by :func:`~quantkern.io.export_rules.check_exportable` in
    ``save_quantized``."""
    gguf = _gguf()
    if embedding_type not in (None, "Q8_0"):
        raise ValueError(f"embedding_type must be None (dense) or 'Q8_0', got {embedding_type!r}")
    cfg = model.config
    path = Path(path)
    if path.suffix != ".gguf":
        path = path / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    gnames = architecture_for(model).gguf
    if gnames is None:
        raise ValueError(gguf_model_problem(cfg))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gnames.arch), cfg.num_hidden_layers)
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and getattr(out_emb, "weight", None) is not None and \
        out_emb.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    report, requantized, sources = {}, [], {}
    try:
        meta, source = model_metadata(model, tokenizer, source_gguf=source_gguf, exclude=path)
        writer = gguf.GGUFWriter(tmp, gnames.name)
        tensors = []
        for mod_name, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                gname = names.get_name(mod_name)
                if gname is None:
                    raise ValueError(f"{mod_name}: no GGUF tensor name for this module")
                qw = mod.to_quantized()
                qw = QuantizedWeight(qw.codes.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.g_idx.cpu(), qw.scheme)
                heads = gnames.permute_heads(gname, cfg)
                if heads:
                    qw = _permuted(qw, heads)
                qtype = exact_gguf_type(qw)
                if qtype is not None:
                    data = encode_blocks(qw, qtype)
                    report[mod_name] = (qtype, "exact")
                else:
                    qtype = fallback_gguf_type(qw)
                    w = qw.dequantize(torch.float32).numpy()
                    data = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
                    report[mod_name] = (qtype, "re-quantized")
                    requantized.append(mod_name)
                    sources[mod_name] = qw.scheme.describe()
                tensors.append((f"{gname}.weight", data, getattr(gguf.GGMLQuantizationType, qtype)))
                if mod.bias is not None:
                    tensors.append((f"{gname}.bias", mod.bias.detach().float().cpu().numpy(), None))
        for pname, p in model.named_parameters():
            mod_name, _, leaf = pname.rpartition(".")
            if tied and out_emb is not None and mod_name == next(n for n, m in model.named_modules() if m is out_emb):
                continue
            gname = names.get_name(mod_name)
            if gname is None:
                raise ValueError(f"{pname}: no GGUF tensor name for this parameter")
            arr = p.detach().cpu()
            if embedding_type == "Q8_0" and leaf == "weight" and gname in ("token_embd", "output"):
                if arr.shape[-1] % BLOCK:
                    raise ValueError(f"{pname}: {arr.shape[-1]} columns, not a multiple of {BLOCK}: no Q8_0 blocks")
                q8 = gguf.GGMLQuantizationType.Q8_0
                tensors.append((f"{gname}.{leaf}", gguf.quants.quantize(arr.float().numpy(), q8), q8))
                continue
            arr = arr.float() if (arr.dtype == torch.float32 or arr.dim() == 1) else arr.to(torch.float16)
            tensors.append((f"{gname}.{leaf}", arr.numpy(), None))
        if requantized:
            log.warning("GGUF export: %d layer(s) have no exact GGUF type and were re-quantized by the gguf "
                        "package (exact only when every 32-column block lies in one group and the scales fit fp16): %s",
                        len(requantized), _summary(requantized, report, sources))
        for key, v in meta.items():
            writer.add_key_value(key, v.value, v.type, v.sub_type)
        writer.add_file_type(file_type({name: (raw if raw is not None else _dense_type(data), _n_weights(data, raw),
                                               data.ndim) for name, data, raw in tensors}))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("quantkern.version", __version__)
        writer.add_array("quantkern.requantized", requantized or [""])
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        publish_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return GGUFExport(path, report, source)


def _dense_type(data: np.ndarray):
    gguf = _gguf()
    return {np.dtype(np.float16): gguf.GGMLQuantizationType.F16}.get(data.dtype, gguf.GGMLQuantizationType.F32)


def _n_weights(data: np.ndarray, raw) -> int:
    """Elements of a tensor: block data (uint8 rows of ``raw`` blocks) counts its weights."""
    if raw is None:
        return int(data.size)
    gguf = _gguf()
    block, nbytes = gguf.GGML_QUANT_SIZES[raw]
    return int(data.size // nbytes * block)

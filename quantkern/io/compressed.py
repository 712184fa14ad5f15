"""compressed-tensors (llm-compressor's format, loaded by vLLM and transformers): "pack-quantized"
integer weights, through the ``compressed-tensors`` package's own config classes and packers.

Layout per quantized Linear (K = in_features, N = out_features, G groups, b bits), as the
package's ``PackedQuantizationCompressor`` defines it:

- ``weight_packed``: int32 ``[N, ceil(K*b/32)]`` — signed codes ``q = code - 2**(b-1)`` packed along K
  (dense bit stream in compressed-tensors >= 0.20, by the package's ``pack_to_int32``)
- ``weight_scale``: ``[N, G]`` (the transpose of GPTQ's ``scales``)
- ``weight_zero_point``: int32 ``[ceil(N*b/32), G]`` (asymmetric only; signed ``zero - 2**(b-1)``
  packed along N); symmetric schemes have a zero of 0, i.e. quantkern's ``2**(b-1)``
- ``weight_shape``: int64 ``[2]`` = ``(N, K)``; optional ``weight_g_idx`` int32 ``[K]`` (act-order,
  read when present; not written: compressed-tensors 0.20 removed ``actorder="group"``)

The codes are packed directly (not re-quantized from a dequantized weight), so export is exact.
Not covered here: float-quantized fp8 weights and int8 / fp8 activation schemes (W8A8) — quantkern
has no module that holds them yet; such checkpoints are refused with a clear error.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from ..core import QuantizedWeight, WeightScheme
from ..formats.gptq import pack_gptq
from .config import CheckpointConfigError
from .hf import dense_state_dict
from .validate import (FLOAT_DTYPES, CheckpointTensorError, check_bias, check_g_idx, check_linear_scheme,
                       check_scales, check_tensor)

_TOP_KEYS = {"quant_method", "version", "config_groups", "format", "quantization_status", "global_compression_ratio",
             "ignore", "kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config",
             "quantizer"}
_SCHEME_KEYS = {"targets", "weights", "input_activations", "output_activations", "format"}


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ImportError("the compressed-tensors format needs the `compressed-tensors` package "
                          "(pip install compressed-tensors)") from e
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return QuantizationArgs, QuantizationScheme, QuantizationConfig, pack_to_int32, unpack_from_int32


def _weight_args(scheme: WeightScheme, symmetric: bool):
    QuantizationArgs = _ct()[0]
    grouped = scheme.group_size != -1
    return QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=symmetric,
                            strategy="group" if grouped else "channel",
                            group_size=scheme.group_size if grouped else None, dynamic=False)


def compressed_export(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state dict, quantization_config, {})``: QuantLinear layers as "pack-quantized", W8A8Linear
    as "int-quantized", FP8Linear as "float-quantized" (:mod:`.compressed_act`); several formats in
    one model make the top-level format "mixed-precision".

    What the format cannot hold (ragged groups, a permuted ``g_idx``) is refused before this runs, by
    :func:`~quantkern.io.export_rules.check_exportable` in ``save_quantized``."""
    sd, groups, expert_targets = compressed_tensors_of(model)
    return sd, compressed_config(groups, expert_targets, dense_linears(model)), {}


def dense_linears(model: nn.Module, quantized=()) -> list[str]:
    """The checkpoint names of ``model``'s Linears that stay dense (every plain ``nn.Linear`` not named in
    ``quantized``, and the MoE routers): compressed-tensors' ``ignore`` list."""
    from .experts import quant_experts, rename, routers

    experts = quant_experts(model)
    renames = next(iter(experts.values())).layout.checkpoint_renames if experts else ()
    dense = [rename(n, renames) for n, m in model.named_modules() if type(m) is nn.Linear and n not in quantized]
    return dense + [rename(n, renames) for n in routers(model)]  # kept dense, Linears in the original checkpoints


def compressed_tensors_of(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[tuple, list[str]], dict[tuple, list[str]]]:
    """The compressed-tensors state dict of ``model`` and how its quantized layers group:
    ``(state dict, {scheme key: layer names}, {scheme key: per-expert target regexes})``. The keys are
    what :func:`compressed_config` turns into config groups; a model streamed block by block merges the
    groups of its blocks."""
    from ..nn import QuantLinear
    from .compressed_act import act_layers

    from .experts import expert_prefix, expert_weights, quant_experts, rename, stacked_keys

    QuantizationArgs, QuantizationScheme, QuantizationConfig, pack_to_int32, _ = _ct()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    experts = quant_experts(model)
    others = act_layers(model)
    if not layers and not others and not experts:
        raise ValueError("the model has no QuantLinear / QuantExperts / W8A8Linear / FP8Linear layers: quantize it "
                         "before saving")
    sd = dense_state_dict(model)
    renames = next(iter(experts.values())).layout.checkpoint_renames if experts else ()
    if experts:  # the per-expert Linears replace the stacked tensors; keys take the checkpoint names
        stacked = stacked_keys(model)
        sd = {rename(k, renames): t for k, t in sd.items() if k not in stacked}
    groups: dict[tuple, list[str]] = defaultdict(list)

    def pack(name: str, qw: QuantizedWeight) -> tuple:
        s = qw.scheme
        n, k = qw.codes.shape
        mid = 1 << (s.bits - 1)
        symmetric = s.sym and bool((qw.zeros == mid).all())  # a "sym" layer with other zeros is stored asym
        sd[f"{name}.weight_packed"] = pack_to_int32((qw.codes.cpu() - mid).to(torch.int8), s.bits)
        sd[f"{name}.weight_scale"] = qw.scales.cpu().t().contiguous()
        sd[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not symmetric:
            zp = (qw.zeros.cpu().t() - mid).to(torch.int8).contiguous()
            sd[f"{name}.weight_zero_point"] = pack_to_int32(zp, s.bits, packed_dim=0).contiguous()
        return ("pack-quantized", s.bits, s.group_size, symmetric)

    for name, m in layers.items():
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            sd.pop(rename(f"{name}.{suffix}", renames))
        groups[pack(rename(name, renames), m.to_quantized())].append(rename(name, renames))
    expert_targets: dict[tuple, list[str]] = defaultdict(list)  # one regex per experts module and scheme
    for name, m in experts.items():
        keys = {pack(lname, qw) for lname, qw in expert_weights(name, m)}
        names = "|".join(re.escape(n) for n in m.layout.checkpoint_names)
        for key in keys:
            groups.setdefault(key, [])
            expert_targets[key].append(rf"re:^{re.escape(expert_prefix(name, m.layout))}\.\d+\.({names})$")
    for name, (fmt, act) in others.items():
        groups[(fmt, act)].append(name)
    return sd, dict(groups), dict(expert_targets)


def compressed_config(groups: dict[tuple, list[str]], expert_targets: dict[tuple, list[str]], dense: list[str]
                      ) -> dict:
    """The ``quantization_config`` of a compressed-tensors checkpoint whose quantized layers group as
    ``groups`` / ``expert_targets`` (see :func:`compressed_tensors_of`) and whose ``dense`` Linears
    stay unquantized: one group targets "Linear" and ignores the dense ones; several name their layers."""
    from .compressed_act import act_scheme

    QuantizationArgs, QuantizationScheme, QuantizationConfig, _, _ = _ct()
    config_groups = {}
    for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        targets = ["Linear"] if len(groups) == 1 else names + expert_targets.get(key, [])
        if key[0] == "pack-quantized":
            _, bits, gs, symmetric = key
            args = _weight_args(WeightScheme(bits, gs, symmetric, False), symmetric)
            config_groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args, format="pack-quantized")
        else:
            config_groups[f"group_{i}"] = act_scheme(key[0], key[1], targets)
    formats = {key[0] for key in groups}
    qconfig = QuantizationConfig(config_groups=config_groups,
                                 format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                 quantization_status="compressed", ignore=dense if len(groups) == 1 else [])
    import compressed_tensors

    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **qconfig.model_dump(exclude=["quant_method"])}


def parse_compressed_config(qc: dict):
    """Validate a compressed-tensors ``quantization_config`` with the package's pydantic classes, plus
    the unknown-key check they skip at the top level. Returns the ``QuantizationConfig``."""
    QuantizationArgs, QuantizationScheme, QuantizationConfig, _, _ = _ct()
    where = "quantization_config"
    unknown = sorted(str(k) for k in qc if k not in _TOP_KEYS)
    if unknown:
        raise CheckpointConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(_TOP_KEYS)}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointConfigError(f"{where}: 'config_groups' must be a non-empty object")
    try:
        cfg = QuantizationConfig.model_validate(qc)
    except Exception as e:  # pydantic.ValidationError lists every field
        raise CheckpointConfigError(f"{where}: invalid compressed-tensors config: {e}") from None
    if cfg.quantization_status != "compressed":
        raise CheckpointConfigError(f"{where}: quantization_status {cfg.quantization_status!r} is not supported; "
                                    "only 'compressed' checkpoints hold packed weights")
    from .compressed_act import ACT_FORMATS, check_act_scheme

    for gname, s in cfg.config_groups.items():
        fmt = s.format or cfg.format
        if fmt in ACT_FORMATS:
            check_act_scheme(f"{where}.config_groups.{gname}", fmt, s)
            continue
        if fmt != "pack-quantized":
            raise CheckpointConfigError(f"{where}.config_groups.{gname}: format {fmt!r} is not supported; "
                                        f"quantkern imports 'pack-quantized', {' and '.join(ACT_FORMATS)}")
        if s.input_activations is not None or s.output_activations is not None:
            raise CheckpointConfigError(f"{where}.config_groups.{gname}: activation quantization is not supported "
                                        "with pack-quantized weights (weight-only QuantLinear)")
        w = s.weights
        if w is None or w.type != "int" or w.num_bits not in (2, 3, 4, 5, 6, 7, 8):
            raise CheckpointConfigError(f"{where}.config_groups.{gname}: weights must be int with 2..8 bits, got {w}")
        if w.strategy not in ("group", "channel"):
            raise CheckpointConfigError(f"{where}.config_groups.{gname}: strategy {w.strategy!r} is not supported "
                                        "(group or channel)")
    return cfg


def compressed_to_gptq(qc: dict, tensors: dict[str, torch.Tensor], model: nn.Module, dtype=None, backend="auto"):
    """Match the config's schemes to the skeleton's Linears, validate their tensors and convert them:
    pack-quantized to the GPTQ v2 layout (``{name: (scheme, tensors)}``), int-/float-quantized to a
    W8A8Linear / FP8Linear built on the meta device (``{name: (module, tensors)}``); fused MoE experts
    stored as per-expert pack-quantized Linears under the original checkpoint names (as llm-compressor
    writes them) to a QuantExperts (``{name: (module, tensors)}``). Returns ``(that dict, {dense
    tensors})``."""
    from compressed_tensors.utils import match_named_modules
    from compressed_tensors.utils.match import is_match

    from .compressed_act import ACT_FORMATS, build_act_layer, check_act_scheme
    from .experts import checkpoint_renames, rename, stack_experts

    cfg = parse_compressed_config(qc)
    probe = nn.Linear(1, 1, device="meta")  # a stand-in per-expert Linear for the targets' class names

    def expert_layer(lname: str, k: int, n: int):
        if f"{lname}.bias" in tensors:
            raise CheckpointTensorError(f"{lname}.bias: biases of quantized experts are not supported")
        for gname, s in cfg.config_groups.items():
            if is_match(lname, probe, s.targets, cfg.ignore):
                if (s.format or cfg.format) != "pack-quantized":
                    raise CheckpointTensorError(f"{lname}: config group {gname} is {s.format or cfg.format!r}; "
                                                "quantized experts are read from pack-quantized groups only")
                return _pack_quantized_layer(lname, gname, s.weights, k, n, tensors)
        raise CheckpointTensorError(f"{lname}.weight_packed: packed weights for a module no config group targets")

    quant, used = stack_experts(model, tensors, expert_layer, dtype, "weight_packed")
    ignore = cfg.ignore
    if quant:  # the rest of the checkpoint in the module tree's names (Mixtral: block_sparse_moe -> mlp)
        renames = checkpoint_renames(model)
        tensors = {rename(k, renames, reverse=True): t for k, t in tensors.items() if k not in used}
        ignore = [rename(i, renames, reverse=True) for i in ignore]
        used = set()
    for gname, s in cfg.config_groups.items():
        fmt = s.format or cfg.format
        for name, mod in match_named_modules(model, s.targets, ignore):
            if not isinstance(mod, nn.Linear) or name in quant:
                continue
            if fmt in ACT_FORMATS:
                act = check_act_scheme(gname, fmt, s)
                module, out, names = build_act_layer(name, fmt, act, mod, tensors, dtype, backend)
                quant[name] = (module, out)
                used |= names
                continue
            scheme, out, names = _pack_quantized_layer(name, gname, s.weights, mod.in_features, mod.out_features,
                                                       tensors)
            quant[name] = (scheme, out)
            used |= names
    stray = sorted(k for k in tensors if k.endswith(".weight_packed") and k not in used)
    if stray:
        raise CheckpointTensorError(f"{stray[0]}: packed weights for a module no config group targets")
    return quant, {k: t for k, t in tensors.items() if k not in used}


def _pack_quantized_layer(name: str, gname: str, w, k: int, n: int, tensors: dict[str, torch.Tensor]):
    """One pack-quantized Linear ``name`` (``k -> n``, config group ``gname`` with weight args ``w``):
    its tensors validated and converted to the GPTQ v2 layout. Returns ``(scheme, {name.qweight, ...},
    the checkpoint keys it reads)``."""
    unpack_from_int32 = _ct()[4]
    gs = w.group_size if w.strategy == "group" else -1
    act = f"{name}.weight_g_idx" in tensors
    scheme = WeightScheme(w.num_bits, gs, bool(w.symmetric), act)
    check_linear_scheme(name, scheme, k, n)
    g = scheme.num_groups(k)
    b, mid = w.num_bits, 1 << (w.num_bits - 1)
    need = ["weight_packed", "weight_scale", "weight_shape"] + ([] if w.symmetric else ["weight_zero_point"])
    for part in need:
        if f"{name}.{part}" not in tensors:
            raise CheckpointTensorError(f"{name}.{part}: missing (config group {gname})")
    check_tensor(f"{name}.weight_packed", tensors[f"{name}.weight_packed"], (torch.int32,), (n, -(-k * b // 32)))
    check_tensor(f"{name}.weight_scale", tensors[f"{name}.weight_scale"], FLOAT_DTYPES, (n, g))
    check_scales(f"{name}.weight_scale", tensors[f"{name}.weight_scale"])
    shape = tensors[f"{name}.weight_shape"]
    if shape.dtype not in (torch.int32, torch.int64) or shape.tolist() != [n, k]:
        raise CheckpointTensorError(f"{name}.weight_shape: {shape.tolist()} does not match the module ({n}, {k})")
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], b, torch.Size([n, k])).to(torch.int32) + mid
    if w.symmetric:
        zeros = torch.full((g, n), mid, dtype=torch.int32)
    else:
        check_tensor(f"{name}.weight_zero_point", tensors[f"{name}.weight_zero_point"], (torch.int32,),
                     (-(-n * b // 32), g))
        zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], b, torch.Size([n, g]), packed_dim=0)
        zeros = zp.to(torch.int32).t().contiguous() + mid
    if act:
        g_idx = tensors[f"{name}.weight_g_idx"]
        check_tensor(f"{name}.weight_g_idx", g_idx, (torch.int32, torch.int64), (k,))
        check_g_idx(f"{name}.weight_g_idx", g_idx, g)
        g_idx = g_idx.to(torch.int32)
    else:
        g_idx = torch.arange(k, dtype=torch.int32) // (gs if gs != -1 else k)
    scales = tensors[f"{name}.weight_scale"].t().contiguous()
    t = pack_gptq(QuantizedWeight(codes, scales, zeros, g_idx, scheme))
    out = {f"{name}.qweight": t.qweight, f"{name}.qzeros": t.qzeros, f"{name}.scales": t.scales,
           f"{name}.g_idx": t.g_idx}
    if f"{name}.bias" in tensors:
        check_bias(f"{name}.bias", tensors[f"{name}.bias"], n)
        out[f"{name}.bias"] = tensors[f"{name}.bias"]
    return scheme, out, {f"{name}.{p}" for p in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                                                 "weight_g_idx", "bias")}

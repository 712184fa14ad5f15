"""Describe a checkpoint without loading the model: format, scheme, layers, sizes and consistency.

Reads ``config.json`` and the safetensors headers (shapes and dtypes only, no tensor data), or a
GGUF file through the ``gguf`` package's reader. Problems found (bad config, tensor shapes that
contradict each other or the config) are listed in ``"problems"`` rather than raised; only an
unreadable path raises.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from ..core import WeightScheme
from ..formats.bitpack import packed_length
from ..formats.sizes import bits_per_weight
from .config import (CheckpointConfigError, check_model_config, parse_quantization_config, read_config_json,
                     resolve_gptq_format)
from .files import CheckpointFileError
from .validate import checkpoint_headers

_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_gguf(path, strict: bool = False) -> "object":
    """Open a GGUF file with the ``gguf`` package's reader after cheap sanity checks; every failure is a
    :class:`CheckpointFileError` naming the file (truncated, corrupt, wrong magic). ``strict`` also
    decodes every metadata value (what a loader such as transformers does next), so a value that is
    not valid UTF-8 or does not match its declared type fails here, naming its key."""
    import gguf

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot read ({e})") from None
    if magic != b"GGUF":
        raise CheckpointFileError(f"{path}: not a GGUF file (magic {magic!r})")
    try:
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointFileError(f"{path}: tensor {t.name} extends past the end of the file (truncated)")
    except CheckpointFileError:
        raise
    except Exception as e:  # the reader raises ValueError / IndexError / struct errors on corrupt input
        raise CheckpointFileError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None
    if strict:
        for key, f in reader.fields.items():
            try:
                f.contents()
            except Exception as e:
                raise CheckpointFileError(f"{path}: corrupt GGUF metadata value {key!r} "
                                          f"({type(e).__name__}: {e})") from None
    return reader


def _field_value(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None


_GGUF_DENSE_TYPES = frozenset({"F64", "F32", "F16", "BF16", "I8", "I16", "I32", "I64"})  # stored as is


def _inspect_gguf(path: Path) -> dict:
    reader = read_gguf(path)
    arch = _field_value(reader, "general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    quantized = [t for t in reader.tensors if t.tensor_type.name not in _GGUF_DENSE_TYPES]
    total = int(sum(int(t.n_bytes) for t in reader.tensors))
    qbytes = int(sum(int(t.n_bytes) for t in quantized))
    info = {"path": str(path), "format": "gguf", "architecture": arch, "tensor_types": dict(types),
            "num_tensors": len(reader.tensors), "num_quantized_layers": len(quantized), "total_bytes": total,
            "quantized_bytes": qbytes, "dense_bytes": total - qbytes, "file_bytes": os.path.getsize(path),
            "problems": []}
    blocks = _field_value(reader, f"{arch}.block_count")
    info["num_layers"] = blocks
    names = {t.name for t in reader.tensors}
    if isinstance(blocks, int):
        missing = [i for i in range(blocks) if not any(n.startswith(f"blk.{i}.") for n in names)]
        if missing:
            info["problems"].append(f"{arch}.block_count={blocks} but blocks {missing[:5]} have no tensors")
    requant = _field_value(reader, "quantkern.requantized")
    if isinstance(requant, list):
        info["requantized"] = [r for r in requant if r]
    info["consistent"] = not info["problems"]
    return info


def _expected_gptq(bits, gs, k, n):
    g = 1 if gs == -1 else -(-k // gs)
    return g, {"qweight": (packed_length(k, bits), n), "qzeros": (g, packed_length(n, bits)), "scales": (g, n),
               "g_idx": (k,)}


MAX_NAME_LENGTH = 1024  # a tensor name longer than this is not matched against override patterns


def _skeleton(cfg: dict, headers: dict, problems: list):
    """The model of config.json on the meta device, after the same checks load_quantized makes; None
    (and a problem) when it cannot be built."""
    from .load import build_skeleton

    try:
        check_model_config(cfg, headers, "config.json")
        d = {k: v for k, v in cfg.items() if k != "quantization_config"}
        return build_skeleton(d, None)
    except CheckpointConfigError as e:
        problems.append(str(e))
        return None


def _expected_dense(model, quantized: set[str]) -> set[str]:
    """The tensors the skeleton needs from the files, less the weights of the quantized modules (and
    of a tied output embedding)."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    names = {n for n, _ in model.named_parameters()}
    persistent = set(model.state_dict())
    names |= {n for n, _ in model.named_buffers() if n in persistent}
    return {n for n in names if n.rpartition(".")[0] not in quantized or not n.endswith(".weight")}


def _inspect_dir(path: Path) -> dict:
    info = {"path": str(path), "problems": []}
    cfg = read_config_json(path / "config.json", "config.json")
    info["model_type"] = cfg.get("model_type")
    info["architectures"] = cfg.get("architectures")
    files, headers, shard_problems = checkpoint_headers(path)
    info["problems"] += shard_problems
    info["files"] = [f.name for f in files]
    info["file_bytes"] = sum(f.stat().st_size for f in files)
    qc = cfg.get("quantization_config")
    if qc is None:
        info["format"] = "dense"
        info["problems"].append("config.json has no quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    parsed = None
    try:
        if method == "compressed-tensors":
            from .compressed import parse_compressed_config

            parsed = parse_compressed_config(qc)
            info["format"] = f"compressed-tensors ({parsed.format})"
            info["groups"] = {k: {"targets": v.targets, "bits": v.weights.num_bits, "type": v.weights.type,
                                  "group_size": v.weights.group_size, "symmetric": v.weights.symmetric,
                                  "strategy": v.weights.strategy, "activations": _acts(v.input_activations)}
                              for k, v in parsed.config_groups.items()}
        elif qc is not None:
            parsed = parse_quantization_config(qc)
            info["format"] = parsed.checkpoint_format if method == "gptq" else "awq-gemm"
            s = parsed.scheme
            info.update(bits=s.bits, group_size=s.group_size, sym=s.sym, desc_act=s.act_order)
    except (CheckpointConfigError, CheckpointFileError, ImportError) as e:
        info.setdefault("format", str(method))
        info["problems"].append(str(e))
    model = _skeleton(cfg, headers, info["problems"])
    modules = dict(model.named_modules()) if model is not None else None
    fused_quantized, renames = set(), ()
    if modules is not None and method in ("gptq", "compressed-tensors"):  # per-expert Linears of fused MoE
        from .experts import expert_linears                                # experts (HF checkpoint names)

        marker = "weight_packed" if method == "compressed-tensors" else "qweight"
        per_expert, fused_quantized, renames, counts = expert_linears(model, headers, marker)
        modules.update(per_expert)
        if counts:
            info["experts"] = counts
    layers, qbytes, quantized = [], 0, set()
    suffix = ".weight_packed" if method == "compressed-tensors" else ".qweight"
    keys = [k for k in headers if k.endswith(suffix)]
    if method == "compressed-tensors":  # int8 / fp8 weights (int- / float-quantized) are stored unpacked
        keys += [k for k, (_, d, _) in headers.items() if k.endswith(".weight") and d in ("I8", "F8_E4M3")]
    gptq_layers = []
    for key in sorted(keys):
        name = key.rpartition(".")[0]
        _, dtype, shape = headers[key]
        layer = {"name": name}
        quantized.add(name)
        lin = modules.get(name) if modules is not None else None
        if modules is not None and not hasattr(lin, "in_features"):
            info["problems"].append(f"{key}: the model config has no Linear {name[:MAX_NAME_LENGTH]!r}")
            continue
        if key.endswith(".weight"):
            layer.update(in_features=shape[1], out_features=shape[0], bits=8, weight_dtype=dtype,
                         static_activations=f"{name}.input_scale" in headers)
            qbytes += sum(_ST_SIZES.get(d, 0) * _numel(sh) for k, (_, d, sh) in headers.items()
                          if k.startswith(f"{name}.") and not k.endswith(".bias"))
            layers.append(layer)
            continue
        parts = {p: headers[k] for p in ("qzeros", "scales", "g_idx", "weight_scale", "weight_zero_point")
                 if (k := f"{name}.{p}") in headers}
        layer["bytes"] = sum(_ST_SIZES.get(d, 0) * _numel(s) for _, d, s in [headers[key], *parts.values()])
        qbytes += layer["bytes"]
        if dtype != "I32" or len(shape) != 2:
            info["problems"].append(f"{key}: dtype {dtype} shape {list(shape)}, expected a 2-D I32 tensor")
            layers.append(layer)
            continue
        if parsed is not None and method in ("gptq", "awq"):
            if len(name) > MAX_NAME_LENGTH:
                info["problems"].append(f"{key[:64]}...: tensor name longer than {MAX_NAME_LENGTH} characters")
                continue
            s = parsed.scheme_for(name)
            if s is None:
                info["problems"].append(f"{key}: the config excludes this module, yet it holds packed weights")
                continue
            # K and N from the model config; without one, from g_idx / scales, and from qweight last
            if lin is not None:
                k_, n_ = lin.in_features, lin.out_features
            elif method == "gptq":
                k_ = parts["g_idx"][2][0] if len(parts.get("g_idx", (0, 0, ()))[2]) == 1 else shape[0] * 32 // s.bits
                n_ = parts["scales"][2][1] if len(parts.get("scales", (0, 0, ()))[2]) == 2 else shape[1]
            else:
                k_, n_ = shape[0], shape[1] * 8
            g, exp = _expected_gptq(s.bits, s.group_size, k_, n_)
            if method == "awq":
                exp = {"qweight": (k_, packed_length(n_, s.bits)), "qzeros": (g, packed_length(n_, s.bits)),
                       "scales": (g, n_)}
            for p, want in exp.items():
                have = shape if p == "qweight" else parts[p][2] if p in parts else None
                if have is not None and tuple(have) != want:
                    why = " (does the bit width match?)" if p == "qweight" else ""
                    info["problems"].append(f"{name}.{p}: shape {list(have)}, expected {list(want)} "
                                            f"for a {k_}->{n_} {s.describe()} layer{why}")
                elif have is None and p != "g_idx":
                    info["problems"].append(f"{name}.{p}: missing")
            layer.update(in_features=k_, out_features=n_, bits=s.bits, group_size=s.group_size, groups=g,
                         scheme=s.describe())
            if method == "gptq" and "qzeros" in parts and tuple(parts["qzeros"][2]) == exp["qzeros"]:
                gptq_layers.append((name, s.bits, s.sym, n_,
                                    lambda f=parts["qzeros"][0], k=f"{name}.qzeros": _read_tensor(f, k)))
        elif "weight_scale" in parts:
            n_, g = parts["weight_scale"][2]
            layer.update(out_features=n_, groups=g)
            if lin is not None:
                layer["in_features"] = lin.in_features
            group = _ct_group(info.get("groups") or {}, name)
            if group is not None:
                gs = group["group_size"] or -1
                layer.update(bits=group["bits"], group_size=gs, scheme=WeightScheme(
                    group["bits"], gs, bool(group["symmetric"])).describe() if group["type"] == "int" else None)
        layers.append(layer)
    if method == "gptq" and parsed is not None:
        try:
            fmt, note = resolve_gptq_format(path, qc, gptq_layers)
            info["format"] = fmt
            if note:
                info["format_note"] = note
        except (CheckpointConfigError, CheckpointFileError) as e:
            info["problems"].append(str(e))
    if model is not None:
        from .experts import rename

        missing = sorted({rename(n, renames) for n in _expected_dense(model, quantized)
                          if n.rpartition(".")[0] not in fused_quantized} - set(headers))
        if missing:
            info["problems"].append(f"{len(missing)} tensor(s) the model config expects are in no shard: "
                                    f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    info["layers"] = layers
    info["num_quantized_layers"] = len(layers)
    total = sum(_ST_SIZES.get(d, 0) * _numel(s) for _, d, s in headers.values())
    info.update(total_bytes=total, quantized_bytes=qbytes, dense_bytes=total - qbytes,
                num_tensors=len(headers))
    if layers and all("in_features" in la and "out_features" in la for la in layers):
        info["quantized_weights"] = sum(la["in_features"] * la["out_features"] for la in layers)
        info["bpw"] = bits_per_weight(qbytes, info["quantized_weights"])
    if qc is not None and not layers:
        info["problems"].append("quantization_config is present but no packed weights were found")
    info["consistent"] = not info["problems"]
    return info


def _ct_group(groups: dict, name: str) -> dict | None:
    """The compressed-tensors config group whose targets name ``name`` (or the single ``Linear`` group)."""
    for g in groups.values():
        if name in g["targets"] or any(t.startswith("re:") and re.match(t[3:], name) for t in g["targets"]):
            return g
    only = [g for g in groups.values() if "Linear" in g["targets"]]
    return only[0] if len(only) == 1 else None


def _read_tensor(file: Path, key: str):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as h:
        return h.get_tensor(key)


def _acts(a) -> str:
    if a is None:
        return "not quantized"
    return f"{a.type}{a.num_bits} {'dynamic' if a.dynamic else 'static'} per-{a.strategy}"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_checkpoint(path) -> dict:
    """Describe the checkpoint at ``path`` (a directory, or a ``.gguf`` file) without loading it.

    Keys: ``format``, ``bits`` / ``group_size`` / ``sym`` / ``desc_act`` (GPTQ, AWQ), ``groups``
    (compressed-tensors), ``layers`` (name, in/out features, groups), ``num_quantized_layers``,
    ``total_bytes`` / ``quantized_bytes`` / ``dense_bytes``, ``consistent`` and ``problems``.
    Raises :class:`CheckpointFileError` when the path cannot be read at all."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _inspect_gguf(path)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _inspect_gguf(ggufs[0])
    if not path.exists():
        raise CheckpointFileError(f"{path} does not exist")
    return _inspect_dir(path)


def _mb(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_inspection(info: dict, layers: bool = False) -> str:
    """A human-readable summary of :func:`inspect_checkpoint`'s dict (``layers``: a line per quantized
    layer with its scheme, stored bytes and bits per weight)."""
    lines = [f"checkpoint: {info['path']}", f"format:     {info.get('format')}"]
    if info.get("format") == "gguf":
        lines.append(f"arch:       {info.get('architecture')}, {info.get('num_layers')} blocks, "
                     f"{info['num_tensors']} tensors")
        lines.append("types:      " + ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items())))
        if info.get("requantized"):
            lines.append(f"re-quantized at export: {len(info['requantized'])} layer(s)")
        lines.append(f"size:       {_mb(info['file_bytes'])}")
    else:
        if info.get("model_type"):
            lines.append(f"model:      {info.get('model_type')} {info.get('architectures') or ''}")
        if "bits" in info:
            g = "per-channel" if info["group_size"] == -1 else f"group {info['group_size']}"
            lines.append(f"scheme:     {info['bits']}-bit, {g}, {'sym' if info['sym'] else 'asym'}"
                         f"{', act-order' if info['desc_act'] else ''}")
        for gname, g in (info.get("groups") or {}).items():
            gs = f" {g['group_size']}" if g["group_size"] else ""
            lines.append(f"scheme:     {gname}: {g['type']}{g['bits']} {g['strategy']}{gs} "
                         f"{'sym' if g['symmetric'] else 'asym'}, activations {g['activations']} -> {g['targets']}")
        lines.append(f"layers:     {info.get('num_quantized_layers', 0)} quantized, "
                     f"{info.get('num_tensors', 0)} tensors "
                     f"in {len(info.get('files', []))} file(s)")
        for prefix, n in (info.get("experts") or {}).items():  # fused MoE experts stored per expert
            per = [la for la in info.get("layers", []) if la["name"].startswith(prefix + ".")]
            schemes = sorted({la["scheme"] for la in per if la.get("scheme")})
            lines.append(f"experts:    {prefix}: {n} experts, {len(per)} expert Linears, "
                         f"{', '.join(schemes) or 'scheme unknown'}")
        mix = Counter(la["scheme"] for la in info.get("layers", []) if la.get("scheme"))
        if len(mix) > 1:
            lines.append("per layer:  " + ", ".join(f"{d} x{n}" for d, n in mix.most_common()))
        if "total_bytes" in info:
            lines.append(f"size:       {_mb(info['total_bytes'])} (quantized {_mb(info['quantized_bytes'])}, "
                         f"dense {_mb(info['dense_bytes'])})")
        if "bpw" in info:
            lines.append(f"bpw:        {info['bpw']:.3f} bits per quantized weight ({info['quantized_weights']:,} "
                         "weights; codes, scales, zeros and g_idx; dense tensors not included)")
    if layers:
        for la in info.get("layers", []):
            w = la.get("in_features", 0) * la.get("out_features", 0)
            bpw = f"{bits_per_weight(la['bytes'], w):6.3f} bpw" if w and "bytes" in la else ""
            lines.append(f"  {la['name']:<48s} {la.get('scheme') or '':<24s} {la.get('bytes', ''):>10} B {bpw}")
    if info.get("format_note"):
        lines.append(f"note:       {info['format_note']}")
    if info["problems"]:
        lines.append(f"consistent: NO ({len(info['problems'])} problem(s))")
        lines += [f"  - {p}" for p in info["problems"][:20]]
    else:
        lines.append("consistent: yes")
    return "\n".join(lines)

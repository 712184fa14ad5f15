"""``load_quantized``: read a GPTQ (v1 / v2), AWQ GEMM or compressed-tensors checkpoint into
:class:`QuantLinear` layers.

Order of work, so that nothing hostile reaches a kernel: parse and validate ``config.json`` →
list safetensors files (pickles refused) and read their headers; check the shards against the index
and the model config's sizes and layer count against the tensors present → read the tensors → build
the model skeleton on the meta device (no dense allocation; its real buffers measured first) → per
quantized Linear, validate its tensors against the config and convert them to the in-memory GPTQ v2
layout → validate every dense tensor against the skeleton → assign.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..core import dtype_overflow
from ..nn import QuantLinear
from .config import (CheckpointConfigError, check_model_config, parse_quantization_config, read_config_json,
                     resolve_gptq_format, warn_format)
from .files import CheckpointFileError, read_tensors, recover_interrupted
from .validate import CheckpointTensorError, checkpoint_headers, validate_dense, validate_gptq_layer

# the skeleton's real (non-parameter) buffers, e.g. rotary tables or causal masks sized by
# max_position_embeddings, are the one allocation a config controls directly: bounded here
MAX_SKELETON_BUFFER_BYTES = 1 << 30
_BUILD_ERRORS = (ValueError, RuntimeError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError,
                 MemoryError, RecursionError)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)} or a torch dtype, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return dtype


def build_skeleton(config_dict: dict, dtype: torch.dtype | None) -> nn.Module:
    """The model of ``config_dict`` with parameters on the meta device (buffers real).

    ``quantization_config`` is removed before ``from_config`` (so transformers does not start its own
    GPTQ / AWQ integration) and restored on the returned model's config afterwards."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(config_dict)
    qc = d.pop("quantization_config", None)
    model_type = d.pop("model_type", None)
    if not isinstance(model_type, str):
        raise CheckpointConfigError(f"config.json: 'model_type' must be a string, got {model_type!r}")
    try:
        config = AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointConfigError(f"config.json: cannot build a {model_type!r} config: {e}") from None
    file_dtype = _DTYPES.get(str(d.get("dtype", d.get("torch_dtype", "float32"))), torch.float32)
    try:
        with init_empty_weights(include_buffers=True):  # everything on meta: measure the buffers first
            probe = AutoModelForCausalLM.from_config(config, dtype=dtype or file_dtype)
        nbytes = sum(b.numel() * b.element_size() for b in probe.buffers())
        del probe
        if nbytes > MAX_SKELETON_BUFFER_BYTES:
            raise CheckpointConfigError(f"config.json: the model it describes needs {nbytes / 2**30:.1f} GiB of "
                                        f"buffers (over {MAX_SKELETON_BUFFER_BYTES >> 30} GiB); "
                                        "check max_position_embeddings and the other sizes")
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or file_dtype)
    except CheckpointConfigError:
        raise
    except _BUILD_ERRORS as e:
        raise CheckpointConfigError(f"config.json: cannot build the model it describes "
                                    f"({type(e).__name__}: {e})") from None
    if qc is not None:
        model.config.quantization_config = qc
    return model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def assemble(model: nn.Module, quant: dict[str, tuple], dense: dict[str, torch.Tensor], device, dtype, backend,
             modules_only: bool = False):
    """Replace the Linears named in ``quant`` (``{name: (scheme, {tensor name: v2 GPTQ tensor})}``)
    with QuantLinear (or, for ``{name: (module, tensors)}``, with that ready-made module), validate
    ``dense`` against the skeleton and assign everything. ``modules_only``: return ``{name: module}``
    of the quantized modules only, with their tensors (the dense ones are left to the caller).

    Raises :class:`CheckpointTensorError` for unexpected / missing / mis-shaped tensors."""
    state = {}
    for name, (scheme, tensors) in quant.items():
        if isinstance(scheme, nn.Module):  # a layer built by the format (W8A8Linear / FP8Linear)
            _set_module(model, name, scheme)
            state.update(tensors)
            continue
        old = model.get_submodule(name)
        scales = tensors[f"{name}.scales"]
        bias = tensors.get(f"{name}.bias")
        sdtype = dtype or scales.dtype
        bdtype = sdtype  # the bias in the scales' dtype, or in its own where that cannot hold it
        if dtype is None and bias is not None and bias.dtype != sdtype and dtype_overflow(bias, sdtype):
            bdtype = bias.dtype
        q = QuantLinear(old.in_features, old.out_features, scheme.bits, scheme.group_size, scheme.sym,
                        scheme.act_order, bias=bias is not None, dtype=sdtype, backend=backend, device="meta",
                        bias_dtype=bdtype)
        q.name = name
        _set_module(model, name, q)
        for k, t in tensors.items():
            if t.is_floating_point():
                to = bdtype if k == f"{name}.bias" else sdtype
                err = dtype_overflow(t, to) if t.dtype != to else None
                if err:
                    raise CheckpointTensorError(f"{k}: {err}; load with dtype=None (as stored) or a wider dtype")
                t = t.to(to)
            state[k] = t
    if modules_only:
        return _quantized_modules(model, quant, state, device)
    expected = model.state_dict()
    for k, t in dense.items():
        if k not in expected:
            raise CheckpointTensorError(f"{k}: unexpected tensor, the model has no such parameter or buffer")
        validate_dense(k, t, expected[k])
        state[k] = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    named = list(model.named_parameters()) + list(model.named_buffers())
    missing = sorted(n for n, t in named if t.device.type == "meta")
    if missing:
        raise CheckpointTensorError(f"the checkpoint lacks {len(missing)} tensor(s): {missing[:8]}"
                                    f"{' ...' if len(missing) > 8 else ''}")
    return model.to(device).eval()


def _quantized_modules(model: nn.Module, quant: dict, state: dict, device) -> dict[str, nn.Module]:
    out = {}
    for name in quant:
        m = model.get_submodule(name)
        prefix = name + "."
        m.load_state_dict({k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}, strict=False,
                          assign=True)
        missing = sorted(n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.device.type == "meta")
        if missing:
            raise CheckpointTensorError(f"{name}: the checkpoint lacks {[prefix + n for n in missing]}")
        out[name] = m.to(device).eval()
    return out


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise CheckpointTensorError(f"{name}.qweight: the model has no module {name!r}") from None
    if not isinstance(m, nn.Linear):
        raise CheckpointTensorError(f"{name}.qweight: module {name!r} is a {type(m).__name__}, not nn.Linear")
    return m


def load_quantized(path, device="cpu", dtype=None, backend="auto", device_map=None, max_memory=None) -> nn.Module:
    """Load a quantized checkpoint directory into a model whose quantized Linears are QuantLinear
    (GPTQ v1 / v2, AWQ GEMM, compressed-tensors pack-quantized), W8A8Linear (compressed-tensors
    int-quantized) or FP8Linear (float-quantized).

    ``dtype`` (None: as stored) casts scales, biases and dense tensors (fp8 / int8 weights and their
    fp32 scales stay as they are); ``backend`` is passed to every QuantLinear ("reference" also picks
    the reference / emulated path of W8A8Linear / FP8Linear).

    Raises :class:`~quantkern.io.files.CheckpointFileError` (missing / corrupt files, pickles),
    :class:`~quantkern.io.config.CheckpointConfigError` (bad ``quantization_config`` or model config)
    or :class:`~quantkern.io.validate.CheckpointTensorError` (a tensor that does not match the
    config, named) — all ``ValueError``; a ``device`` that is not usable here raises
    :class:`~quantkern.env.DeviceUnavailableError` before anything is read. A GPTQ checkpoint whose
    v1 / v2 format no config states is read as its zeros say (v1 when they do not tell), with a
    :class:`~quantkern.io.config.CheckpointFormatWarning`; sources that disagree are refused. A missing
    ``path`` whose save was killed between its two renames is first restored from the ``.<name>.old-*``
    it left (:func:`~quantkern.io.files.recover_interrupted`).

    ``device_map`` (several devices; overrides ``device``): ``"auto"``, ``"balanced"``,
    ``"balanced_low_0"``, ``"sequential"`` (accelerate fits the decoder blocks into ``max_memory``, e.g.
    ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``) or an explicit ``{module name: device}``; see
    :func:`quantkern.devices.dispatch` ("cpu" entries run on the CPU kernels)."""
    from ..env import check_device

    path = Path(path)
    if device_map is None:
        check_device(device)
    model = _load(path, device if device_map is None else "cpu", dtype, backend)
    if device_map is None:
        return model
    from ..devices import dispatch

    return dispatch(model, device_map, max_memory)


def _load(path: Path, device, dtype, backend, modules_only: bool = False):
    """The model at ``path`` (see :func:`load_quantized`); ``modules_only``: ``{name: quantized module}``
    only (transformers' ``from_pretrained`` loads the dense tensors itself, see :mod:`quantkern.hf`)."""
    if not path.exists():  # a save killed between its two renames left the checkpoint as .<name>.old-*
        recover_interrupted(path, clean=False)
    if not path.is_dir():
        raise CheckpointFileError(f"{path} is not a checkpoint directory")
    config_dict = read_config_json(path / "config.json", "config.json")
    qc = config_dict.get("quantization_config")
    if qc is None:
        raise CheckpointConfigError(f"{path / 'config.json'}: no 'quantization_config'; not a quantized checkpoint")
    dtype = _resolve_dtype(dtype)
    compressed = isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"
    cfg = None if compressed else parse_quantization_config(qc)
    files, headers, problems = checkpoint_headers(path)
    if problems:
        raise CheckpointFileError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if problems[1:] else ""))
    check_model_config(config_dict, headers, str(path / "config.json"))
    tensors = read_tensors(files)
    model = build_skeleton(config_dict, dtype)
    if compressed:
        from .compressed import compressed_to_gptq

        quant, dense = compressed_to_gptq(qc, tensors, model, dtype, backend)
        return assemble(model, quant, dense, device, dtype, backend, modules_only)
    experts, expert_keys = {}, set()
    if cfg.quant_method == "gptq":  # per-expert tensors of fused experts modules, under the HF checkpoint names
        from .experts import checkpoint_renames, experts_from_checkpoint, rename

        experts, expert_keys = experts_from_checkpoint(model, tensors, cfg, lambda: resolve_gptq_format(path, qc, [])[0],
                                                       dtype, backend)
        if experts:
            renames = checkpoint_renames(model)
            tensors = {rename(k, renames, reverse=True): t for k, t in tensors.items() if k not in expert_keys}
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    layers = {}
    for name in names:
        lin = _linear(model, name)
        scheme = cfg.scheme_for(name)
        if scheme is None:
            raise CheckpointTensorError(f"{name}.qweight: the config excludes {name!r} from quantization, "
                                        "yet the file holds packed weights for it")
        layers[name] = (lin, scheme)
    if cfg.quant_method == "gptq":
        fmt, note = resolve_gptq_format(path, qc, [
            (name, s.bits, s.sym, lin.out_features, lambda k=f"{name}.qzeros": tensors[k])
            for name, (lin, s) in layers.items() if f"{name}.qzeros" in tensors])
        warn_format(note)
        cfg = dataclasses.replace(cfg, checkpoint_format=fmt)
    quant, used = {}, set()
    for name, (lin, scheme) in layers.items():
        if cfg.quant_method == "awq":
            from .awq import awq_layer_to_gptq

            tensors_v2 = awq_layer_to_gptq(name, tensors, scheme, lin.in_features, lin.out_features)
            used |= {f"{name}.{p}" for p in ("qweight", "qzeros", "scales", "bias")}
        else:
            tensors_v2 = validate_gptq_layer(name, tensors, scheme, lin.in_features, lin.out_features,
                                             cfg.checkpoint_format)
            used |= {f"{name}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        quant[name] = (scheme, tensors_v2)
    dense = {k: t for k, t in tensors.items() if k not in used}
    quant.update(experts)
    return assemble(model, quant, dense, device, dtype, backend, modules_only)

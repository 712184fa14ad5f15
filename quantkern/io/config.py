"""``quantization_config`` parsing and writing for the checkpoint formats quantkern reads and writes.

A loaded config is hostile input: every value is type- and range-checked here, before any tensor is
read, and unknown keys are rejected with their names. Keys that other tools write and that do not
change how the tensors are read (calibration settings, kernel preferences) are accepted and ignored;
they are listed explicitly so that a typo such as ``"group_szie"`` is still an error.

Parsed configs are frozen dataclasses:

- :class:`GPTQCheckpointConfig` — ``quant_method: "gptq"`` (AutoGPTQ / GPTQModel / transformers), v1
  and v2 zeros, GPTQModel's per-module ``dynamic`` overrides.
- :class:`AWQCheckpointConfig` — ``quant_method: "awq"``, GEMM packing only.

compressed-tensors configs are parsed by the ``compressed-tensors`` package itself
(:mod:`quantkern.io.compressed`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core import WeightScheme
from ..core.scheme import SUPPORTED_BITS

# keys that change how tensors are interpreted (validated) ...
_GPTQ_SCHEME_KEYS = {"quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format", "dynamic",
                     "lm_head", "format"}
# ... and keys other writers emit that only describe how the checkpoint was made (accepted, ignored)
_GPTQ_INFO_KEYS = {
    "damp_percent", "damp_auto_increment", "static_groups", "true_sequential", "quantizer", "meta",
    "modules_in_block_to_quantize", "model_name_or_path", "model_file_base_name", "pack_dtype", "mse",
    "tokenizer", "dataset", "act_group_aware", "backend", "model_seqlen", "block_name_to_quantize",
    "module_name_preceding_first_block", "batch_size", "pad_token_id", "max_input_length",
    "cache_block_outputs", "use_cuda_fp16", "use_exllama", "exllama_config", "disable_exllama",
    "hyb_act", "v2", "v2_alpha", "adapter", "rotation", "is_marlin_format", "use_marlin",
}
_DYNAMIC_OVERRIDE_KEYS = {"bits", "group_size", "sym", "desc_act"}

_AWQ_SCHEME_KEYS = {"quant_method", "bits", "group_size", "zero_point", "version", "format",
                    "modules_to_not_convert"}
_AWQ_INFO_KEYS = {"quantizer", "meta", "tokenizer", "dataset", "backend", "do_fuse", "fuse_max_seq_len",
                  "modules_to_fuse", "exllama_config", "damp_percent", "desc_act", "sym", "act_group_aware",
                  "true_sequential", "model_seqlen", "block_name_to_quantize", "module_name_preceding_first_block",
                  "batch_size", "pad_token_id", "max_input_length", "cache_block_outputs",
                  "modules_in_block_to_quantize", "use_exllama"}

QUANT_METHODS = ("gptq", "awq", "compressed-tensors")


class CheckpointConfigError(ValueError):
    """A ``quantization_config`` that is malformed, inconsistent or not supported."""


def _check_type(where: str, key: str, value, types, allowed=None):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise CheckpointConfigError(f"{where}: '{key}' must be {getattr(types, '__name__', types)}, got {value!r}")
    if not isinstance(value, types):
        raise CheckpointConfigError(f"{where}: '{key}' must be {getattr(types, '__name__', types)}, "
                                    f"got {value!r} ({type(value).__name__})")
    if allowed is not None and value not in allowed:
        raise CheckpointConfigError(f"{where}: '{key}' must be one of {allowed}, got {value!r}")
    return value


def _check_scheme(where: str, bits, group_size, sym, desc_act) -> WeightScheme:
    _check_type(where, "bits", bits, int, SUPPORTED_BITS)
    _check_type(where, "group_size", group_size, int)
    if group_size == 0 or group_size < -1:
        raise CheckpointConfigError(f"{where}: 'group_size' must be -1 (per channel) or a positive int, "
                                    f"got {group_size}")
    _check_type(where, "sym", sym, bool)
    _check_type(where, "desc_act", desc_act, bool)
    return WeightScheme(bits=bits, group_size=group_size, sym=sym, act_order=desc_act)


def _reject_unknown(where: str, d: dict, known: set) -> None:
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise CheckpointConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")


@dataclass(frozen=True)
class GPTQCheckpointConfig:
    """A validated GPTQ ``quantization_config``.

    ``dynamic`` holds GPTQModel-style per-module rules: ``{"+:regex": {overrides}}`` (or a bare regex)
    changes the scheme of matching modules, ``{"-:regex": {}}`` marks them as not quantized. The first
    matching rule wins.
    """

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    dynamic: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # informational keys, kept for round trips

    quant_method = "gptq"

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.sym, self.desc_act)

    def scheme_for(self, module: str) -> WeightScheme | None:
        """The scheme of ``module`` (``None`` if a ``-:`` rule excludes it)."""
        for key, over in self.dynamic.items():
            neg = key.startswith("-:")
            pattern = key[2:] if key[:2] in ("+:", "-:") else key
            if re.match(pattern, module):
                if neg:
                    return None
                base = self.scheme
                return WeightScheme(over.get("bits", base.bits), over.get("group_size", base.group_size),
                                    over.get("sym", base.sym), over.get("desc_act", base.act_order))
        return self.scheme

    def to_dict(self) -> dict:
        d = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
             "sym": self.sym, "checkpoint_format": self.checkpoint_format, "lm_head": self.lm_head}
        if self.dynamic:
            d["dynamic"] = self.dynamic
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class AWQCheckpointConfig:
    """A validated AWQ ``quantization_config`` (GEMM layout, 4-bit)."""

    bits: int
    group_size: int
    zero_point: bool = True
    modules_to_not_convert: tuple = ()
    extra: dict = field(default_factory=dict)

    quant_method = "awq"

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, not self.zero_point, False)

    def scheme_for(self, module: str) -> WeightScheme | None:
        if any(skip in module for skip in self.modules_to_not_convert):
            return None
        return self.scheme

    def to_dict(self) -> dict:
        d = {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size,
             "zero_point": self.zero_point, "version": "gemm"}
        if self.modules_to_not_convert:
            d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        d.update(self.extra)
        return d


def _parse_dynamic(where: str, dynamic) -> dict:
    if dynamic is None:
        return {}
    _check_type(where, "dynamic", dynamic, dict)
    out = {}
    for key, over in dynamic.items():
        _check_type(f"{where}.dynamic", "key", key, str)
        pattern = key[2:] if key[:2] in ("+:", "-:") else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise CheckpointConfigError(f"{where}.dynamic: invalid regex {key!r}: {e}") from None
        _check_type(f"{where}.dynamic[{key!r}]", "value", over, dict)
        _reject_unknown(f"{where}.dynamic[{key!r}]", over, _DYNAMIC_OVERRIDE_KEYS)
        if not key.startswith("-:") and over:
            # validate the merged values by type only; the base fills in the rest at lookup
            for k, v in over.items():
                if k == "bits":
                    _check_type(f"{where}.dynamic[{key!r}]", k, v, int, SUPPORTED_BITS)
                elif k == "group_size":
                    _check_type(f"{where}.dynamic[{key!r}]", k, v, int)
                    if v == 0 or v < -1:
                        raise CheckpointConfigError(f"{where}.dynamic[{key!r}]: 'group_size' must be -1 or "
                                                    f"positive, got {v}")
                else:
                    _check_type(f"{where}.dynamic[{key!r}]", k, v, bool)
        out[key] = dict(over)
    return out


def parse_gptq_config(d: dict) -> GPTQCheckpointConfig:
    """Validate a GPTQ ``quantization_config`` dict; raises :class:`CheckpointConfigError`."""
    where = "quantization_config"
    _reject_unknown(where, d, _GPTQ_SCHEME_KEYS | _GPTQ_INFO_KEYS)
    for key in ("bits", "group_size"):
        if key not in d:
            raise CheckpointConfigError(f"{where}: missing required key '{key}'")
    s = _check_scheme(where, d["bits"], d["group_size"], d.get("sym", True), d.get("desc_act", False))
    fmt = d.get("checkpoint_format", d.get("format", "gptq"))
    _check_type(where, "checkpoint_format", fmt, str, ("gptq", "gptq_v2"))
    if "format" in d and d["format"] != fmt:
        raise CheckpointConfigError(f"{where}: 'format'={d['format']!r} contradicts 'checkpoint_format'={fmt!r}")
    lm_head = _check_type(where, "lm_head", d.get("lm_head", False), bool)
    extra = {k: v for k, v in d.items() if k in _GPTQ_INFO_KEYS}
    return GPTQCheckpointConfig(bits=s.bits, group_size=s.group_size, sym=s.sym, desc_act=s.act_order,
                                checkpoint_format=fmt, lm_head=lm_head,
                                dynamic=_parse_dynamic(where, d.get("dynamic")), extra=extra)


def parse_awq_config(d: dict) -> AWQCheckpointConfig:
    """Validate an AWQ ``quantization_config`` dict (GEMM only); raises :class:`CheckpointConfigError`."""
    where = "quantization_config"
    _reject_unknown(where, d, _AWQ_SCHEME_KEYS | _AWQ_INFO_KEYS)
    bits = _check_type(where, "bits", d.get("bits"), int, (4,))
    group_size = _check_type(where, "group_size", d.get("group_size"), int)
    if group_size == 0 or group_size < -1:
        raise CheckpointConfigError(f"{where}: 'group_size' must be -1 or a positive int, got {group_size}")
    zp = _check_type(where, "zero_point", d.get("zero_point", True), bool)
    version = d.get("version", d.get("format", "gemm"))
    _check_type(where, "version", version, str)
    if version.lower() != "gemm":
        raise CheckpointConfigError(f"{where}: AWQ version {version!r} is not supported; only 'gemm' is")
    skip = d.get("modules_to_not_convert") or []
    _check_type(where, "modules_to_not_convert", skip, list)
    for s in skip:
        _check_type(where, "modules_to_not_convert[]", s, str)
    extra = {k: v for k, v in d.items() if k in _AWQ_INFO_KEYS}
    return AWQCheckpointConfig(bits=bits, group_size=group_size, zero_point=zp,
                               modules_to_not_convert=tuple(skip), extra=extra)


def parse_quantization_config(d) -> GPTQCheckpointConfig | AWQCheckpointConfig:
    """Dispatch on ``quant_method``; compressed-tensors is handled by :mod:`quantkern.io.compressed`."""
    if not isinstance(d, dict):
        raise CheckpointConfigError(f"quantization_config must be a JSON object, got {type(d).__name__}")
    method = d.get("quant_method")
    if method == "gptq":
        return parse_gptq_config(d)
    if method == "awq":
        return parse_awq_config(d)
    raise CheckpointConfigError(f"quantization_config: 'quant_method' must be one of {QUANT_METHODS}, got {method!r}")

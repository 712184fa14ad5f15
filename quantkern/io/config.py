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

import functools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..core import WeightScheme
from ..core.scheme import SUPPORTED_BITS
from .files import CheckpointFileError, read_json

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


class CheckpointFormatWarning(UserWarning):
    """A GPTQ checkpoint whose v1 / v2 zero convention had to be detected from its tensors."""


def read_config_json(path, what: str) -> dict:
    """:func:`~quantkern.io.files.read_json` that also turns JSON nested too deeply for the parser
    (a ``RecursionError``) into :class:`CheckpointFileError` naming the file."""
    try:
        return read_json(Path(path), what)
    except RecursionError:
        raise CheckpointFileError(f"{path}: {what} is nested too deeply to be a config") from None


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


# --- GPTQModel ``dynamic`` override patterns -------------------------------------------------------
# The patterns come from the file, and Python's backtracking ``re`` takes exponential time on some of
# them (``(.*.*)*X``) with no way to stop it. So a pattern is parsed with ``re``'s own parser (the same
# syntax and errors) and matched by a Thompson NFA simulation: time O(len(pattern) * len(name)) for
# every pattern. Patterns without repetition or alternation (what ``save_quantized`` writes:
# ``^escaped\.name$``) cannot backtrack and go to ``re`` directly. ``re.match`` semantics are kept (a
# match anchored at the start; a prefix is enough). Constructs no linear-time engine can run
# (backreferences, lookaround, atomic groups, possessive repeats) and inline flags are refused.

MAX_PATTERN_LENGTH = 1000
MAX_PATTERN_STATES = 5000

try:  # Python >= 3.11
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse


class PatternTooComplex(ValueError):
    """An override pattern that is too long, too large once expanded, or uses a construct that cannot
    be matched in linear time."""


_CHAR, _SPLIT, _AT, _MATCH = range(4)
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES = {
    _sre.CATEGORY_DIGIT: str.isdecimal, _sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    _sre.CATEGORY_SPACE: str.isspace, _sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    _sre.CATEGORY_WORD: _is_word, _sre.CATEGORY_NOT_WORD: lambda c: not _is_word(c),
}


def _char_class(items) -> "callable":
    negate, tests = False, []
    for op, av in items:
        if op is _sre.NEGATE:
            negate = True
        elif op is _sre.LITERAL:
            tests.append(lambda c, v=chr(av): c == v)
        elif op is _sre.RANGE:
            tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
        elif op is _sre.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise PatternTooComplex(f"character class item {op} is not supported")
    return lambda c: negate != any(t(c) for t in tests)


class _NFA:
    def __init__(self, parsed):
        self.states: list = []
        self.start = self._seq(list(parsed), self._new(_MATCH))

    def _new(self, kind, *args) -> int:
        if len(self.states) >= MAX_PATTERN_STATES:
            raise PatternTooComplex(f"more than {MAX_PATTERN_STATES} states once its repeats are expanded")
        self.states.append([kind, *args])
        return len(self.states) - 1

    def _seq(self, items, nxt: int) -> int:
        for op, av in reversed(items):
            nxt = self._item(op, av, nxt)
        return nxt

    def _item(self, op, av, nxt: int) -> int:
        if op is _sre.LITERAL:
            return self._new(_CHAR, lambda c, v=chr(av): c == v, nxt)
        if op is _sre.NOT_LITERAL:
            return self._new(_CHAR, lambda c, v=chr(av): c != v, nxt)
        if op is _sre.ANY:
            return self._new(_CHAR, lambda c: c != "\n", nxt)
        if op is _sre.IN:
            return self._new(_CHAR, _char_class(av), nxt)
        if op is _sre.AT:
            return self._new(_AT, av, nxt)
        if op is _sre.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternTooComplex("inline flags are not supported")
            return self._seq(list(sub), nxt)
        if op is _sre.BRANCH:
            return self._new(_SPLIT, [self._seq(list(alt), nxt) for alt in av[1]])
        if op in _REPEATS:
            lo, hi, sub = av
            sub = list(sub)
            before = len(self.states)
            self._seq(sub, nxt)  # (unreachable) probe: a body that needs no state matches only ""
            if len(self.states) == before:
                return nxt
            if hi is _sre.MAXREPEAT or hi == _sre.MAXREPEAT:
                loop = self._new(_SPLIT, [])
                self.states[loop][1] = [self._seq(sub, loop), nxt]
                nxt = loop
            else:
                for _ in range(hi - lo):  # optional copies
                    nxt = self._new(_SPLIT, [self._seq(sub, nxt), nxt])
            for _ in range(lo):
                nxt = self._seq(sub, nxt)
            return nxt
        raise PatternTooComplex(f"{str(op).lower()} cannot be matched in linear time")

    def _closure(self, states, pos: int, s: str) -> set:
        out, stack = set(), list(states)
        while stack:
            i = stack.pop()
            if i in out:
                continue
            out.add(i)
            st = self.states[i]
            if st[0] == _SPLIT:
                stack.extend(st[1])
            elif st[0] == _AT and _at(st[1], pos, s):
                stack.append(st[2])
        return out

    def match(self, s: str) -> bool:
        cur = self._closure([self.start], 0, s)
        for pos, ch in enumerate(s):
            if any(self.states[i][0] == _MATCH for i in cur):
                return True
            nxt = [st[2] for st in (self.states[i] for i in cur) if st[0] == _CHAR and st[1](ch)]
            if not nxt:
                return False
            cur = self._closure(nxt, pos + 1, s)
        return any(self.states[i][0] == _MATCH for i in cur)


def _at(code, pos: int, s: str) -> bool:
    if code in (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING):
        return pos == 0
    if code is _sre.AT_END:
        return pos == len(s) or (pos == len(s) - 1 and s[-1] == "\n")
    if code is _sre.AT_END_STRING:
        return pos == len(s)
    before = pos > 0 and _is_word(s[pos - 1])
    after = pos < len(s) and _is_word(s[pos])
    if code is _sre.AT_BOUNDARY:
        return before != after
    if code is _sre.AT_NON_BOUNDARY:
        return before == after and bool(s)
    raise PatternTooComplex(f"anchor {code} is not supported")


def _cannot_backtrack(items) -> bool:
    """Literals, classes, anchors and groups of them only: ``re`` matches these in one pass."""
    return all(op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN, _sre.AT)
               or (op is _sre.SUBPATTERN and _cannot_backtrack(av[3])) for op, av in items)


@functools.lru_cache(maxsize=4096)
def override_matcher(pattern: str):
    """A function ``name -> bool`` equal to ``re.match(pattern, name) is not None`` that runs in
    O(len(pattern) * len(name)). Raises ``re.error`` for an invalid pattern and
    :class:`PatternTooComplex` for one longer than ``MAX_PATTERN_LENGTH``, one that expands to more than
    ``MAX_PATTERN_STATES`` states, or one using backreferences / lookaround / atomic groups /
    possessive repeats / inline flags."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternTooComplex(f"longer than {MAX_PATTERN_LENGTH} characters ({len(pattern)})")
    try:
        parsed = _sre_parse.parse(pattern)
        if parsed.state.flags & ~(_sre.SRE_FLAG_UNICODE):
            raise PatternTooComplex("inline flags are not supported")
        if _cannot_backtrack(list(parsed)):
            compiled = re.compile(pattern)
            return lambda name: compiled.match(name) is not None
        return _NFA(parsed).match
    except RecursionError:
        raise PatternTooComplex("nested too deeply") from None


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
            if override_matcher(pattern)(module):
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
            override_matcher(pattern)
        except (re.error, PatternTooComplex) as e:
            raise CheckpointConfigError(f"{where}.dynamic: invalid regex {key[:MAX_PATTERN_LENGTH]!r}: {e}") from None
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


# --- GPTQ v1 / v2: which zero convention the qzeros use ---------------------------------------------

_FORMAT_KEYS = ("checkpoint_format", "format")
GPTQ_SIDE_CONFIG = "quantize_config.json"  # AutoGPTQ / GPTQModel's own copy of the config


def gptq_format_sources(path, qc: dict) -> dict[str, str]:
    """``{where: value}`` for every place that states a GPTQ checkpoint's format: ``checkpoint_format``
    / ``format`` in config.json's ``quantization_config`` and in ``quantize_config.json``. Values other
    than "gptq" / "gptq_v2" raise :class:`CheckpointConfigError`."""
    path = Path(path)
    found = {f"config.json quantization_config.{k}": qc[k] for k in _FORMAT_KEYS if k in qc}
    side = path / GPTQ_SIDE_CONFIG
    if side.is_file():
        d = read_config_json(side, GPTQ_SIDE_CONFIG)
        found.update({f"{GPTQ_SIDE_CONFIG} {k}": d[k] for k in _FORMAT_KEYS if k in d})
    for where, v in found.items():
        if v not in ("gptq", "gptq_v2"):
            raise CheckpointConfigError(f"{path}: {where}={v!r} is not supported; quantkern reads 'gptq' "
                                        "(v1 zeros, stored zero - 1) and 'gptq_v2'")
    return found


def _zeros_evidence(bits: int, sym: bool, stored) -> str | None:
    """What one layer's stored (unpacked) zeros say about the convention, if anything: a symmetric
    layer stores ``2**(b-1) - 1`` in v1 and ``2**(b-1)`` in v2; a stored ``2**b - 1`` is a v1 zero of
    ``2**b``, which v1 cannot hold, so only v2 explains it."""
    mid = 1 << (bits - 1)
    if sym and bool((stored == mid - 1).all()):
        return "gptq"
    if sym and bool((stored == mid).all()):
        return "gptq_v2"
    if bool((stored == (1 << bits) - 1).any()):
        return "gptq_v2"
    return None


def resolve_gptq_format(path, qc: dict, layers) -> tuple[str, str | None]:
    """``(checkpoint_format, note)`` of a GPTQ checkpoint from every source that states it, checked
    against what the zeros say.

    ``layers``: ``(name, bits, sym, out_features, qzeros getter)`` per quantized Linear. Sources that
    disagree raise :class:`CheckpointConfigError`; when none states the format it is detected from the
    zeros (v1, the historical default, when they do not tell) and ``note`` says so; ``note`` is also
    set when the stated format contradicts zeros that leave no doubt. Callers warn with ``note``."""
    from ..formats.bitpack import unpack_cols

    sources = gptq_format_sources(path, qc)
    stated = set(sources.values())
    if len(stated) > 1:
        listed = ", ".join(f"{k}={v!r}" for k, v in sources.items())
        raise CheckpointConfigError(f"{path}: the GPTQ checkpoint format is stated inconsistently ({listed}); "
                                    "refusing to guess whether the qzeros hold v1 (zero - 1) or v2 zeros")
    seen: dict[str, str] = {}
    for name, bits, sym, n, get in layers:
        try:
            ev = _zeros_evidence(bits, sym, unpack_cols(get(), bits, n))
        except Exception:  # a malformed qzeros tensor is reported by the tensor checks, with its name
            ev = None
        if ev is not None:
            seen.setdefault(ev, name)
    if stated:
        fmt = stated.pop()
        other = "gptq_v2" if fmt == "gptq" else "gptq"
        if other in seen and fmt not in seen:
            return fmt, (f"{path}: the config states checkpoint_format={fmt!r}, but the zeros of "
                         f"{seen[other]} look like {other!r}; loading as {fmt!r} as stated")
        return fmt, None
    if len(seen) > 1:
        raise CheckpointConfigError(f"{path}: no checkpoint_format in config.json or {GPTQ_SIDE_CONFIG}, and the "
                                    f"zeros disagree ({seen['gptq']} looks like v1, {seen['gptq_v2']} like v2); "
                                    "add checkpoint_format to the config")
    if seen:
        fmt, name = next(iter(seen.items()))
        return fmt, (f"{path}: no checkpoint_format in config.json or {GPTQ_SIDE_CONFIG}; the zeros of {name} "
                     f"say {fmt!r}, loading as {fmt!r}")
    return "gptq", (f"{path}: no checkpoint_format in config.json or {GPTQ_SIDE_CONFIG}, and the zeros do not "
                    "tell v1 from v2; loading as 'gptq' (v1, the historical default). Add checkpoint_format "
                    "to the config if that is wrong")


def warn_format(note: str | None) -> None:
    if note:
        warnings.warn(note, CheckpointFormatWarning, stacklevel=3)


# --- the model config against the tensors present ---------------------------------------------------

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# sizes a transformers config turns into modules: positive ints (or null), below limits no causal LM
# comes near, so that a hostile value fails here and not in a division or an allocation
SIZE_LIMITS = {
    **dict.fromkeys(LAYER_COUNT_KEYS, 1 << 12),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads", "num_experts", "num_local_experts",
                     "n_routed_experts"), 1 << 14),
    **dict.fromkeys(("hidden_size", "n_embd", "head_dim"), 1 << 20),
    **dict.fromkeys(("intermediate_size", "n_inner", "moe_intermediate_size"), 1 << 22),
    "vocab_size": 1 << 24,
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 1 << 27),
}


def numbered_lists(names) -> dict[str, set[int]]:
    """``{prefix: indices}`` of the module lists in tensor ``names`` (``model.layers.3.mlp...`` ->
    ``{"model.layers": {3}}``), up to the first numeric component of each name."""
    out: dict[str, set[int]] = {}
    for name in names:
        parts = name.split(".")
        for i, p in enumerate(parts):
            if p.isascii() and p.isdigit() and len(p) <= 9:
                out.setdefault(".".join(parts[:i]), set()).add(int(p))
                break
    return out


def check_model_config(config_dict: dict, names, where: str = "config.json") -> None:
    """Check the model config's sizes (positive ints within :data:`SIZE_LIMITS`) and its layer count
    against the tensors present (``names``), before anything is built from it. Raises
    :class:`CheckpointConfigError` naming the key."""
    key = next((k for k in LAYER_COUNT_KEYS if config_dict.get(k) is not None), None)
    if key is not None:
        n = config_dict[key]
        lists = numbered_lists(names)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0 and not any(
                n <= len(idx) and all(i in idx for i in range(n)) for idx in lists.values()):
            prefix, idx = max(lists.items(), key=lambda kv: len(kv[1]), default=("", set()))
            held = f"{len(idx)} ({prefix}.{min(idx)} .. {prefix}.{max(idx)})" if idx else "none"
            raise CheckpointConfigError(f"{where}: '{key}'={n}, but the weights do not hold layers 0..{n - 1}: "
                                        f"layers found: {held}")
    for key, limit in SIZE_LIMITS.items():
        v = config_dict.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise CheckpointConfigError(f"{where}: cannot build the model it describes: '{key}' must be a "
                                        f"positive int <= {limit}, got {v!r}")

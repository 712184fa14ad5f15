"""Fuzzing (Hypothesis, bounded) of everything that reads untrusted checkpoint input: the config
parsers, the per-layer tensor validator, the safetensors header reader and the GGUF reader. The
only acceptable failures are the library's own ValueError subclasses naming the problem."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fixtures.quant_models import quantize_linears, tiny_llama
from quantkern.core import WeightScheme
from quantkern.io import (CheckpointConfigError, CheckpointFileError, CheckpointTensorError, inspect_checkpoint,
                          parse_quantization_config, read_gguf, save_quantized)
from quantkern.io.files import read_headers, read_tensors
from quantkern.io.validate import validate_gptq_layer
from quantkern.kernels import gptq_gemm_reference

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
gptq_keys = st.sampled_from(["quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format", "dynamic",
                             "lm_head", "format", "damp_percent", "zero_point", "version", "modules_to_not_convert",
                             "bogus"])
good_values = {"quant_method": st.sampled_from(["gptq", "awq", "gguf", 3]),
               "bits": st.sampled_from([2, 4, 8, 0, 9, True, "4"]),
               "group_size": st.sampled_from([-1, 0, 32, 128, -5, 1.5]),
               "checkpoint_format": st.sampled_from(["gptq", "gptq_v2", "v9"]),
               "dynamic": st.dictionaries(st.sampled_from(["+:.*", "-:q_proj", "(", "+:["]),
                                          st.dictionaries(st.sampled_from(["bits", "group_size", "sym", "x"]),
                                                          json_values, max_size=2),
                                          max_size=2)}


@st.composite
def quant_configs(draw):
    d = {}
    for key in draw(st.lists(gptq_keys, max_size=8, unique=True)):
        d[key] = draw(good_values.get(key, json_values) | json_values)
    return d


@st.composite
def near_valid_configs(draw):
    d = {"quant_method": "gptq", "bits": draw(st.sampled_from([2, 3, 4, 8])),
         "group_size": draw(st.sampled_from([-1, 32, 128])), "desc_act": draw(st.booleans()),
         "sym": draw(st.booleans()), "checkpoint_format": draw(st.sampled_from(["gptq", "gptq_v2"]))}
    if draw(st.booleans()):
        d = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    for key in draw(st.lists(gptq_keys, max_size=2, unique=True)):
        d[key] = draw(good_values.get(key, json_values) | json_values)
    return d


@FUZZ
@given(quant_configs() | near_valid_configs())
def test_config_parser_never_crashes(d):
    try:
        cfg = parse_quantization_config(d)
    except CheckpointConfigError:
        event("rejected")
        return
    event("accepted")
    assert cfg.quant_method in ("gptq", "awq")
    assert cfg.scheme.bits in (2, 3, 4, 5, 6, 7, 8)
    cfg.scheme_for("model.layers.0.self_attn.q_proj")  # dynamic rules were validated: lookups cannot fail


@FUZZ
@given(st.dictionaries(st.sampled_from(["config_groups", "format", "quantization_status", "ignore", "version",
                                        "quant_method", "x"]), json_values, max_size=5))
def test_compressed_config_parser_never_crashes(d):
    pytest.importorskip("compressed_tensors")
    from quantkern.io.compressed import parse_compressed_config

    try:
        parse_compressed_config(d)
    except CheckpointConfigError:
        pass


def _tensor(draw, shape, dtype):
    if draw(st.booleans()):  # sometimes a wrong shape
        shape = tuple(max(0, s + draw(st.integers(-2, 2))) for s in shape)
    if dtype.is_floating_point:
        special = draw(st.sampled_from([None, float("nan"), float("inf"), 0.0, -1.0]))
        t = torch.rand(shape).to(dtype) + 0.01
        if special is not None and t.numel():
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = special
        return t
    lo, hi = {torch.int32: (-2**31, 2**31 - 1), torch.int64: (-4, 10), torch.int8: (-128, 127)}[dtype]
    if not math.prod(shape):
        return torch.zeros(shape, dtype=dtype)
    return torch.randint(lo, hi, shape, dtype=torch.int64).to(dtype)


@st.composite
def layer_tensors(draw):
    """A valid layer, then (usually) one or two defects: a wrong dtype or shape, a NaN / zero / negative
    scale, a g_idx out of range, a v1 zero that overflows, a missing tensor."""
    from quantkern.formats.bitpack import pack_cols
    from quantkern.formats.gptq import gptq_shapes

    bits = draw(st.sampled_from([2, 3, 4, 8]))
    k, n = draw(st.sampled_from([(32, 32), (64, 32), (96, 64)]))
    gs = draw(st.sampled_from([-1, 16, 32, 48]))
    scheme = WeightScheme(bits, gs, draw(st.booleans()), draw(st.booleans()))
    g = scheme.num_groups(k)
    shapes = gptq_shapes(k, n, bits, g)
    fmt = draw(st.sampled_from(["gptq", "gptq_v2"]))
    zmax = scheme.maxq - 1 if fmt == "gptq" else scheme.maxq  # v1 stores zero - 1: maxq would overflow
    t = {"L.qweight": torch.randint(-2**31, 2**31 - 1, shapes["qweight"], dtype=torch.int64).to(torch.int32),
         "L.qzeros": pack_cols(torch.randint(0, zmax + 1, (g, n)), bits),
         "L.scales": torch.rand(shapes["scales"]).half() + 0.01,
         "L.g_idx": torch.randint(0, g, (k,), dtype=torch.int32)}
    if draw(st.booleans()):
        t["L.bias"] = torch.randn(n).half()
    for _ in range(draw(st.integers(0, 2))):
        part = draw(st.sampled_from(sorted(t)))
        defect = draw(st.sampled_from(["dtype", "shape", "value", "missing"]))
        if defect == "missing":
            t.pop(part)
        elif defect == "dtype":
            t[part] = t[part].to(draw(st.sampled_from([torch.int64, torch.float32, torch.int8, torch.float16])))
        elif defect == "shape":
            t[part] = _tensor(draw, tuple(t[part].shape), t[part].dtype)
        elif part in ("L.scales", "L.bias"):
            bad = draw(st.sampled_from([float("nan"), float("inf"), 0.0, -1.0]))
            t[part].view(-1)[draw(st.integers(0, t[part].numel() - 1))] = bad
        elif part == "L.g_idx":
            t[part][draw(st.integers(0, k - 1))] = draw(st.sampled_from([-1, g, 2**30]))
        elif part == "L.qzeros":
            t[part] = torch.full_like(t[part], -1)  # every nibble = maxq: a v1 overflow
    return scheme, k, n, t, fmt


@FUZZ
@given(layer_tensors())
def test_tensor_validator_never_crashes(case):
    scheme, k, n, tensors, fmt = case
    try:
        out = validate_gptq_layer("L", tensors, scheme, k, n, fmt)
    except CheckpointTensorError as e:
        assert str(e).startswith("L"), str(e)
        event("rejected")
        return
    event("accepted")
    # whatever passed validation is safe for the reference kernel
    g = scheme.num_groups(k)
    assert int(out["L.g_idx"].min()) >= 0 and int(out["L.g_idx"].max()) < g
    y = gptq_gemm_reference(torch.randn(2, k), out["L.qweight"], out["L.qzeros"], out["L.scales"].float(),
                            out["L.g_idx"], scheme.bits)
    assert y.shape == (2, n) and bool(torch.isfinite(y).all())


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    m = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    st_path = save_quantized(m, d / "st") / "model.safetensors"
    gguf_path = save_quantized(m, d / "m.gguf", format="gguf")
    return st_path.read_bytes(), gguf_path.read_bytes()


mutations = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "overwrite"]), st.floats(0, 1),
                               st.integers(0, 255)), min_size=1, max_size=3)


def _mutate(data: bytes, muts, header_bias: bool) -> bytes:
    b = bytearray(data)
    for kind, pos, val in muts:
        # most interesting damage is in the header / metadata: bias positions towards the start
        i = int((pos ** 3 if header_bias else pos) * (len(b) - 1)) if b else 0
        if kind == "truncate":
            b = b[:i]
        elif kind == "flip" and b:
            b[i] ^= 1 << (val % 8)
        elif b:
            b[i: i + 8] = bytes([val]) * min(8, len(b) - i)
    return bytes(b)


@FUZZ
@given(mutations)
def test_safetensors_reader_never_crashes(small_files, tmp_path_factory, muts):
    f = tmp_path_factory.mktemp("st") / "model.safetensors"
    f.write_bytes(_mutate(small_files[0], muts, header_bias=True))
    try:
        read_headers([f])
        read_tensors([f])
        event("read")
    except CheckpointFileError as e:
        assert "model.safetensors" in str(e)
        event("rejected")


@FUZZ
@given(mutations)
def test_gguf_reader_never_crashes(small_files, tmp_path_factory, muts):
    f = tmp_path_factory.mktemp("gguf") / "m.gguf"
    f.write_bytes(_mutate(small_files[1], muts, header_bias=True))
    try:
        read_gguf(f)
        inspect_checkpoint(f)
        event("read")
    except CheckpointFileError as e:
        assert "m.gguf" in str(e)
        event("rejected")

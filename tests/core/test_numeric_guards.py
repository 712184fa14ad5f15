"""Issue #14, "silently wrong numbers": meta / mismatched devices, stale kernels after
load_state_dict, fp16 overflow of scales and bias, and checkpoints the loader would reject."""

from __future__ import annotations

import re

import pytest
import torch

from quantkern import GPTQQuantizer, QuantLinear, RTNQuantizer
from quantkern.algorithms import quantize_rtn
from quantkern.algorithms.fp4 import quantize_fp4_groups
from quantkern.core import QuantizedWeight, ScaleOverflowError, WeightScheme
from quantkern.io import load_quantized, save_quantized
from quantkern.io.validate import CheckpointTensorError
from quantkern.nn.fp4_linear import FP4Linear
from quantkern.nn.fp8_linear import FP8Linear
from quantkern.nn.w8a8_linear import W8A8Linear, ZeroQuantLinear


def _qlinear(seed=0, backend="auto"):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 32)
    qw = quantize_rtn(lin.weight, WeightScheme(4, 32, False))
    return QuantLinear.from_quantized(qw, bias=lin.bias, dtype=torch.float32, backend=backend)


def _tiny_llama(bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, attention_bias=bias)
    return LlamaForCausalLM(cfg).eval()


# -- weights on the meta device (or any other device than the input's) ---------------------------------------
@pytest.mark.parametrize("make", [
    lambda: QuantLinear(64, 32, bits=4, group_size=32, bias=True, device="meta"),
    lambda: QuantLinear(64, 32, bits=4, group_size=32, device="meta", backend="reference"),
    lambda: QuantLinear(64, 32, bits=4, group_size=32, device="meta", backend="cpu"),
    lambda: W8A8Linear(64, 32, bias=True, device="meta"),
    lambda: FP8Linear(64, 32, device="meta"),
    lambda: FP8Linear(64, 32, act="none", device="meta"),
    lambda: FP4Linear(64, 32, device="meta"),
    lambda: ZeroQuantLinear(64, 32, device="meta"),
], ids=["qlinear-auto", "qlinear-reference", "qlinear-cpu", "w8a8", "fp8", "fp8-weight-only", "fp4", "zeroquant"])
def test_meta_weights_with_a_cpu_input_are_refused_naming_both_devices(make):
    layer = make()
    layer.name = "model.layers.0.mlp.up_proj"
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.up_proj.*the input is on cpu but \w+ is on meta "
                                           r"\(the meta device holds no data"):
        layer(torch.randn(3, 64, dtype=torch.float16))


def test_a_buffer_moved_off_the_input_device_is_refused_when_the_kernel_is_built():
    layer = _qlinear(backend="reference")
    x = torch.randn(2, 64)
    layer(x)
    layer.load_state_dict({k: v.to("meta") for k, v in layer.state_dict().items()}, assign=True)
    with pytest.raises(RuntimeError, match=r"the input is on cpu but qweight is on meta"):
        layer(x)


# -- load_state_dict after the first forward ---------------------------------------------------------------
def test_load_state_dict_after_a_forward_is_what_runs_for_every_quantized_module():
    x = torch.randn(3, 64)
    pairs = [(_qlinear(0, backend=b), _qlinear(1, backend=b)) for b in ("auto", "cpu")]  # the C++ kernel repacks
    torch.manual_seed(0)
    la, lb = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    pairs += [(W8A8Linear.from_linear(la), W8A8Linear.from_linear(lb)),
              (FP8Linear.from_linear(la), FP8Linear.from_linear(lb)),
              (ZeroQuantLinear.from_linear(la, w_bits=4, group_size=32),
               ZeroQuantLinear.from_linear(lb, w_bits=4, group_size=32)),
              tuple(FP4Linear.from_codes(*quantize_fp4_groups(lin.weight, 32), 32, dtype=torch.float32)
                    for lin in (la, lb))]
    for a, b in pairs:
        want = b(x)
        assert not torch.equal(a(x), want)  # builds a's kernel
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), want), type(a).__name__
    a, b = _qlinear(0, backend="cpu"), _qlinear(2, backend="cpu")
    a(x)
    a.load_state_dict({k: v.clone() for k, v in b.state_dict().items()}, assign=True)
    assert torch.equal(a(x), b(x))


def test_load_state_dict_after_release_canonical_brings_the_buffers_back_or_raises():
    x = torch.randn(3, 64)
    a, b = _qlinear(0, backend="cpu"), _qlinear(1, backend="cpu")
    a(x)
    assert a.release_canonical() > 0 and a.released
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) without qweight, g_idx needs the canonical GPTQ "
                                           "buffers.*released for inference"):
        a.load_state_dict({k: v for k, v in b.state_dict().items() if k not in ("qweight", "g_idx")}, strict=False)
    assert a.released
    a.load_state_dict(b.state_dict())
    assert not a.released and torch.equal(a(x), b(x))
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    # a failed load (wrong shape) leaves it released, not holding uninitialised buffers
    a(x)
    a.release_canonical()
    bad = dict(b.state_dict(), qzeros=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="size mismatch for qzeros"):
        a.load_state_dict(bad)
    assert a.released and torch.equal(a(x), b(x))


# -- fp16 overflow of scales ---------------------------------------------------------------------------------
_HUGE = [(2, 1e5), (4, 1e6)]
_LAYER = "model.layers.0.mlp.down_proj"


def _huge(model, value):
    with torch.no_grad():
        model.get_submodule(_LAYER).weight[3, 5] = value
    return model


@pytest.mark.parametrize("bits, value", _HUGE)
def test_rtn_refuses_scales_that_overflow_fp16_naming_the_layer(bits, value, tmp_path):
    model = _huge(_tiny_llama(), value)
    with pytest.raises(ScaleOverflowError, match=rf"^{_LAYER}: {bits}-bit scales overflow float16: weights with max "
                                                 rf"\|w\| = {re.escape(f'{value:.4g}')} need scales up to .*largest finite value 65504; "
                                                 "quantize with scale_dtype='float32'"):
        RTNQuantizer(model, bits=bits, group_size=32).quantize()
    # the way out the message names: fp32 scales, a checkpoint that loads and computes the same
    model = RTNQuantizer(_huge(_tiny_llama(), value), bits=bits, group_size=32, scale_dtype="float32").quantize()
    assert model.get_submodule(_LAYER).scales.dtype == torch.float32
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = model(x).logits
        out = load_quantized(save_quantized(model, tmp_path / "q"))(x).logits
    assert torch.isfinite(ref).all() and torch.equal(out, ref)


@pytest.mark.parametrize("bits, value", _HUGE)
def test_gptq_refuses_scales_that_overflow_fp16_naming_the_layer(bits, value, token_data):
    model = _huge(_tiny_llama(), value)
    with pytest.raises(ScaleOverflowError, match=rf"^{_LAYER}: {bits}-bit scales overflow float16: weights with max "
                                                 rf"\|w\| = {re.escape(f'{value:.4g}')}"):
        GPTQQuantizer(model, bits=bits, group_size=32, use_triton=False).quantize(token_data[:2])


def test_quant_linear_refuses_scales_its_dtype_cannot_hold():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[0, 0] = 1e6
    qw = quantize_rtn(w, WeightScheme(4, 32, False), torch.float32)
    with pytest.raises(ScaleOverflowError, match=r"^lm_head: scales: values up to 6.667e\+04 overflow float16 "
                                                 r"\(largest finite value 65504\)"):
        QuantLinear.from_quantized(qw, dtype=torch.float16, name="lm_head")
    inf = QuantizedWeight(qw.codes, qw.scales.half(), qw.zeros, qw.g_idx, qw.scheme)
    with pytest.raises(ScaleOverflowError, match="^q: the quantized weight's scales are not finite"):
        QuantLinear.from_quantized(inf, name="q")
    # load_state_dict into an fp16 layer: copy_ would turn them into inf
    layer = QuantLinear(64, 32, bits=4, group_size=32, sym=False, dtype=torch.float16)
    good = QuantLinear.from_quantized(qw)
    with pytest.raises(ScaleOverflowError, match=r"^scales: values up to 6.667e\+04 overflow float16"):
        layer.load_state_dict(good.state_dict())
    assert torch.equal(layer.scales, torch.ones_like(layer.scales))  # nothing half-loaded


def test_fp4_refuses_group_scales_that_overflowed():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[1, 2] = 1e6  # amax / 6 > 65504
    codes, scales = quantize_fp4_groups(w, 32, torch.float16)
    with pytest.raises(ScaleOverflowError, match="FP4Linear: the float16 group scales are not finite"):
        FP4Linear.from_codes(codes, scales, 32)
    assert torch.isfinite(FP4Linear.from_codes(*quantize_fp4_groups(w, 32, torch.float32), 32).dequantized_weight()).all()


# -- bias: kept in a dtype that holds it ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_a_bias_fp16_cannot_hold_stays_fp32_and_round_trips(fmt, tmp_path):
    model = _tiny_llama(bias=True)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule(name).bias[1] = 1e5
    model = RTNQuantizer(model, bits=4, group_size=32).quantize()
    q = model.get_submodule(name)
    assert q.scales.dtype == torch.float16 and q.bias.dtype == torch.float32 and q.bias[1] == 1e5
    other = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert other.bias.dtype == torch.float16  # a bias that fits stays in the scales' dtype
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = model(x).logits
    path = save_quantized(model, tmp_path / "q", format=fmt)
    loaded = load_quantized(path)
    lq = loaded.get_submodule(name)
    assert lq.bias.dtype == torch.float32 and torch.equal(lq.bias, q.bias)
    assert loaded.get_submodule("model.layers.0.self_attn.k_proj").bias.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    with pytest.raises(CheckpointTensorError, match=rf"{name}.bias: values up to 1e\+05 overflow float16"):
        load_quantized(path, dtype="float16")


# -- the last line of defence: save_quantized never writes what load_quantized rejects ------------------------
@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
@pytest.mark.parametrize("tensor, value", [("scales", float("inf")), ("bias", float("nan"))])
def test_save_refuses_non_finite_scales_or_bias_before_writing(fmt, tensor, value, tmp_path):
    model = RTNQuantizer(_tiny_llama(bias=True), bits=4, group_size=32).quantize()
    name = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        getattr(model.get_submodule(name), tensor).view(-1)[0] = value
    with pytest.raises(ValueError, match=rf"{name}\.{tensor} holds inf/NaN values; refusing to save"):
        save_quantized(model, tmp_path / "q", format=fmt)
    assert not (tmp_path / "q").exists()

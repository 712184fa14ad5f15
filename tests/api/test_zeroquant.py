"""ZeroQuant-style: the four range conventions, group-wise weights, token-wise / static activations."""

import copy

import pytest
import torch

import quantkern as qk
from quantkern.calibration import group_batches, normalize_calibration_data
from quantkern.core.int8 import code_range, dequantize_codes, quantize_rows, quantize_weight_groups
from quantkern.nn.w8a8_linear import ZeroQuantLinear

EVAL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("has_zero,unsign", [(False, False), (True, False), (True, True), (False, True)])
def test_range_conventions(bits, has_zero, unsign):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 40, generator=g) + (2.0 if unsign and not has_zero else 0.5)  # shifted data
    if unsign and not has_zero:
        x = x.abs()
    q, s, z = quantize_rows(x, bits, has_zero, unsign)
    qmin, qmax = code_range(bits, unsign)
    assert q.min() >= qmin and q.max() <= qmax
    assert (q.amax(1) == qmax).any() or (q.amin(1) == qmin).any()  # the range is used
    if not has_zero:
        assert (z == 0).all()
    err = (dequantize_codes(q, s, z) - x).abs()
    assert (err <= s * 0.5 + 1e-6).all()  # round-to-nearest inside the range


def test_unsigned_without_zero_saturates_negatives():
    q, s, z = quantize_rows(torch.tensor([[-1.0, 0.5, 1.0]]), 8, False, True)
    assert q[0, 0] == 0 and q[0, 2] == 255 and q[0, 1] in (127, 128) and z.item() == 0


def test_asymmetric_beats_symmetric_on_skewed_rows():
    x = torch.rand(8, 64, generator=torch.Generator().manual_seed(0)) + 1.0  # all positive
    e = {hz: (dequantize_codes(*quantize_rows(x, 4, hz, False)) - x).pow(2).mean() for hz in (False, True)}
    assert e[True] < 0.5 * e[False]


@pytest.mark.parametrize("k,gs", [(64, 16), (70, 32), (64, -1)])
def test_weight_groups(k, gs):
    w = torch.randn(12, k, generator=torch.Generator().manual_seed(1))
    codes, s, z = quantize_weight_groups(w, 4, gs, True, True)
    ngroups = 1 if gs == -1 else -(-k // gs)
    assert s.shape == (12, ngroups) and z.shape == (12, ngroups) and codes.shape == (12, k)
    lin = torch.nn.Linear(k, 12, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = ZeroQuantLinear.from_linear(lin, w_bits=4, group_size=gs, w_has_zero=True, w_unsign=True)
    assert m.weight.dtype == torch.uint8 and m.weight_zero_point.dtype == torch.uint8
    step = s.repeat_interleave(gs if gs != -1 else k, dim=1)[:, :k]
    assert ((m.dequantized_weight() - w).abs() <= 0.5 * step + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_zeroquant_linear_forward_matches_fake_quant_oracle(dtype, m):
    lin = torch.nn.Linear(48, 20)
    x = torch.randn(m, 48, generator=torch.Generator().manual_seed(m)).to(dtype)
    zq = ZeroQuantLinear.from_linear(lin, w_bits=8, group_size=16, a_bits=8, a_has_zero=True)
    q, s, z = quantize_rows(x.float(), 8, True, False)
    ref = dequantize_codes(q, s, z).double() @ zq.dequantized_weight().double().t() + lin.bias.double()
    y = zq(x)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert (y.double() - ref).norm() / ref.norm() < tol
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    assert (ref - exact).norm() / exact.norm() < 0.03


@pytest.mark.parametrize("static", [False, True])
def test_zeroquant_quantizer_both_doors(tiny_llama, token_data, static):
    with torch.no_grad():
        ref = tiny_llama(EVAL).logits
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    cfg = qk.ZeroQuantConfig(w_bits=8, w_group_size=32, a_has_zero=True, act_static=static, batch_size=4)
    qk.ZeroQuantQuantizer(a, cfg, verbose=False).quantize(token_data)
    b = qk.prepare(b, cfg)
    if static:
        for batch in group_batches(normalize_calibration_data(token_data), 4):
            b(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    b = qk.convert(b, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    down = a.model.layers[0].mlp.down_proj
    assert isinstance(down, ZeroQuantLinear) and (down.input_zero_point is not None) == static
    with torch.no_grad():
        out = a(EVAL).logits
    assert (out - ref).norm() / ref.norm() < 0.1


def test_zeroquant_w4_group_beats_per_channel(tiny_llama):
    with torch.no_grad():
        ref = tiny_llama(EVAL).logits
    errs = []
    for gs in (16, -1):
        m = copy.deepcopy(tiny_llama)
        qk.ZeroQuantQuantizer(m, w_bits=4, w_group_size=gs, w_has_zero=True, verbose=False).quantize()
        with torch.no_grad():
            errs.append(float((m(EVAL).logits - ref).pow(2).mean()))
    assert errs[0] < errs[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(w_bits=9), "w_bits must be an int in 2..8"),
    (dict(a_bits=1), "a_bits must be an int in 2..8"),
    (dict(w_group_size=0), "w_group_size"),
    (dict(w_unsign=True), "w_unsign=True needs w_has_zero=True"),
    (dict(a_has_zero="yes"), "a_has_zero must be a bool"),
])
def test_zeroquant_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.ZeroQuantConfig(**kwargs)


def test_zeroquant_group_larger_than_layer(tiny_llama):
    with pytest.raises(ValueError, match="w_group_size=256 > in_features=64"):
        qk.ZeroQuantQuantizer(tiny_llama, w_group_size=256, verbose=False).quantize()

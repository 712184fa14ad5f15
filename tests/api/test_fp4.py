"""FP4 (E2M1): codec and packing (bit-exact), group quantization, FP4Linear vs oracle, FP4Quantizer."""

import copy

import pytest
import torch

import quantkern as qk
from quantkern.algorithms.fp4 import quantize_fp4_groups
from quantkern.core.fp4 import E2M1_VALUES, e2m1_table, encode_e2m1, pack_nibbles, unpack_nibbles
from quantkern.nn.fp4_linear import FP4Linear

EVAL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))


def test_e2m1_codes_round_trip_and_nearest():
    table = e2m1_table()
    assert torch.equal(encode_e2m1(table), torch.tensor(list(range(8)) + [0] + list(range(9, 16)), dtype=torch.uint8))
    x = torch.linspace(-8, 8, 2001)
    dec = table[encode_e2m1(x).long()]
    grid = torch.tensor(E2M1_VALUES)
    grid = torch.cat([grid, -grid])
    nearest = (x[:, None] - grid[None]).abs().min(dim=1).values
    inside = x.abs() <= 6
    assert torch.allclose((dec - x).abs()[inside], nearest[inside])
    assert (dec[x > 6] == 6).all() and (dec[x < -6] == -6).all()  # saturate, never NaN


@pytest.mark.parametrize("k", [1, 2, 7, 64])
def test_nibble_packing_bit_exact(k):
    codes = torch.randint(0, 16, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, k), codes)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0])  # even column in the low nibble


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("k,gs", [(64, 32), (70, 16), (64, -1)])
def test_group_quantization_error_bound(scale_dtype, k, gs):
    w = torch.randn(12, k, generator=torch.Generator().manual_seed(0))
    codes, scales = quantize_fp4_groups(w, gs, scale_dtype)
    ng = 1 if gs == -1 else -(-k // gs)
    assert scales.shape == (12, ng) and scales.dtype == scale_dtype
    m = FP4Linear.from_codes(codes, scales, gs, dtype=torch.float32)
    deq = m.dequantized_weight()
    gsz = k if gs == -1 else gs
    s = scales.float().repeat_interleave(gsz, dim=1)[:, :k]
    # the largest E2M1 step is 2 (between 4 and 6): error at most one step times the scale
    assert ((deq - w).abs() <= s * 1.0 + 1e-6).all()
    rel = (deq - w).norm() / w.norm()
    assert rel < 0.15


def test_mse_search_lowers_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    errs = []
    for mse in (False, True):
        codes, scales = quantize_fp4_groups(w, 32, torch.float16, mse=mse)
        errs.append(float((FP4Linear.from_codes(codes, scales, 32).dequantized_weight() - w).pow(2).sum()))
    assert errs[1] < errs[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_fp4_linear_forward_matches_oracle(dtype, m):
    lin = torch.nn.Linear(48, 20)
    codes, scales = quantize_fp4_groups(lin.weight, 16)
    q = FP4Linear.from_codes(codes, scales, 16, bias=lin.bias, dtype=dtype)
    x = torch.randn(m, 48, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = x.double() @ q.dequantized_weight().double().t() + lin.bias.double()
    y = q(x)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert y.dtype == dtype and (y.double() - ref).norm() / ref.norm() < tol


def test_fp4_linear_errors():
    codes, scales = quantize_fp4_groups(torch.randn(4, 32), 16)
    with pytest.raises(ValueError, match="scales shape"):
        FP4Linear.from_codes(codes, scales[:, :1], 16)
    q = FP4Linear.from_codes(codes, scales, 16)
    with pytest.raises(ValueError, match="expected 32"):
        q(torch.randn(2, 31))
    with pytest.raises(ValueError, match="inf/NaN"):
        quantize_fp4_groups(torch.tensor([[float("inf"), 1.0]]), -1)


def test_fp4_quantizer_both_doors(tiny_llama):
    with torch.no_grad():
        ref = tiny_llama(EVAL).logits
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    cfg = qk.FP4Config(group_size=16, mse=True)
    qk.FP4Quantizer(a, cfg, verbose=False).quantize()
    b = qk.convert(qk.prepare(b, cfg))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(isinstance(x, FP4Linear) for x in a.modules()) == 14
    with torch.no_grad():
        out = a(EVAL).logits
    assert (out - ref).norm() / ref.norm() < 0.3


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=0), "group_size must be -1 or a positive int"),
    (dict(scale_dtype="int8"), "scale_dtype must be one of"),
    (dict(mse=1), "mse must be a bool"),
])
def test_fp4_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.FP4Config(**kwargs)


def test_fp4_group_larger_than_layer(tiny_llama):
    with pytest.raises(ValueError, match=r"larger than in_features of: .*\(group_size=128, in_features=64\)"):
        qk.FP4Quantizer(tiny_llama, group_size=128, verbose=False).quantize()


def test_fp4_per_layer_override(tiny_llama):
    qk.FP4Quantizer(tiny_llama, group_size=32, overrides={"*.down_proj": {"group_size": 16, "scale_dtype": "bfloat16"}},
                    verbose=False).quantize()
    down, up = tiny_llama.model.layers[0].mlp.down_proj, tiny_llama.model.layers[0].mlp.up_proj
    assert down.group_size == 16 and down.weight_scale.dtype == torch.bfloat16
    assert up.group_size == 32 and up.weight_scale.dtype == torch.float16

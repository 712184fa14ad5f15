"""AWQ GEMM packing against an independent reading of the published layout."""

from __future__ import annotations

import pytest
import torch

from fixtures.foreign import autoawq_pack as autoawq_style_pack
from fixtures.quant_models import rtn_weight
from quantkern.core import WeightScheme
from quantkern.formats.awq import AWQ_ORDER, AWQ_REVERSE_ORDER, AWQTensors, pack_awq, unpack_awq


def published_dequant(qweight, qzeros, scales, group_size):
    """Dequantize as vLLM's test helper describes: shift-unpack, undo the order, repeat per group."""
    shifts = torch.arange(0, 32, 4)
    def unpack(t):
        v = (t[:, :, None] >> shifts[None, None, :]) & 0xF
        v = v.reshape(t.shape[0], -1)
        idx = torch.arange(v.shape[1]).view(-1, 8)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
        return v[:, idx]
    w, z = unpack(qweight), unpack(qzeros)
    gs = group_size if group_size != -1 else qweight.shape[0]
    z = z.repeat_interleave(gs, dim=0)
    s = scales.float().repeat_interleave(gs, dim=0)
    return ((w - z).float() * s)  # [K, N]


def test_orders_are_inverse():
    assert [AWQ_ORDER[AWQ_REVERSE_ORDER[j]] for j in range(8)] == list(range(8))


@pytest.mark.parametrize("n, k, gs", [(8, 32, 32), (24, 64, 16), (64, 128, -1), (136, 96, 32)])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_matches_published_layout(n, k, gs, sym):
    torch.manual_seed(n + k)
    qw = rtn_weight(torch.randn(n, k), WeightScheme(4, gs, sym, False), zero_pattern="cycle")
    t = pack_awq(qw)
    assert t.qweight.shape == (k, n // 8) and t.qzeros.shape == (qw.scales.shape[0], n // 8)
    assert torch.equal(t.qweight, autoawq_style_pack(qw.codes.t()))
    assert torch.equal(t.qzeros, autoawq_style_pack(qw.zeros))
    torch.testing.assert_close(published_dequant(t.qweight, t.qzeros, t.scales, gs), qw.dequantize().t(),
                               rtol=0, atol=0)
    back = unpack_awq(AWQTensors(t.qweight, t.qzeros, t.scales), gs, k, n)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.g_idx, qw.g_idx)


def test_every_zero_value_and_code_roundtrips():
    n, k = 16, 32
    codes = (torch.arange(n * k).view(n, k) % 16).to(torch.int32)
    zeros = torch.arange(16, dtype=torch.int32).repeat(2).view(2, 16)[:, :n]
    from quantkern.core import QuantizedWeight

    qw = QuantizedWeight(codes, torch.ones(2, n, dtype=torch.float16), zeros,
                         torch.arange(k, dtype=torch.int32) // 16, WeightScheme(4, 16, False, False))
    back = unpack_awq(pack_awq(qw), 16, k, n)
    assert torch.equal(back.codes, codes) and torch.equal(back.zeros, zeros)


def test_pack_rejects_unrepresentable():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match="4-bit weights only, not 8-bit"):
        pack_awq(rtn_weight(w, WeightScheme(8, 32, True, False)))
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        pack_awq(rtn_weight(w, WeightScheme(4, 48, True, False)))
    with pytest.raises(ValueError, match="out_features=12 is not a multiple of 8"):
        pack_awq(rtn_weight(torch.randn(12, 64), WeightScheme(4, 32, True, False)))
    with pytest.raises(ValueError, match="act-order"):
        pack_awq(rtn_weight(w, WeightScheme(4, 32, True, True)))

import pytest
import torch

from quantkern.core import QuantizedWeight, WeightScheme
from quantkern.formats import (pack_cols, pack_gptq, pack_rows, packed_length, unpack_cols, unpack_gptq, unpack_rows,
                               zeros_v1_to_v2, zeros_v2_to_v1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 96, 128, 130])
def test_pack_rows_roundtrip_bit_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 1 << bits, (n, 5), generator=g, dtype=torch.int32)
    p = pack_rows(v, bits)
    assert p.dtype == torch.int32 and p.shape == (packed_length(n, bits), 5)
    assert torch.equal(unpack_rows(p, bits, n), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_cols_roundtrip(bits):
    v = torch.randint(0, 1 << bits, (3, 64), dtype=torch.int32)
    assert torch.equal(unpack_cols(pack_cols(v, bits), bits, 64), v)


def test_4bit_layout_lowest_nibble_first():
    # value i in bits [4i, 4i+4) of the word
    assert pack_rows(torch.arange(8).view(8, 1), 4).item() == 0x76543210
    # 8-bit: four bytes, little end first; the top byte makes the int32 negative
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).item() == 0xFF030201 - (1 << 32)


def test_3bit_layout_straddles_words_like_gptq():
    # 32 three-bit values fill exactly 3 words; value 10 straddles words 0 and 1, value 21 words 1 and 2
    v = torch.zeros(32, 1, dtype=torch.int32)
    v[10] = 0b111
    words = pack_rows(v, 3).view(-1).tolist()
    assert words[0] == (0b11 << 30) - (1 << 32) and words[1] == 0b1 and words[2] == 0
    v.zero_()
    v[21] = 0b101
    words = pack_rows(v, 3).view(-1).tolist()
    assert words[1] == -(1 << 31) and words[2] == 0b10 and words[0] == 0


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="need"):
        unpack_rows(torch.zeros(3, 2, dtype=torch.int32), 4, 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_unpack_bit_exact(bits):
    n, k, gs = 64, 96, 32
    scheme = WeightScheme(bits, gs, sym=False)
    maxq = (1 << bits) - 1
    qw = QuantizedWeight(codes=torch.randint(0, maxq + 1, (n, k), dtype=torch.int32),
                         scales=torch.rand(3, n).half() + 0.01,
                         zeros=torch.randint(0, maxq + 1, (3, n), dtype=torch.int32),
                         g_idx=torch.randperm(k).to(torch.int32) % 3, scheme=scheme)
    t = pack_gptq(qw)
    assert t.qweight.shape == (k * bits // 32, n) and t.qzeros.shape == (3, n * bits // 32)
    back = unpack_gptq(t, scheme, k, n)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.g_idx, qw.g_idx) and torch.equal(back.scales, qw.scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_convention(bits):
    maxq = (1 << bits) - 1
    z = torch.arange(1, maxq + 1, dtype=torch.int32).repeat(2, 32)[:, :32]
    packed = pack_cols(z, bits)
    v1 = zeros_v2_to_v1(packed, bits, 32)
    assert torch.equal(unpack_cols(v1, bits, 32), z - 1)
    assert torch.equal(zeros_v1_to_v2(v1, bits, 32), packed)
    z[0, 0] = 0
    with pytest.raises(ValueError, match="cannot be stored in GPTQ v1"):
        zeros_v2_to_v1(pack_cols(z, bits), bits, 32)

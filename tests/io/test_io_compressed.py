"""compressed-tensors (pack-quantized) export / import, checked against the package's own compressor
and loaded by transformers' compressed-tensors integration."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from fixtures.quant_models import quantize_linears, tiny_llama, tokens  # noqa: E402
from quantkern.core import WeightScheme  # noqa: E402
from quantkern.io import CheckpointConfigError, CheckpointTensorError, load_quantized, save_quantized  # noqa: E402
from quantkern.nn import QuantLinear  # noqa: E402

L = "model.layers.0.mlp.up_proj"


def _upstream_zp_bug() -> bool:
    """compressed-tensors <= 0.20.1 (checked with transformers 5.24) builds an unpacked weight_zero_point
    for transformers' default load route; later versions may have fixed it, so tests expect the failure
    strictly only where it was seen."""
    import compressed_tensors
    from packaging.version import Version

    return Version(compressed_tensors.__version__) <= Version("0.20.1")


UPSTREAM_ZP_BUG = _upstream_zp_bug()


def _load_bit_exact(path, model):
    """``load_quantized(path)``, asserting every QuantLinear's GPTQ tensors equal ``model``'s."""
    loaded = load_quantized(path, backend="reference")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for buf in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(getattr(loaded.get_submodule(name), buf), getattr(m, buf)), f"{name}.{buf}"
    return loaded


def _save(tmp_path, scheme, name="ct", **kw):
    model = quantize_linears(tiny_llama(), scheme, **kw)
    return model, save_quantized(model, tmp_path / name, format="compressed-tensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_roundtrip_exact(tmp_path, bits, sym):
    model, path = _save(tmp_path, WeightScheme(bits, 32, sym, False), zero_pattern="cycle")
    loaded = _load_bit_exact(path, model)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["strategy"]) == (bits, 32, sym, "group")


def test_mixed_schemes_roundtrip(tmp_path):
    schemes = {"mlp": WeightScheme(4, -1, False, False), "k_proj": WeightScheme(8, 16, True, False)}
    model, path = _save(tmp_path, WeightScheme(4, 32, True, False), schemes=schemes)
    loaded = load_quantized(path, backend="reference")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 3
    assert loaded.model.layers[0].self_attn.k_proj.bits == 8
    assert loaded.model.layers[1].mlp.up_proj.group_size == -1


@pytest.mark.parametrize("sym", [True, False])
def test_tensors_equal_the_packages_own_compressor(tmp_path, sym):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    model, path = _save(tmp_path, WeightScheme(4, 32, sym, False), zero_pattern="cycle")
    qw = model.get_submodule(L).to_quantized()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scales.t().contiguous(),
             "weight_zero_point": (qw.zeros.t() - 8).to(torch.int8).contiguous()}
    theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
    ours = load_file(str(path / "model.safetensors"))
    assert set(theirs) == {k[len(L) + 1:] for k in ours if k.startswith(L + ".")}
    for k, v in theirs.items():
        assert torch.equal(ours[f"{L}.{k}"], v.to(ours[f"{L}.{k}"].dtype)), k


def _hf(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def _hf_logits(path, x, **kw):
    with torch.no_grad():
        return _hf(path, **kw)(x).logits


def _assert_hf_weights_exact(model, hf):
    """compressed-tensors dequantizes ``(q - z) * s`` in the scales' dtype: every dense weight transformers
    built must equal quantkern's own dequantization in that dtype, bit for bit."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            qw = m.to_quantized()
            w = hf.get_submodule(name).weight.detach()
            assert torch.equal(w, qw.dequantize(qw.scales.dtype).to(w.dtype)), name
            n += 1
    assert n


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_loads_symmetric_export(tmp_path, bits):
    model, path = _save(tmp_path, WeightScheme(bits, 32, True, False))
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    # transformers decompresses to a dense fp32 Linear: same weights, another matmul order
    torch.testing.assert_close(_hf_logits(path, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_loads_asymmetric_export(tmp_path, bits):
    """transformers' load-time decompression (``CompressedTensorsConfig(dequantize=True)``) runs the
    package's own ``PackedQuantizationCompressor.decompress`` over our packed codes and packed zero
    points, for every zero point value ("cycle")."""
    from transformers import CompressedTensorsConfig

    model, path = _save(tmp_path, WeightScheme(bits, 32, False, False), zero_pattern="cycle")
    hf = _hf(path, quantization_config=CompressedTensorsConfig(dequantize=True))
    _assert_hf_weights_exact(model, hf)
    x = tokens()
    with torch.no_grad():
        # quantkern's reference path dequantizes in fp32, transformers in the fp16 of the scales: the
        # logits differ by that rounding (<= 2**-11 relative per weight) only
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=2e-3, atol=2e-3)


@pytest.mark.xfail(strict=UPSTREAM_ZP_BUG, raises=RuntimeError,
                   reason="upstream: compressed-tensors <= 0.20.1 PackedQuantizationCompressor.compress, on the meta "
                          "tensors transformers builds before loading, packs weight_packed but leaves "
                          "weight_zero_point unpacked [N, G], so the packed [ceil(N*b/32), G] zero points of any "
                          "asymmetric checkpoint (llm-compressor's own included) mismatch; the dequantize=True "
                          "route above loads them")
def test_transformers_default_route_loads_asymmetric_export(tmp_path):
    model, path = _save(tmp_path, WeightScheme(4, 32, False, False))
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(_hf_logits(path, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_checkpoint_from_the_packages_own_compressor(tmp_path, sym):
    """Every tensor written by compressed-tensors' own ``PackedQuantizationCompressor`` (as
    llm-compressor saves): quantkern imports it bit-exactly; transformers' default route loads the
    symmetric one and refuses the asymmetric one exactly as it refuses ours (so the xfail above is not
    ours), and its dequantize=True route rebuilds our weights bit for bit."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file, save_file
    from transformers import CompressedTensorsConfig

    model, path = _save(tmp_path, WeightScheme(4, 32, sym, False), zero_pattern="cycle")
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
    tensors = load_file(str(path / "model.safetensors"))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            qw = m.to_quantized()
            state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scales.t().contiguous(),
                     "weight_zero_point": (qw.zeros.t() - 8).to(torch.int8).contiguous()}
            theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
            for k in [k for k in tensors if k.startswith(name + ".")]:
                del tensors[k]
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in theirs.items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _load_bit_exact(path, model)
    x = tokens()
    if sym:
        with torch.no_grad():
            torch.testing.assert_close(_hf_logits(path, x), model(x).logits, rtol=1e-4, atol=1e-4)
    else:
        if UPSTREAM_ZP_BUG:
            with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
                _hf_logits(path, x)
        _assert_hf_weights_exact(model, _hf(path, quantization_config=CompressedTensorsConfig(dequantize=True)))


def test_export_refuses_ragged_groups_and_act_order(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 48, True, False))
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        save_quantized(model, tmp_path / "x", format="compressed-tensors")
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, True))
    with pytest.raises(ValueError, match="act-order with a permuted g_idx cannot be stored"):
        save_quantized(model, tmp_path / "x", format="compressed-tensors")
    assert not (tmp_path / "x").exists()


def _edit(path, cfg_fn=None, t_fn=None):
    from safetensors.torch import load_file, save_file

    if cfg_fn:
        cfg = json.loads((path / "config.json").read_text())
        cfg_fn(cfg["quantization_config"])
        (path / "config.json").write_text(json.dumps(cfg))
    if t_fn:
        t = load_file(str(path / "model.safetensors"))
        t_fn(t)
        save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("cfg_fn, t_fn, err, match", [
    (lambda q: q.update(colour="red"), None, CheckpointConfigError, r"unknown key\(s\) \['colour'\]"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=9), None, CheckpointConfigError,
     "weights must be int with 2..8 bits"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(bogus=1), None, CheckpointConfigError,
     "invalid compressed-tensors config"),
    (lambda q: q["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"), None, CheckpointConfigError,
     "format 'nvfp4-pack-quantized' is not supported"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int", "dynamic": True,
                                                                        "strategy": "token"}),
     None, CheckpointConfigError, "activation quantization is not supported"),
    (lambda q: q.update(quantization_status="frozen"), None, CheckpointConfigError, "only 'compressed'"),
    (None, lambda t: t[f"{L}.weight_scale"].fill_(float("nan")), CheckpointTensorError,
     rf"{L}\.weight_scale: holds non-finite"),
    (None, lambda t: t.update({f"{L}.weight_shape": torch.tensor([128, 32])}), CheckpointTensorError,
     rf"{L}\.weight_shape: \[128, 32\] does not match"),
    (None, lambda t: t.pop(f"{L}.weight_zero_point"), CheckpointTensorError, rf"{L}\.weight_zero_point: missing"),
    (None, lambda t: t.update({f"{L}.weight_packed": torch.zeros(128, 4, dtype=torch.int32)}), CheckpointTensorError,
     rf"{L}\.weight_packed: shape \(128, 4\)"),
    (None, lambda t: t.update({f"{L}.weight_g_idx": torch.full((64,), 5, dtype=torch.int32)}), CheckpointTensorError,
     rf"{L}\.weight_g_idx: values must lie in \[0, 2\)"),
])
def test_hostile_compressed(tmp_path, cfg_fn, t_fn, err, match):
    _, path = _save(tmp_path, WeightScheme(4, 32, False, False))
    _edit(path, cfg_fn, t_fn)
    with pytest.raises(err, match=match):
        load_quantized(path)


def test_act_order_with_static_groups_exports(tmp_path, token_data):
    import quantkern as qk

    model = tiny_llama()
    qk.GPTQQuantizer(model, bits=4, group_size=32, actorder=True, static_groups=True,
                     verbose=False).quantize(token_data)
    path = save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    loaded = load_quantized(path, backend="reference")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    torch.testing.assert_close(_hf_logits(path, x), model(x).logits, rtol=1e-4, atol=1e-4)

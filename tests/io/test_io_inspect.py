"""inspect_checkpoint / format_inspection: what a checkpoint is, and whether it is consistent."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from fixtures.quant_models import quantize_linears, tiny_llama
from quantkern.core import WeightScheme
from quantkern.io import CheckpointFileError, format_inspection, inspect_checkpoint, save_quantized


@pytest.fixture(scope="module")
def model():
    return quantize_linears(tiny_llama(), WeightScheme(4, 32, False, True), zero_pattern="cycle")


def test_gptq(tmp_path, model):
    info = inspect_checkpoint(save_quantized(model, tmp_path / "g"))
    assert info["format"] == "gptq_v2" and info["consistent"] and info["problems"] == []
    assert (info["bits"], info["group_size"], info["sym"], info["desc_act"]) == (4, 32, False, True)
    assert info["num_quantized_layers"] == 14
    down = next(layer for layer in info["layers"] if layer["name"] == "model.layers.0.mlp.down_proj")
    assert (down["in_features"], down["out_features"], down["groups"]) == (128, 64, 4)
    assert 0 < info["quantized_bytes"] < info["total_bytes"]
    text = format_inspection(info)
    assert "4-bit, group 32, asym, act-order" in text and "consistent: yes" in text


@pytest.mark.parametrize("fmt, expect", [("awq", "awq-gemm"), ("gguf", "gguf"),
                                         ("compressed-tensors", "compressed-tensors (pack-quantized)")])
def test_other_formats(tmp_path, fmt, expect):
    m = quantize_linears(tiny_llama(), WeightScheme(4, 32, False, False))
    path = save_quantized(m, tmp_path / ("m.gguf" if fmt == "gguf" else "m"), format=fmt)
    info = inspect_checkpoint(path)
    assert info["format"] == expect and info["consistent"], info["problems"]
    if fmt == "gguf":
        assert info["tensor_types"] == {"Q4_1": 14, "F32": 6} and info["num_layers"] == 2
        # 14 Q4_1 matrices of 64 x 64 / 64 x 128: 20 bytes per 32 weights; the F32 rest is dense
        weights = sum(q.in_features * q.out_features for q in m.modules() if type(q).__name__ == "QuantLinear")
        assert info["quantized_bytes"] == weights // 32 * 20
        assert info["dense_bytes"] == info["total_bytes"] - info["quantized_bytes"] > 0
    assert info["num_quantized_layers"] == 14
    assert f"format:     {expect}" in format_inspection(info)


def test_inconsistent_checkpoint_is_reported(tmp_path, model):
    path = save_quantized(model, tmp_path / "g")
    t = load_file(str(path / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.scales"] = t["model.layers.1.mlp.up_proj.scales"][:1].contiguous()
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    info = inspect_checkpoint(path)
    assert not info["consistent"]
    want = "model.layers.1.mlp.up_proj.scales: shape [1, 128], expected [2, 128]"
    assert any(p.startswith(want) for p in info["problems"])
    assert "consistent: NO (1 problem(s))" in format_inspection(info)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 9
    (path / "config.json").write_text(json.dumps(cfg))
    info = inspect_checkpoint(path)
    assert any("'bits' must be one of" in p for p in info["problems"])


def test_unreadable_paths(tmp_path):
    with pytest.raises(CheckpointFileError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(CheckpointFileError, match="not a GGUF file"):
        inspect_checkpoint(bad)

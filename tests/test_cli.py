"""The command line on a tiny model saved to disk (no network, no real model)."""

import json

import pytest
import torch

import quantkern as qk
from quantkern.cli import main


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize()
    return qk.save_quantized(tiny_llama, tmp_path / "ckpt")


def test_inspect_and_export(ckpt, tmp_path, capsys):
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["consistent"] is True
    assert main(["export", str(ckpt), "--format", "gptq", "--checkpoint-format", "gptq_v2",
                 "--out", str(tmp_path / "v2")]) == 0
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert cfg["quantization_config"]["checkpoint_format"] == "gptq_v2"
    a, b = qk.load_quantized(ckpt), qk.load_quantized(tmp_path / "v2")
    ids = torch.arange(12)[None]
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) != 0
    assert "error" in capsys.readouterr().err.lower()


def test_quantize_rejects_bad_bits_before_loading(capsys):
    assert main(["quantize", "--model", "/nonexistent-model-dir", "--bits", "9", "--out", "x"]) == 2


def test_device_map_argument(ckpt, capsys):
    from quantkern.devices import parse_device_map

    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {"model.layers.0": 0, "lm_head": "cpu"}
    with pytest.raises(ValueError, match="--device-map must be one of"):
        parse_device_map("[1, 2]")
    with pytest.raises(SystemExit, match="--device-map must be one of"):
        main(["eval", str(ckpt), "--device-map", "fastest"])
    with pytest.raises(SystemExit, match="does not take --device-map"):
        main(["quantize", "--offload", "disk", "--device-map", "auto", "--out", "x"])

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
    assert main(["eval", str(ckpt), "--device-map", "fastest"]) == 2
    assert "--device-map must be one of" in capsys.readouterr().err
    assert main(["quantize", "--offload", "disk", "--device-map", "auto", "--out", "x"]) == 2
    assert "does not take --device-map" in capsys.readouterr().err
    assert main(["quantize", "--method", "awq", "--offload", "disk", "--out", "x"]) == 2
    assert "--method awq runs in memory" in capsys.readouterr().err
    assert main(["quantize", "--method", "smoothquant", "--alpha", "1.5", "--out", "x"]) == 2
    assert "alpha must be a number in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("method,extra,layer", [
    ("awq", ["--bits", "4", "--group-size", "32"], "QuantLinear"),
    ("fp8", ["--fp8-gptq"], "FP8Linear"),
    ("smoothquant", [], "W8A8Linear"),
])
def test_quantize_every_method_end_to_end(tiny_llama, tmp_path, monkeypatch, method, extra, layer):
    # the CLI loads models by name: serve the tiny model and a byte-level tokenizer stand-in
    import quantkern.models

    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": torch.tensor([list(text.encode()[:4096])]) % 256}

        def save_pretrained(self, path):
            pass

    monkeypatch.setattr(quantkern.models, "load_model", lambda name, device="cpu", **kw: (tiny_llama, Tok()))
    out = tmp_path / method
    assert main(["quantize", "--model", "tiny", "--method", method, "--nsamples", "4", "--seq-len", "32",
                 "--out", str(out), *extra]) == 0
    loaded = qk.load_quantized(out)
    assert type(loaded.model.layers[1].mlp.down_proj).__name__ == layer
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tiny_llama(ids).logits, rtol=1e-3, atol=1e-3)

"""A format that cannot hold the quantized model is refused before calibration (``quantize(...,
export_format=...)``, ``quantize --format``), with every offending layer named; and the plan checked
then is the model that comes out (the same rules run again at save time on the real layers)."""

from __future__ import annotations

import pytest
import torch

import quantkern as qk
from quantkern.api.base import BaseQuantizer
from quantkern.calibration import group_batches, normalize_calibration_data
from quantkern.cli import main
from quantkern.io.export_rules import model_layer_plans


@pytest.fixture
def no_calibration(monkeypatch):
    """Any calibration forward fails the test: the refusals below must come before it."""
    def boom(self, batches):
        raise AssertionError("calibration started")

    monkeypatch.setattr(BaseQuantizer, "calibrate", boom)


def _untouched(model):
    assert "forward" not in model.__dict__  # no InputCatcher / observer wrapper left behind
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())


@pytest.mark.parametrize("cls, kw, fmt, match", [
    (qk.GPTQQuantizer, dict(bits=4, group_size=48), "compressed-tensors",
     r"model\.layers\.\*\.self_attn\.q_proj \(2x\), .*: group_size=48 does not divide in_features=64(.|\n)*"
     r"quantize with group_size 16 or 32 or 64 \(divides every in_features: \[64, 128\]\)"),
    (qk.GPTQQuantizer, dict(bits=4, group_size=32, actorder=True), "compressed-tensors",
     "act-order with a permuted g_idx cannot be stored"),
    (qk.GPTQQuantizer, dict(bits=8, group_size=32), "awq", "AWQ GEMM stores 4-bit weights only, not 8-bit"),
    (qk.GPTQQuantizer, dict(bits=4, group_size=32, actorder=True), "awq", "AWQ GEMM has no g_idx"),
    (qk.AWQQuantizer, dict(bits=4, group_size=32, overrides={"*.down_proj": {"group_size": 64}}), "awq",
     r"AWQ stores one group_size for the whole model; the layers use \[32, 64\]"),
    (qk.W8A8Quantizer, dict(), "gptq", r"model\.layers\.\*\.self_attn\.q_proj \(2x\), .* is a W8A8Linear: "
                                       "format 'gptq' cannot store it; save with format='compressed-tensors'"),
    (qk.PTQQuantizer, dict(weight_dtype="float8_e4m3fn", act_dtype="float8_e4m3fn"), "awq", "is a FP8Linear"),
    (qk.ZeroQuantQuantizer, dict(), "compressed-tensors", "is a ZeroQuantLinear"),
])
def test_refused_before_calibration(tiny_llama, token_data, no_calibration, cls, kw, fmt, match):
    q = cls(tiny_llama, verbose=False, **kw)
    with pytest.raises(ValueError, match=match):
        q.quantize(token_data, export_format=fmt)
    _untouched(tiny_llama)


def test_gguf_architecture_refused_before_calibration(tiny_llama, token_data, no_calibration):
    tiny_llama.config.model_type = "mistral"
    with pytest.raises(ValueError, match="GGUF export supports the llama architecture, got 'mistral'"):
        qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(token_data, export_format="gguf")
    with pytest.raises(ValueError, match="format must be one of"):
        qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(export_format="onnx")


def test_prepare_door_checks_the_format_too(tiny_llama):
    with pytest.raises(ValueError, match="AWQ GEMM stores 4-bit weights only, not 8-bit"):
        qk.prepare(tiny_llama, qk.GPTQConfig(bits=8, group_size=32), export_format="awq")
    _untouched(tiny_llama)
    model = qk.prepare(tiny_llama, qk.GPTQConfig(bits=4, group_size=32), export_format="awq")
    assert "forward" in model.__dict__  # prepared: the input catcher is in place


def test_failed_check_leaves_the_model_quantizable(tiny_llama, token_data):
    q = qk.GPTQQuantizer(tiny_llama, bits=4, group_size=48, verbose=False)
    with pytest.raises(ValueError):
        q.quantize(token_data, export_format="awq")
    _untouched(tiny_llama)
    qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(token_data, export_format="awq")
    assert type(tiny_llama.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"


@pytest.mark.parametrize("cls, kw, fmt", [
    (qk.RTNQuantizer, dict(bits=3, group_size=32, sym=False), "gptq"),
    (qk.GPTQQuantizer, dict(bits=4, group_size=32, actorder=True, static_groups=True), "compressed-tensors"),
    (qk.GPTQQuantizer, dict(bits=4, group_size=32, actorder=True, static_groups=True), "awq"),
    (qk.AWQQuantizer, dict(bits=4, group_size=32, overrides={"*.down_proj": {"bits": 8}}), "gptq"),
    (qk.FP8Quantizer, dict(), "compressed-tensors"),
    (qk.PTQQuantizer, dict(), "compressed-tensors"),
])
def test_the_plan_is_what_comes_out(tiny_llama, token_data, tmp_path, cls, kw, fmt):
    q = cls(tiny_llama, verbose=False, **kw)
    q.prepare(export_format=fmt)
    planned = {name: q.layer_plan(name, lin) for name, lin in q.plan.quantize.items()}
    if q.needs_data:
        q.calibrate(group_batches(normalize_calibration_data(token_data), 4))
    q.convert()
    assert model_layer_plans(tiny_llama) == planned
    path = qk.save_quantized(tiny_llama, tmp_path / "out", format=fmt)  # and the format takes it
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(qk.load_quantized(path)(ids).logits, tiny_llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_refuses_the_format_before_calibration(cli_serves_tiny_llama, tmp_path, capsys, no_calibration):
    assert main(["quantize", "--model", "tiny", "--method", "gptq", "--group-size", "48", "--format",
                 "compressed-tensors", "--nsamples", "2", "--seq-len", "16", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "group_size=48 does not divide in_features=64" in err and "quantize with group_size 16 or 32 or 64" in err
    assert not (tmp_path / "o").exists()

"""compressed-tensors "int-quantized" (W8A8 int8) and "float-quantized" (fp8) export / import,
loaded back by quantkern and by transformers' compressed-tensors integration."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")

from fixtures.quant_models import quantize_linears, tiny_llama, tokens  # noqa: E402
from quantkern.core import WeightScheme  # noqa: E402
from quantkern.io import CheckpointConfigError, CheckpointTensorError, load_quantized, save_quantized  # noqa: E402
from quantkern.nn import QuantLinear  # noqa: E402
from quantkern.nn.fp8_linear import FP8Linear  # noqa: E402
from quantkern.nn.w8a8_linear import W8A8Linear  # noqa: E402

L = "model.layers.0.mlp.up_proj"
MAKERS = {
    "w8a8-dynamic": lambda lin: W8A8Linear.from_linear(lin),
    "w8a8-static": lambda lin: W8A8Linear.from_linear(lin, input_scale=0.05),  # ~no clamping
    "fp8-weight-only": lambda lin: FP8Linear.from_linear(lin, act="none"),
    "fp8-dynamic": lambda lin: FP8Linear.from_linear(lin, act="dynamic"),
    "fp8-static": lambda lin: FP8Linear.from_linear(lin, act="static", input_scale=0.01),
}


def convert(model, make, only=None):
    for name, lin in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]:
        if only and only not in name:
            continue
        q = make(lin)
        q.name = name
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return model


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_roundtrip_and_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model = convert(tiny_llama(), MAKERS[kind])
    path = save_quantized(model, tmp_path / kind, format="compressed-tensors")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ("int-quantized" if kind.startswith("w8a8") else "float-quantized")
    g = qc["config_groups"]["group_0"]
    assert g["weights"]["num_bits"] == 8 and g["weights"]["strategy"] == "channel"
    assert (g["input_activations"] is None) == (kind == "fp8-weight-only")
    loaded = load_quantized(path)
    m, lm = model.get_submodule(L), loaded.get_submodule(L)
    assert type(lm) is type(m)
    for buf in ("weight", "weight_scale", "input_scale"):
        a, b = getattr(m, buf), getattr(lm, buf)
        assert (a is None and b is None) or torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                                        b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(loaded(x).logits, ref)
        hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        out = hf(x).logits
    # transformers fake-quantizes activations on its own (rounding of the per-token / static scales
    # may differ by one step): fp tolerance for fp8, a relative-norm bound for int8 activations
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (1e-2 if kind.startswith("w8a8") else 1e-5), rel


def test_mixed_formats(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False), skip=("lm_head", "mlp"))
    convert(model, MAKERS["w8a8-dynamic"], only="mlp")
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            m.backend = "reference"  # what load_quantized(backend="reference") gives the W8A8 layers
    path = save_quantized(model, tmp_path / "mixed", format="compressed-tensors")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    loaded = load_quantized(path, backend="reference")
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, QuantLinear)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, W8A8Linear)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def _save_edit(tmp_path, kind, cfg_fn=None, t_fn=None):
    from safetensors.torch import load_file, save_file

    path = save_quantized(convert(tiny_llama(), MAKERS[kind]), tmp_path / kind, format="compressed-tensors")
    if cfg_fn:
        cfg = json.loads((path / "config.json").read_text())
        cfg_fn(cfg["quantization_config"]["config_groups"]["group_0"])
        (path / "config.json").write_text(json.dumps(cfg))
    if t_fn:
        t = load_file(str(path / "model.safetensors"))
        t_fn(t)
        save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("kind, cfg_fn, t_fn, err, match", [
    ("w8a8-static", None, lambda t: t.pop(f"{L}.input_scale"), CheckpointTensorError, rf"{L}\.input_scale: missing"),
    ("w8a8-static", None, lambda t: t[f"{L}.input_scale"].fill_(-1), CheckpointTensorError,
     rf"{L}\.input_scale: holds values <= 0"),
    ("w8a8-dynamic", None, lambda t: t.update({f"{L}.weight": t[f"{L}.weight"].float()}), CheckpointTensorError,
     rf"{L}\.weight: dtype torch.float32"),
    ("w8a8-dynamic", None, lambda t: t[f"{L}.weight_scale"].fill_(float("inf")), CheckpointTensorError,
     rf"{L}\.weight_scale: holds non-finite"),
    ("fp8-dynamic", None, lambda t: t[f"{L}.weight"].view(torch.uint8).fill_(0x7F), CheckpointTensorError,
     rf"{L}\.weight: holds NaN fp8 codes"),
    ("w8a8-dynamic", lambda g: g["input_activations"].update(symmetric=False), None, CheckpointConfigError,
     "activations must be 8-bit int symmetric"),
    ("w8a8-dynamic", lambda g: g.update(input_activations=None), None, CheckpointConfigError,
     r"W8A16 int\) are not supported"),
    ("fp8-dynamic", lambda g: g["weights"].update(strategy="tensor"), None, CheckpointConfigError,
     "must be 8-bit float, symmetric, per channel"),
    ("fp8-dynamic", lambda g: g["input_activations"].update(strategy="tensor"), None, CheckpointConfigError,
     "per-token dynamic or per-tensor static"),
])
def test_hostile(tmp_path, kind, cfg_fn, t_fn, err, match):
    path = _save_edit(tmp_path, kind, cfg_fn, t_fn)
    with pytest.raises(err, match=match):
        load_quantized(path)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "gguf"])
def test_other_formats_refuse_w8a8_and_fp8(tmp_path, fmt):
    model = convert(tiny_llama(), MAKERS["fp8-dynamic"], only="mlp")
    quantize_linears(model, WeightScheme(4, 32, True, False))
    with pytest.raises(ValueError, match=rf"model\.layers\.\*\.mlp\.gate_proj \(2x\), .* is a FP8Linear: format "
                                         rf"'{fmt}' cannot store it; save with format='compressed-tensors'"):
        save_quantized(model, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()


def test_inspect_w8a8(tmp_path):
    from quantkern.io import format_inspection, inspect_checkpoint

    path = save_quantized(convert(tiny_llama(), MAKERS["w8a8-static"]), tmp_path / "w", format="compressed-tensors")
    info = inspect_checkpoint(path)
    assert info["consistent"] and info["num_quantized_layers"] == 14
    down = next(layer for layer in info["layers"] if layer["name"] == "model.layers.1.mlp.down_proj")
    assert (down["in_features"], down["out_features"], down["static_activations"]) == (128, 64, True)
    assert "int8 channel sym, activations int8 static per-tensor" in format_inspection(info)


def test_unsupported_layer_type_is_refused(tmp_path):
    from quantkern.nn.fp4_linear import FP4Linear

    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False), skip=("lm_head", "down_proj"))
    model.model.layers[1].mlp.down_proj = FP4Linear(128, 64)
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ValueError, match=rf"model\.layers\.1\.mlp\.down_proj is a FP4Linear: format '{fmt}'"):
            save_quantized(model, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()

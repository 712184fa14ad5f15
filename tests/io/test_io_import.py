"""Import of checkpoints written by other tools (AutoGPTQ v1, GPTQModel v2, AutoAWQ GEMM) and
export -> import round trips between formats, bit-exact on the packed tensors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fixtures.foreign import autoawq_pack, autogptq_pack_cols, autogptq_pack_rows, write_hf_checkpoint
from fixtures.quant_models import quantize_linears, rtn_weight, tiny_llama, tokens
from quantkern.core import WeightScheme
from quantkern.io import CheckpointConfigError, CheckpointTensorError, load_quantized, save_quantized
from quantkern.nn import QuantLinear


def _foreign(tmp_path, fmt, scheme, zero_pattern="rtn", bias=False):
    """A dense tiny Llama, its Linears quantized by RTN, written in ``fmt`` by the independent packers.
    Returns the checkpoint path, the dense model with the dequantized weights and the codes."""
    model = tiny_llama()
    if bias:
        model.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(64) * 0.1)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    codes = {}
    gen = torch.Generator().manual_seed(0)
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear) or name == "lm_head":
            continue
        qw = rtn_weight(lin.weight.detach(), scheme, torch.float16, gen, zero_pattern)
        codes[name] = qw
        del sd[f"{name}.weight"]
        if fmt == "awq":
            sd[f"{name}.qweight"] = autoawq_pack(qw.codes.t())
            sd[f"{name}.qzeros"] = autoawq_pack(qw.zeros)
        else:
            z = qw.zeros - 1 if fmt == "gptq" else qw.zeros  # v1 stores zero - 1
            sd[f"{name}.qweight"] = autogptq_pack_rows(qw.codes.t(), scheme.bits)
            sd[f"{name}.qzeros"] = autogptq_pack_cols(z & scheme.maxq, scheme.bits)
            sd[f"{name}.g_idx"] = qw.g_idx
        sd[f"{name}.scales"] = qw.scales
        with torch.no_grad():
            lin.weight.copy_(qw.dequantize(torch.float32))
    if fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": None}
    else:
        # the keys AutoGPTQ / transformers' GPTQConfig write, informational ones included
        qc = {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
              "desc_act": scheme.act_order, "sym": scheme.sym, "damp_percent": 0.01, "static_groups": False,
              "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
              "checkpoint_format": fmt, "tokenizer": None, "dataset": None, "use_exllama": True,
              "cache_block_outputs": True, "modules_in_block_to_quantize": None, "batch_size": 1}
    path = write_hf_checkpoint(tmp_path / f"foreign-{fmt}", model, sd, qc)
    return path, model, codes


def _check_import(path, dense, codes):
    loaded = load_quantized(path, backend="reference")
    for name, qw in codes.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, QuantLinear)
        back = m.to_quantized()
        assert torch.equal(back.codes, qw.codes), name
        assert torch.equal(back.zeros, qw.zeros), name
        assert torch.equal(back.scales, qw.scales), name
    x = tokens()
    with torch.no_grad():
        ref, out = dense(x).logits, loaded(x).logits
    # the dense model holds the same dequantized weights in fp32; only the matmul order differs
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    return loaded


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_import_autogptq_layout(tmp_path, bits, fmt):
    sym = fmt == "gptq"  # v1 cannot hold a zero of 0: asymmetric "cycle" zeros only in v2
    path, dense, codes = _foreign(tmp_path, fmt, WeightScheme(bits, 32, sym, bits == 4),
                                  zero_pattern="rtn" if sym else "cycle")
    _check_import(path, dense, codes)


def test_import_autoawq_layout(tmp_path):
    path, dense, codes = _foreign(tmp_path, "awq", WeightScheme(4, 32, False, False), zero_pattern="cycle")
    _check_import(path, dense, codes)


def test_import_awq_with_bias(tmp_path):
    path, dense, codes = _foreign(tmp_path, "awq", WeightScheme(4, 16, False, False), bias=True)
    loaded = _check_import(path, dense, codes)
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("zero_pattern", ["rtn", "cycle"])
def test_gptq_awq_gptq_bit_exact(tmp_path, zero_pattern):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, False, False), zero_pattern=zero_pattern)
    a = load_quantized(save_quantized(model, tmp_path / "awq", format="awq"), backend="reference")
    g = load_quantized(save_quantized(a, tmp_path / "gptq", checkpoint_format="gptq_v2"), backend="reference")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for buf in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(getattr(g.get_submodule(name), buf), getattr(m, buf)), f"{name}.{buf}"
    x = tokens()
    with torch.no_grad():
        assert torch.equal(g(x).logits, model(x).logits)
        assert torch.equal(a(x).logits, model(x).logits)
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert cfg == {**cfg, "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    assert json.loads((tmp_path / "awq" / "quant_config.json").read_text())["version"] == "GEMM"


def test_awq_export_refuses_unrepresentable(tmp_path):
    for scheme, match in [(WeightScheme(8, 32, True, False), "4-bit weights only"),
                          (WeightScheme(4, 32, True, True), "act-order"),
                          (WeightScheme(4, 48, True, False), "does not divide")]:
        model = quantize_linears(tiny_llama(), scheme)
        with pytest.raises(ValueError, match=match):
            save_quantized(model, tmp_path / "x", format="awq")
    mixed = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False),
                             schemes={"mlp": WeightScheme(4, 16, True, False)})
    with pytest.raises(ValueError, match=r"one group_size for the whole model; the layers use \[16, 32\]"):
        save_quantized(mixed, tmp_path / "x", format="awq")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("edit, err, match", [
    (lambda q, t: q.update(version="gemv"), CheckpointConfigError, "only 'gemm' is"),
    (lambda q, t: q.update(bits=8), CheckpointConfigError, r"'bits' must be one of \(4,\)"),
    (lambda q, t: q.update(w_bit=4), CheckpointConfigError, r"unknown key\(s\) \['w_bit'\]"),
    (lambda q, t: t.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(64, 8, dtype=torch.int32)}),
     CheckpointTensorError,
     r"model\.layers\.0\.mlp\.up_proj\.qweight: shape \(64, 8\) does not match the config, expected \(64, 16\)"),
    (lambda q, t: t["model.layers.1.mlp.up_proj.scales"].fill_(float("nan")),
     CheckpointTensorError, r"model\.layers\.1\.mlp\.up_proj\.scales: holds non-finite"),
])
def test_awq_hostile(tmp_path, edit, err, match):
    from safetensors.torch import load_file, save_file

    path, _, _ = _foreign(tmp_path, "awq", WeightScheme(4, 32, False, False))
    cfg = json.loads((path / "config.json").read_text())
    t = load_file(str(path / "model.safetensors"))
    edit(cfg["quantization_config"], t)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(err, match=match):
        load_quantized(path)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_foreign_checkpoint_through_from_pretrained(tmp_path, fmt):
    """Another tool's checkpoint (AutoGPTQ v1 act-order, AutoAWQ GEMM with a bias) through
    transformers' from_pretrained with QuantkernConfig: the codes load_quantized reads, the same logits."""
    from transformers import AutoModelForCausalLM

    import quantkern.hf  # noqa: F401  (registers the method)

    scheme = WeightScheme(4, 32, fmt == "gptq", fmt == "gptq")
    path, dense, codes = _foreign(tmp_path, fmt, scheme, bias=fmt == "awq")
    got = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantkern.hf.QuantkernConfig(backend="reference"))
    for name, qw in codes.items():
        back = got.get_submodule(name).to_quantized()
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros), name
    x = tokens()
    with torch.no_grad():
        assert torch.equal(got(x).logits, load_quantized(path, backend="reference")(x).logits)

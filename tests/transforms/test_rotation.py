"""Offline rotations (issue #20): Hadamard constructions, equivalence of the rotated dense model on every
supported family (tied and untied), refusals, and standard checkpoints of rotated + quantized models."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import quantkern as qk
from quantkern.core.hadamard import hadamard_matrix, random_rotation
from quantkern.transforms import SUPPORTED_MODEL_TYPES, RotationError, rotate


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 40, 44, 48, 64, 80, 96, 128, 576, 896, 1536])
def test_hadamard_matrix(n):
    h = hadamard_matrix(n)
    assert h is not None and h.dtype == torch.float64 and torch.all(h.abs() == 1)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 30, 52])
def test_no_hadamard_falls_back_to_random_orthogonal(n, caplog):
    assert hadamard_matrix(n) is None
    with caplog.at_level(logging.WARNING, logger="quantkern"):
        q, kind = random_rotation(n, torch.Generator().manual_seed(0), "test")
    assert kind == "orthogonal" and f"no Hadamard matrix of size {n}" in caplog.text
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_random_hadamard_is_orthogonal_and_seeded():
    a, kind = random_rotation(576, torch.Generator().manual_seed(3))
    b, _ = random_rotation(576, torch.Generator().manual_seed(3))
    c, _ = random_rotation(576, torch.Generator().manual_seed(4))
    assert kind == "hadamard" and torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a @ a.T, torch.eye(576, dtype=torch.float64), atol=1e-12, rtol=0)


def _config(family: str, tie: bool, hidden=64, heads=4, kv=2, head_dim=None):
    import transformers as tf

    common = dict(hidden_size=hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=128, tie_word_embeddings=tie, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if head_dim is not None:
        common["head_dim"] = head_dim
    if family == "llama":
        return tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=8)
    if family == "qwen2":
        return tf.Qwen2Config(**common)  # q/k/v biases
    if family == "qwen3":
        return tf.Qwen3Config(**{**common, "head_dim": head_dim or 32})  # q_norm / k_norm per head
    if family == "smollm3":
        return tf.SmolLM3Config(**common, no_rope_layer_interval=2)
    if family == "granite":
        return tf.GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0,
                                attention_multiplier=0.2)
    raise AssertionError(family)


def _randomise(model, seed=0):
    """Norm weights and biases away from their init (ones / zeros), so that fusing them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _model(family, tie, randomise=True, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(_config(family, tie, **kw)).eval()
    return _randomise(m) if randomise else m


def _tokens():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_rotated_model_is_equivalent(family, tie):
    model = _model(family, tie)
    x = _tokens()
    ref = _logits(model, x)
    rotate(model, seed=1)
    out = _logits(model, x)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    for name, p in model.named_parameters():
        if "norm" in name and "q_norm" not in name and "k_norm" not in name:
            assert torch.all(p == 1), name
    # the weights really moved (not an identity rotation)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight,
                              _model(family, tie).model.layers[0].self_attn.v_proj.weight)
    assert model.config.quantkern_rotation["residual"] == "hadamard"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_non_power_of_two_sizes(family):
    # hidden 48 = 4 x 12, head_dim 12 / 24: Paley factors
    model = _model(family, True, hidden=48, heads=4, kv=2, head_dim=12 if family == "llama" else 24)
    x = _tokens()
    ref = _logits(model, x)
    rotate(model)
    torch.testing.assert_close(_logits(model, x), ref, atol=2e-4, rtol=1e-4)
    assert model.config.quantkern_rotation["residual"] == "hadamard"
    assert model.config.quantkern_rotation["heads"] == "hadamard"


def test_sizes_without_hadamard_use_orthogonal(caplog):
    model = _model("llama", False, hidden=30, heads=3, kv=1)  # 30 and head_dim 10: no Hadamard matrix
    x = _tokens()
    ref = _logits(model, x)
    with caplog.at_level(logging.WARNING, logger="quantkern"):
        rotate(model)
    assert "no Hadamard matrix of size 30" in caplog.text and "no Hadamard matrix of size 10" in caplog.text
    torch.testing.assert_close(_logits(model, x), ref, atol=2e-4, rtol=1e-4)
    assert model.config.quantkern_rotation["residual"] == "orthogonal"


def test_tied_embeddings_kept_when_the_final_norm_is_ones(caplog):
    model = _model("llama", True, randomise=False)  # init: every norm weight is 1
    x = _tokens()
    ref = _logits(model, x)
    with caplog.at_level(logging.WARNING, logger="quantkern"):
        rotate(model)
    assert "untied" not in caplog.text
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(_logits(model, x), ref, atol=2e-4, rtol=1e-4)


def test_tied_embeddings_untied_when_the_final_norm_is_not_ones(caplog):
    model = _model("llama", True)
    with caplog.at_level(logging.WARNING, logger="quantkern"):
        rotate(model)
    assert "lm_head is untied" in caplog.text
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # what loaders do: must not re-tie
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_without_head_rotation():
    model = _model("qwen2", False)
    v0 = model.model.layers[0].self_attn.v_proj.weight.clone()
    x = _tokens()
    ref = _logits(model, x)
    rotate(model, heads=False)
    torch.testing.assert_close(_logits(model, x), ref, atol=2e-4, rtol=1e-4)
    assert model.config.quantkern_rotation["heads"] is None
    assert not torch.equal(model.model.layers[0].self_attn.v_proj.weight, v0)  # residual rotation only


def test_bfloat16_model_stays_bfloat16():
    model = _model("llama", False).to(torch.bfloat16)
    x = _tokens()
    ref = _logits(model, x).float()
    rotate(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = _logits(model, x).float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_unsupported_family_refused_naming_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match="model_type='gpt2' is not supported"):
        qk.rotate(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantized_model_refused(tiny_llama):
    qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize()
    with pytest.raises(RotationError, match="rotate before quantizing|already quantized"):
        qk.rotate(tiny_llama)


def test_rotation_spreads_outlier_columns():
    """The point of it all: a weight with a few large input columns (outlier features) quantizes badly in
    groups; rotated (``W Q``, same Frobenius norm) its RTN W3 error is much smaller."""
    from quantkern.algorithms.rtn import quantize_rtn
    from quantkern.core import WeightScheme

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 576, generator=g, dtype=torch.float64)
    w[:, [7, 100, 300]] *= 25
    q, _ = random_rotation(576, g)
    scheme = WeightScheme(3, 64, True, False)
    err = [float((quantize_rtn(m.float(), scheme, torch.float32).dequantize().double() - m).norm() / m.norm())
           for m in (w, w @ q)]
    assert err[1] < 0.75 * err[0]


def test_gptq_checkpoint_of_a_rotated_model_is_standard(tmp_path, token_data):
    """save_quantized after GPTQ of a rotated tiny model: an ordinary GPTQ checkpoint of an ordinary model
    (lm_head untied, norms 1); load_quantized gives the same logits."""
    model = _randomise(_model("llama", True, randomise=False))
    x = _tokens()
    rotate(model)
    qk.GPTQQuantizer(model, bits=4, group_size=32, actorder=True, verbose=False, use_triton=False).quantize(
        [t % 128 for t in token_data])
    ref = _logits(model, x)
    path = qk.save_quantized(model, tmp_path / "gptq")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["tie_word_embeddings"] is False
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["quantkern_rotation"]["residual"] == "hadamard"
    loaded = qk.load_quantized(path, backend="reference")
    torch.testing.assert_close(_logits(loaded, x), ref, atol=1e-4, rtol=1e-4)


def test_compressed_tensors_checkpoint_of_a_rotated_model_loads_in_transformers(tmp_path, token_data):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = _model("qwen2", True)
    x = _tokens()
    rotate(model)
    qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False, use_triton=False).quantize(
        [t % 128 for t in token_data])
    ref = _logits(model, x)
    path = qk.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    torch.testing.assert_close(_logits(hf, x), ref, atol=2e-3, rtol=1e-3)


class _Tok:
    def __call__(self, text, **kw):
        return {"input_ids": torch.tensor([list(text.encode()[:4096])]) % 128}

    def save_pretrained(self, path):
        pass


def test_cli_quantize_rotate(tmp_path, monkeypatch):
    import quantkern.models
    from quantkern.cli import main

    model = _model("llama", True)
    x = _tokens()
    ref = _logits(model, x)
    monkeypatch.setattr(quantkern.models, "load_model", lambda name, device="cpu", **kw: (model, _Tok()))
    out = tmp_path / "rot"
    assert main(["quantize", "--model", "tiny", "--method", "rtn", "--bits", "8", "--group-size", "32", "--rotate",
                 "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantkern_rotation"]["seed"] == 0 and cfg["tie_word_embeddings"] is False
    loaded = qk.load_quantized(out)
    torch.testing.assert_close(_logits(loaded, x), ref, atol=0.05, rtol=0.05)  # W8: close to the original


def test_cli_quantize_rotate_refuses_unsupported(tmp_path, monkeypatch, capsys):
    import quantkern.models
    from quantkern.cli import main
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128)).eval()
    monkeypatch.setattr(quantkern.models, "load_model", lambda name, device="cpu", **kw: (model, _Tok()))
    assert main(["quantize", "--model", "tiny", "--method", "rtn", "--rotate", "--out", str(tmp_path / "x")]) != 0
    assert "model_type='gpt2' is not supported" in capsys.readouterr().err

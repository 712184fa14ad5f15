"""quantkern inside transformers' from_pretrained (issue #17): a dense checkpoint quantized on load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import quantkern as qk


@pytest.fixture
def dense_dir(tiny_llama, tmp_path):
    path = tmp_path / "dense"
    tiny_llama.save_pretrained(path)
    return path


def _load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.hf.QuantkernConfig(**kw))


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32),
                                dict(bits=3, group_size=-1, sym=False, mse=True, skip_layers=["lm_head", "*.v_proj"],
                                     overrides={"*.down_proj": {"bits": 8, "group_size": 64}})])
def test_on_the_fly_equals_rtn_quantizer(tiny_llama, dense_dir, kw):
    model = _load(dense_dir, **kw)
    ref = qk.RTNQuantizer(copy.deepcopy(tiny_llama), verbose=False, **kw).quantize()
    got = {n: m for n, m in model.named_modules() if isinstance(m, qk.QuantLinear)}
    want = {n: m for n, m in ref.named_modules() if isinstance(m, qk.QuantLinear)}
    assert got.keys() == want.keys() and got
    for name, m in want.items():
        o = got[name]
        assert dict(o.named_parameters()) == {} and (o.bits, o.group_size, o.sym) == (m.bits, m.group_size, m.sym)
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(o, t), getattr(m, t)), (name, t)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    out = model.generate(x[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 13)


def test_written_with_save_quantized_and_refusals(dense_dir, tmp_path):
    model = _load(dense_dir, bits=4, group_size=32)
    qk.save_quantized(model, tmp_path / "ck")
    back = qk.load_quantized(tmp_path / "ck")
    x = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="bits"):
        qk.hf.QuantkernConfig(bits=9)
    with pytest.raises(ValueError, match="unknown settings"):
        qk.hf.QuantkernConfig(bitz=4)
    with pytest.raises(ValueError, match="group_size=128"):
        _load(dense_dir, bits=4, group_size=128)  # larger than v_proj's in_features: refused, named
    cfg = qk.hf.QuantkernConfig(bits=2, group_size=64, overrides={"*.q_proj": {"bits": 8}})
    assert qk.hf.QuantkernConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="quantized with 'bitsandbytes'"):
        qk.hf.QuantkernConfig.for_checkpoint({"quant_method": "bitsandbytes"}, qk.hf.QuantkernConfig())


# ------------------------------------------------------------------ pre-quantized checkpoints (load)
def _quantized(kind, tiny_llama):
    """A quantized copy of ``tiny_llama`` (or a tiny Qwen3-MoE) and the format to save it in."""
    from fixtures.quant_models import tokens

    from quantkern.nn.fp8_linear import FP8Linear
    from quantkern.nn.w8a8_linear import W8A8Linear

    m = copy.deepcopy(tiny_llama)
    data = [tokens(batch=1, seq=32, seed=i)[0] for i in range(4)]
    if kind in ("gptq", "gptq_v2"):
        qk.GPTQQuantizer(m, bits=4, group_size=32, actorder=True, sym=False, verbose=False).quantize(data)
        return m, dict(format="gptq", checkpoint_format=None if kind == "gptq" else "gptq_v2")
    if kind == "gptq-3bit-mixed":
        qk.RTNQuantizer(m, bits=3, group_size=-1, sym=False, verbose=False,
                        overrides={"*.down_proj": {"bits": 8, "group_size": 64}}).quantize()
        return m, dict(format="gptq")
    if kind == "awq":
        qk.AWQQuantizer(m, bits=4, group_size=32, verbose=False).quantize(data)
        return m, dict(format="awq")
    if kind == "compressed":
        qk.GPTQQuantizer(m, bits=4, group_size=32, actorder=True, static_groups=True, verbose=False).quantize(data)
        return m, dict(format="compressed-tensors")
    if kind in ("w8a8", "fp8"):
        for name, lin in [(n, x) for n, x in m.named_modules() if type(x) is torch.nn.Linear and n != "lm_head"]:
            q = W8A8Linear.from_linear(lin, input_scale=0.05) if kind == "w8a8" else \
                FP8Linear.from_linear(lin, act="dynamic")
            q.name = name
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, q)
        return m, dict(format="compressed-tensors")
    assert kind in ("moe", "moe-compressed")
    from api.test_moe import calib, tiny_moe

    m = tiny_moe("qwen3_moe" if kind == "moe" else "mixtral")  # (Mixtral: block_sparse_moe in its checkpoints)
    ct = kind == "moe-compressed"
    qk.GPTQQuantizer(m, bits=4, group_size=32, actorder=True, static_groups=ct, verbose=False,
                     use_triton=False).quantize(calib(8))
    return m, dict(format="compressed-tensors" if ct else "gptq")


KINDS = ["gptq", "gptq_v2", "gptq-3bit-mixed", "awq", "compressed", "w8a8", "fp8", "moe", "moe-compressed"]


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_loads_quantized_checkpoints_like_load_quantized(kind, tiny_llama, tmp_path):
    """GPTQ v1 / v2, AWQ, compressed-tensors (int weight-only, W8A8, fp8) and MoE experts come up in
    quantkern modules, the same ones load_quantized builds, with identical logits."""
    from transformers import AutoModelForCausalLM

    model, save = _quantized(kind, tiny_llama)
    path = qk.save_quantized(model, tmp_path / kind, **save)
    ref = qk.load_quantized(path)
    got = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.hf.QuantkernConfig())
    kinds = {n: type(m) for n, m in ref.named_modules()}
    assert {n: type(m) for n, m in got.named_modules()} == kinds
    assert any(t.__module__.startswith("quantkern.") for t in kinds.values())
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(got(x).logits, ref(x).logits)
        assert torch.equal(got(x).logits, model(x).logits)
    assert got.generate(x[:1], max_new_tokens=3, do_sample=False).shape == (1, 12)
    assert got.config.quantization_config.to_dict() == json.loads((path / "config.json").read_text())["quantization_config"]

    # save_pretrained writes the checkpoint save_quantized writes (the same tensor bytes)
    got.save_pretrained(tmp_path / "hf")
    again = qk.load_quantized(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref(x).logits)


def test_save_pretrained_writes_the_save_quantized_checkpoint(dense_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _load(dense_dir, bits=4, group_size=32, sym=False)
    model.save_pretrained(tmp_path / "hf")
    qk.save_quantized(model, tmp_path / "qk")
    a, b = (tmp_path / "hf" / "model.safetensors").read_bytes(), (tmp_path / "qk" / "model.safetensors").read_bytes()
    assert a == b
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "qk"))
    assert ca["quantization_config"] == cb["quantization_config"] and ca["quantization_config"]["quant_method"] == "gptq"
    x = torch.randint(0, 256, (1, 7))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=qk.hf.QuantkernConfig())
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
        assert torch.equal(qk.load_quantized(tmp_path / "hf")(x).logits, model(x).logits)


def test_pre_quantized_dtype_and_device_map(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, save = _quantized("gptq", tiny_llama)
    path = qk.save_quantized(model, tmp_path / "ck", **save)
    cfg = qk.hf.QuantkernConfig(backend="reference")
    bf = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu")
    assert bf.model.embed_tokens.weight.dtype == torch.bfloat16
    q = bf.model.layers[0].self_attn.q_proj
    assert isinstance(q, qk.QuantLinear) and q.backend is qk.Backend.REFERENCE and q.qweight.device.type == "cpu"
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        a, b = bf(x).logits.float(), model(x).logits
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.1 * b.abs().max()


@pytest.mark.model
def test_smollm2_on_the_fly(tmp_path):
    from quantkern.models import load_model

    from safetensors.torch import save_file

    dense, _ = load_model("smollm2")  # (a GGUF file dequantized by transformers: written back as safetensors)
    cfg = copy.deepcopy(dense.config)
    del cfg.quantization_config
    cfg.save_pretrained(tmp_path / "dense")
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items() if k not in tied},
              str(tmp_path / "dense" / "model.safetensors"), metadata={"format": "pt"})
    model = _load(tmp_path / "dense", bits=4, group_size=64)
    ref = qk.RTNQuantizer(dense, bits=4, group_size=64, verbose=False).quantize()
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    model.save_pretrained(tmp_path / "w4")  # the GPTQ checkpoint, read back through from_pretrained
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "w4", quantization_config=qk.hf.QuantkernConfig())
    with torch.no_grad():
        want = qk.load_quantized(tmp_path / "w4")(x).logits
        assert torch.equal(back(x).logits, want) and torch.equal(want, ref(x).logits)


def test_compiles_fullgraph_after_from_pretrained(dense_dir):
    """from_pretrained prepares every kernel for the model's dtype: torch.compile(fullgraph=True) traces it."""
    model = _load(dense_dir, bits=4, group_size=32)
    x = torch.randint(0, 256, (2, 9))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x).logits, model(x).logits)


def test_pipeline_runs_on_the_loaded_model(dense_dir):
    from fixtures.quant_models import byte_tokenizer
    from transformers import pipeline

    model = _load(dense_dir, bits=4, group_size=32)
    tok = byte_tokenizer()
    out = pipeline("text-generation", model=model, tokenizer=tok)("hello", max_new_tokens=5, do_sample=False)
    ids = tok("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"] == tok.decode(want[0])

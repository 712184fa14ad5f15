"""quantkern inside transformers' from_pretrained (issue #17): a dense checkpoint quantized on load."""

from __future__ import annotations

import copy

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
    from transformers import AutoModelForCausalLM

    model = _load(dense_dir, bits=4, group_size=32)
    with pytest.raises(ValueError, match="(?i)serializ"):
        model.save_pretrained(tmp_path / "hf")
    qk.save_quantized(model, tmp_path / "ck")
    back = qk.load_quantized(tmp_path / "ck")
    x = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="quantized with GPTQConfig"):  # (transformers' own refusal, first)
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck", quantization_config=qk.hf.QuantkernConfig())
    with pytest.raises(ValueError, match="bits"):
        qk.hf.QuantkernConfig(bits=9)
    with pytest.raises(ValueError, match="unknown settings"):
        qk.hf.QuantkernConfig(bitz=4)
    with pytest.raises(ValueError, match="group_size=128"):
        _load(dense_dir, bits=4, group_size=128)  # larger than v_proj's in_features: refused, named
    cfg = qk.hf.QuantkernConfig(bits=2, group_size=64, overrides={"*.q_proj": {"bits": 8}})
    assert qk.hf.QuantkernConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


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

"""Issue #15, "proof on a real model": SmolLM2-135M upcycled into a Mixtral MoE (every MLP copied into 4
identical experts, top-2 with renormalised weights: the same function as the dense model). The helper,
on tiny random Llamas."""

import copy

import pytest
import torch
from torch import nn

from quantkern.models import balanced_router, upcycle_to_moe

E, TOP_K = 4, 2


def route_counts(model):
    """Hooks that count, per layer, the top-k slots each expert gets: ``(counts [L, E], handles)``."""
    layers = model.model.layers
    counts = torch.zeros(len(layers), layers[0].mlp.gate.num_experts, dtype=torch.long)

    def hook(i):
        def h(router, args, out):
            counts[i] += torch.bincount(out[2].flatten(), minlength=counts.shape[1])
        return h
    return counts, [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]


# -- the helper, on a tiny random Llama (fast) -----------------------------------------------------------
@pytest.mark.parametrize("router", ["random", "balanced"])
def test_upcycled_tiny_llama_is_the_dense_function(tiny_llama, token_data, router):
    from transformers import MixtralForCausalLM

    dense = tiny_llama
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle_to_moe(dense, num_experts=E, top_k=TOP_K, router=router, data=token_data)
    assert isinstance(moe, MixtralForCausalLM) and not moe.training
    assert moe.config.num_local_experts == E and moe.config.num_experts_per_tok == TOP_K
    for i, (d, m) in enumerate(zip(dense.model.layers, moe.model.layers)):
        ex = m.mlp.experts
        assert tuple(ex.gate_up_proj.shape) == (E, 2 * 128, 64) and tuple(ex.down_proj.shape) == (E, 64, 128)
        for e in range(E):
            assert torch.equal(ex.gate_up_proj[e], torch.cat([d.mlp.gate_proj.weight, d.mlp.up_proj.weight]))
            assert torch.equal(ex.down_proj[e], d.mlp.down_proj.weight)
        assert torch.equal(m.self_attn.o_proj.weight, d.self_attn.o_proj.weight)
        assert torch.equal(m.post_attention_layernorm.weight, d.post_attention_layernorm.weight)
        assert ex.gate_up_proj.data_ptr() != d.mlp.gate_proj.weight.data_ptr()
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()  # tied as in the dense model
    x = torch.stack(token_data[:4])
    counts, hooks = route_counts(moe)
    with torch.no_grad():
        got, want = moe(x).logits, dense(x).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (counts.sum(1) == x.numel() * TOP_K).all()
    assert (counts > 0).all(), counts  # tokens spread over every expert of every layer
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # the dense model untouched


def test_balanced_router_spreads_what_a_random_one_does_not():
    """Hidden states with a large common direction (as LLMs' are): random router rows rank the experts
    alike for every token; the balanced router's top-k is about uniform on other tokens of the same kind."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    dense = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # every token embedding = a shared offset + a small token-specific part
        emb = dense.model.embed_tokens.weight
        emb.copy_(3.0 * torch.randn(1, 64) + 0.3 * torch.randn(256, 64))
    g = torch.Generator().manual_seed(4)
    fit, held = torch.randint(0, 256, (8, 64), generator=g), torch.randint(0, 256, (8, 64), generator=g)

    def shares(router):
        moe = upcycle_to_moe(dense, router=router, data=fit)
        counts, hooks = route_counts(moe)
        with torch.no_grad():
            moe(held)
        for h in hooks:
            h.remove()
        return counts.float() / counts.sum(1, keepdim=True)

    random_share, balanced_share = shares("random"), shares("balanced")
    assert random_share.min() < 0.05, random_share
    assert balanced_share.min() > 0.15, balanced_share  # uniform top-2 of 4: 0.25 each


def test_upcycle_refuses_what_it_cannot_copy(tiny_llama):
    with pytest.raises(ValueError, match=r"1 <= top_k <= num_experts"):
        upcycle_to_moe(tiny_llama, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match=r"router weights must be \[2, 4, 64\]"):
        upcycle_to_moe(tiny_llama, router=torch.zeros(2, 3, 64))
    with pytest.raises(ValueError, match="needs data"):
        upcycle_to_moe(tiny_llama, router="balanced")
    with pytest.raises(ValueError, match="'balanced', 'random' or a tensor"):
        upcycle_to_moe(tiny_llama, router="uniform")
    with pytest.raises(ValueError, match="need at least 2 tokens"):
        balanced_router(tiny_llama, [torch.tensor([5])])
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen2 = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    with pytest.raises(ValueError, match=r"model_type 'qwen2' is not one of \('llama', 'mistral'\)"):
        upcycle_to_moe(qwen2)
    biased = copy.deepcopy(tiny_llama)
    biased.config.mlp_bias = True
    with pytest.raises(ValueError, match="no attention / MLP biases"):
        upcycle_to_moe(biased)
    biased.config.mlp_bias = False
    biased.model.layers[1].mlp.down_proj = nn.Linear(128, 64, bias=True)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj is not a bias-free nn\.Linear"):
        upcycle_to_moe(biased)

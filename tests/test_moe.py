"""Mixture-of-Experts (issue #15, first slice): fused 3-D experts of transformers 5 are weight sites,
quantized into QuantExperts with RTN and GPTQ (routing-aware calibration), saved under the per-expert HF
names and loaded back. Tiny random models of every MoE family the installed transformers has."""

import copy

import pytest
import torch
import transformers
from torch import nn

import quantkern as qk
from quantkern.nn.quant_experts import QuantExperts

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=1,
                                  pad_token_id=0)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                             kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16, n_group=1, topk_group=1)),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
                                       num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                       topk_group=1)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
}
PRESENT = [f for f, (cfg, _) in FAMILIES.items() if hasattr(transformers, cfg)]


def tiny_moe(family="qwen3_moe", seed=0, **over):
    cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**COMMON, **{**kw, **over})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random routers that spread tokens over the experts, biases not zero
        for n, p in model.named_parameters():
            if p.dim() == 3 or n.endswith("_bias") or ".router." in n or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2 if p.dim() == 3 else 0.5)
    return model


def ids(n=2, L=24, seed=5):
    return torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed))


def dequantized_reference(dense: nn.Module, quantized: nn.Module) -> nn.Module:
    """``dense`` with every weight that ``quantized`` quantized replaced by its dequantized value."""
    ref = copy.deepcopy(dense)
    mods = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in mods.items():
            if not isinstance(m, (qk.QuantLinear, QuantExperts)):
                continue
            target = ref.get_submodule(name)
            if isinstance(m, qk.QuantLinear):
                target.weight.copy_(m.to_quantized().dequantize(target.weight.dtype))
            elif isinstance(m, QuantExperts):
                gu, dn = m.dense_weights(torch.float32)
                if m.layout.transposed:
                    gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
                getattr(target, m.layout.gate_up).copy_(gu)
                getattr(target, m.layout.down).copy_(dn)
                if m.layout.gate_up_bias:  # kept in the scales' dtype, as QuantLinear keeps its bias
                    getattr(target, m.layout.gate_up_bias).copy_(m.gate_up_proj.bias)
                    getattr(target, m.layout.down_bias).copy_(m.down_proj.bias)
    return ref


def n_experts_modules(model):
    return sum(isinstance(m, QuantExperts) for m in model.modules())


@pytest.mark.parametrize("family", PRESENT)
def test_rtn_quantizes_every_expert(family):
    dense = tiny_moe(family)
    model = copy.deepcopy(dense)
    q = qk.RTNQuantizer(model, bits=4, group_size=32, verbose=False)
    q.quantize()
    n_moe = sum(1 for m in dense.modules() if type(m).__name__.endswith("Experts"))
    assert n_moe and n_experts_modules(model) == n_moe
    # all but the routers (kept dense) quantized; per-expert biases are not counted, as Linear biases
    router = sum(p.numel() for n, p in dense.named_parameters() if p.dim() == 2 and n.startswith("model.layers.")
                 and (".gate." in n or ".router." in n or "shared_expert_gate" in n))
    assert q.plan.block_params - q.plan.quantized_params == router
    assert all("router" in r or "norm" in r.lower() or "embedding" in r or r == "matches skip_layers"
               for _, r in q.report["skipped"]), q.report["skipped"]
    ref = dequantized_reference(dense, model)
    x = ids()
    with torch.no_grad():
        got, want, orig = model(x).logits, ref(x).logits, dense(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - orig).abs().max() > 1e-3  # really quantized


def test_rtn_experts_module_matches_original_semantics():
    """One QuantExperts against the replaced module on the same routing, an expert with no tokens included."""
    dense = tiny_moe()
    exp = dense.model.layers[0].mlp.experts
    model = copy.deepcopy(dense)
    qk.RTNQuantizer(model, bits=8, group_size=-1, verbose=False).quantize()
    qexp = model.model.layers[0].mlp.experts
    ref = copy.deepcopy(exp)
    gu, dn = qexp.dense_weights()
    with torch.no_grad():
        ref.gate_up_proj.copy_(gu)
        ref.down_proj.copy_(dn)
    x = torch.randn(10, 64)
    idx = torch.tensor([[0, 1]] * 5 + [[1, 3]] * 5)  # expert 2 gets no token
    w = torch.rand(10, 2)
    torch.testing.assert_close(qexp(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qexp(x, idx[:, :1], w[:, :1]), ref(x, idx[:, :1], w[:, :1]), rtol=1e-5, atol=1e-5)


def test_skip_experts_keeps_them_dense_and_partial_patterns_are_refused():
    model = tiny_moe()
    q = qk.RTNQuantizer(model, bits=4, group_size=32, skip_layers=["lm_head", "experts"], verbose=False)
    q.quantize()
    assert n_experts_modules(model) == 0
    assert dict(q.report["skipped"])["model.layers.0.mlp.experts.gate_up_proj"] == "matches skip_layers"
    model = tiny_moe()
    with pytest.raises(ValueError, match=r"matches 3 of the 12 expert weights of model\.layers\.0\.mlp\.experts"):
        qk.RTNQuantizer(model, bits=4, group_size=32, skip_layers=["lm_head", "layers.0.mlp.experts.3"]).quantize()
    assert not any(isinstance(m, (qk.QuantLinear, QuantExperts)) for m in model.modules())


def test_unpackable_expert_shapes_are_refused_naming_the_site():
    model = tiny_moe(moe_intermediate_size=36)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts, 4 experts\): gate/up "
                                         r"64->36 per expert: out_features=36 is not a multiple of 8"):
        qk.RTNQuantizer(model, bits=4, group_size=32).quantize()
    with pytest.raises(ValueError, match=r"down 32->64 per expert: group_size=64 > in_features=32"):
        qk.RTNQuantizer(tiny_moe(), bits=4, group_size=64).quantize()

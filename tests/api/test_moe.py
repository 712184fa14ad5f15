"""Mixture-of-Experts (issue #15, first slice): fused 3-D experts of transformers 5 are weight sites,
quantized into QuantExperts with RTN and GPTQ (routing-aware calibration), saved under the per-expert HF
names and loaded back. Tiny random models of every MoE family the installed transformers has."""

import copy
import json

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
    # every expert is two weight sites of the plan (its gate/up and down tensors), with the run's spec
    experts = {n: m for n, m in model.named_modules() if type(m).__name__ == "QuantExperts"}
    sites = {s for s in q.sites if s.expert is not None}
    assert sites and {s.module for s in sites} == set(experts)
    assert len(sites) == 2 * sum(m.num_experts for m in experts.values())
    assert {spec.weight for spec in q.sites.values()} == {qk.WeightScheme(4, 32, True)}


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


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_per_site_overrides_reach_the_experts(method):
    """Experts 8-bit, attention 4-bit g32 (the per-site override of the issue), validated per experts
    module before calibration and honoured by the quantizer."""
    model = tiny_moe()
    cfg = (qk.RTNConfig if method == "rtn" else qk.GPTQConfig)(bits=4, group_size=32,
                                                                overrides={"*.experts": {"bits": 8, "group_size": 16}})
    q = qk.api.quantizer_for(cfg)(model, cfg, verbose=False)
    q.quantize(None if method == "rtn" else calib())
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert experts and all((m.bits, m.group_size) == (8, 16) for m in experts)
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert {spec.weight.bits for s, spec in q.sites.items() if s.expert is not None} == {8}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts, 4 experts\): "
                                         r"gate/up 64->32 per expert: .*group_size=128 > in_features=64"):
        qk.RTNQuantizer(tiny_moe(), bits=4, group_size=32, overrides={"*.experts": {"group_size": 128}},
                        verbose=False).prepare()


def test_unpackable_expert_shapes_are_refused_naming_the_site():
    model = tiny_moe(moe_intermediate_size=36)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts, 4 experts\): gate/up "
                                         r"64->36 per expert: out_features=36 is not a multiple of 8"):
        qk.RTNQuantizer(model, bits=4, group_size=32).quantize()
    with pytest.raises(ValueError, match=r"down 32->64 per expert: group_size=64 > in_features=32"):
        qk.RTNQuantizer(tiny_moe(), bits=4, group_size=64).quantize()


def calib(n=16, L=32, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (L,), generator=g) for _ in range(n)]


def logits_error(model, ref_logits, x):
    with torch.no_grad():
        return float(((model(x).logits - ref_logits) ** 2).mean())


@pytest.mark.parametrize("opts", [{}, {"actorder": True}, {"actorder": True, "static_groups": True}],
                         ids=["plain", "actorder", "actorder-static"])
def test_gptq_beats_rtn_on_held_apart_tokens(opts):
    """Only the experts are quantized (attention skipped), so the whole error is theirs. The token
    embeddings are made correlated (rank 8 plus noise), as trained ones are: on isotropic inputs GPTQ has
    nothing to exploit."""
    dense = tiny_moe()
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        emb = dense.model.embed_tokens.weight
        emb.copy_(torch.randn(256, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.05 * torch.randn(256, 64, generator=g))
    held = ids(4, 32, seed=99)
    with torch.no_grad():
        want = dense(held).logits
    skip = ["lm_head", "self_attn"]
    rtn = copy.deepcopy(dense)
    qk.RTNQuantizer(rtn, bits=3, group_size=32, verbose=False, skip_layers=skip).quantize()
    gptq = copy.deepcopy(dense)
    q = qk.GPTQQuantizer(gptq, bits=3, group_size=32, verbose=False, use_triton=False, skip_layers=skip, **opts)
    q.quantize(calib())
    assert n_experts_modules(gptq) == 2
    tokens = q.report["expert_tokens"]
    assert set(tokens) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(sum(t) == 16 * 32 * 2 for t in tokens.values())  # top-2 of every calibration token
    assert q.report["expert_fallbacks"] == {}
    assert any(k.startswith("model.layers.0.mlp.experts.3.") for k in q.report["gptq_losses"])
    e_rtn, e_gptq = logits_error(rtn, want, held), logits_error(gptq, want, held)
    print(f"\nlogits MSE vs dense on held-apart tokens, W3 g32 {opts}: RTN {e_rtn:.3e}, GPTQ {e_gptq:.3e}")
    assert e_gptq < 0.5 * e_rtn


def starve_expert(model, e=3):
    """A router that never picks expert ``e`` (its logit forced to -inf before the top-k)."""
    def hook(router, args, out):
        logits = out[0].clone()
        logits[:, e] = float("-inf")
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        return logits, top.to(out[1].dtype), idx
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    return model


def experts_tensors(model, layer=0):
    m = model.model.layers[layer].mlp.experts
    return {f"{p}.{t}": getattr(getattr(m, p), t).clone() for p in ("gate_up_proj", "down_proj")
            for t in ("qweight", "qzeros", "scales", "g_idx")}


def test_starved_expert_is_calibrated_on_all_tokens_and_named():
    """The default fallback: an expert routed no token is calibrated on every token, exactly what
    calibrate-all-experts gives that expert (layer 0, where both runs see the same block inputs)."""
    model = starve_expert(tiny_moe())
    q = qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False, use_triton=False, actorder=True)
    q.quantize(calib(8))
    assert q.report["expert_tokens"]["model.layers.0.mlp.experts"][3] == 0
    fb = q.report["expert_fallbacks"]
    assert set(fb) == {f"model.layers.{i}.mlp.experts.3.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert fb["model.layers.0.mlp.experts.3.gate_up_proj"] == (
        "all tokens: 0 calibration token(s) routed to expert 3, fewer than 64 (in_features); calibrated on all "
        "256 tokens")
    assert "model.layers.0.mlp.experts.3.gate_up_proj" in q.report["gptq_losses"]
    summary = q.experts_summary()
    assert "8 in 2 modules" in summary and "fewest 0" in summary and "4 projection(s) with a fallback" in summary
    assert "model.layers.1.mlp.experts.3.down_proj: all tokens: 0 calibration token(s)" in summary
    every = starve_expert(tiny_moe())
    qk.GPTQQuantizer(every, bits=4, group_size=32, verbose=False, use_triton=False, actorder=True,
                     expert_calibration="all").quantize(calib(8))
    got, want = experts_tensors(model), experts_tensors(every)
    for k in got:
        assert torch.equal(got[k][3], want[k][3]), k
        if k.endswith("qweight"):  # a routed expert's statistics differ between the two runs
            assert not torch.equal(got[k][0], want[k][0]), k
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()


def test_calibrate_all_experts_ignores_the_routing_for_statistics_only():
    """expert_calibration="all": every token feeds every expert's statistics, so layer 0's experts come
    out the same under any router; the block outputs still follow the real routing (layer 1 differs)."""
    runs = []
    for starve in (False, True):
        model = tiny_moe()
        if starve:
            starve_expert(model)
        q = qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False, use_triton=False,
                             expert_calibration="all")
        q.quantize(calib(8))
        assert q.report["expert_fallbacks"] == {}
        assert all(f"model.layers.{i}.mlp.experts.{e}.{p}" in q.report["gptq_losses"]
                   for i in (0, 1) for e in range(4) for p in ("gate_up_proj", "down_proj"))
        runs.append((experts_tensors(model, 0), experts_tensors(model, 1), q.report["expert_tokens"]))
    (a0, a1, ta), (b0, b1, tb) = runs
    assert all(torch.equal(a0[k], b0[k]) for k in a0)
    assert any(not torch.equal(a1[k], b1[k]) for k in a1)
    assert ta["model.layers.0.mlp.experts"][3] > 0 and tb["model.layers.0.mlp.experts"][3] == 0


def test_rtn_fallback_and_thresholds_are_named():
    model = starve_expert(tiny_moe())
    q = qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False, use_triton=False, actorder=True,
                         expert_fallback="rtn")
    q.quantize(calib(8))
    fb = q.report["expert_fallbacks"]
    assert set(fb) == {f"model.layers.{i}.mlp.experts.3.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert fb["model.layers.0.mlp.experts.3.gate_up_proj"].startswith("RTN: 0 calibration token(s) routed to expert 3")
    rtn = tiny_moe()
    qk.RTNQuantizer(rtn, bits=4, group_size=32, verbose=False).quantize()
    got, want = experts_tensors(model, 1), experts_tensors(rtn, 1)
    assert all(torch.equal(got[k][3], want[k][3]) for k in got if not k.endswith("g_idx"))
    for m in model.modules():
        if isinstance(m, QuantExperts):
            for proj in (m.gate_up_proj, m.down_proj):
                assert torch.isfinite(proj.scales).all() and (proj.scales > 0).all()
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()
    # a threshold above the whole calibration set: every expert projection falls back to RTN, named
    for kw in ({}, {"expert_calibration": "all"}):
        model = tiny_moe()
        q = qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False, use_triton=False,
                             min_expert_tokens=10**6, **kw)
        q.quantize(calib(4))
        fb = q.report["expert_fallbacks"]
        assert len(fb) == 2 * 4 * 2 and all(v.startswith("RTN: ") and "fewer than 1000000 (min_expert_tokens)" in v
                                            for v in fb.values())
    for bad in ({"min_expert_tokens": -1}, {"expert_calibration": "some"}, {"expert_fallback": "dense"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            qk.GPTQConfig(**bad)


def test_expert_calibration_excludes_padding():
    model = tiny_moe()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    q = qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False, use_triton=False, min_expert_tokens=0)
    q.prepare()
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)
    q.convert()
    assert all(sum(t) == (32 + 20) * 2 for t in q.report["expert_tokens"].values())


SAVABLE = [f for f in PRESENT if f != "gpt_oss"]


PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"),
         "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")}


@pytest.mark.parametrize("fmt", list(PARTS))
@pytest.mark.parametrize("family", SAVABLE)
def test_checkpoint_per_expert_names_round_trip(family, fmt, tmp_path):
    """GPTQ and compressed-tensors: every expert under the original HF names (gate/up split back), the
    routers listed as dense, inspect counts the experts, load_quantized gives bit-identical logits."""
    from safetensors import safe_open

    model = tiny_moe(family)
    ct = fmt == "compressed-tensors"  # (act-order with static groups: compressed-tensors has no permuted g_idx)
    qk.GPTQQuantizer(model, bits=4, group_size=32, actorder=True, static_groups=ct, sym=not ct, verbose=False,
                     use_triton=False).quantize(calib(8))
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    out = qk.save_quantized(model, tmp_path / "ckpt", format=fmt)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    last = 1  # the last block is an MoE block in every family here
    moe = "block_sparse_moe" if family in ("mixtral", "phimoe") else "mlp"
    names = ("w1", "w3", "w2") if family in ("mixtral", "phimoe") else ("gate_proj", "up_proj", "down_proj")
    for e in range(4):
        for proj in names:
            for part in PARTS[fmt]:
                assert f"model.layers.{last}.{moe}.experts.{e}.{proj}.{part}" in keys
    assert not any("gate_up_proj" in k for k in keys)
    packed = f"model.layers.{last}.{moe}.experts.0.{{}}.{PARTS[fmt][0]}"
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # gate [I=32, H=64], down [H, I], 4 bits
        gate, down = (tuple(f.get_tensor(packed.format(names[j])).shape) for j in (0, 2))
    assert (gate, down) == (((32, 64 * 4 // 32), (64, 32 * 4 // 32)) if ct else ((64 * 4 // 32, 32), (32 * 4 // 32, 64)))
    if ct:
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        router = {f"model.layers.{last}.{moe}.{leaf}" for leaf in ("gate", "router")}
        assert router & set(qc["ignore"]), qc["ignore"]  # the router: dense, a Linear in HF checkpoints
    from quantkern.io.inspect import inspect_checkpoint

    info = inspect_checkpoint(out)
    assert info["consistent"], info["problems"]
    assert info["experts"][f"model.layers.{last}.{moe}.experts"] == 4
    from quantkern.io import format_inspection

    assert (f"experts:    model.layers.{last}.{moe}.experts: 4 experts, 12 expert Linears, W4 g32 "
            f"{'asym' if ct else 'sym act-order'}") in format_inspection(info)
    loaded = qk.load_quantized(out)
    assert n_experts_modules(loaded) == n_experts_modules(model)
    with torch.no_grad():
        got = loaded(x).logits
    assert torch.equal(got, want)


def test_experts_refused_by_other_formats_and_families_without_names(tmp_path):
    model = tiny_moe()
    qk.RTNQuantizer(model, bits=4, group_size=32, verbose=False).quantize()
    for fmt in ("awq", "gguf"):
        with pytest.raises(ValueError, match=r"QuantExperts: format .* cannot store it \(quantized MoE experts are "
                                             r"saved in format='gptq' or 'compressed-tensors'"):
            qk.save_quantized(model, tmp_path / fmt, format=fmt)
    with pytest.raises(ValueError, match="cannot store"):  # before calibration
        qk.GPTQQuantizer(tiny_moe(), bits=4, group_size=32, use_triton=False).prepare(export_format="awq")
    oss = tiny_moe("gpt_oss") if "gpt_oss" in PRESENT else None
    if oss is not None:
        qk.RTNQuantizer(oss, bits=4, group_size=32, verbose=False).quantize()
        with pytest.raises(ValueError, match="no per-expert tensor names"):
            qk.save_quantized(oss, tmp_path / "oss")


@pytest.mark.parametrize("skip", [["lm_head", "self_attn", "shared_expert"], ["lm_head", "experts"]],
                         ids=["experts-only", "experts-dense"])
def test_checkpoint_with_only_experts_or_dense_experts_round_trips(skip, tmp_path):
    model = tiny_moe("qwen2_moe")
    qk.RTNQuantizer(model, bits=4, group_size=32, sym=False, skip_layers=skip, verbose=False).quantize()
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    loaded = qk.load_quantized(qk.save_quantized(model, tmp_path / "c"))
    assert n_experts_modules(loaded) == n_experts_modules(model)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, want)


def test_gptq_moe_both_doors_identical_and_failure_restores():
    from quantkern.calibration import group_batches, normalize_calibration_data

    data = calib(8)
    a = tiny_moe()
    b = copy.deepcopy(a)
    before = {k: t.clone() for k, t in a.state_dict().items()}
    cfg = qk.GPTQConfig(bits=4, group_size=32, actorder=True, batch_size=4)
    qk.GPTQQuantizer(a, cfg, verbose=False, use_triton=False).quantize(data)
    b = qk.prepare(b, cfg)
    for batch in group_batches(normalize_calibration_data(data), 4):
        assert b(input_ids=batch.input_ids, attention_mask=batch.attention_mask) is None
    b = qk.convert(b, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(a.model.layers[1].mlp.experts, QuantExperts)
    # a failure inside the experts' GPTQ puts the model back as it was (fused experts, dense weights)
    c = tiny_moe()
    q = qk.GPTQQuantizer(c, cfg, verbose=False, use_triton=False)
    orig = QuantExperts.from_quantized
    try:
        QuantExperts.from_quantized = classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            q.quantize(data)
    finally:
        QuantExperts.from_quantized = orig
    assert n_experts_modules(c) == 0
    sc = c.state_dict()
    assert sc.keys() == before.keys() and all(torch.equal(sc[k], before[k]) for k in sc)


@pytest.mark.parametrize("family", PRESENT)
def test_gptq_every_family_computes_its_dequantized_weights(family):
    """GPTQ on each family: every expert quantized, its tokens reported, and the model computes
    exactly the dense model holding the dequantized weights (the calibration stand-in is that model)."""
    dense = tiny_moe(family)
    model = copy.deepcopy(dense)
    q = qk.GPTQQuantizer(model, bits=4, group_size=32, actorder=True, verbose=False, use_triton=False)
    q.quantize(calib(8))
    assert n_experts_modules(model) == sum(1 for m in dense.modules() if type(m).__name__.endswith("Experts"))
    assert len(q.report["expert_tokens"]) == n_experts_modules(model)
    ref = dequantized_reference(dense, model)
    x = ids()
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_non_finite_expert_weights_are_named_before_calibration():
    model = tiny_moe()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.2\.down_proj \(1 inf/NaN\)"):
        qk.GPTQQuantizer(model, bits=4, group_size=32, use_triton=False).quantize(calib(2))
    q = qk.RTNQuantizer(tiny_moe("qwen2_moe"), bits=4, group_size=32, verbose=False)
    q.prepare()
    assert dict(q.plan.skipped)["model.layers.0.mlp.shared_expert_gate"] == "MoE router (Linear), kept dense"


class _ListMoE(nn.Module):
    """Older transformers / custom code: a router ``gate`` and per-expert ``nn.Linear`` MLPs in a
    ``ModuleList``; top-1 routing, an expert computed only on its tokens."""

    def __init__(self, h, i, n_exp, never=None):
        super().__init__()
        self.gate = nn.Linear(h, n_exp, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict(dict(w1=nn.Linear(h, i, bias=False), w2=nn.Linear(i, h, bias=False)))
                                     for _ in range(n_exp))
        self.never = never

    def forward(self, x):
        logits = self.gate(x)
        if self.never is not None:
            logits[..., self.never] = float("-inf")
        idx = logits.argmax(-1)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            sel = idx == e
            if sel.any():
                out[sel] = ex["w2"](torch.nn.functional.silu(ex["w1"](x[sel])))
        return out


def test_per_expert_linear_lists_are_sites_with_routed_tokens_reported(tiny_llama):
    """Experts as a ModuleList of Linears are quantized as Linears, each calibrated on the tokens its
    router sent it; the tokens per expert are reported and an expert that got too few is RTN, named."""
    model = copy.deepcopy(tiny_llama)
    h = model.config.hidden_size
    for layer in model.model.layers:
        layer.mlp = _ListMoE(h, 64, 4, never=2)
    q = qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False, use_triton=False)
    q.quantize(calib(8))
    n_layers = len(model.model.layers)
    quantized = {n for n, m in model.named_modules() if isinstance(m, qk.QuantLinear)}
    assert {f"model.layers.{i}.mlp.experts.{e}.{w}" for i in range(n_layers) for e in range(4)
            for w in ("w1", "w2")} <= quantized
    assert not any(n.endswith("mlp.gate") for n in quantized)  # the router stays dense
    tokens = q.report["expert_tokens"]
    assert set(tokens) == {f"model.layers.{i}.mlp.experts" for i in range(n_layers)}
    assert all(t[2] == 0 and sum(t) == 8 * 32 for t in tokens.values())  # top-1 of every calibration token
    fb = q.report["expert_fallbacks"]
    assert {f"model.layers.{i}.mlp.experts.2.{w}" for i in range(n_layers) for w in ("w1", "w2")} <= set(fb)
    assert fb["model.layers.0.mlp.experts.2.w1"].startswith("RTN: 0 calibration token(s) routed to expert 2")
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()

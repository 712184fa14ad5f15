"""AWQ of fused MoE experts (issue #15): one norm scale searched with each expert's routed tokens and
folded into the norm, the routers, the experts and a shared expert; each expert's down scale folded
into its own up rows; clipping and RTN per expert. Tiny random models of the families with a spec."""

import copy

import pytest
import torch

import quantkern as qk
from api.test_moe import PRESENT, calib, ids, logits_error, n_experts_modules, starve_expert, tiny_moe

AWQ_FAMILIES = [f for f in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "phimoe") if f in PRESENT]


@pytest.mark.parametrize("family", AWQ_FAMILIES)
def test_awq_quantizes_every_expert_and_beats_rtn(family):
    """W3: AWQ's logits are closer to the dense model's than RTN's on held-apart tokens. W8: the folds
    keep the function (the error stays at RTN's level; a wrong fold, e.g. a router left unscaled, would
    move the routing and the logits far more)."""
    dense = tiny_moe(family)
    held = ids(4, 32, seed=99)
    with torch.no_grad():
        want = dense(held).logits
    errs = {}
    for bits in (3, 8):
        awq = copy.deepcopy(dense)
        q = qk.AWQQuantizer(awq, bits=bits, group_size=32, verbose=False)
        q.quantize(calib(16))
        assert n_experts_modules(awq) == sum(type(m).__name__.endswith("Experts") for m in dense.modules())
        assert q.report["expert_fallbacks"] == {}
        assert all(sum(t) == 16 * 32 * 2 for t in q.report["expert_tokens"].values())
        assert any(".experts.0.down_proj" in k for k in q.report["awq_errors"])
        rtn = copy.deepcopy(dense)
        qk.RTNQuantizer(rtn, bits=bits, group_size=32, sym=False, verbose=False).quantize()
        errs[bits] = logits_error(awq, want, held), logits_error(rtn, want, held)
    print(f"\n{family}: logits MSE vs dense, (AWQ, RTN): W3 {errs[3]}, W8 {errs[8]}")
    assert errs[3][0] < errs[3][1]
    assert errs[8][0] < 3 * errs[8][1]


def test_awq_starved_expert_fallback_and_checkpoint_round_trip(tmp_path):
    model = starve_expert(tiny_moe())
    q = qk.AWQQuantizer(model, bits=4, group_size=32, verbose=False)
    q.quantize(calib(8))
    fb = q.report["expert_fallbacks"]
    assert set(fb) == {f"model.layers.{i}.mlp.experts.3.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert all(v.startswith("all tokens: 0 calibration token(s) routed to expert 3") for v in fb.values())
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()
    rtn = starve_expert(tiny_moe())
    q = qk.AWQQuantizer(rtn, bits=4, group_size=32, verbose=False, expert_fallback="rtn")
    q.quantize(calib(8))
    assert all(v.startswith("RTN: 0") for v in q.report["expert_fallbacks"].values())
    # the folded norms and routers and the experts go through a GPTQ checkpoint unchanged (the starved
    # model's router hooks do not, so a model with its own routing is saved)
    model = tiny_moe("qwen2_moe")
    qk.AWQQuantizer(model, bits=4, group_size=32, verbose=False).quantize(calib(8))
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    back = qk.load_quantized(qk.save_quantized(model, tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(back(x).logits, want)


def test_awq_refuses_moe_families_without_a_norm_spec():
    if "deepseek_v3" not in PRESENT:
        pytest.skip("no DeepseekV3Config in this transformers")
    with pytest.raises(ValueError, match="AWQ has no spec for architecture model_type='deepseek_v3'"):
        qk.AWQQuantizer(tiny_moe("deepseek_v3"), bits=4, group_size=32).prepare()

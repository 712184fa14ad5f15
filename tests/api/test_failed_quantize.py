"""Issue #14: a failed quantize leaves the model exactly as it was; bad input is refused before
calibration with one line naming the layer / row and the cause."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import quantkern as qk
from quantkern.calibration import group_batches, normalize_calibration_data
from quantkern.transforms import conv1d_to_linear

EVAL = torch.arange(24).reshape(2, 12) % 256


# -- what "as it was" means --------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()  # bitwise: NaN == NaN


def state(model: torch.nn.Module) -> dict:
    """Every parameter and buffer (bit for bit, with its object identity, dtype and device), every module's
    type, hook counts, and instance attributes quantkern could leave behind."""
    tensors = {}
    for kind, items in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for n, t in items:
            tensors[kind + ":" + n] = (id(t), t.dtype, t.device, tuple(t.shape), _bits(t))
    return {
        "tensors": tensors,
        "modules": {n: (type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
        "patched": sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
        "attrs": sorted(k for k in model.__dict__ if "quantkern" in k),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["modules"] == b["modules"]
    assert a["hooks"] == b["hooks"]
    assert a["patched"] == b["patched"] == []
    assert a["attrs"] == b["attrs"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        (ia, da, va, sa, xa), (ib, db, vb, sb, xb) = a["tensors"][k], b["tensors"][k]
        assert (ia, da, va, sa) == (ib, db, vb, sb), k
        assert torch.equal(xa, xb), f"{k} changed"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=EVAL)
    assert out is not None, "model(x) returned None: still prepared"
    return out.logits


def assert_restored(model, before: dict, ref_logits: torch.Tensor | None) -> None:
    assert_same_state(state(model), before)
    if ref_logits is not None:
        assert torch.equal(logits(model), ref_logits)


def sd_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


CALIBRATED = {
    "gptq": lambda: qk.GPTQConfig(bits=4, group_size=32, batch_size=4),
    "awq": lambda: qk.AWQConfig(bits=4, group_size=32, batch_size=4),
    "smoothquant": lambda: qk.SmoothQuantConfig(alpha=0.5, batch_size=4),
    "w8a8_static": lambda: qk.W8A8Config(act_static=True, batch_size=4),
    "ptq": lambda: qk.PTQConfig(batch_size=4),
    "fp8_gptq": lambda: qk.FP8Config(weight_method="gptq", batch_size=4),
    "fp8_gptq_static": lambda: qk.FP8Config(weight_method="gptq", act_static=True, batch_size=4),
    "zeroquant_static": lambda: qk.ZeroQuantConfig(act_static=True, batch_size=4),
}


def _quantizer(model, cfg):
    return qk.api.quantizer_for(cfg)(model, cfg, verbose=False)


def _drive(model, data, bs=4):
    for b in group_batches(normalize_calibration_data(data), bs):
        model(input_ids=b.input_ids, attention_mask=b.attention_mask)  # None where the forward stops at block 0


# -- token ids --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [256, -1])
@pytest.mark.parametrize("method", list(CALIBRATED))
def test_bad_token_ids_quantize_door(method, bad, tiny_llama, token_data):
    before, ref = state(tiny_llama), logits(tiny_llama)
    data = [t.clone() for t in token_data]
    data[3][5] = bad
    msg = rf"calibration item 3, row 0: token id {bad} at position 5 .*valid ids 0..255"
    with pytest.raises(ValueError, match=msg):
        _quantizer(tiny_llama, CALIBRATED[method]()).quantize(data)
    assert_restored(tiny_llama, before, ref)


@pytest.mark.parametrize("method", list(CALIBRATED))
def test_bad_token_ids_prepare_door_restores_and_retry_succeeds(method, tiny_llama, token_data):
    clean = copy.deepcopy(tiny_llama)
    before, ref = state(tiny_llama), logits(tiny_llama)
    cfg = CALIBRATED[method]()
    model = qk.prepare(tiny_llama, cfg)
    model(input_ids=torch.stack(token_data[:4]))
    bad = torch.stack(token_data[4:]).clone()
    bad[2, 7] = 300
    with pytest.raises(ValueError, match=r"calibration forward 1, row 2: token id 300 at position 7") as err:
        model(input_ids=bad)
    assert any("the model was restored to its state before prepare()" in n for n in err.value.__notes__)
    assert_restored(tiny_llama, before, ref)
    with pytest.raises(RuntimeError, match="call prepare\\(\\) again"):
        qk.convert(tiny_llama, cfg)
    # a retry with good data gives exactly what a clean run gives
    model = qk.prepare(tiny_llama, cfg)
    _drive(model, token_data)
    qk.convert(model, cfg)
    _quantizer(clean, cfg).quantize(token_data)
    assert sd_equal(tiny_llama, clean)


def test_second_prepare_is_refused_and_changes_nothing(tiny_llama, token_data):
    cfg = qk.GPTQConfig(bits=4, group_size=32)
    model = qk.prepare(tiny_llama, cfg)
    before = state(model)
    with pytest.raises(RuntimeError, match=r"model is already prepared for gptq \(prepare\(\) was called and "
                                           r"convert\(\) not yet\)"):
        qk.prepare(model, qk.AWQConfig(bits=4, group_size=32))
    after = state(model)  # still the first prepare's model: its patched forward and block-0 hook, nothing more
    assert after["patched"] == before["patched"] == [""] and after["hooks"] == before["hooks"]
    assert after["modules"] == before["modules"] and after["attrs"] == before["attrs"]
    assert all(torch.equal(after["tensors"][k][4], v[4]) for k, v in before["tensors"].items())
    _drive(model, token_data, bs=8)
    qk.convert(model, cfg)
    assert sum(isinstance(x, qk.QuantLinear) for x in model.modules()) == 14


def test_float_token_ids_prepare_door(tiny_llama, token_data):
    before, ref = state(tiny_llama), logits(tiny_llama)
    model = qk.prepare(tiny_llama, qk.GPTQConfig(bits=4, group_size=32))
    with pytest.raises(TypeError, match="calibration forward 0: input_ids must be integer token ids, got dtype "
                                        "torch.float32"):
        model(input_ids=torch.stack(token_data).float())
    assert_restored(tiny_llama, before, ref)


# -- non-finite activations -------------------------------------------------------------------------
def _inf_after(module):
    return module.register_forward_hook(lambda m, a, out: out * float("inf"))


@pytest.mark.parametrize("door", ["quantize", "prepare"])
@pytest.mark.parametrize("method", list(CALIBRATED))
def test_nonfinite_activations_named_and_model_restored(method, door, tiny_llama, token_data):
    ref = logits(tiny_llama)
    hook = _inf_after(tiny_llama.model.layers[1].input_layernorm)  # block 1's q/k/v get inf inputs
    before = state(tiny_llama)
    cfg = CALIBRATED[method]()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj.*non-finite inputs \(inf/NaN\)"):
        if door == "quantize":
            _quantizer(tiny_llama, cfg).quantize(token_data)
        else:
            model = qk.prepare(tiny_llama, cfg)
            _drive(model, token_data)
            qk.convert(model, cfg)
    assert_restored(tiny_llama, before, None)
    hook.remove()
    assert torch.equal(logits(tiny_llama), ref)
    _quantizer(tiny_llama, cfg).quantize(token_data)  # and a retry on a finite model works
    assert logits(tiny_llama).isfinite().all()


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8_gptq"])
def test_nonfinite_block_output_names_the_block(method, tiny_llama, token_data):
    hook = tiny_llama.model.layers[0].register_forward_hook(
        lambda m, a, out: (out[0] * float("nan"),) + tuple(out[1:]) if isinstance(out, tuple) else out * float("nan"))
    before = state(tiny_llama)
    with pytest.raises(ValueError, match=r"model\.layers\.1: non-finite inputs .*outputs of model\.layers\.0"):
        _quantizer(tiny_llama, CALIBRATED[method]()).quantize(token_data)
    assert_restored(tiny_llama, before, None)
    hook.remove()


# -- failures in the middle of convert (after blocks were folded / swapped) ---------------------------
def test_smoothquant_failure_mid_convert_restores_folded_norms(tiny_llama, token_data, monkeypatch):
    from quantkern.nn.w8a8_linear import W8A8Linear

    before, ref = state(tiny_llama), logits(tiny_llama)
    real, calls = W8A8Linear.from_linear, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 9:  # block 0 swapped in, norms of both blocks already divided by s
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(W8A8Linear, "from_linear", staticmethod(flaky))
    with pytest.raises(RuntimeError, match="boom"):
        qk.SmoothQuantQuantizer(tiny_llama, alpha=0.5, verbose=False).quantize(token_data)
    assert_restored(tiny_llama, before, ref)


def test_awq_failure_mid_convert_restores(tiny_llama, token_data, monkeypatch):
    import quantkern.api.awq as awq_mod

    before, ref = state(tiny_llama), logits(tiny_llama)
    real, calls = awq_mod.quantize_rtn, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 10:  # in block 1, after block 0 was folded, clipped and swapped in
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(awq_mod, "quantize_rtn", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        qk.AWQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(token_data)
    assert_restored(tiny_llama, before, ref)
    monkeypatch.undo()
    clean = copy.deepcopy(tiny_llama)
    qk.AWQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(token_data)
    qk.AWQQuantizer(clean, bits=4, group_size=32, verbose=False).quantize(token_data)
    assert sd_equal(tiny_llama, clean)


def test_keyboard_interrupt_in_calibration_restores(tiny_llama, token_data):
    before, ref = state(tiny_llama), logits(tiny_llama)
    n = []

    def pre(m, a):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt

    h = tiny_llama.model.embed_tokens.register_forward_pre_hook(pre)
    before = state(tiny_llama)
    with pytest.raises(KeyboardInterrupt):
        qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, batch_size=2, verbose=False).quantize(token_data)
    assert_restored(tiny_llama, before, None)
    h.remove()
    assert torch.equal(logits(tiny_llama), ref)


# -- devices ----------------------------------------------------------------------------------------
def _meta_llama():
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256)
    with torch.device("meta"):
        return T.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "w8a8", "fp8_gptq"])
def test_meta_weights_refused_naming_both_devices(method, token_data):
    m = _meta_llama()
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight is on the meta device .*calibration inputs "
                                         r"would be on cpu"):
        _quantizer(m, ALL_METHODS[method]()).quantize(token_data)
    assert all(p.device.type == "meta" for p in m.parameters())


def test_config_device_differs_from_model_device(tiny_llama, token_data):
    before = state(tiny_llama)
    with pytest.raises(ValueError, match=r"config device='cuda:0' but the model's parameters are on cpu"):
        qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, device="cuda:0", verbose=False).quantize(token_data)
    assert_restored(tiny_llama, before, None)


# -- GPT-2 (transformers Conv1D) ----------------------------------------------------------------------
def _gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)).eval()


ALL_METHODS = {
    "rtn": lambda: qk.RTNConfig(bits=4, group_size=32),
    "gptq": lambda: qk.GPTQConfig(bits=4, group_size=32),
    "awq": lambda: qk.AWQConfig(bits=4, group_size=32),
    "smoothquant": lambda: qk.SmoothQuantConfig(),
    "w8a8": lambda: qk.W8A8Config(),
    "fp8": lambda: qk.FP8Config(),
    "fp8_gptq": lambda: qk.FP8Config(weight_method="gptq"),
    "fp4": lambda: qk.FP4Config(),
    "ptq": lambda: qk.PTQConfig(),
    "zeroquant": lambda: qk.ZeroQuantConfig(),
}

CONV1D_MSG = (r"8 transformers Conv1D layer\(s\) \(GPT-2 style, weight stored \[in, out\]\) cannot be quantized: "
              r"transformer\.h\.\*\.attn\.c_attn \(2x\), .*could not be loaded back by load_quantized")


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_gpt2_conv1d_refused_alike_by_every_method(method, token_data):
    m = _gpt2()
    before, ref = state(m), logits(m)
    with pytest.raises(ValueError, match=CONV1D_MSG):
        _quantizer(m, ALL_METHODS[method]()).quantize(token_data)
    assert_restored(m, before, ref)
    with pytest.raises(ValueError, match=CONV1D_MSG):
        qk.prepare(m, ALL_METHODS[method]())
    assert_restored(m, before, ref)


def test_mixed_conv1d_and_linear(token_data):
    m = _gpt2()
    for block in m.transformer.h:
        conv1d_to_linear(block.mlp)  # the MLP as nn.Linear, attention still Conv1D
    before = state(m)
    with pytest.raises(ValueError, match=r"4 transformers Conv1D layer\(s\) .*: transformer\.h\.\*\.attn\.c_attn "
                                         r"\(2x\), transformer\.h\.\*\.attn\.c_proj \(2x\)\. "):
        qk.RTNQuantizer(m, bits=4, group_size=32, verbose=False).quantize()
    assert_restored(m, before, None)
    q = qk.RTNQuantizer(m, bits=4, group_size=32, skip_layers=["lm_head", "attn.c_attn", "attn.c_proj"],
                        verbose=False)
    q.quantize()
    assert sum(isinstance(x, qk.QuantLinear) for x in m.modules()) == 4
    assert ("transformer.h.0.attn.c_attn", "matches skip_layers") in q.report["skipped"]
    assert logits(m).isfinite().all()


# -- already quantized --------------------------------------------------------------------------------
PRODUCERS = {
    "QuantLinear": lambda m: qk.RTNQuantizer(m, bits=4, group_size=32, verbose=False).quantize(),
    "W8A8Linear": lambda m: qk.W8A8Quantizer(m, verbose=False).quantize(),
    "FP8Linear": lambda m: qk.FP8Quantizer(m, verbose=False).quantize(),
    "FP4Linear": lambda m: qk.FP4Quantizer(m, verbose=False).quantize(),
    "ZeroQuantLinear": lambda m: qk.ZeroQuantQuantizer(m, verbose=False).quantize(),
}


@pytest.mark.parametrize("consumer", ["rtn", "gptq", "awq", "w8a8", "fp8", "fp4"])
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_requantizing_says_already_quantized(kind, consumer, tiny_llama, token_data):
    PRODUCERS[kind](tiny_llama)
    before = state(tiny_llama)
    with pytest.raises(ValueError, match=rf"model is already quantized \(model\.layers\.0\.self_attn\.q_proj is a "
                                         rf"{kind}; 14 {kind} layers in all\)"):
        _quantizer(tiny_llama, ALL_METHODS[consumer]()).quantize(token_data)
    assert_same_state(state(tiny_llama), before)


# -- config options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [qk.RTNConfig, qk.GPTQConfig, qk.AWQConfig, qk.W8A8Config, qk.FP8Config,
                                 qk.FP4Config, qk.PTQConfig, qk.ZeroQuantConfig])
@pytest.mark.parametrize("value", [5, None, {"lm_head": 1}, 2.5])
def test_skip_layers_type_checked(cls, value):
    with pytest.raises(ValueError, match=r"skip_layers must be a module-name pattern or a list of them \(strings "
                                         rf"such as \['lm_head', '\*\.mlp\.\*'\]\), got .* \({type(value).__name__}\)"):
        cls(skip_layers=value)


def test_skip_layers_items_and_sets():
    with pytest.raises(ValueError, match=r"skip_layers must be non-empty strings .*got 3 in \['lm_head', 3\]"):
        qk.RTNConfig(skip_layers=["lm_head", 3])
    assert qk.RTNConfig(skip_layers={"b", "a"}).skip_layers == ("a", "b")


@pytest.mark.parametrize("cls", [qk.RTNConfig, qk.GPTQConfig, qk.AWQConfig, qk.W8A8Config, qk.FP8Config,
                                 qk.FP4Config, qk.PTQConfig, qk.ZeroQuantConfig])
def test_overrides_type_checked(cls):
    with pytest.raises(ValueError, match=r"overrides must be a dict \{module-name pattern: \{setting: value\}\}.*"
                                         r"got 5 \(int\)"):
        cls(overrides=5)
    with pytest.raises(ValueError, match=r"overrides\['\*\.down_proj'\] must be a dict of settings \(allowed keys: "):
        cls(overrides={"*.down_proj": 7})


# -- non-finite weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_nonfinite_weight_named_before_calibration(method, tiny_llama, token_data):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        tiny_llama.model.layers[0].self_attn.k_proj.weight[0, :2] = float("inf")
    forwards = []
    tiny_llama.model.embed_tokens.register_forward_pre_hook(lambda m, a: forwards.append(1))
    before = state(tiny_llama)
    with pytest.raises(ValueError, match=r"non-finite weights in 2 tensor\(s\), .*: "
                                         r"model\.layers\.0\.self_attn\.k_proj\.weight \(2 inf/NaN values\), "
                                         r"model\.layers\.1\.mlp\.down_proj\.weight \(1 inf/NaN value\)"):
        _quantizer(tiny_llama, ALL_METHODS[method]()).quantize(token_data)
    assert forwards == []  # refused before any calibration forward
    assert_same_state(state(tiny_llama), before)

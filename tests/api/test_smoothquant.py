"""W8A8 int8 (kernel vs oracle, module) and SmoothQuant (smoothing math, quantizer, errors)."""

import copy
import os

import pytest
import torch

# The Triton W8A8 kernel runs on a CPU only interpreted: TRITON_INTERPRET=1 must be set when triton is
# first imported (as in test_triton_kernels.py); it is restored right after so it never leaks.
_saved_env = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from quantkern.triton_kernels.w8a8_int8 import _w8a8_int8_kernel, w8a8_int8_matmul_triton
except ImportError:  # triton missing
    _w8a8_int8_kernel = w8a8_int8_matmul_triton = None
if _saved_env is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved_env

import quantkern as qk
from quantkern.algorithms.observers import AbsMaxObserver
from quantkern.algorithms.smoothquant import smoothing_factors
from quantkern.calibration import group_batches, normalize_calibration_data
from quantkern.core.int8 import quantize_int8_per_channel, quantize_int8_per_token
from quantkern.kernels.w8a8 import int8_mm, int8_mm_reference, w8a8_linear, w8a8_linear_reference
from quantkern.transforms import conv1d_to_linear
from quantkern.nn.w8a8_linear import W8A8Linear

T = pytest.importorskip("transformers")
EPS = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _layer(k, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


# -- kernel -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 17, 127, 128, 129])
@pytest.mark.parametrize("k,n", [(64, 48), (67, 45)])
def test_int8_mm_bit_exact(m, k, n):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(int8_mm(a, b), int8_mm_reference(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17, 129])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_op_matches_fp64_oracle(dtype, m, static):
    k, n = 67, 45
    lin = _layer(k, n)
    wq, ws = quantize_int8_per_channel(lin.weight)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    xs = torch.tensor([x.float().abs().max().item() / 127 * 0.8]) if static else None  # some saturate
    y = w8a8_linear(x, wq, ws, lin.bias.to(dtype), xs)
    ref = w8a8_linear_reference(x, wq, ws, lin.bias.to(dtype), xs)
    assert y.dtype == dtype and y.shape == (m, n)
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 2 * EPS[dtype], rel
    # and W8A8 itself is a close approximation of the float layer (dynamic: ~1% relative error)
    if not static and dtype == torch.float32:
        exact = x.double() @ lin.weight.double().t() + lin.bias.double()
        assert (ref - exact).norm() / exact.norm() < 0.02


def test_w8a8_opcheck_and_fake():
    wq, ws = quantize_int8_per_channel(torch.randn(16, 32))
    torch.library.opcheck(torch.ops.quantkern.w8a8_linear.default, (torch.randn(5, 32), wq, ws, None, None))


def test_per_token_quantization_edges():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    q, s = quantize_int8_per_token(x)
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8)) and s[0, 0] == 1.0
    assert q[1].tolist() == [64, -127, 32] and torch.isclose(s[1, 0], torch.tensor(2 / 127))
    with pytest.raises(ValueError, match="inf/NaN"):
        quantize_int8_per_token(torch.tensor([[1.0, float("nan")]]))


# -- module -----------------------------------------------------------------------------------------
def test_w8a8_linear_state_dict_and_forward():
    lin = _layer(64, 32)
    q = W8A8Linear.from_linear(lin)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (32, 64)
    assert sd["weight_scale"].shape == (32, 1) and "input_scale" not in sd
    x = torch.randn(2, 5, 64)
    y = q(x)
    assert y.shape == (2, 5, 32)
    q.backend = "reference"
    assert torch.allclose(q(x), y, atol=1e-5)
    s = W8A8Linear.from_linear(lin, input_scale=0.05)
    assert s.state_dict()["input_scale"].item() == pytest.approx(0.05)


def test_w8a8_linear_errors():
    lin = _layer(64, 32)
    with pytest.raises(ValueError, match="input_scale must be finite and > 0"):
        W8A8Linear.from_linear(lin, input_scale=0.0)
    q = W8A8Linear.from_linear(lin)
    with pytest.raises(ValueError, match="does not match weight"):
        q(torch.randn(3, 63))
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        q(torch.randint(0, 5, (3, 64)))


# -- smoothing --------------------------------------------------------------------------------------
def test_smoothing_factors_formula_and_edges():
    a = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, 4.0, 2.0], [-0.5, 1.0, 0.0]])
    s = smoothing_factors(a, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] == 1.0  # channel never active
    assert torch.allclose(smoothing_factors(a, w, 0.0)[:2], 1 / torch.tensor([1.0, 4.0]))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            smoothing_factors(a, w, bad)


def test_abs_max_observer():
    o = AbsMaxObserver()
    o.update(torch.tensor([[1.0, -3.0]]))
    o.update(torch.tensor([[[-2.0, 1.0]]]))
    assert o.amax.tolist() == [2.0, 3.0] and o.count == 2


@pytest.fixture
def outlier_llama(tiny_llama):
    with torch.no_grad():  # LLM-like outlier channels in the normed activations
        for layer in tiny_llama.model.layers:
            layer.input_layernorm.weight[:3] *= 30
            layer.post_attention_layernorm.weight[5:7] *= 30
    return tiny_llama


EVAL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))


def _err(m, ref):
    with torch.no_grad():
        return float((m(EVAL).logits - ref).pow(2).mean())


@pytest.mark.parametrize("static", [False, True])
def test_smoothquant_beats_plain_w8a8(outlier_llama, token_data, static):
    with torch.no_grad():
        ref = outlier_llama(EVAL).logits
    plain, smooth = copy.deepcopy(outlier_llama), copy.deepcopy(outlier_llama)
    qk.W8A8Quantizer(plain, act_static=static, verbose=False).quantize(token_data)
    q = qk.SmoothQuantQuantizer(smooth, alpha=0.5, act_static=static, verbose=False)
    q.quantize(token_data)
    assert _err(smooth, ref) < 0.7 * _err(plain, ref)
    assert len(q.report["smoothed"]) == 4  # two norms per block
    assert isinstance(smooth.model.layers[0].self_attn.q_proj, W8A8Linear)
    assert (smooth.model.layers[0].mlp.down_proj.input_scale is not None) == static


def test_smoothquant_both_doors_identical(outlier_llama, token_data):
    a, b = outlier_llama, copy.deepcopy(outlier_llama)
    cfg = qk.SmoothQuantConfig(alpha=0.6, act_static=True, batch_size=4)
    qk.SmoothQuantQuantizer(a, cfg, verbose=False).quantize(token_data)
    b = qk.prepare(b, cfg)
    for batch in group_batches(normalize_calibration_data(token_data), 4):
        b(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    b = qk.convert(b, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_padding_is_not_observed(outlier_llama, token_data):
    a, b = outlier_llama, copy.deepcopy(outlier_llama)
    qk.W8A8Quantizer(a, act_static=True, verbose=False).quantize(token_data[:2])
    ids = torch.stack([token_data[0], torch.cat([token_data[1][:20], torch.zeros(12, dtype=torch.long)])])
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    qk.W8A8Quantizer(b, act_static=True, verbose=False).quantize(
        [{"input_ids": ids[0], "attention_mask": mask[0]}, {"input_ids": token_data[1][:20]},
         {"input_ids": ids[1], "attention_mask": mask[1]}])
    # the padded row only adds tokens already seen (its real part is a prefix of a sample)
    assert torch.equal(a.model.layers[0].mlp.up_proj.input_scale, b.model.layers[0].mlp.up_proj.input_scale)


def test_w8a8_dynamic_needs_no_data(tiny_llama):
    qk.W8A8Quantizer(tiny_llama, verbose=False).quantize()
    assert isinstance(tiny_llama.model.layers[1].mlp.gate_proj, W8A8Linear)
    assert not isinstance(tiny_llama.lm_head, W8A8Linear)
    assert tiny_llama(EVAL).logits.isfinite().all()


def test_static_without_forwards_raises(tiny_llama):
    cfg = qk.W8A8Config(act_static=True)
    with pytest.raises(RuntimeError, match="no calibration forwards"):
        qk.convert(qk.prepare(tiny_llama, cfg))


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_smoothquant_other_architectures(arch, token_data):
    torch.manual_seed(0)
    m = (T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)) if arch == "gpt2" else
         T.OPTForCausalLM(T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=256, word_embed_proj_dim=64))).eval()
    if arch == "gpt2":  # quantkern refuses Conv1D layers: the GPT-2 spec runs on them made nn.Linear
        conv1d_to_linear(m)
    with torch.no_grad():
        ref = m(EVAL).logits
    qk.SmoothQuantQuantizer(m, alpha=0.5, verbose=False).quantize(token_data)
    assert sum(isinstance(x, W8A8Linear) for x in m.modules()) == (8 if arch == "gpt2" else 12)
    assert _err(m, ref) < 1e-3 * float(ref.pow(2).mean()) + 1e-4


def test_smoothquant_unknown_architecture(token_data):
    m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=256))
    with pytest.raises(ValueError, match="SmoothQuant has no spec for architecture model_type='gpt_neox'"):
        qk.SmoothQuantQuantizer(m, verbose=False).quantize(token_data)
    qk.W8A8Quantizer(m, verbose=False).quantize()  # plain W8A8 needs no spec


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=-0.1), r"alpha must be a number in \[0, 1\]"),
    (dict(alpha=1.01), r"alpha must be a number in \[0, 1\]"),
    (dict(alpha=True), "alpha"),
    (dict(backend="cutlass"), "backend must be one of"),
    (dict(act_static=1), "act_static must be a bool"),
    (dict(calibrate_seq_length=-3), "calibrate_seq_length"),
])
def test_smoothquant_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.SmoothQuantConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_cuda_int_mm(m, dtype):
    k, n = 256, 128
    lin = _layer(k, n)
    wq, ws = quantize_int8_per_channel(lin.weight)
    x = torch.randn(m, k, dtype=dtype)
    ref = w8a8_linear_reference(x, wq, ws, lin.bias.to(dtype))
    y = w8a8_linear(x.cuda(), wq.cuda(), ws.cuda(), lin.bias.to(dtype).cuda())
    assert torch.equal(int8_mm(quantize_int8_per_token(x.cuda())[0], wq.cuda()).cpu(),
                       int8_mm_reference(quantize_int8_per_token(x)[0], wq))
    assert (y.cpu().double() - ref).norm() / ref.norm() < 2 * EPS[dtype]


def test_w8a8_per_layer_static_override(tiny_llama, token_data):
    cfg = qk.W8A8Config(overrides={"*.down_proj": {"act_static": True}})
    q = qk.W8A8Quantizer(tiny_llama, cfg, verbose=False)
    assert q.needs_data  # one layer needs calibrated scales
    q.quantize(token_data)
    assert tiny_llama.model.layers[0].mlp.down_proj.input_scale is not None
    assert tiny_llama.model.layers[0].mlp.up_proj.input_scale is None
    with pytest.raises(ValueError, match=r"cannot override \['alpha'\] per layer"):
        qk.SmoothQuantConfig(overrides={"*.q_proj": {"alpha": 0.9}})


def test_already_quantized_model_is_refused(tiny_llama, token_data):
    qk.W8A8Quantizer(tiny_llama, verbose=False).quantize()
    with pytest.raises(ValueError, match="already quantized .*W8A8Linear"):
        qk.FP8Quantizer(tiny_llama, verbose=False).quantize()
    with pytest.raises(ValueError, match="already quantized .*W8A8Linear"):
        qk.AWQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(token_data)


@pytest.fixture
def interpret(monkeypatch):
    """Interpreted launches also read TRITON_INTERPRET at run time: set it for the test only."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _triton_usable() -> str | None:
    if w8a8_int8_matmul_triton is None:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_w8a8_int8_kernel, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1 could be set"
    return None


@pytest.mark.parametrize("m", [1, 2, 3, 17, 127, 128, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_w8a8_matches_oracle(m, dtype, interpret):
    why = _triton_usable()
    if why:
        pytest.skip(why)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k, n = 67, 45
    lin = _layer(k, n)
    wq, ws = quantize_int8_per_channel(lin.weight)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    xq, xs = quantize_int8_per_token(x)
    y = w8a8_int8_matmul_triton(xq.to(dev), xs.to(dev), wq.to(dev), ws.to(dev), lin.bias.to(dtype).to(dev), dtype)
    ref = w8a8_linear_reference(x, wq, ws, lin.bias.to(dtype))
    assert y.dtype == dtype and y.shape == (m, n)
    assert (y.cpu().double() - ref).norm() / ref.norm() < 2 * EPS[dtype]


def test_triton_w8a8_module_backend_and_errors(interpret):
    why = _triton_usable()
    if why:
        pytest.skip(why)
    lin = _layer(64, 32)
    for scale in (None, 0.02):
        q = W8A8Linear.from_linear(lin, input_scale=scale)
        x = torch.randn(5, 64)
        q.backend = "reference"
        ref = q(x)
        q.backend = "triton"
        assert torch.allclose(q(x), ref, rtol=1e-5, atol=1e-5)
    a = torch.zeros(3, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="must be 2-D int8"):
        w8a8_int8_matmul_triton(a.float(), torch.ones(3), a, torch.ones(3), None, torch.float32)
    with pytest.raises(ValueError, match=r"expected \[N, 64\]"):
        w8a8_int8_matmul_triton(a, torch.ones(3), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), None,
                                torch.float32)
    with pytest.raises(ValueError, match="a_scale has 2 values for M=3"):
        w8a8_int8_matmul_triton(a, torch.ones(2), a, torch.ones(3), None, torch.float32)


@pytest.mark.model
@pytest.mark.slow
def test_smoothquant_on_smollm2():
    """SmoothQuant W8A8 stays close to fp32 and is not worse than W8A8 without smoothing."""
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text
    from quantkern.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    held = tokenize_text(tok, builtin_text("eval"), max_tokens=4 * 256)
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration"), max_tokens=20000), 8, 256)
    ppl_fp = perplexity(model, held, seq_len=256, progress=False)
    plain = copy.deepcopy(model)
    qk.W8A8Quantizer(plain, verbose=False).quantize()
    ppl_plain = perplexity(plain, held, seq_len=256, progress=False)
    del plain
    qk.SmoothQuantQuantizer(model, alpha=0.5, verbose=False).quantize(calib)
    ppl_sq = perplexity(model, held, seq_len=256, progress=False)
    assert ppl_sq < 1.03 * ppl_fp and ppl_sq <= ppl_plain, (ppl_fp, ppl_plain, ppl_sq)


def test_smoothing_linear_producers_keeps_function_and_helps(outlier_llama, token_data):
    """With smooth_linear_producers, up_proj -> down_proj is smoothed too (folded into up_proj rows)."""
    with torch.no_grad():
        for layer in outlier_llama.model.layers:  # an outlier channel in down_proj's input
            layer.mlp.up_proj.weight[3] *= 40
        ref = outlier_llama(EVAL).logits
    a, b = copy.deepcopy(outlier_llama), copy.deepcopy(outlier_llama)
    qa = qk.SmoothQuantQuantizer(a, alpha=0.5, verbose=False)
    qa.quantize(token_data)
    qb = qk.SmoothQuantQuantizer(b, alpha=0.5, smooth_linear_producers=True, verbose=False)
    qb.quantize(token_data)
    assert len(qb.report["smoothed"]) == len(qa.report["smoothed"]) + 2  # + up_proj in both blocks
    assert _err(b, ref) < _err(a, ref)


def test_triton_w8a8_forward_is_one_custom_op(interpret):
    why = _triton_usable()
    if why:
        pytest.skip(why)
    from conformance import single_op_of

    for scale in (None, 0.02):
        q = W8A8Linear.from_linear(_layer(64, 32), input_scale=scale)
        q.backend = "triton"
        assert single_op_of(q, torch.randn(5, 64)) == "quantkern::w8a8_linear_triton"

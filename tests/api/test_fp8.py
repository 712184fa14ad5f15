"""FP8 E4M3: casts (range, no NaN), the fp8 linear op vs its fp64 oracle, FP8Linear, FP8Quantizer."""

import copy

import pytest
import torch

import quantkern as qk
from quantkern.calibration import group_batches, normalize_calibration_data
from quantkern.core.fp8 import FP8_DTYPE, FP8_MAX, cast_to_fp8, quantize_fp8_per_row
from quantkern.kernels.w8a8 import fp8_linear, fp8_linear_reference
from quantkern.nn.fp8_linear import FP8Linear

EPS = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
EVAL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))


def test_cast_clamps_to_e4m3_range_and_never_nans():
    x = torch.tensor([[1e30, -1e30, 3.0e38, 500.0, -448.0, 0.0]])
    q = cast_to_fp8(x, torch.ones(1, 1))
    assert q.dtype == FP8_DTYPE and not q.float().isnan().any()
    assert q.float().tolist() == [[448.0, -448.0, 448.0, 448.0, -448.0, 0.0]]
    # (whether a raw out-of-range cast saturates or gives NaN depends on device and torch version;
    # cast_to_fp8 clamps first so the result never depends on it)


def test_per_row_quantization_error_and_edges():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 70, generator=g) * torch.logspace(-6, 2, 33)[:, None]  # tiny to large rows
    q, s = quantize_fp8_per_row(w)
    assert s.shape == (33, 1) and s.dtype == torch.float32
    assert (q.float().abs().amax(1) == FP8_MAX).all()  # each row's max maps onto 448
    deq = q.float() * s
    big = w.abs() > w.abs().amax(1, keepdim=True) / 64  # E4M3 normals: 3 mantissa bits -> rel err <= 2^-4
    assert ((deq - w).abs() <= w.abs() * 2 ** -4 + 1e-30)[big].all()
    q0, s0 = quantize_fp8_per_row(torch.zeros(2, 8))
    assert (q0.float() == 0).all() and (s0 == 1).all()
    with pytest.raises(ValueError, match="inf/NaN"):
        quantize_fp8_per_row(torch.tensor([[1.0, float("inf")]]))


def _layer(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin


@pytest.mark.parametrize("act", ["none", "dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 17, 129])
def test_fp8_op_matches_oracle(act, dtype, m):
    k, n = 67, 45
    lin = _layer(k, n)
    wq, ws = quantize_fp8_per_row(lin.weight)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    xs = torch.tensor([x.float().abs().max().item() / FP8_MAX]) if act == "static" else None
    y = fp8_linear(x, wq, ws, lin.bias.to(dtype), xs, act)
    ref = fp8_linear_reference(x, wq, ws, lin.bias.to(dtype), xs, act)
    assert y.dtype == dtype and y.shape == (m, n)
    tol = 2 * EPS[dtype] + (3e-3 if act == "none" and dtype != torch.float32 else 0)  # fp16/bf16 GEMM inputs
    assert (y.double() - ref).norm() / ref.norm() < tol
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    assert (ref - exact).norm() / exact.norm() < 0.06  # fp8 is a close approximation of the layer


def test_fp8_opcheck():
    wq, ws = quantize_fp8_per_row(torch.randn(16, 32))
    # test_schema is left out: its checker multiplies the fp8 inputs, which CPU torch cannot do
    torch.library.opcheck(torch.ops.quantkern.fp8_linear.default,
                          (torch.randn(5, 32), wq, ws, None, None, "dynamic", True),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fp8_linear_module():
    lin = _layer(64, 32)
    q = FP8Linear.from_linear(lin, act="static", input_scale=0.01)
    sd = q.state_dict()
    assert sd["weight"].dtype == FP8_DTYPE and sd["weight_scale"].shape == (32, 1)
    assert sd["input_scale"].item() == pytest.approx(0.01) and sd["bias"].shape == (32,)
    x = torch.randn(2, 3, 64)
    assert q(x).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="needs a finite input_scale > 0"):
        FP8Linear.from_linear(lin, act="static")
    with pytest.raises(ValueError, match="act must be one of"):
        FP8Linear(8, 8, act="e5m2")
    with pytest.raises(ValueError, match="expected 64"):
        q(torch.randn(3, 65))
    d = FP8Linear.from_linear(lin)
    if not torch.cuda.is_available():
        d.backend = "scaled_mm"
        with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
            d(x)


@pytest.mark.parametrize("kwargs", [dict(), dict(act_dtype=None), dict(act_static=True)])
def test_fp8_quantizer_close_to_float(tiny_llama, token_data, kwargs):
    with torch.no_grad():
        ref = tiny_llama(EVAL).logits
    qk.FP8Quantizer(tiny_llama, verbose=False, **kwargs).quantize(token_data)
    mods = [m for m in tiny_llama.modules() if isinstance(m, FP8Linear)]
    assert len(mods) == 14 and not isinstance(tiny_llama.lm_head, FP8Linear)
    with torch.no_grad():
        out = tiny_llama(EVAL).logits
    assert out.isfinite().all()
    assert (out - ref).norm() / ref.norm() < 0.05


def _both_doors_identical(model, cfg, token_data) -> None:
    a, b = model, copy.deepcopy(model)
    qk.FP8Quantizer(a, cfg, verbose=False).quantize(token_data)
    b = qk.prepare(b, cfg)
    for batch in group_batches(normalize_calibration_data(token_data), cfg.batch_size):
        b(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    b = qk.convert(b, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k].view(torch.uint8) if sa[k].dtype == FP8_DTYPE else sa[k],
                           sb[k].view(torch.uint8) if sb[k].dtype == FP8_DTYPE else sb[k]) for k in sa)


def test_fp8_both_doors_identical(tiny_llama, token_data):
    _both_doors_identical(tiny_llama, qk.FP8Config(act_static=True, batch_size=4), token_data)


@pytest.mark.parametrize("kwargs", [dict(), dict(act_dtype=None), dict(act_static=True, actorder=True)])
def test_fp8_gptq_weights(tiny_llama, token_data, kwargs):
    with torch.no_grad():
        ref = tiny_llama(EVAL).logits
    dense = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    q = qk.FP8Quantizer(tiny_llama, verbose=False, weight_method="gptq", **kwargs)
    q.quantize(token_data)
    mods = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, FP8Linear)}
    assert len(mods) == 14 and len(q.report["gptq_losses"]) == 14
    changed = 0
    for n, m in mods.items():
        r8, rs = quantize_fp8_per_row(dense[n])
        assert torch.equal(m.weight_scale, rs)  # same per-channel scales as rounding ...
        changed += not torch.equal(m.weight.view(torch.uint8), r8.view(torch.uint8))  # ... other codes
        if kwargs.get("act_static"):
            assert m.act == "static" and 0 < float(m.input_scale) < float("inf")
    assert changed == 14
    with torch.no_grad():
        out = tiny_llama(EVAL).logits
    assert out.isfinite().all() and (out - ref).norm() / ref.norm() < 0.05


def test_fp8_gptq_both_doors_identical_and_needs_data(tiny_llama, token_data):
    cfg = qk.FP8Config(weight_method="gptq", act_static=True, batch_size=4)
    with pytest.raises(ValueError, match="calibration data"):
        qk.FP8Quantizer(copy.deepcopy(tiny_llama), cfg, verbose=False).quantize(None)
    _both_doors_identical(tiny_llama, cfg, token_data)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_method="awq"), "weight_method must be 'rtn' or 'gptq'"),
    (dict(weight_method="gptq", damp_percent=0.0), r"damp_percent must be in \(0, 1\)"),
    (dict(actorder="yes"), "actorder must be a bool"),
    (dict(act_dtype="int8"), r"unsupported \(weight_dtype, act_dtype\) pair.*W8A8Config"),
    (dict(weight_dtype="float8_e5m2"), r"unsupported \(weight_dtype, act_dtype\) pair"),
    (dict(act_dtype=None, act_static=True), "act_static=True needs quantized activations"),
    (dict(backend="marlin"), "backend must be one of"),
])
def test_fp8_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.FP8Config(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 17, 128])
def test_fp8_scaled_mm_matches_emulation(m):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm fp8 needs sm89+")
    lin = _layer(256, 128)
    wq, ws = quantize_fp8_per_row(lin.weight)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    ref = fp8_linear_reference(x, wq, ws, lin.bias.bfloat16())
    y = fp8_linear(x.cuda(), wq.cuda(), ws.cuda(), lin.bias.bfloat16().cuda())
    assert (y.cpu().double() - ref).norm() / ref.norm() < 2 * EPS[torch.bfloat16]


@pytest.mark.model
@pytest.mark.slow
def test_fp8_w8a8_on_smollm2_within_3_percent():
    # fp8 W8A8 with GPTQ-rounded weights (round-to-nearest weights measured +4.0% on this model:
    # benchmarks/results/quality_algorithms.csv)
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text
    from quantkern.models import load_model

    model, tok = load_model("smollm2")
    held = tokenize_text(tok, builtin_text("eval"), max_tokens=4 * 256)
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration")), 8, 256)
    ppl_fp = perplexity(model, held, seq_len=256, progress=False)
    qk.FP8Quantizer(model, verbose=False, weight_method="gptq").quantize(calib)
    ppl = perplexity(model, held, seq_len=256, progress=False)
    assert ppl < 1.03 * ppl_fp, (ppl_fp, ppl)

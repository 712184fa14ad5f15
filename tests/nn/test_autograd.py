"""Autograd through the quantized module family (issue #17, training on top): gradients flow to the
input, the quantized weights stay frozen, and ``grad_x`` equals the dequantized reference's."""

import pytest
import torch

from quantkern import QuantLinear
from quantkern.algorithms import quantize_rtn
from quantkern.core import WeightScheme

from conformance import family_module


def _quant_linear(bits, gs, sym, act_order, dtype, backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    qw = quantize_rtn(lin.weight, WeightScheme(bits, gs, sym))
    if act_order:  # a non-monotonic g_idx, as GPTQ act-order leaves it
        qw = type(qw)(codes=qw.codes, scales=qw.scales, zeros=qw.zeros, g_idx=qw.g_idx[torch.randperm(64)],
                      scheme=WeightScheme(bits, gs, sym, act_order=True))
    return QuantLinear.from_quantized(qw, bias=lin.bias, dtype=dtype, backend=backend)


def _check_grad(mod, xdtype, tol):
    buffers = {k: v.clone() for k, v in mod.state_dict().items()}
    torch.manual_seed(1)
    x = torch.randn(3, 5, mod.in_features, dtype=xdtype, requires_grad=True)
    y = mod(x)
    assert y.requires_grad and y.dtype == xdtype
    g = torch.randn_like(y)
    (y * g).sum().backward()
    w = mod.dequantized_weight()
    want = g.float() @ w
    assert x.grad.dtype == xdtype and x.grad.shape == x.shape
    err = (x.grad.float() - want).abs().max() / want.abs().max()
    assert err < tol, f"relative grad error {err:.2e}"
    assert not any(p.requires_grad for p in mod.parameters())
    for k, v in mod.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed in a backward pass"


@pytest.mark.parametrize("xdtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bits,gs,sym,act_order", [(4, 32, True, False), (3, 32, False, True), (2, -1, False, False),
                                                   (8, 32, True, True)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_quant_linear_grad_matches_dequantized_reference(backend, bits, gs, sym, act_order, xdtype, tol):
    mod = _quant_linear(bits, gs, sym, act_order, torch.float16, backend)
    if backend == "cpu" and not mod.kernel_for(torch.randn(1, 64, dtype=xdtype)).backend.value == "cpu":
        pytest.skip("the CPU kernel does not take this input here")
    _check_grad(mod, xdtype, tol)


def test_quant_linear_forward_and_grad_equal_a_dense_linear_fp32():
    """gradcheck-style: with fp32 scales the quantized layer is exactly x @ W_deq.T + b, forward and back."""
    mod = _quant_linear(4, 32, False, True, torch.float32, "reference")
    dense = torch.nn.Linear(64, 96)
    with torch.no_grad():
        dense.weight.copy_(mod.dequantized_weight())
        dense.bias.copy_(mod.bias)
    x = torch.randn(7, 64, dtype=torch.float64, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    y, y_ref = mod(x32), dense(x32.detach().requires_grad_())
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    xa = x32.detach().requires_grad_()
    xb = x32.detach().requires_grad_()
    mod(xa).pow(2).sum().backward()
    dense(xb).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    assert dense.weight.grad is not None  # the dense one trains its weight; the quantized one has none


@pytest.mark.parametrize("kind", ["w8a8", "w8a8-static", "fp8-dynamic", "fp8-none", "fp4", "zeroquant"])
def test_family_grad_is_straight_through_the_dequantized_weight(kind):
    mod = family_module(kind, "auto")
    _check_grad(mod, torch.float32, 1e-5)


def test_no_grad_inference_path_is_unchanged():
    """Inputs that do not need a gradient run the kernel op directly (the one-op forward stays)."""
    mod = _quant_linear(4, 32, True, False, torch.float16, "reference")
    x = torch.randn(2, 64)
    with torch.no_grad():
        a = mod(x)
    b = mod(x)  # grad enabled but x needs none
    assert not b.requires_grad and torch.equal(a, b)


def test_compile_without_prepared_kernels_names_the_fix():
    from quantkern.nn import build_kernels

    mod = _quant_linear(4, 32, True, False, torch.float16, "auto")
    x = torch.randn(3, 64)
    with pytest.raises(Exception, match="build_kernels"):
        torch.compile(mod, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert build_kernels(torch.nn.Sequential(mod), dtype=torch.float32) == 1
    torch.testing.assert_close(torch.compile(mod, backend="aot_eager", fullgraph=True)(x), mod(x), rtol=0, atol=0)


import pytest
import torch

from quantkern import Backend, QuantLinear
from quantkern.algorithms import quantize_rtn
from quantkern.core import WeightScheme
from quantkern.kernels import NoKernelError


def _ql(n=48, k=96, bits=4, gs=32, sym=False, bias=True, dtype=torch.float16, backend="auto"):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias)
    qw = quantize_rtn(lin.weight, WeightScheme(bits, gs, sym))
    return QuantLinear.from_quantized(qw, bias=lin.bias, dtype=dtype, backend=backend), qw, lin


@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96,), (1, 96), (3, 5, 96), (2, 1, 4, 96)])
def test_reference_forward_any_leading_dims_and_dtype(xdtype, shape):
    ql, qw, lin = _ql()
    x = torch.randn(*shape)
    want = x @ qw.dequantize().T + lin.bias.detach().half().float()
    got = ql(x.to(xdtype))
    assert got.dtype == xdtype and got.shape == (*shape[:-1], 48)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[xdtype]
    assert torch.allclose(got.float(), want, atol=tol * 4, rtol=tol)


def test_roundtrip_to_quantized_is_exact():
    ql, qw, _ = _ql(n=64, bits=3, gs=32)
    back = ql.to_quantized()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)


def test_shape_errors_are_early():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        QuantLinear(100, 64, bits=3, group_size=32)
    with pytest.raises(ValueError, match="larger than in_features"):
        QuantLinear(64, 64, bits=4, group_size=128)
    ql, _, _ = _ql()
    with pytest.raises(ValueError, match="expected 96"):
        ql(torch.randn(2, 95))


def test_explicit_backend_that_cannot_run_fails_loudly():
    ql, _, _ = _ql(backend=Backend.REFERENCE)
    with pytest.raises(NoKernelError, match="reference"):
        ql(torch.randn(2, 96).to(torch.int32))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        _ql(backend="tpu")


def test_state_dict_holds_only_the_standard_tensors():
    ql, _, _ = _ql()
    ql(torch.randn(1, 96))
    assert set(ql.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}

"""The kernel protocol (quantkern.kernels.registry): kernels answer from a spec and a call shape, are
prepared from tensors, never see the module; the choice is per (device, dtype, M bucket); every
backend's forward is one registered custom op, and ``torch.compile(fullgraph=True)`` traces it.

The Triton backend's share of these checks runs in tests/kernels/test_triton_kernels.py (the interpreter
must be on before triton is imported)."""

import pytest
import torch

from quantkern import QuantLinear
from quantkern.algorithms import quantize_rtn
from quantkern.core import WeightScheme
from quantkern.kernels import Backend, NoKernelError
from quantkern.kernels import registry as R
from quantkern.kernels.cpu import build as cpu_build
from quantkern.kernels.reference import gptq_gemm_reference

from conformance import BackendConformance, assert_compiles_fullgraph, family_module, single_op_of


def _layer(k=96, n=40, bits=4, gs=32, sym=False, bias=True, backend="auto", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    qw = quantize_rtn(w, WeightScheme(bits, gs, sym))
    return QuantLinear.from_quantized(qw, bias=b, dtype=torch.float16, backend=backend)


def _reference(layer, x):
    return gptq_gemm_reference(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.bias)


class _Recorder(R.QuantKernel):
    """A stand-in fused kernel that serves decode only (M <= 8) on CPUs; counts its preparations."""

    backend = Backend.CUDA  # its slot in the order: tried first
    priority = 10
    prepared = 0
    decline = None

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        if not shape.fits(8):
            return False, f"decode only, got M up to {shape.m_max}"
        return True, None

    def __init__(self, tensors, dtype):
        super().__init__(tensors, dtype)
        if type(self).decline:
            raise R.KernelDeclined(type(self).decline)
        type(self).prepared += 1
        self.t = tensors

    def apply(self, x):
        t = self.t
        return gptq_gemm_reference(x, t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.bias) + 1000


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(R, "_KERNELS", sorted(R._KERNELS + [_Recorder], key=lambda k: k.priority))
    monkeypatch.setattr(_Recorder, "prepared", 0)
    monkeypatch.setattr(_Recorder, "decline", None)
    return _Recorder


def test_buckets_are_ordered_and_cover_every_m():
    assert list(R.M_BUCKETS) == sorted(R.M_BUCKETS)
    assert [R.m_bucket(m) for m in (0, 1, 2, 8, 9, 16, 17, 64, 65, 256, 257, 10 ** 6)] == \
        [1, 1, 8, 8, 16, 16, 64, 64, 256, 256, None, None]
    assert R.CallShape(8, 1, 1).fits(8) and not R.CallShape(16, 1, 1).fits(8) and not R.CallShape(None, 1, 1).fits(8)
    assert R.CallShape(None, 1, 1).fits(None)


def test_decode_and_prefill_choose_their_own_kernels(recorder):
    layer = _layer()
    for m in (1, 3, 8, 9, 129, 2):
        x = torch.randn(m, 96)
        y = layer(x)
        want = _reference(layer, x) + (1000 if m <= 8 else 0)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    assert recorder.prepared == 1  # prepared once, shared by the buckets 1 and 8
    kinds = {type(k).__name__ for k in layer._kernels.prepared()}
    assert "_Recorder" in kinds and len(kinds) == 2  # and one kernel for M > 8


def test_a_kernel_that_declines_its_tensors_passes_the_call_on(recorder, caplog):
    recorder.decline = "g_idx is not a permutation of contiguous groups"
    layer = _layer(backend="cuda")  # explicit: the decline is the error
    with pytest.raises(NoKernelError, match="cuda: g_idx is not a permutation"):
        layer(torch.randn(1, 96))
    layer = _layer()
    x = torch.randn(1, 96)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-4)


def test_a_prepared_kernel_with_a_row_limit_is_not_used_above_it(monkeypatch):
    class Limited(_Recorder):
        @classmethod
        def can_implement(cls, spec, shape, device, dtype):
            return True, None  # the spec allows any M, the prepared layout only M <= 8

        def __init__(self, tensors, dtype):
            super().__init__(tensors, dtype)
            self.max_m = 8

    monkeypatch.setattr(R, "_KERNELS", sorted(R._KERNELS + [Limited], key=lambda k: k.priority))
    layer = _layer()
    assert isinstance(layer.kernel_for(torch.randn(4, 96)), Limited)
    assert not isinstance(layer.kernel_for(torch.randn(40, 96)), Limited)
    strict = _layer(backend="cuda")
    strict(torch.randn(1, 96))
    with pytest.raises(NoKernelError, match=r"layout runs M <= 8, got M up to 64"):
        strict(torch.randn(40, 96))


def test_kernels_take_tensors_not_modules():
    layer = _layer()
    t = layer.weight_tensors()
    assert not isinstance(t, torch.nn.Module) and t.spec == layer.kernel_spec()
    for cls in R.registered_kernels("gptq"):
        x = torch.randn(3, 96)
        ok, why = cls.can_implement(*R.kernel_query(layer, x))
        if not ok:
            continue
        k = cls.prepare(t, x.dtype)
        assert not any(isinstance(v, torch.nn.Module) for v in vars(k).values())
        torch.testing.assert_close(k.apply(x), _reference(layer, x), rtol=1e-4, atol=1e-3)


def test_build_kernels_prepares_every_bucket_before_tracing():
    layer = _layer()
    layer.build_kernels("cpu", torch.float32, max_rows=20)
    assert {key[2] for key in layer._kernels._by_bucket} == {1, 8, 16, 64}


class TestReferenceConformance(BackendConformance):
    backend = Backend.REFERENCE
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    OP = "quantkern::gptq_gemm_ref"


class TestCpuConformance(BackendConformance):
    backend = Backend.CPU
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    OP = "quantkern_cpu::gemm"

    @classmethod
    def available(cls):
        return cpu_build.load_error()


def _backends_here():
    out = [Backend.REFERENCE]
    if cpu_build.load_error() is None:
        out.append(Backend.CPU)
    return out


@pytest.mark.parametrize("backend", _backends_here(), ids=lambda b: b.value)
def test_forward_is_one_custom_op(backend):
    layer = _layer(backend=backend)
    op = single_op_of(layer, torch.randn(5, 96))
    assert op == {Backend.REFERENCE: "quantkern::gptq_gemm_ref", Backend.CPU: "quantkern_cpu::gemm"}[backend]


@pytest.mark.parametrize("backend", _backends_here(), ids=lambda b: b.value)
def test_fullgraph_compile_through_each_backend(backend):
    model = torch.nn.Sequential(_layer(n=64, backend=backend, seed=1), torch.nn.GELU(),
                                _layer(k=64, n=96, bits=3, gs=-1, sym=True, backend=backend, seed=2))
    assert_compiles_fullgraph(model, [torch.randn(1, 96), torch.randn(2, 7, 96)])


# ---------------------------------------------------------------- the rest of the module family
FAMILY = [("w8a8", "int_mm", "quantkern::w8a8_linear"), ("w8a8", "reference", "quantkern::w8a8_linear_ref"),
          ("w8a8-static", "auto", "quantkern::w8a8_linear"),
          ("fp8-dynamic", "auto", "quantkern::fp8_linear"), ("fp8-static", "emulated", "quantkern::fp8_linear"),
          ("fp8-none", "scaled_mm", "quantkern::fp8_linear"),
          ("fp4", "auto", "quantkern::fp4_linear_ref"), ("zeroquant", "auto", "quantkern::zeroquant_linear_ref")]


@pytest.mark.parametrize("kind,backend,op", FAMILY, ids=[f"{k}-{b}" for k, b, _ in FAMILY])
def test_family_forward_is_one_custom_op_and_compiles_fullgraph(kind, backend, op):
    mod = family_module(kind, backend)
    assert single_op_of(mod, torch.randn(3, 64)) == op
    if backend != "auto":
        assert mod.kernel_for(torch.randn(3, 64)).backend is Backend.parse(backend)
    assert_compiles_fullgraph(torch.nn.Sequential(mod, torch.nn.ReLU()), [torch.randn(1, 64), torch.randn(2, 5, 64)])


def test_family_speaks_one_backend_vocabulary():
    w8 = family_module("w8a8", "auto")
    assert w8.backend is Backend.AUTO and type(w8.kernel_for(torch.randn(2, 64))).__name__ == "Int8MMKernel"
    fp8 = family_module("fp8-dynamic", "emulated")
    assert fp8.backend is Backend.REFERENCE  # the fp8 name of the reference
    fp8.backend = "scaled_mm"
    with pytest.raises(NoKernelError, match="scaled_mm: needs a CUDA GPU with compute capability >= 8.9"):
        fp8(torch.randn(2, 64))
    with pytest.raises(NoKernelError, match="backend 'cpu' has no kernel for"):
        family_module("fp4", "cpu")(torch.randn(2, 64))
    with pytest.raises(ValueError, match="unknown backend"):
        w8.backend = "tpu"

"""Triton WnA16 kernels vs the fp32 reference: layout, both kernels, the backend, the ops.

Without CUDA the kernels run on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1`` is set
while ``quantkern.triton_kernels`` is first imported (the kernels are then built interpreted) and,
through an autouse fixture, during each test of this module only, so the variable never leaks into
other test modules (where it would make AUTO pick the slow interpreted backend on a CPU). If triton
was imported earlier in the process without it, the interpreted tests skip with that reason. With
CUDA every kernel test runs its same grid on the GPU instead (the ``cuda`` ids, marked ``gpu``);
``test_every_config_compiles_for_gpu_targets`` (slow) compiles all autotune configs for sm_80 and
sm_90 without a GPU.

Tolerance: the fused kernels and ``x.float() @ W.float()`` differ by the rounding of the weight tile
to the activation dtype (gather mode), the output rounding and fp32 accumulation, so elementwise
``|y - ref| <= 4 eps (|x| @ |W| + |bias|)`` with eps the dtype's machine epsilon, plus a relative
Frobenius-norm bound of ``2 eps``.
"""

import os
import subprocess
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
_saved_env = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton (and the kernels) are imported
pytest.importorskip("triton")
import quantkern.triton_kernels as tk  # noqa: E402

if _saved_env is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved_env

from quantkern.core import QuantizedWeight, WeightScheme  # noqa: E402
from quantkern.formats.bitpack import pack_rows  # noqa: E402
from quantkern.kernels import Backend, NoKernelError, dequantize_gptq, gptq_gemm_reference  # noqa: E402
from quantkern.kernels.registry import kernel_query  # noqa: E402
from quantkern.kernels.triton_backend import TritonKernel  # noqa: E402
from quantkern.nn import QuantLinear  # noqa: E402

INTERPRETED = tk.kernels_interpreted()
cpu_only = pytest.mark.skipif(not INTERPRETED, reason="kernels were not built for the interpreter "
                              "(CUDA present or triton_kernels imported before TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not _CUDA or INTERPRETED, reason="needs CUDA (kernels built non-interpreted)")
# every kernel test runs twice: on the CPU interpreter (default run) and on CUDA (marked gpu)
DEVICES = [pytest.param("cpu", marks=cpu_only, id="interp"),
           pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda], id="cuda")]

M_LIST = (1, 2, 3, 17, 127, 128, 129)
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# Pinned configs for the interpreter (autotuning there is pointless): small, but big enough to be quick.
GEMV_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)
GEMV1_CFG = dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3)
GEMM_CFG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_qweight(n, k, bits, group_size, sym, act_order, seed=0, scale_dtype=torch.float16) -> QuantizedWeight:
    """Random canonical weight: uniform codes / zeros, positive scales, GPTQ-style act-order g_idx."""
    gen = torch.Generator().manual_seed(seed)
    g = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(g, n, generator=gen) * 0.02 + 0.004).to(scale_dtype)
    zeros = (torch.full((g, n), 1 << (bits - 1), dtype=torch.int32) if sym
             else torch.randint(0, 1 << bits, (g, n), generator=gen, dtype=torch.int32))
    g_idx = torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return QuantizedWeight(codes, scales, zeros, g_idx, WeightScheme(bits, group_size, sym, act_order))


def check(y, x, w_kn, bias=None):
    """Assert ``y`` matches ``x @ w_kn (+ bias)`` computed in fp32, within the dtype's rounding."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w_kn.shape[1])
    x32, y32 = x.float().cpu(), y.float().cpu()
    w_kn = w_kn.float().cpu()
    ref = x32 @ w_kn
    bound = x32.abs() @ w_kn.abs()
    if bias is not None:
        ref, bound = ref + bias.float().cpu(), bound + bias.float().cpu().abs()
    eps = EPS[x.dtype]
    err = (y32 - ref).abs()
    assert torch.isfinite(y32).all()
    excess = err - 4 * eps * bound
    assert (excess <= 1e-6).all(), f"max error {err.max():.3g}, worst excess {excess.max():.3g}"
    rel = (y32 - ref).norm() / ref.norm().clamp(min=1e-12)
    assert rel <= 2 * eps, f"relative error {rel:.3g} > {2 * eps:.3g}"


def run_case(m, n, k, bits, group_size, sym, act_order, dtype, device="cpu", bias=False, config="pinned", seed=0):
    qw = make_qweight(n, k, bits, group_size, sym, act_order, seed)
    w = tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, group_size)
    w = _to(w, device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    # M = 1 takes the GEMV mode (BLOCK_M = 1), other decode sizes tl.dot, M > 16 the GEMM
    cfg = None if config is None else GEMV1_CFG if m == 1 else GEMV_CFG if m <= tk.DECODE_MAX_M else GEMM_CFG
    y = tk.wna16_matmul(x, w, b, config=cfg)
    check(y, x, qw.dequantize(torch.float32).t(), b)


def _to(w, device):
    if device == "cpu":
        return w
    for f in ("qweight", "scales", "zeros", "g_idx", "perm"):
        if getattr(w, f) is not None:
            setattr(w, f, getattr(w, f).to(device))
    return w


# ---------------------------------------------------------------- layout (pure torch, exact)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_k_words_is_the_gptq_stream_for_power_of_two_bits(bits):
    codes = torch.randint(0, 1 << bits, (64, 24), dtype=torch.int32)
    assert torch.equal(tk.pack_k_words(codes, bits), pack_rows(codes, bits))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 10, 37, 64])
def test_pack_k_words_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (k, 5), dtype=torch.int32)
    words = tk.pack_k_words(codes, bits)
    assert words.shape == (sum(-(-k // (32 // w)) for w in (1, 2, 4, 8) if bits & w), 5)
    if k % 32 == 0:
        assert words.numel() * 32 == codes.numel() * bits  # exactly `bits` bits a weight
    assert torch.equal(tk.unpack_k_words(words, bits, k), codes)


def test_pack_k_words_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        tk.pack_k_words(torch.full((4, 4), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        tk.pack_k_words(torch.zeros(4, 4, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match=r"int32 \[2, N\]"):
        tk.unpack_k_words(torch.zeros(3, 4, dtype=torch.int32), 4, 16)


@pytest.mark.parametrize("bits,group_size,sym,act_order", [(4, 32, True, False), (3, 32, False, True),
                                                           (2, 64, False, True), (8, -1, True, False)])
def test_from_gptq_layout(bits, group_size, sym, act_order):
    qw = make_qweight(64, 128, bits, group_size, sym, act_order)
    layer = QuantLinear.from_quantized(qw)
    w = tk.from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 128, group_size)
    assert torch.equal(w.dequantize(), qw.dequantize().t())
    assert w.group_size == group_size  # act-order is sorted back into regular groups
    assert (w.perm is not None) == act_order
    assert (w.zero_point >= 0) == sym and (w.zeros.numel() == 0) == sym
    if 32 % bits == 0 and not act_order:
        assert w.qweight.data_ptr() == layer.qweight.data_ptr()  # reused, not copied


def test_layout_arbitrary_g_idx_is_gathered():
    qw = make_qweight(16, 64, 4, 16, False, False)
    qw.g_idx = torch.randint(0, 4, (64,), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    for sort in (False, True):
        w = tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 16, sort_act_order=sort)
        assert w.group_size == 0 and torch.equal(w.dequantize(), qw.dequantize().t())


def test_layout_rejects_inconsistent_tensors():
    qw = make_qweight(16, 64, 4, 32, False, False)
    with pytest.raises(ValueError, match="g_idx must have shape"):
        tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx[:10], 4, 32)
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
        tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx + 1, 4, 32)
    with pytest.raises(ValueError, match="scales .* and zeros"):
        tk.pack_triton_weight(qw.codes, qw.scales[:, :8], qw.zeros, qw.g_idx, 4, 32)


# ---------------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", M_LIST)
@pytest.mark.parametrize("bits,group_size,sym,act_order", [(2, 32, False, False), (3, 64, True, True),
                                                           (4, 128, False, True), (8, -1, True, False)])
def test_m_sweep(m, bits, group_size, sym, act_order, device):
    dtype = torch.bfloat16 if m in (2, 127) else torch.float16
    run_case(m, 96, 256, bits, group_size, sym, act_order, dtype, device, bias=(m % 2 == 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("m", [3, 17])
def test_schemes(bits, group_size, m, device):
    # sym / act-order / dtype rotate through the grid so that every pair of them meets
    i = bits + group_size // 32
    sym, act_order = bool(i % 2), bool((i // 2) % 2) and group_size != -1
    dtype = (torch.float16, torch.bfloat16)[(i + m) % 2]
    run_case(m, 48, 256, bits, group_size, sym, act_order, dtype, device, seed=i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,bits,group_size", [(19, 37, 3, 16), (33, 100, 5, 32), (7, 130, 4, 64),
                                                 (21, 45, 2, -1), (9, 70, 8, 32), (13, 50, 6, 16), (11, 64, 7, 32)])
@pytest.mark.parametrize("m", [1, 2, 17])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_odd_shapes_and_ragged_groups(n, k, bits, group_size, m, dtype, device):
    run_case(m, n, k, bits, group_size, False, False, dtype, device, bias=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [GEMV1_CFG, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1),
                                    dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=16, SPLIT_K=16)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_decode_modes_and_split_k(config, m, device):
    bits = 2 if config["BLOCK_K"] == 16 else 4  # 2-bit words hold 16 codes: one word row a tile
    qw = make_qweight(40, 192, bits, 32, False, True)
    w = _to(tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, 32), device)
    x = torch.randn(m, 192).half().to(device)
    b = torch.randn(40).half().to(device)
    check(tk.wna16_matmul(x, w, b, config=config), x, qw.dequantize().t(), b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("m", [1, 2, 33])
def test_arbitrary_g_idx_and_unaligned_groups(sort, m, device):
    # group 48 is not a multiple of BLOCK_K=32 and g_idx is an arbitrary map: both gather per column
    qw = make_qweight(24, 96, 4, 48, False, False, scale_dtype=torch.float32)
    x = torch.randn(m, 96).bfloat16().to(device)
    cfg = GEMV1_CFG if m == 1 else GEMV_CFG if m <= 16 else GEMM_CFG
    w = _to(tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 48), device)
    check(tk.wna16_matmul(x, w, config=cfg), x, qw.dequantize().t())
    qw.g_idx = torch.randint(0, 2, (96,), dtype=torch.int32, generator=torch.Generator().manual_seed(5))
    w = _to(tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 48, sort_act_order=sort), device)
    check(tk.wna16_matmul(x, w, config=cfg), x, qw.dequantize().t())


@cpu_only
def test_tolerance_catches_an_off_by_one_zero():
    """The comparison is tight enough to see the smallest layout mistake: every zero off by one."""
    qw = make_qweight(32, 128, 4, 32, True, False)
    w = tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 32)
    w.zero_point += 1
    x = torch.randn(3, 128).half()
    with pytest.raises(AssertionError, match="max error"):
        check(tk.wna16_matmul(x, w, config=GEMV_CFG), x, qw.dequantize().t())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,bits", [(1, 4), (129, 4), (16, 3), (4096, 8)])
def test_registered_ops_autotune_path(m, bits, device):
    """The ops with no pinned config: interpreted, the first pruned candidate; on CUDA, autotuned."""
    if device == "cpu" and m > 129:
        pytest.skip("large M is for the GPU")
    run_case(m, 256 if device == "cuda" else 64, 512 if device == "cuda" else 128, bits, 32, False, True,
             torch.float16, device, bias=True, config=None)


# ---------------------------------------------------------------- constraints: clear early errors
def _args(m=2, k=64, n=16, bits=4, dtype=torch.float16):
    qw = make_qweight(n, k, bits, 32, False, False)
    w = tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, 32)
    return [torch.randn(m, k).to(dtype), w.qweight, w.scales, w.zeros, w.g_idx, None, bits, 32, w.zero_point]


@pytest.mark.parametrize("op", [tk.gemm_wna16, tk.gemv_wna16])
@pytest.mark.parametrize("index,value,match", [
    (0, torch.randn(2, 64), "float16 or bfloat16"),
    (0, torch.randn(2, 2, 64).half(), "2-D"),
    (0, torch.randn(64, 2).half().t(), "unit stride"),
    (0, torch.randn(2, 72).half(), r"qweight must be int32 \[9, N\] \(bit planes \[4\] of K=72\)"),
    (1, torch.zeros(8, 16, dtype=torch.int64), "qweight must be int32"),
    (2, torch.ones(2, 15).half(), r"scales must be fp16 / bf16 / fp32 \[G, 16\]"),
    (2, torch.ones(3, 16).half(), "give 2 groups, but scales has 3 rows"),
    (3, torch.zeros(2, 16, dtype=torch.int32), "zeros must be uint8"),
    (4, torch.zeros(63, dtype=torch.int32), r"g_idx must be int32 \[64\]"),
    (5, torch.zeros(15).half(), r"bias must be float \[16\]"),
    (6, 9, "bits must be an int in 2..8"),
    (7, -2, "group_size must be -1, 0"),
    (8, 16, "zero_point 16 is outside"),
])
def test_bad_inputs_raise_early(op, index, value, match):
    args = _args()
    args[index] = value
    with pytest.raises(ValueError, match=match):
        op(*args, config=GEMM_CFG if op is tk.gemm_wna16 else GEMV_CFG)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.gemm_wna16(*_args(), config=GEMM_CFG)
    layer = QuantLinear.from_quantized(make_qweight(16, 64, 4, 32, True, False))
    ok, reason = TritonKernel.can_implement(*kernel_query(layer, torch.randn(2, 64).half()))
    assert not ok and "TRITON_INTERPRET=1" in reason


@pytest.mark.parametrize("config,split_k,match", [
    (dict(BLOCK_M=32, BLOCK_N=32), False, r"missing \['BLOCK_K'\]"),
    (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2), False, r"unknown config keys \['SPLIT_K'\]"),
    (dict(BLOCK_M=32, BLOCK_N=48, BLOCK_K=32), False, "BLOCK_N'] must be a power of two"),
    (dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32), False, r"BLOCK_M'\] must be >= 16, got 1"),
    (dict(BLOCK_M=8, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1), True, "or exactly 1"),
    (dict(BLOCK_M=16, BLOCK_N=8, BLOCK_K=32, SPLIT_K=1), True, "must be >= 16"),
    (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=0), True, "positive int"),
    (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=1), True, "BLOCK_K'] must be >= 32 for 3-bit"),
    ([16, 32, 32], True, "must be a dict"),
])
def test_bad_configs_raise(config, split_k, match):
    op = tk.gemv_wna16 if split_k else tk.gemm_wna16
    with pytest.raises(ValueError, match=match):
        op(*_args(bits=3 if "3-bit" in match else 4), config=config)


# ---------------------------------------------------------------- backend selection and QuantLinear
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [Backend.TRITON, Backend.AUTO])
def test_quant_linear_runs_triton(backend, device):
    if device == "cuda" and backend is Backend.AUTO:
        pytest.skip("AUTO picks the CUDA backend first on a GPU")
    qw = make_qweight(64, 128, 3, 32, False, True)
    bias = torch.randn(64)
    layer = QuantLinear.from_quantized(qw, bias=bias, dtype=torch.float16, backend=backend).to(device)
    x = torch.randn(2, 5, 128).half().to(device)
    y = layer(x)
    assert isinstance(layer.kernel_for(x.reshape(-1, 128)), TritonKernel)
    assert y.shape == (2, 5, 64)
    w = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 3, 128, dtype=torch.float32)
    check(y.reshape(-1, 64), x.reshape(-1, 128), w, layer.bias)
    ref = gptq_gemm_reference(x.reshape(-1, 128), layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 3,
                              layer.bias)
    assert (y.reshape(-1, 64).float() - ref.float()).norm() / ref.float().norm() < 4 * EPS[torch.float16]
    kernel = layer.kernel_for(x.reshape(-1, 128))
    kernel.config = dict(GEMV_CFG, SPLIT_K=4)  # pinning on the backend object bypasses the autotuner
    check(layer(x).reshape(-1, 64), x.reshape(-1, 128), w, layer.bias)
    kernel.config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=1)
    with pytest.raises(ValueError, match="BLOCK_K'] must be >= 32 for 3-bit"):
        layer(x)


@cpu_only
def test_explicit_triton_backend_fails_loudly():
    layer = QuantLinear.from_quantized(make_qweight(16, 64, 4, 32, True, False), backend="triton")
    with pytest.raises(NoKernelError, match="triton: activation dtype torch.float32 is not fp16 / bf16"):
        layer(torch.randn(2, 64))


# ---------------------------------------------------------------- torch.library registration
@cpu_only
@pytest.mark.parametrize("m", [3, 20])
def test_opcheck(m):
    op = torch.ops.quantkern.gemv_wna16_triton if m <= 16 else torch.ops.quantkern.gemm_wna16_triton
    args = _args(m=m)
    args[5] = torch.randn(16).half()
    torch.library.opcheck(op, tuple(args))


@cpu_only
def test_torch_compile_traces_without_graph_breaks():
    qw = make_qweight(32, 128, 4, 32, False, True)
    w = tk.pack_triton_weight(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 32)
    torch._dynamo.reset()
    f = torch.compile(lambda x: tk.wna16_matmul(x, w), backend="aot_eager", fullgraph=True)
    for m in (3, 20):  # the decode op and the GEMM op, act-order permutation included
        x = torch.randn(m, 128).half()
        check(f(x), x, qw.dequantize().t())


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _args(m=5, dtype=torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        for op in (torch.ops.quantkern.gemm_wna16_triton, torch.ops.quantkern.gemv_wna16_triton):
            y = op(*fake)
            assert y.shape == (5, 16) and y.dtype == torch.bfloat16


# ---------------------------------------------------------------- full grid (slow) and CUDA
GRID = [(bits, gs, sym, act) for bits in (2, 3, 4, 8) for gs in (-1, 32, 64, 128)
        for sym in (True, False) for act in (False, True) if not (act and gs == -1)]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,group_size,sym,act_order", GRID)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_grid(bits, group_size, sym, act_order, dtype, device):
    for m in M_LIST:
        run_case(m, 72, 320, bits, group_size, sym, act_order, dtype, device, bias=bool(m % 2))
        if device == "cuda":  # ragged last group and odd sizes at a realistic K
            run_case(m, 200, 1000, bits, group_size, sym, act_order, dtype, device, bias=bool(m % 2))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 64])
def test_quant_linear_cuda_compile(m):
    qw = make_qweight(4096, 4096, 4, 128, False, True)
    layer = QuantLinear.from_quantized(qw, dtype=torch.float16, backend="triton").cuda()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    y = torch.compile(layer, fullgraph=False)(x)
    w = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 4096, dtype=torch.float32)
    check(y, x, w)


# Compiles every autotune config of both kernels for sm_80 and sm_90 without a GPU (Triton's AOT
# path: TTIR -> PTX -> cubin with its bundled ptxas), in a fresh process because this one holds the
# interpreted kernels. Fails on a compile error, or if a config of the main case (W4 g128 fp16)
# needs more shared memory than the architecture has.
_AOT_SCRIPT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantkern.triton_kernels.gemm_wna16 import GROUP_M, _gemm_wna16_kernel
from quantkern.triton_kernels.gemv_wna16 import _gemv_wna16_kernel, _splitk_reduce_kernel
from quantkern.triton_kernels._checks import group_mode
from quantkern.triton_kernels._tuning import GEMM_CONFIGS, GEMV_CONFIGS
from quantkern.triton_kernels.aot import compile_ahead

arch = int(sys.argv[1])
smem_limit = {80: 166912, 90: 232448}[arch]
variants = [(4, 128, -1, "fp16"), (3, 64, 4, "bf16"), (2, 32, -1, "fp16"), (8, -1, 128, "bf16"), (4, 0, -1, "fp16")]
bad = []
for fn, configs in ((_gemm_wna16_kernel, GEMM_CONFIGS), (_gemv_wna16_kernel, GEMV_CONFIGS)):
    for cfg in configs:
        for bits, gs, zp, dt in variants:
            bk = min(cfg["BLOCK_K"], gs) if gs > 0 else cfg["BLOCK_K"]
            mode = group_mode(gs, bk)
            const = dict(BITS=bits, GROUP_MODE=mode, GROUP_SIZE=gs if mode == 1 else 1, ZERO_POINT=zp,
                         HAS_BIAS=True, DOT_FP32=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk)
            const.update(GROUP_M=GROUP_M) if fn is _gemm_wna16_kernel else const.update(SPLIT_K=cfg["SPLIT_K"])
            try:
                k = compile_ahead(fn, const, dt, arch, cfg["num_warps"], cfg["num_stages"])
            except Exception as e:
                bad.append(f"{fn.__name__} {cfg} W{bits} g{gs} {dt}: {type(e).__name__} {str(e)[-300:]}")
                continue
            if (bits, gs, dt) == (4, 128, "fp16") and k.metadata.shared > smem_limit:
                bad.append(f"{fn.__name__} {cfg}: {k.metadata.shared} B shared memory > {smem_limit}")
for dt in ("fp16", "bf16"):
    sig = dict(p_ptr="*fp32", b_ptr="*" + dt, y_ptr="*" + dt, MN="i32", N="i32", SPLIT_K="constexpr",
               HAS_BIAS="constexpr", BLOCK="constexpr")
    try:
        triton.compile(ASTSource(fn=_splitk_reduce_kernel, signature=sig,
                                 constexprs=dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=1024)),
                       target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    except Exception as e:
        bad.append(f"_splitk_reduce_kernel {dt}: {type(e).__name__} {str(e)[-300:]}")
print("\n".join(bad) or "all compiled")
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_for_gpu_targets(arch):
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@cpu_only
@pytest.mark.parametrize("bits", [4, 3])
def test_release_canonical_with_triton(bits):
    # 4-bit: the Triton layout *is* GPTQ's qweight (and the layer's scales and, without act-order, g_idx):
    # only qzeros (unpacked into the kernel's uint8 zeros) is freed; 3-bit streams are repacked into bit
    # planes, so qweight goes too
    import quantkern as qk

    layer = QuantLinear.from_quantized(make_qweight(64, 128, bits, 32, False, False), dtype=torch.float16,
                                       backend="triton")
    x = torch.randn(3, 128).half()
    ref = layer(x)
    nbytes = {b: getattr(layer, b).numel() * getattr(layer, b).element_size()
              for b in ("qweight", "qzeros", "scales", "g_idx")}
    freed = qk.release_canonical(layer)
    assert freed == nbytes["qzeros"] + (nbytes["qweight"] if bits == 3 else 0)
    assert torch.equal(layer(x), ref)
    with pytest.raises(RuntimeError, match="released for inference on cpu / float16"):
        layer(x.float())


# ---------------------------------------------------------------- the kernel protocol (see test_kernel_protocol.py)
@pytest.mark.parametrize("act_order", [False, True], ids=["static", "actorder"])
def test_triton_forward_is_one_custom_op_and_compiles_fullgraph(act_order):
    from conformance import assert_compiles_fullgraph, single_op_of

    layer = QuantLinear.from_quantized(make_qweight(64, 128, 4, 32, False, act_order), bias=torch.randn(64),
                                       dtype=torch.float16, backend="triton")
    for m in (1, 17):  # the decode kernel and the GEMM, inside the one op
        assert single_op_of(layer, torch.randn(m, 128).half()) == "quantkern::wna16_linear_triton"
    assert_compiles_fullgraph(layer, [torch.randn(1, 128).half(), torch.randn(3, 17, 128).half()])


from conformance import BackendConformance  # noqa: E402


class TestTritonConformance(BackendConformance):
    """The conformance grid on the Triton backend (the interpreter here, the GPU where there is one)."""

    backend = Backend.TRITON
    device = "cuda" if torch.cuda.is_available() else "cpu"
    OP = "quantkern::wna16_linear_triton"
    MS = (1, 2, 3, 17, 127, 128, 129) if torch.cuda.is_available() else (1, 3, 17, 129)

    @classmethod
    def available(cls):
        if cls.device == "cpu" and not INTERPRETED:
            return "kernels were not built for the interpreter"
        return None

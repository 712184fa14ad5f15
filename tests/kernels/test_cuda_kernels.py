"""CUDA kernels (csrc/cuda): layouts and dequantization proven bit-exact on CPU, every .cu compiled
for sm_80 / sm_90 with nvcc, and (``gpu``-marked) numerics against the reference on a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from quantkern.core import QuantizedWeight
from quantkern.formats.gptq import pack_gptq
from quantkern.kernels import Backend, NoKernelError, select_kernel
from quantkern.kernels.registry import kernel_query

from conformance import BackendConformance, random_qweight
from quantkern.kernels.cuda import backend as cb
from quantkern.kernels.cuda import build, emulate, layout as L, ops
from quantkern.kernels.reference import dequantize_gptq, gptq_gemm_reference
from quantkern.nn.quant_linear import QuantLinear

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
HALF = (torch.float16, torch.bfloat16)


def make_qweight(k, n, bits, group_size, sym, act_order, dtype, seed=0, device="cpu") -> QuantizedWeight:
    """Random codes / zeros / scales of a valid scheme (:func:`conformance.random_qweight`) on ``device``."""
    qw = random_qweight(k, n, bits, group_size, sym, act_order, scale_dtype=dtype, seed=seed)
    if device == "cpu":
        return qw
    return QuantizedWeight(*(t.to(device) for t in (qw.codes, qw.scales, qw.zeros, qw.g_idx)), qw.scheme)


def reference_weight(qw: QuantizedWeight, dtype) -> torch.Tensor:
    t = pack_gptq(qw)
    return dequantize_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, qw.scheme.bits, qw.in_features, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# --- layouts: CPU, bit-exact ----------------------------------------------------------------------------
GEMM_CASES = [  # (K, N, group_size, sym, act_order): ragged groups, padded K and N, per-channel, act-order
    (136, 264, 64, True, False),
    (320, 128, 128, False, False),
    (200, 136, -1, False, False),
    (256, 256, 128, False, True),
    (192, 8, 64, True, True),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,n,gs,sym,act", GEMM_CASES)
def test_gemm_layout_dequant_bit_exact(dtype, bits, k, n, gs, sym, act):
    qw = make_qweight(k, n, bits, gs, sym, act, dtype)
    p = L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, gs, dtype)
    assert p.kp % 64 == 0 and p.np % 128 == 0 and p.qweight.numel() == p.kp * p.np * bits // 32
    assert (p.perm is not None) == act
    w = L.emulate_gemm_weight(p)  # what the mma instructions see, decoded the kernel's way
    ref = reference_weight(qw, dtype)
    assert same_bits(w[:k, :n], ref if p.perm is None else ref[p.perm])
    assert not w.isnan().any()  # padding must be finite: x is zero there, 0 * NaN is not


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("gs,sym,act", [(128, False, True), (48, True, False), (-1, False, False), (32, False, True)])
def test_gemv_layout_dequant_bit_exact(dtype, bits, gs, sym, act):
    k, n = 224, 96  # 224 = 128 + 96: ragged last group at g128; multiples of 32 so every bit width packs
    qw = make_qweight(k, n, bits, gs, sym, act, dtype, seed=bits)
    p = L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, dtype)
    assert p.qweight.shape == (k // 32 * bits, n) and p.g_idx.shape == (k,)
    ref = reference_weight(qw, dtype)
    assert same_bits(L.emulate_gemv_weight(p)[:k], ref if p.perm is None else ref[p.perm])
    if act:  # groups are contiguous after the permutation: the kernel's group-change branch is rare
        assert bool((p.g_idx[1:] >= p.g_idx[:-1]).all())


def test_gemv_layout_pads_k_to_32():
    qw = make_qweight(40, 16, 4, 16, False, False, torch.float16)
    p = L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, torch.float16)
    assert p.qweight.shape == (2 * 4, 16) and p.g_idx.shape == (64,)
    assert int(p.g_idx[40:].max()) == int(qw.g_idx.max())  # padding columns point at a real group
    assert same_bits(L.emulate_gemv_weight(p)[:40], reference_weight(qw, torch.float16))


@pytest.mark.parametrize("act", [False, True])
def test_permuted_product_equals_reference(act):
    """The wrapper multiplies x[:, perm] by the permuted weight; that must be x @ W."""
    k, n, dtype = 256, 128, torch.float16
    qw = make_qweight(k, n, 4, 128, False, act, dtype)
    p = L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 128, dtype)
    x = torch.randn(3, k).to(dtype)
    xp = x if p.perm is None else x[:, p.perm]
    y = xp.float() @ L.emulate_gemm_weight(p)[:k, :n].float()
    ref = x.float() @ reference_weight(qw, dtype).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def _rel_err(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("m,k,n,bits,gs,sym,act,dtype,splits", [
    (1, 136, 264, 4, 64, True, False, torch.float16, 1),     # K and N tails, one split
    (2, 136, 136, 4, 64, False, True, torch.bfloat16, 2),    # act-order, asym, split K
    (17, 320, 128, 8, 128, False, True, torch.bfloat16, 3),  # MT = 2, W8 bf16 (fp32 dequant path)
    (40, 200, 136, 4, -1, False, False, torch.float16, 2),   # MT = 4, per-channel, uneven split
    (129, 136, 136, 8, 64, True, False, torch.float16, 1),   # three M tiles, last one row
])
def test_gemm_kernel_model_matches_reference(m, k, n, bits, gs, sym, act, dtype, splits):
    """The thread-level model of gemm_wna16_kernel (swizzled x tile, ldmatrix / mma fragments, epilogue,
    splits) reproduces x @ W up to the output rounding."""
    qw = make_qweight(k, n, bits, gs, sym, act, dtype, seed=m)
    p = L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, gs, dtype)
    x = torch.randn(m, k).to(dtype)
    y = emulate.emulate_gemm(x if p.perm is None else x[:, p.perm], p, splits)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, x.float() @ reference_weight(qw, dtype).float()) < torch.finfo(dtype).eps


@pytest.mark.parametrize("m,bits,gs,act,dtype,splits,n", [
    (1, 3, 128, True, torch.float16, 2, 96),
    (8, 5, 48, False, torch.bfloat16, 1, 96),   # ragged groups change inside chunks: the per-code branch
    (3, 2, -1, False, torch.float16, 3, 96),
    (2, 8, 128, False, torch.bfloat16, 2, 100),  # N tail: lanes past N load column N-1 and store nothing
])
def test_gemv_kernel_model_matches_reference(m, bits, gs, act, dtype, splits, n):
    k = 1000  # K tail inside a chunk
    qw = make_qweight(k, n, bits, gs, False, act, dtype, seed=bits)
    p = L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, dtype)
    x = torch.randn(m, k).to(dtype)
    y = emulate.emulate_gemv(x if p.perm is None else x[:, p.perm], p, splits)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, x.float() @ reference_weight(qw, dtype).float()) < torch.finfo(dtype).eps


def test_gemm_unsupported_reasons():
    g = torch.arange(256, dtype=torch.int32) // 128
    assert L.gemm_unsupported(256, 256, 4, 128, g) is None
    assert L.gemm_unsupported(256, 256, 8, -1, torch.zeros(256, dtype=torch.int32)) is None
    assert "4 or 8 bits, got 3" in L.gemm_unsupported(256, 256, 3, 128, g)
    assert "multiple of 64, got 32" in L.gemm_unsupported(256, 256, 4, 32, torch.arange(256) // 32)
    assert "in_features % 8 == 0, got 252" in L.gemm_unsupported(252, 256, 8, -1, torch.zeros(252))
    shuffled = g[torch.randperm(256)]  # an act-order g_idx: contiguous groups once sorted
    assert L.gemm_unsupported(256, 256, 4, 128, shuffled) is None
    uneven = torch.cat([torch.zeros(100), torch.ones(156)]).int()  # groups of 100 and 156, not 128
    assert "contiguous groups" in L.gemm_unsupported(256, 256, 4, 128, uneven)


def test_pack_constraints_raise():
    qw = make_qweight(256, 128, 3, 128, True, False, torch.float16)
    with pytest.raises(ValueError, match="4 or 8 bits, got 3"):
        L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, 3, 128, torch.float16)
    with pytest.raises(ValueError, match="fp16 or bf16 activations, got torch.float32"):
        L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 128, torch.float32)
    with pytest.raises(ValueError, match="fp16 or bf16 activations"):
        L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, 3, torch.float32)
    with pytest.raises(ValueError, match="2..8 bits, got 1"):
        L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, 1, torch.float16)


def test_split_heuristics():
    assert cb.gemm_splits(4096, 4096, 4096, 132) == 1  # plenty of output tiles
    s = cb.gemm_splits(1, 4096, 4096, 132)
    assert 1 < s <= 4096 // 64 // 4
    assert cb.gemm_splits(1, 64, 128, 132) == 1  # one k-tile cannot be split
    assert cb.gemm_splits(0, 4096, 4096, 132) >= 1
    assert 1 < cb.gemv_splits(4096, 4096, 132) <= 4096 // 32 // 8
    assert cb.gemv_splits(64, 32, 132) == 1


def test_fake_impls_shapes():
    x = torch.empty(5, 256, dtype=torch.float16, device="meta")
    qw = torch.empty(10, dtype=torch.int32, device="meta")
    assert ops.gemm_fake(x, qw, x, x, 4, 128, 300, 1).shape == (5, 300)
    gq = torch.empty(32, 96, dtype=torch.int32, device="meta")
    y = ops.gemv_fake(x, gq, x, x, qw, 4, 2)
    assert y.shape == (5, 96) and y.dtype == torch.float16


def test_cuda_backend_rejects_cpu_input_with_reason():
    qw = make_qweight(256, 128, 4, 128, True, False, torch.float16)
    layer = QuantLinear.from_quantized(qw, backend="cuda")
    x = torch.randn(2, 256, dtype=torch.float16)
    ok, reason = cb.CudaKernel.can_implement(*kernel_query(layer, x))
    assert not ok
    assert ("has no CUDA support" in reason) if torch.version.cuda is None else ("not a CUDA device" in reason)
    with pytest.raises(NoKernelError, match="cuda: "):
        select_kernel(*kernel_query(layer, x), Backend.CUDA)
    with pytest.raises(NoKernelError, match="cuda: "):
        layer(x)


def test_cuda_backend_reason_chain(monkeypatch):
    """Every rejection reason of CudaKernel.can_implement, in order, with a stand-in CUDA input."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    cap = {"v": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["v"])
    ext = {"v": (False, "JIT build failed (RuntimeError): nvcc exploded")}
    monkeypatch.setattr(cb, "extension_status", lambda load=True: ext["v"])

    def ask(layer, m=1, dtype=torch.float16):
        x = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(m, layer.in_features))
        return cb.CudaKernel.can_implement(*kernel_query(layer, x))

    def layer(bits=4, gs=128, k=256, n=128, dtype=torch.float16, act=False):
        return QuantLinear.from_quantized(make_qweight(k, n, bits, gs, False, act, dtype))

    assert ask(layer()) == (False, "compute capability 7.5 < 8.0 (mma.sync / cp.async need sm_80+)")
    cap["v"] = (9, 0)
    assert ask(layer(), dtype=torch.float32)[1] == "activation dtype torch.float32 is not fp16 / bf16"
    assert ask(layer(dtype=torch.bfloat16))[1] == ("scales are torch.bfloat16 but activations are torch.float16 "
                                                   "(they must match)")
    assert ask(layer(bits=3), m=9)[1] == ("the tensor-core GEMM takes 4 or 8 bits, got 3, and the GEMV handles "
                                          "M <= 8, got M up to 16")
    assert "multiple of 64, got 32" in ask(layer(gs=32), m=17)[1]
    assert ask(layer(bits=8, gs=-1, k=252), m=64)[1].startswith("the tensor-core GEMM needs in_features % 8 == 0")
    # scheme fits (GEMM for any M, GEMV for M <= 8): the extension's recorded failure is the answer
    for lay, m in ((layer(), 129), (layer(act=True), 3), (layer(bits=3), 8)):
        assert ask(lay, m) == (False, "CUDA extension unavailable: JIT build failed (RuntimeError): nvcc exploded")
    ext["v"] = (True, None)
    assert ask(layer(bits=3), m=8) == (True, None)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_extension_failure_is_recorded_and_raised():
    ok, reason = build.extension_status(load=True)
    assert not ok and "CPU-only build" in reason
    with pytest.raises(RuntimeError, match="quantkern CUDA extension unavailable: .*CPU-only build"):
        build.require_extension()
    assert build.setuptools_extension(ROOT) is None  # setup.py then builds no CUDA extension


def test_setuptools_extension_when_cuda_toolkit_present(monkeypatch):
    import torch.utils.cpp_extension as ce

    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ce, "CUDA_HOME", str(Path(nvcc).resolve().parents[1]))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    ext = build.setuptools_extension(ROOT)
    assert ext.name == "quantkern._cuda_kernels"
    assert sorted(ext.sources) == sorted(build.SOURCES)  # relative, as setuptools wants
    assert "--use_fast_math" not in ext.extra_compile_args["nvcc"]
    assert os.environ["TORCH_CUDA_ARCH_LIST"].startswith("8.0")
    monkeypatch.setattr(ce, "CUDA_HOME", None)
    assert "finds no CUDA toolkit" in build.toolchain_problem()
    assert build.setuptools_extension(ROOT) is None


def test_broken_prebuilt_library_is_reported_with_cause(monkeypatch, tmp_path, caplog):
    """An extension built against another torch fails to load; the reason says so, and the JIT attempt's
    reason follows it."""
    import importlib.machinery

    bogus = tmp_path / "_cuda_kernels.so"
    bogus.write_bytes(b"not an ELF file")
    spec = importlib.machinery.ModuleSpec(build.EXT_MODULE, None, origin=str(bogus))
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: spec if name == build.EXT_MODULE else None)
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_jit_build", lambda: (False, "cannot JIT-build: no nvcc (test)"))
    with caplog.at_level("WARNING", logger="quantkern"):
        ok, reason = build.load_extension()
    assert "CUDA kernels are disabled" in caplog.text  # loud, once
    assert not ok
    assert f"prebuilt {bogus} failed to load, probably built against another torch" in reason
    assert reason.endswith("then cannot JIT-build: no nvcc (test)")
    assert build.load_extension() == (ok, reason)  # cached: no second build attempt
    with pytest.raises(RuntimeError, match="CUDA extension unavailable: prebuilt"):
        build.require_extension()


def test_sources_are_found():
    assert build.source_root() == ROOT
    assert all((ROOT / s).exists() for s in build.SOURCES)


# --- compile checks: no GPU needed ----------------------------------------------------------------------
# torch's extension builds define these; the kernels must not rely on implicit half / bf16 conversions
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
CHECK_LOADED_LIBRARY = """
import sys, torch
torch.ops.load_library(sys.argv[1])
from quantkern.kernels.cuda.ops import register_fakes
register_fakes()
x = torch.empty(5, 200, dtype=torch.bfloat16, device="meta")
s = torch.empty(4, 384, dtype=torch.bfloat16, device="meta")
w = torch.empty(256 * 384 * 4 // 32, dtype=torch.int32, device="meta")
assert torch.ops.quantkern.cuda_gemm_wna16(x, w, s, s, 4, 64, 300, 2).shape == (5, 300)
gw = torch.empty(7 * 3, 96, dtype=torch.int32, device="meta")
gi = torch.empty(224, dtype=torch.int32, device="meta")
assert torch.ops.quantkern.cuda_gemv_wna16(x, gw, s, s, gi, 3, 1).shape == (5, 96)
print("ok")
"""


def _run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, p.returncode, p.stdout + p.stderr


@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not installed")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_extension_compiles_for_sm80_sm90_links_and_registers_ops(tmp_path):
    """Every .cu compiles for sm_80 and sm_90 (C++17 and C++20, with torch's half macros); the binding
    compiles against this torch (it uses only device-generic c10 APIs, so a CPU torch will do); the
    sm_80 objects link into a library whose op schemas load and whose fakes answer meta tensors."""
    from torch.utils.cpp_extension import include_paths, library_paths

    nvcc, cxx = build.find_nvcc(), shutil.which(os.environ.get("CXX", "c++"))
    cus = sorted(CUDA_DIR.glob("*.cu"))
    assert {c.name for c in cus} >= {"gemm_wna16.cu", "gemv_wna16.cu"}
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    jobs = [[nvcc, "-std=c++17" if arch == 90 else "-std=c++20", "-O3", "-Xcompiler", "-fPIC", *TORCH_NVCC_DEFINES,
             "-c", str(cu), "-o", str(tmp_path / f"{cu.stem}_{arch}.o"), "-I", str(CUDA_DIR),
             "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            for cu in cus for arch in (80, 90)]
    binding = tmp_path / "binding.o"
    jobs.append([cxx, "-std=c++20", "-O0", "-fPIC", abi, "-c", str(CUDA_DIR / "qk_binding.cpp"), "-o", str(binding),
                 "-I", str(CUDA_DIR), "-I", sysconfig.get_paths()["include"]]
                + [a for p in include_paths() for a in ("-I", p)])
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run, jobs))
    failed = [f"{' '.join(c)}\n{out}" for c, rc, out in results if rc != 0]
    assert not failed, "\n\n".join(failed)

    lib = tmp_path / "qk_check.so"
    link = [nvcc, "-shared", "-Xcompiler", "-fPIC", str(binding), *(str(tmp_path / f"{c.stem}_80.o") for c in cus),
            "-o", str(lib)] + [a for p in library_paths() for a in ("-L", p)] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    _, rc, out = _run(link)
    assert rc == 0, out
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", CHECK_LOADED_LIBRARY, str(lib)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


# --- GPU numerics -----------------------------------------------------------------------------------------
def _gpu_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


needs_gpu = pytest.mark.skipif(not _gpu_ok(), reason="needs a CUDA GPU with compute capability >= 8.0")
M_GRID = [1, 2, 3, 17, 127, 128, 129]


def _check_against_reference(layer, x, dtype):
    y = layer(x)
    assert y.dtype == dtype and y.shape == (x.shape[0], layer.out_features)
    ref = gptq_gemm_reference(x.float(), layer.qweight, layer.qzeros, layer.scales.float(), layer.g_idx,
                              layer.bits, None if layer.bias is None else layer.bias.float())
    err = (y.float() - ref).norm() / ref.norm().clamp_min(1e-12)
    eps = torch.finfo(dtype).eps
    assert err < 4 * eps, f"relative error {err:.3g} >= {4 * eps:.3g}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", M_GRID)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits,k,n,gs,sym,act", [
    (4, 1024, 264, 128, True, False), (4, 320, 512, 64, False, False), (4, 200, 136, -1, True, False),
    (4, 512, 384, 128, False, True), (8, 1024, 264, 128, True, False), (8, 320, 256, -1, False, True),
])
def test_cuda_gemm_matches_reference(m, dtype, bits, k, n, gs, sym, act):
    qw = make_qweight(k, n, bits, gs, sym, act, dtype, seed=m, device="cuda")
    layer = QuantLinear.from_quantized(qw, bias=torch.randn(n, device="cuda"), backend="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    _check_against_reference(layer, x, dtype)
    assert layer.kernel_for(x).path == "gemm"
    if m == 1:
        assert layer(x[:0]).shape == (0, n)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits,gs,sym,act,k,n", [  # k = 1184 = 9 * 128 + 32: ragged last group
    (2, 64, False, False, 1184, 96), (3, 128, False, True, 1184, 96), (4, 32, False, True, 1184, 96),
    (4, 48, True, False, 1184, 96), (5, -1, False, False, 1184, 96), (8, 16, False, False, 1184, 96),
    (8, 128, False, False, 1004, 100),  # K % 8 != 0 (no GEMM) and an N tail inside a block
])
def test_cuda_gemv_matches_reference(m, dtype, bits, gs, sym, act, k, n):
    qw = make_qweight(k, n, bits, gs, sym, act, dtype, seed=bits + m, device="cuda")
    layer = QuantLinear.from_quantized(qw, backend="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    _check_against_reference(layer, x, dtype)
    assert layer.kernel_for(x).path == "gemv"
    if m == 1:  # the same kernel object then serves a prefill-sized batch through dequantize + matmul
        _check_against_reference(layer, torch.randn(17, k, device="cuda").to(dtype), dtype)


@pytest.mark.gpu
@needs_gpu
def test_cuda_ops_splits_agree_and_bad_input_raises():
    dtype, k, n = torch.float16, 2048, 256
    qw = make_qweight(k, n, 4, 128, False, False, dtype, device="cuda")
    p = L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, 128, dtype)
    x = torch.randn(5, k, device="cuda", dtype=dtype)
    op = torch.ops.quantkern.cuda_gemm_wna16
    y1 = op(x, p.qweight, p.scales, p.zeros, 4, 128, n, 1)
    y7 = op(x, p.qweight, p.scales, p.zeros, 4, 128, n, 7)
    torch.testing.assert_close(y1, y7, rtol=2e-3, atol=2e-3)
    with pytest.raises(RuntimeError, match="qweight has"):
        op(x, p.qweight[:-1].contiguous(), p.scales, p.zeros, 4, 128, n, 1)
    with pytest.raises(RuntimeError, match="scales must be"):
        op(x, p.qweight, p.scales.float(), p.zeros, 4, 128, n, 1)
    g = L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4, dtype)
    assert op(x[:0], p.qweight, p.scales, p.zeros, 4, 128, n, 1).shape == (0, n)  # empty batch: no launch
    with pytest.raises(RuntimeError, match="handles 1..8 rows"):
        torch.ops.quantkern.cuda_gemv_wna16(torch.randn(9, k, device="cuda", dtype=dtype), g.qweight, g.scales,
                                            g.zeros, g.g_idx, 4, 1)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = op(fx, mode.from_tensor(p.qweight), mode.from_tensor(p.scales), mode.from_tensor(p.zeros), 4, 128, n, 1)
        assert out.shape == (5, n) and out.dtype == dtype




class TestCudaConformance(BackendConformance):
    """The conformance grid on the CUDA backend (GPU only). Its GEMV serves M <= 8 of weights the
    tensor-core GEMM cannot hold, so the grid keeps to schemes the GEMM takes for every M."""

    backend = Backend.CUDA
    device = "cuda"
    OP = "quantkern::cuda_wna16_linear"
    SCHEMES = ((4, 64, False, False, 192, 72), (4, -1, True, True, 256, 136), (8, 128, True, False, 384, 40))

    @classmethod
    def available(cls):
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
            return "needs a CUDA GPU with compute capability >= 8.0"
        ok, why = build.extension_status(load=True)
        return None if ok else f"CUDA extension unavailable: {why}"

"""The C++ CPU backend (csrc/cpu, quantkern/kernels/cpu) against the float64 reference.

The extension is JIT-built once per session (cached under ~/.cache/quantkern); a build failure fails
these tests loudly instead of skipping them. Every kernel variant this CPU runs (portable, AVX2,
AVX-512, AVX-512 BF16) is compared over the awkward-shape grid: M in (1, 2, 3, 17, 127, 128, 129), K and N not
multiples of 16 where the GPTQ layout allows, ragged last groups, every bits / group / sym /
act-order combination, fp32 / bf16 / fp16 activations.

Tolerance (see ``_Oracle.check``): the kernel accumulates sum q*x*s and sum z*x*s in fp32 and rounds
the result to the output dtype once, so the bound is ``eps_out * |ref| + eps_fp32 * sqrt(K) * S`` with
S the magnitude of those two sums (|x| @ (q + z) * s); the BF16 kernel decodes q as 128 + q (and z as
128 + z), so for it S grows by |x| @ 256 * s (its bf16 products are exact). One wrong code moves y by about S / K, far
above the fp32 term for the K used here (K <= 224: sqrt(K) * eps_fp32 ~ 2e-6 * S vs S / K >= 4e-3 * S).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantkern.core import QuantizedWeight, WeightScheme, find_qparams, quantize
from quantkern.kernels import Backend, NoKernelError, select_kernel
from quantkern.kernels.registry import kernel_query
from quantkern.kernels.cpu import build, layout, ops
from quantkern.kernels.cpu.backend import CpuKernel, int8_activations
from quantkern.algorithms import quantize_rtn
from quantkern.nn import QuantLinear, build_kernels

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the C++ CPU kernels are x86-64 only")

MS = (1, 2, 3, 17, 127, 128, 129)
# (K, N) per bit width: not multiples of 16 where the GPTQ packing (multiples of 32/bits) allows,
# and K chosen so that g32 / g64 / g128 all leave a ragged last group (W3 g32 divides evenly).
SHAPES = {2: (208, 48), 3: (224, 96), 4: (200, 40), 8: (228, 36)}
GROUPS = (-1, 32, 64, 128)


@pytest.fixture(scope="session")
def ext():
    """Build / load the extension once; raises (fails the test) with the compiler output if it cannot."""
    return build.load()


@pytest.fixture(scope="session")
def isas(ext):
    order = ["portable", "avx2", "avx512", "avx512bf16"]
    return order[: order.index(ops.best_isa()) + 1]


def _quantized(k, n, bits, group, sym, act_order, g_idx=None, scale_dtype=torch.float16, seed=0):
    """A random weight quantized per group with min/max qparams; act-order permutes the groups."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scheme = WeightScheme(bits, group, sym, act_order)
    ng = scheme.num_groups(k)
    if g_idx is None:
        g_idx = torch.arange(k) // (group if group != -1 else k)
        if act_order:  # GPTQ's act-order: group i // g of the i-th column in a permuted order
            g_idx = g_idx[torch.argsort(torch.randperm(k, generator=gen))]
    g_idx = g_idx.to(torch.int32)
    codes = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.ones(ng, n)
    zeros = torch.full((ng, n), 1 << (bits - 1), dtype=torch.int32)
    for g in range(ng):
        cols = (g_idx == g).nonzero().flatten()
        if len(cols) == 0:
            continue
        s, z = find_qparams(w[:, cols], bits, sym, scale_dtype)
        scales[g], zeros[g] = s, z
        codes[:, cols] = quantize(w[:, cols], s, z, (1 << bits) - 1)
    return QuantizedWeight(codes, scales.to(scale_dtype), zeros, g_idx, scheme)


class _Oracle:
    """float64 reference of one weight, and the magnitudes that set the tolerance (module docstring)."""

    def __init__(self, qw, bias=None):
        g = qw.g_idx.long()
        s = qw.scales.double()[g].t()
        z = qw.zeros.double()[g].t()
        self.w = ((qw.codes.double() - z) * s).t().contiguous()  # [K, N]
        self.mag = ((qw.codes.double() + z) * s).t().contiguous()
        self.s = s.t().contiguous()
        self.bias = None if bias is None else bias.double()

    def check(self, y, x, offset: float = 0.0):
        """``offset``: a constant the kernel adds to every code and zero (the BF16 kernel's 128 each)."""
        xd = x.double()
        ref, mag = xd @ self.w, xd.abs() @ (self.mag + 2 * offset * self.s)
        if self.bias is not None:
            ref, mag = ref + self.bias, mag + self.bias.abs()
        assert y.dtype == x.dtype and y.shape == ref.shape
        eps_out = 0.0 if y.dtype == torch.float32 else torch.finfo(y.dtype).eps
        tol = eps_out * ref.abs() + torch.finfo(torch.float32).eps * x.shape[-1] ** 0.5 * mag + 1e-30
        err = (y.double() - ref).abs()
        worst = (err / tol).max().item()
        assert worst <= 1.0, f"max error / tolerance = {worst:.3g} (max abs error {err.max().item():.3g})"


def _check(y, x, qw, bias=None, **err):
    _Oracle(qw, bias).check(y, x, **err)


def _bf16_dot_error(isa, dtype, bits):
    """The BF16 kernel (gemm_avx512bf16.cpp) runs for bf16 activations on W2..W4 and offsets codes and
    zeros by 128; every other case is the fp32 kernel."""
    if isa != "avx512bf16" or bits > 4 or dtype != torch.bfloat16:
        return {}
    return {"offset": 128.0}


# --- layout: bit-exact ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group,act_order", [(-1, False), (32, False), (64, True), (128, False)])
def test_pack_roundtrip_bit_exact(bits, group, act_order):
    qw = _quantized(224, 96, bits, group, False, act_order)
    p = layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits)
    assert p.w.dtype == torch.int32 and p.w.shape[2] == 16 and p.w.shape[0] == 6
    assert torch.equal(layout.unpack_cpu(p), qw.codes)
    assert torch.equal(p.scale_table(), qw.scales.float())
    assert torch.equal(p.scale_table("zs"), qw.zeros.float() * qw.scales.float())
    # column-block major: block b's scales for every group are one contiguous run
    assert p.scales.shape == (6, qw.scales.shape[0], 16) and torch.equal(p.scales[2, :, 5], qw.scales[:, 37].float())
    # the per-call gather is skipped exactly when the padded order is the identity
    needs_gather = act_order or (group != -1 and 224 % group % p.vpw != 0)
    assert (p.src is not None) == needs_gather


def test_code_positions_are_pair_interleaved():
    # k = 0..7 of column 0 hold codes 1..8: even k in the low half-word, odd k in the high half
    codes = torch.zeros(16, 8, dtype=torch.int32)
    codes[0] = torch.arange(1, 9)
    qw = QuantizedWeight(codes, torch.ones(1, 16), torch.zeros(1, 16, dtype=torch.int32),
                         torch.zeros(8, dtype=torch.int32), WeightScheme(4, -1, False, False))
    p = layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4)
    expect = 1 | 3 << 4 | 5 << 8 | 7 << 12 | 2 << 16 | 4 << 20 | 6 << 24 | 8 << 28
    assert int(p.w[0, 0, 0]) & 0xFFFFFFFF == expect and not p.w[0, 0, 1:].any()


def test_pack_from_gptq_matches_canonical():
    qw = _quantized(200, 40, 4, 64, False, True)
    lin = QuantLinear.from_quantized(qw)
    p = layout.pack_cpu_from_gptq(lin.qweight, lin.qzeros, lin.scales, lin.g_idx, 4, 200)
    assert torch.equal(layout.unpack_cpu(p), qw.codes)


def test_pack_arbitrary_g_idx_with_empty_groups():
    g_idx = torch.tensor([3, 0, 3, 3, 1, 0, 3, 1] * 4, dtype=torch.int32)  # group 2 is empty
    qw = _quantized(32, 16, 4, 8, False, True, g_idx=g_idx)
    p = layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4)
    assert p.gptr.tolist() == [0, 1, 2, 2, 4]  # 8, 8, 0 and 16 columns -> 1, 1, 0, 2 words
    assert torch.equal(layout.unpack_cpu(p), qw.codes)


def test_pack_rejects_bad_input():
    qw = _quantized(64, 16, 4, 32, True, False)
    with pytest.raises(ValueError, match="bits must be one of"):
        layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, 1)
    with pytest.raises(ValueError, match="g_idx values must lie in"):
        layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx + 5, 4)
    with pytest.raises(ValueError, match="shapes do not match"):
        layout.pack_cpu(qw.codes[:, :32], qw.scales, qw.zeros, qw.g_idx, 4)


# --- the fused kernel against the reference ------------------------------------------------------

def _grid_case(isas, bits, group, sym, act_order, all_ms_for_every_isa):
    k, n = SHAPES[bits]
    qw = _quantized(k, n, bits, group, sym, act_order, seed=bits * 100 + group)
    lin = QuantLinear.from_quantized(qw, dtype=torch.float16)
    gen = torch.Generator().manual_seed(1)
    xs = {m: torch.randn(m, k, generator=gen) for m in MS}
    oracle = _Oracle(qw)
    for isa in isas:
        kern = CpuKernel(lin.weight_tensors(), isa=isa)
        # the best kernel (what AUTO runs) sees every M; the others (all of them in the slow sweep)
        # M = 1, 3, 17: every register tile and remainder of their row blocking
        ms = MS if all_ms_for_every_isa or isa == isas[-1] else (1, 3, 17)
        for m in ms:
            for dtype in (torch.float32, torch.bfloat16):
                x = xs[m].to(dtype)
                oracle.check(kern.apply(x), x, **_bf16_dot_error(isa, dtype, bits))


GRID = pytest.mark.parametrize("bits,group,sym,act_order", [
    pytest.param(b, g, s, a, id=f"w{b}-g{g}-{'sym' if s else 'asym'}-{'actorder' if a else 'static'}")
    for b in (2, 3, 4, 8) for g in GROUPS for s in (True, False) for a in (False, True)])


@GRID
def test_gemm_matches_reference(isas, bits, group, sym, act_order):
    _grid_case(isas, bits, group, sym, act_order, all_ms_for_every_isa=False)


@pytest.mark.slow
@GRID
def test_gemm_matches_reference_every_isa_every_m(isas, bits, group, sym, act_order):
    _grid_case(isas, bits, group, sym, act_order, all_ms_for_every_isa=True)


@pytest.mark.parametrize("isa_index", [0, 1, 2, 3])
def test_gemm_arbitrary_g_idx_bias_and_fp16(isas, isa_index):
    if isa_index >= len(isas):
        pytest.skip(f"this CPU runs only {isas}")
    g_idx = torch.randint(0, 7, (96,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    g_idx[g_idx == 4] = 5  # an empty group in the middle
    qw = _quantized(96, 40, 4, 14, False, True, g_idx=g_idx, scale_dtype=torch.bfloat16)  # 7 groups
    bias = torch.randn(40)
    lin = QuantLinear.from_quantized(qw, bias=bias, dtype=torch.bfloat16)
    kern = CpuKernel(lin.weight_tensors(), isa=isas[isa_index])
    oracle = _Oracle(qw, bias=lin.bias.float())
    for m in (1, 5, 9):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(m, 96).to(dtype)
            oracle.check(kern.apply(x), x, **_bf16_dot_error(isas[isa_index], dtype, 4))


def test_quantlinear_auto_selects_cpu_and_matches(ext):
    qw = _quantized(200, 40, 4, 128, True, False, scale_dtype=torch.bfloat16)
    lin = QuantLinear.from_quantized(qw, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 200, dtype=torch.bfloat16)
    assert select_kernel(*kernel_query(lin, x.reshape(-1, 200))) is CpuKernel
    y = lin(x)
    assert y.shape == (2, 3, 40) and isinstance(lin.kernel_for(x.reshape(-1, 200)), CpuKernel)
    _check(y.reshape(-1, 40), x.reshape(-1, 200), qw, offset=128.0)  # bf16 activations: exact products
    explicit = QuantLinear.from_quantized(qw, dtype=torch.bfloat16, backend="cpu")
    assert torch.equal(explicit(x), y)


def test_opcheck_and_fake(ext):
    qw = _quantized(64, 32, 4, 32, False, True)
    p = layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4)
    x = torch.randn(3, 64)
    args = (x, p.w, p.scales, p.zs, p.gptr, p.src, p.cb, 32, torch.randn(32), 0)
    torch.library.opcheck(torch.ops.quantkern_cpu.gemm.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    fake[0] = mode.from_tensor(torch.empty(5, 64))
    with mode:
        out = torch.ops.quantkern_cpu.gemm(*fake)
    assert out.shape == (5, 32) and out.dtype == torch.float32


# --- errors ----------------------------------------------------------------------------------

def test_op_rejects_bad_arguments(ext):
    qw = _quantized(64, 32, 4, 32, True, False)
    p = layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="unknown CPU isa"):
        ops.gemm(x, p, isa="sse9")
    gemm = torch.ops.quantkern_cpu.gemm
    with pytest.raises(RuntimeError, match="isa must be 0"):
        gemm(x, p.w, p.scales, p.zs, p.gptr, p.src, p.cb, 32, None, 7)
    with pytest.raises(RuntimeError, match="container bits must be 2, 4 or 8"):
        gemm(x, p.w, p.scales, p.zs, p.gptr, p.src, 3, 32, None, 0)
    with pytest.raises(RuntimeError, match="x has 60 features but the packed weight expects 64"):
        gemm(torch.randn(2, 60), p.w, p.scales, p.zs, p.gptr, p.src, p.cb, 32, None, 0)
    with pytest.raises(RuntimeError, match="n=40 does not match"):
        gemm(x, p.w, p.scales, p.zs, p.gptr, p.src, p.cb, 40, None, 0)
    with pytest.raises(RuntimeError, match="w must be contiguous int32"):
        gemm(x, p.w.float(), p.scales, p.zs, p.gptr, p.src, p.cb, 32, None, 0)
    with pytest.raises(RuntimeError, match="scales / zs must be contiguous fp32"):
        gemm(x, p.w, p.scales.half(), p.zs, p.gptr, p.src, p.cb, 32, None, 0)
    with pytest.raises(RuntimeError, match="bias has 3 elements"):
        gemm(x, p.w, p.scales, p.zs, p.gptr, p.src, p.cb, 32, torch.randn(3), 0)
    with pytest.raises(RuntimeError, match="gptr must run from 0"):
        gemm(x, p.w, p.scales, p.zs, p.gptr + 1, p.src, p.cb, 32, None, 0)


def test_can_implement_reasons(ext):
    lin = QuantLinear.from_quantized(_quantized(64, 32, 4, 32, True, False))
    ok, reason = CpuKernel.can_implement(*kernel_query(lin, torch.empty(2, 64, device="meta")))
    assert not ok and "on meta" in reason
    ok, reason = CpuKernel.can_implement(*kernel_query(lin, torch.empty(2, 64, dtype=torch.float64)))
    assert not ok and "torch.float64" in reason
    assert CpuKernel.can_implement(*kernel_query(lin, torch.empty(2, 64))) == (True, None)


def test_recorded_build_failure_is_loud_when_explicit_and_a_reason_under_auto(ext, monkeypatch):
    monkeypatch.setitem(build._state, "origin", None)
    monkeypatch.setitem(build._state, "error", "building the quantkern CPU extension failed: error: boom")
    lin = QuantLinear.from_quantized(_quantized(64, 32, 4, 32, True, False))
    x = torch.randn(1, 64)
    with pytest.raises(NoKernelError, match="cpu: the C.. CPU extension is unavailable: .*error: boom"):
        select_kernel(*kernel_query(lin, x), Backend.CPU)
    with pytest.raises(build.ExtensionError, match="error: boom"):
        CpuKernel(lin.weight_tensors())
    assert select_kernel(*kernel_query(lin, x), Backend.AUTO).backend is Backend.REFERENCE


def test_jit_build_failure_raises_with_compiler_output(tmp_path):
    src = tmp_path / "broken.cpp"
    src.write_text("int quantkern_broken( { return undeclared_identifier_xyz; }\n")
    with pytest.raises(build.ExtensionError, match="(?s)failed.*undeclared_identifier_xyz"):
        build.jit_build("quantkern_broken_test", [src], build_root=tmp_path)


def test_prebuilt_that_does_not_load_is_loud(tmp_path, monkeypatch):
    import importlib.machinery

    bad = tmp_path / "_C_cpu.so"
    bad.write_bytes(b"not a shared library")
    spec = importlib.machinery.ModuleSpec(build.PREBUILT_NAME, None, origin=str(bad))
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(build.ExtensionError, match="prebuilt CPU extension .*_C_cpu.so does not load"):
        build._load()


def test_setuptools_extension_lists_the_sources(tmp_path):
    from pathlib import Path

    root = Path(build.__file__).resolve().parents[3]
    ext = build.setuptools_extension(root)
    assert ext.name == "quantkern._C_cpu"
    assert sorted(Path(s).name for s in ext.sources) == sorted(p.name for p in build.sources(root))
    assert build.setuptools_extension(tmp_path) is None  # no csrc/cpu there: nothing to build


def test_wheel_ships_the_kernel_sources_for_the_jit_path(tmp_path):
    # a wheel built without QUANTKERN_BUILD_EXT has no compiled extension: the JIT path needs csrc/
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, env={**__import__("os").environ, "QUANTKERN_BUILD_EXT": "0"},
                   capture_output=True)
    (whl,) = tmp_path.glob("quantkern-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for src in build.sources(root) + [root / "csrc" / "cuda" / "gemm_wna16.cu"]:
        assert f"quantkern/_src/csrc/{src.parent.name}/{src.name}" in names
    # and an installed copy (no checkout above it) finds them there
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    out = subprocess.run([sys.executable, "-c", "from quantkern.kernels.cpu import build; "
                          "from quantkern.kernels.cuda import build as cb; print(build.source_dir()); "
                          "print(cb.source_root())"],
                         cwd=tmp_path, env={"PATH": __import__("os").environ["PATH"], "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(site / "quantkern" / "_src" / "csrc" / "cpu"), str(site / "quantkern" / "_src")]


# -- inference-only memory: the CPU kernel's layout is the only copy -----------------------------------------
@pytest.mark.parametrize("bits, desc_act", [(4, False), (3, True)])
def test_release_canonical_keeps_one_copy(ext, tmp_path, bits, desc_act):
    import quantkern as qk
    from quantkern.api.base import weight_bytes

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64, bias=True)
    qw = quantize_rtn(lin.weight, WeightScheme(bits, 32, False, False))
    if desc_act:  # a permuted g_idx: the CPU layout sorts K by group
        perm = torch.randperm(96)
        qw = type(qw)(qw.codes[:, perm], qw.scales, qw.zeros, qw.g_idx[perm], WeightScheme(bits, 32, False, True))
    model = torch.nn.Sequential(QuantLinear.from_quantized(qw, bias=lin.bias, dtype=torch.float32))
    x = torch.randn(3, 96)
    with pytest.raises(RuntimeError, match="no kernel built yet"):
        qk.release_canonical(model)
    ref = model(x)
    assert isinstance(model[0].kernel_for(x), CpuKernel)
    canonical = sum(getattr(model[0], b).numel() * getattr(model[0], b).element_size()
                    for b in ("qweight", "qzeros", "scales", "g_idx"))
    before = weight_bytes(model)
    assert qk.release_canonical(model) == canonical
    assert weight_bytes(model) == before - canonical and model[0].released
    assert torch.equal(model(x), ref)  # the kernel's own layout is all it ever read
    assert qk.release_canonical(model) == 0  # idempotent
    for call, what in [(lambda: model.state_dict(), r"state_dict\(\) / saving"),
                       (lambda: model[0].to_quantized(), r"to_quantized\(\)"),
                       (lambda: model.to(torch.float64), r"moving or casting the layer \(.to / .cuda / .half\)"),
                       (lambda: model(x.double()), r"running on cpu / torch.float64 \(no kernel was built for them\)"),
                       (lambda: model[0].reset_kernels(), r"reset_kernels\(\)")]:
        with pytest.raises(RuntimeError, match=f"{what} needs the canonical GPTQ buffers.*released for inference "
                                               "on cpu / float32"):
            call()


def test_release_canonical_refuses_kernels_that_read_the_buffers():
    import quantkern as qk

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = QuantLinear.from_quantized(quantize_rtn(lin.weight, WeightScheme(4, 32, True, False)), backend="reference")
    layer(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match=r"kernel\(s\) \['ReferenceKernel'\] read the canonical buffers"):
        qk.release_canonical(layer)
    assert not layer.released and layer.qweight.numel() > 0


def test_saving_a_released_model_names_the_layers(ext, tmp_path):
    import quantkern as qk
    from fixtures.quant_models import quantize_linears, tiny_llama, tokens

    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False), backend="auto")
    with torch.no_grad():
        model(tokens())
    assert qk.release_canonical(model) > 0
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.self_attn\.q_proj \(2x\), .*: had its canonical weights "
                                         "released for inference"):
        qk.save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_killed_builds_lock_file_does_not_block_the_next_build(tmp_path, monkeypatch):
    """torch's JIT guard is a ``lock`` file that a killed build leaves behind (every later build then
    waited forever: found when a killed test left one in the shared cache); the build now holds a flock
    and clears such a file."""
    from torch.utils import cpp_extension

    seen = []

    def fake_load(name, sources, build_directory, **kw):
        seen.append((Path(build_directory) / "lock").exists())

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    srcs = build.sources()
    build_dir = build.jit_build("quantkern_cpu_ext", srcs, build_root=tmp_path)
    lock = build_dir / "lock"
    lock.touch()  # what a build killed half-way leaves
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert build.jit_build("quantkern_cpu_ext", srcs, build_root=tmp_path) == build_dir
    assert seen == [False, False] and not lock.exists()


def test_a_young_lock_file_is_waited_for_then_cleared(tmp_path):
    """A lock younger than the limit may belong to a live build that takes no flock: wait for it."""
    from quantkern.kernels._jit_lock import build_lock

    lock = tmp_path / "lock"
    lock.touch()
    t = time.perf_counter()
    with build_lock(tmp_path, stale_after=0.5):
        assert not lock.exists()
    assert time.perf_counter() - t >= 0.4


# --- int8 activations (quantkern_cpu::gemm with int8_act; csrc/cpu/gemm_q8.cpp) ----------------------
# Each activation row is quantized per block of 32 positions (llama.cpp's Q8_0) and the codes x int8
# products are summed exactly, so the oracle is the float64 product of the dequantized weight with
# layout.q8_activations_reference's xhat, with the fp32 kernels' tolerance, over the same grid, for the
# portable and the AVX2 versions; a second check bounds the int8 rounding against the exact product.


def _has_vnni() -> bool:
    return "avx512_vnni" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False


@pytest.fixture(scope="session")
def q8_isas():
    """The q8 kernels this CPU runs, by the isa that selects them: portable, AVX2, and "avx512" (the
    AVX-512 VNNI kernel, where the CPU has VNNI)."""
    build.load()
    best = ops.best_isa()
    out = ["portable"] + (["avx2"] if best != "portable" else [])
    return out + (["avx512"] if best in ("avx512", "avx512bf16") and _has_vnni() else [])


def _kernel(qw, isa, dtype=torch.float16, bias=None):
    lin = QuantLinear.from_quantized(qw, dtype=dtype, bias=bias)
    k = CpuKernel(lin.weight_tensors(), isa=isa)
    k.int8_activations = True
    return k


@pytest.mark.parametrize("bits,group,sym,act_order", [
    pytest.param(b, g, s, a, id=f"w{b}-g{g}-{'sym' if s else 'asym'}-{'actorder' if a else 'static'}")
    for b in (2, 3, 4, 8) for g in GROUPS for s in (True, False) for a in (False, True)])
def test_q8_gemm_matches_reference(q8_isas, bits, group, sym, act_order):
    k, n = SHAPES[bits]
    qw = _quantized(k, n, bits, group, sym, act_order, seed=bits * 100 + group)
    oracle = _Oracle(qw)
    gen = torch.Generator().manual_seed(1)
    for isa in q8_isas:
        kern = _kernel(qw, isa)
        for m in MS if isa == q8_isas[-1] else (1, 3, 17):
            x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 4  # uneven blocks
            xhat = layout.q8_activations_reference(x, kern.packed)
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                y = kern.apply(xd)
                assert y.dtype == dtype
                if dtype == torch.float32:
                    oracle.check(y, xhat)
                else:  # bf16 in, bf16 out: xhat of the bf16 values, output rounded once
                    yref = F.linear(layout.q8_activations_reference(xd.float(), kern.packed),
                                    oracle.w.t().float())
                    torch.testing.assert_close(y.float(), yref, rtol=1.6e-2, atol=1e-3 * yref.abs().max().item())


def test_q8_reference_rounding_and_blocks():
    qw = _quantized(64, 16, 4, 32, True, False)
    p = layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4)
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 0.5, 1.5  # d = 1: 0.5 -> 0, 1.5 -> 2 (ties to even)
    x[0, 40] = -2.54  # second block: d = 0.02, exactly -127
    xhat = layout.q8_activations_reference(x, p)
    assert xhat[0, :3].tolist() == [127.0, 0.0, 2.0] and not xhat[0, 3:32].any()
    assert xhat[0, 40].item() == pytest.approx(-2.54, rel=1e-6) and int((xhat[0, 32:] != 0).sum()) == 1
    x[0, 0] = 127.4  # d = 127.4 / 127: 1.5 -> round(1.4945) = 1
    assert layout.q8_activations_reference(x, p)[0, 2].item() == pytest.approx(127.4 / 127)


def test_q8_error_against_fp32_is_small(q8_isas):
    """Against the exact product the int8 rounding costs about 0.4% / sqrt(32 per block) of |x| per
    block: measured relative error well under 1% on gaussian activations."""
    qw = _quantized(576, 96, 4, 32, True, False)
    lin = QuantLinear.from_quantized(qw, dtype=torch.float16)
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(5))
    exact = CpuKernel(lin.weight_tensors()).apply(x)
    rel = ((_kernel(qw, q8_isas[-1]).apply(x) - exact).norm() / exact.norm()).item()
    assert 1e-5 < rel < 1e-2, rel


def test_q8_non_finite_block_gives_nan_rows_only(q8_isas):
    qw = _quantized(200, 40, 4, 32, False, False)
    x = torch.randn(3, 200)
    x[1, 7] = float("inf")
    for isa in q8_isas:
        y = _kernel(qw, isa).apply(x)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_q8_bias_arbitrary_g_idx_and_empty_group(q8_isas):
    g_idx = torch.randint(0, 7, (96,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    g_idx[g_idx == 4] = 5
    qw = _quantized(96, 40, 4, 14, False, True, g_idx=g_idx, scale_dtype=torch.bfloat16)
    bias = torch.randn(40)
    oracle = _Oracle(qw, bias=bias.bfloat16().float())  # the module keeps the bias in its dtype
    for isa in q8_isas:
        kern = _kernel(qw, isa, dtype=torch.bfloat16, bias=bias)
        for m in (1, 2, 9):
            x = torch.randn(m, 96)
            oracle.check(kern.apply(x), layout.q8_activations_reference(x, kern.packed))


def test_avx2_and_portable_q8_agree_to_rounding(q8_isas):
    if len(q8_isas) < 2:
        pytest.skip("this CPU has no AVX2")
    qw = _quantized(224, 96, 3, 64, False, True)
    x = torch.randn(17, 224)
    a, b = (_kernel(qw, isa).apply(x) for isa in q8_isas[:2])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("bits,group,act_order", [(2, 32, False), (3, 64, True), (4, 32, False), (4, 128, True),
                                                  (8, 32, False), (8, -1, True)])
def test_vnni_q8_is_bit_identical_to_avx2(q8_isas, bits, group, act_order):
    """The VNNI kernel sums the same integers exactly (vpdpbusd, int32) and scales them in the AVX2 kernel's
    order: the outputs are equal bit for bit, for every M tile (1, 2, 4 rows) and ragged row counts."""
    if "avx512" not in q8_isas:
        pytest.skip("this CPU has no AVX-512 VNNI")
    k, n = SHAPES[bits]
    qw = _quantized(k, n, bits, group, False, act_order, seed=bits)
    gen = torch.Generator().manual_seed(2)
    vnni, avx2 = _kernel(qw, "avx512"), _kernel(qw, "avx2")
    for m in (1, 2, 3, 5, 17, 129):
        x = torch.randn(m, k, generator=gen) * 3
        assert torch.equal(vnni.apply(x), avx2.apply(x)), m


def test_int8_activations_switches_prepared_kernels_of_a_model(q8_isas):
    qw = _quantized(200, 40, 4, 32, True, False)
    model = torch.nn.Sequential(QuantLinear.from_quantized(qw, dtype=torch.float32, backend="cpu"))
    x = torch.randn(1, 200)
    exact = model(x)
    build_kernels(model, dtype=torch.float32, max_rows=4)
    assert int8_activations(model) >= 1
    q8 = model(x)
    assert not torch.equal(q8, exact)
    _Oracle(qw).check(q8, layout.q8_activations_reference(x, model[0].kernel_for(x).packed))
    int8_activations(model, False)
    assert torch.equal(model(x), exact)


def test_q8_opcheck(q8_isas):
    qw = _quantized(64, 32, 4, 32, False, True)
    p = layout.pack_cpu(qw.codes, qw.scales, qw.zeros, qw.g_idx, 4)
    args = (torch.randn(3, 64), p.w, p.scales, p.zs, p.gptr, p.src, p.cb, 32, torch.randn(32), 0, True)
    torch.library.opcheck(torch.ops.quantkern_cpu.gemm.default, args, test_utils=("test_schema", "test_faketensor"))

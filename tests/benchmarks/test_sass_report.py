"""benchmarks/sass_report.py: the main-loop finder on hand-written SASS, the recorded report's coverage,
and the kernels compiled here against the recorded figures (no spill where none was recorded, no more
than 5% more instructions per weight). The full comparison compiles ~100 kernels (minutes): slow; the
fast one compiles one CUDA file and one Triton config for sm_90."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "benchmarks" / "results" / "sass_report.csv"


def _load():
    spec = importlib.util.spec_from_file_location("sass_report", ROOT / "benchmarks" / "sass_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sr = _load()

SASS = """
        Function : _Z6kernelv
        /*0000*/                   S2R R0, SR_TID.X ;                 /* 0x0 */
        /*0010*/                   FFMA R1, R2, R3, R4 ;              /* 0x0 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;  /* 0x0 */
        /*0030*/              @!P0 BRA 0x20 ;                         /* 0x0 */
        /*0040*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;  /* 0x0 */
        /*0050*/                   VIADD R7, R7, 0x1 ;                /* 0x0 */
        /*0060*/              @P1 BRA 0x40 ;                          /* 0x0 */
        /*0070*/                   HMMA.16816.F32 R8, R12, R16, R8 ;  /* 0x0 */
        /*0080*/                   NOP ;                              /* 0x0 */
        /*0090*/                   HMMA.16816.F32 R8, R12, R18, R8 ;  /* 0x0 */
        /*00a0*/              @!PT LDS RZ, [RZ] ;                     /* 0x0 */
        /*00b0*/               @P2 BRA 0x40 ;                         /* 0x0 */
        /*00c0*/                   STL [R1], R2 ;                     /* 0x0 */
        /*00d0*/                   HMMA.16816.F32 R8, R12, R18, R8 ;  /* 0x0 */
        /*00e0*/                   BRA 0x110 ;                        /* 0x0 */
        /*00f0*/                   EXIT ;                             /* 0x0 */
        /*0100*/                   BRA 0x100 ;                        /* 0x0 */
"""


def test_main_loop_is_the_innermost_loop_around_the_math():
    (name, insns), = sr.parse_sass(SASS).items()
    assert name == "_Z6kernelv" and len(insns) == 17
    # loops: [0x20,0x30] (no math), [0x40,0x60] (a copy loop nested in the main loop), [0x40,0xb0], and the
    # BRA-to-itself trap at 0x100; the forward BRA at 0xe0 closes none
    assert sr.loops(insns) == [(0x100, 0x100), (0x20, 0x30), (0x40, 0x60), (0x40, 0xB0)]
    rng, n = sr.main_loop(insns)
    assert (rng, n) == ((0x40, 0xB0), 4)  # 2 of the 3 HMMA inside: at least half
    assert sr.loop_size(insns, rng) == 7  # 0x40..0xb0 is 8 instructions, the NOP excluded
    assert sr.local_traffic(insns) == (1, 0)
    assert sr.opcode("@!P0 BRA 0x20") == "BRA" and sr.opcode("HMMA.16816.F32 R8, R12") == "HMMA.16816.F32"


def test_figures_per_weight():
    (_, insns), = sr.parse_sass(SASS).items()
    # a CUDA GEMM with MT = 1 issues 16 HMMA per k-tile: two in the loop is not a whole iteration
    with pytest.raises(RuntimeError, match="source iterations"):
        sr._figures(insns, "cuda", dict(kernel="gemm_wna16", mt=1, bits=4))
    f = sr._figures(insns, "triton", dict(BLOCK_K=32, BLOCK_N=64, num_warps=4, bits=4))
    assert f["loop_instr"] == 7 and f["weights_per_thread"] == 16 and f["instr_per_weight"] == round(7 / 16, 3)
    assert f["warp_instr_per_512B"] == round(7 * 512 / (16 * 32 * 4 / 8), 1)
    assert f["loop_mma"] == 2 and f["loop_mem"] == 2 and f["unroll"] == 1


def test_gemm_shared_memory_formula_matches_the_kernel_source():
    src = (ROOT / "csrc" / "cuda" / "gemm_wna16.cu").read_text()
    assert "constexpr int kStages = 4;" in src and "kStage = kA + kB + 2 * kS" in src
    assert sr.gemm_smem(1, 4) == 4 * (16 * 64 * 2 + 64 * 128 // 2 + 512) == 26624
    assert sr.gemm_smem(4, 8) == 67584


def test_check_flags_spills_and_regressions():
    base = dict(kind="cuda", kernel="k", variant="v", arch="90", spill_stores="0", spill_loads="0", stack_bytes="0",
                instr_per_weight="2.0")
    spilled = dict(base, variant="w", spill_stores="3", spill_loads="3", stack_bytes="32")
    rec = [base, spilled]
    assert sr.check([dict(base, instr_per_weight="2.1"), spilled], rec) == []
    assert "instructions per weight" in sr.check([dict(base, instr_per_weight="2.11")], rec)[0]
    assert "spills" in sr.check([dict(base, spill_loads="1")], rec)[0]
    assert sr.check([dict(spilled, spill_stores="2")], rec) == []  # recorded spiller: may only improve
    assert "spills" in sr.check([dict(spilled, stack_bytes="48")], rec)[0]
    assert "not in the recorded report" in sr.check([dict(base, arch="80")], rec)[0]


def test_recorded_report_covers_every_variant_and_config():
    from quantkern.triton_kernels._tuning import GEMM_CONFIGS, GEMV_CONFIGS

    rows = sr.read_csv(RECORD)
    for arch in ("80", "90"):
        at = [r for r in rows if r["arch"] == arch]
        assert {r["variant"] for r in at if r["kernel"] == "gemm_wna16"} == {
            f"{d} W{b} MT{m}" for d in ("fp16", "bf16") for b in (4, 8) for m in (1, 2, 4)}
        assert {r["variant"] for r in at if r["kernel"] == "gemv_wna16"} == {
            f"{d} W{b}" for d in ("fp16", "bf16") for b in range(2, 9)}
        assert sum(r["kernel"] == "reduce_splits" for r in at) == 4
        assert sum(r["kernel"] == "triton_gemm" for r in at) == len(GEMM_CONFIGS)
        assert sum(r["kernel"] == "triton_decode" for r in at) == len(GEMV_CONFIGS)
    for r in rows:
        if r["kernel"] != "reduce_splits":
            assert float(r["instr_per_weight"]) > 0 and int(r["loop_instr"]) > 0 and int(r["regs"]) > 0, r


def _tools_missing() -> str | None:
    from quantkern.kernels.cuda.build import find_nvcc

    if find_nvcc() is None:
        return "nvcc not installed"
    if sr.triton_bin("cuobjdump") is None:
        return "cuobjdump not found (triton's bundled tools or PATH)"
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    return None


def _report(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_report.py"), "--out", str(tmp_path), *args],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return sr.read_csv(tmp_path / "sass_report.csv")


@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_one_cuda_variant_and_one_triton_config_match_the_record(tmp_path):
    rows = _report(tmp_path, "--arch", "90", "--cuda-file", "gemm_wna16.cu",
                   "--filter", r"^(cuda gemm_wna16 fp16 W4 MT1|triton triton_decode fp16 W4 g128 M1 N64 K128 .*) sm_90$")
    assert [(r["kernel"], r["variant"]) for r in rows] == [("gemm_wna16", "fp16 W4 MT1"),
                                                           ("triton_decode", "fp16 W4 g128 M1 N64 K128 w4 s4 sk4")]
    assert sr.check(rows, sr.read_csv(RECORD)) == []


@pytest.mark.slow
@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_every_kernel_matches_the_record(tmp_path):
    rows = _report(tmp_path)
    assert len(rows) == len(sr.read_csv(RECORD))
    assert sr.check(rows, sr.read_csv(RECORD)) == []

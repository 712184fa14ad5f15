"""benchmarks/gpu_session.sh must do its job in the one GPU command a session gets: checked here without a
GPU, by a dry run (every GPU step skips, with its reason) and by a run against a stand-in python whose
CUDA build hangs (the build's time limit, torch's stale lock file, the steps that depend on the build).
Also: the benchmarks write each CSV row as it is measured, and the sanitizer driver's cases are valid."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ["probe", "env", "build", "cuda_tests", "triton_tests", "other_tests", "memcheck", "racecheck", "gemm", "moe",
         "e2e"]
GPU_STEPS = ["cuda_tests", "triton_tests", "other_tests", "memcheck", "racecheck", "gemm", "moe", "e2e"]
LINE = re.compile(r"^(\w+) (?:rc=(\d+) (\d+)s \(limit (\d+)s\)(.*)|skipped \(limit (\d+)s\): (.+))$")


def _run(tmp_path, budget, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("STEPS", "OUT", "BUDGET_S", "SANITIZER")}
    e.update(OUT=str(tmp_path / "out"), BUDGET_S=str(budget), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **env)
    t = time.monotonic()
    p = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    return p, time.monotonic() - t, (tmp_path / "out" / "summary.txt").read_text()


def _steps(summary: str) -> dict[str, dict]:
    """{step: {rc, seconds, limit, note, skipped}} from the summary lines (header / total lines ignored)."""
    out = {}
    for line in summary.splitlines():
        m = LINE.match(line)
        if m and m.group(1) in STEPS:
            name, rc, secs, limit, note, slimit, why = m.groups()
            out[name] = dict(rc=None if rc is None else int(rc), seconds=int(secs or 0), limit=int(limit or slimit),
                             note=(note or "").strip(), skipped=why)
    return out


def test_step_limits_fit_the_command_budget(tmp_path):
    """With nothing selected (no python runs), every step still reports its limit; they sum to the budget
    (540 s: 9 minutes of a 10-minute command), at any BUDGET_S."""
    for budget in (540, 100):
        p, _, summary = _run(tmp_path / str(budget), budget, STEPS="none")
        assert p.returncode == 0, p.stderr
        steps = _steps(summary)
        assert list(steps) == STEPS
        assert all(s["skipped"] == "not in STEPS" for s in steps.values())
        total = sum(s["limit"] for s in steps.values())
        assert budget - len(STEPS) <= total <= budget


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for a machine without a GPU")
def test_dry_run_without_gpu_skips_every_gpu_step_with_its_reason(tmp_path):
    p, wall, summary = _run(tmp_path, 300)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = _steps(summary)
    assert list(steps) == STEPS, summary
    assert sum(s["limit"] for s in steps.values()) <= 300
    assert steps["probe"]["rc"] is not None and steps["env"]["rc"] is not None  # both ran (env may time out)
    assert steps["env"]["seconds"] <= steps["env"]["limit"] + 6
    if steps["probe"]["rc"] != 0:  # no answer in time (an overloaded machine): every step must have run
        assert "running every step" in steps["probe"]["note"], summary
        assert all(steps[n]["rc"] is not None or "compute-sanitizer" in steps[n]["skipped"] for n in GPU_STEPS)
        pytest.skip(f"the probe gave no answer within {steps['probe']['limit']} s here; the skips were not checked")
    for name in ["build"] + GPU_STEPS:
        assert steps[name]["skipped"], f"{name} ran without a GPU: {summary}"
    assert all("no CUDA GPU" in steps[n]["skipped"] for n in GPU_STEPS), summary
    why_no_build = steps["build"]["skipped"]
    assert ("CPU-only build" in why_no_build) if torch.version.cuda is None else ("no CUDA GPU" in why_no_build)
    assert re.search(r"^total \d+s of a 300s budget", summary, re.M)
    assert wall < 120  # nothing waited for a limit beyond probe + env
    assert not (tmp_path / "out" / "build.log").exists()


FAKE_PY = r"""#!/usr/bin/env bash
# stands in for python: a GPU that is there, a CUDA build that hangs, tests and benchmarks that pass
case "$*" in
  -) cat >/dev/null; echo "gpu_problem="; echo "build_problem=" ;;
  *load_extension*) mkdir -p "$TORCH_EXTENSIONS_DIR/quantkern_cuda_kernels"
                    touch "$TORCH_EXTENSIONS_DIR/quantkern_cuda_kernels/lock"; exec sleep 60 ;;
  *) echo "fake python $* QUANTKERN_CUDA_JIT=${QUANTKERN_CUDA_JIT:-unset}" ;;
esac
"""


def test_hung_build_is_bounded_its_lock_removed_and_dependants_skip(tmp_path):
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    p, wall, summary = _run(tmp_path, 22, PY=str(fake), SANITIZER="")  # build limit 150 * 22 / 540 = 6 s
    assert p.returncode == 0, p.stdout + p.stderr
    steps = _steps(summary)
    assert list(steps) == STEPS, summary
    b = steps["build"]
    assert b["rc"] == 124 and b["limit"] == 6 and b["seconds"] <= 6 + 2, summary
    assert "timed out" in b["note"] and "removed torch's stale lock" in b["note"]
    assert not (tmp_path / "ext" / "quantkern_cuda_kernels" / "lock").exists()
    for name in ("cuda_tests", "memcheck", "racecheck"):  # they need the extension
        assert "did not build" in steps[name]["skipped"], summary
    for name in ("triton_tests", "other_tests", "gemm", "moe", "e2e"):  # they do not, and must not rebuild it
        assert steps[name]["rc"] == 0, summary
        assert "QUANTKERN_CUDA_JIT=0" in (tmp_path / "out" / f"{name}.log").read_text()
    assert "-m pytest -v --tb=short -rfEs -m gpu and not slow" in (tmp_path / "out" / "triton_tests.log").read_text()
    assert " -x" not in (tmp_path / "out" / "triton_tests.log").read_text()
    env_log = (tmp_path / "out" / "env.log").read_text()
    assert "QUANTKERN_CUDA_JIT=0" in env_log  # env ran while the build ran, without starting another
    assert wall < 60


def test_nothing_starts_once_the_budget_is_spent(tmp_path):
    """SESSION_T0 in the past: the budget is gone before the first step, so only the probe runs."""
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)  # its build would hang for 60 s if it were started
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    p, wall, summary = _run(tmp_path, 540, PY=str(fake), SANITIZER="", SESSION_T0=str(int(time.time()) - 600))
    assert p.returncode == 0, p.stdout + p.stderr
    steps = _steps(summary)
    assert list(steps) == STEPS and steps["probe"]["rc"] == 0, summary
    for name in STEPS[1:]:
        assert steps[name]["skipped"] == "the 540s budget is spent", summary
    assert wall < 20


def test_build_disabled_by_env_is_reported(monkeypatch):
    from quantkern.kernels.cuda import build

    monkeypatch.setenv("QUANTKERN_CUDA_JIT", "0")
    assert build._jit_build() == (False, "JIT build disabled (QUANTKERN_CUDA_JIT=0)")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Killed(BaseException):
    """What a time limit does to a benchmark: nothing after it runs."""


def test_bench_gemm_keeps_rows_measured_before_a_kill(tmp_path, monkeypatch):
    bench = _load("bench_gemm")
    args = bench.parse_args(["--device", "cpu", "--shape", "128x64", "--m", "1,2,3", "--bits", "4", "--dtypes", "fp16",
                             "--methods", "reference", "--reps", "1", "--out", str(tmp_path)])
    calls = {"n": 0}
    real = bench.Timer.__call__

    def timer(self, fn):
        calls["n"] += 1
        if calls["n"] == 4:  # cublas and reference at M=1 done, cublas at M=2 done, then killed
            raise _Killed
        return real(self, fn)

    monkeypatch.setattr(bench.Timer, "__call__", timer)
    with pytest.raises(_Killed):
        bench.run(args)
    (path,) = tmp_path.glob("gemm_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["M"], r["method"]) for r in rows] == [("1", "cublas"), ("1", "quantkern_reference"), ("2", "cublas")]
    assert float(rows[1]["rel_err"]) < 1e-2 and float(rows[1]["time_us"]) > 0


def test_bench_e2e_keeps_rows_measured_before_a_kill(tmp_path, monkeypatch):
    bench = _load("bench_e2e")
    calls = {"n": 0}
    real = bench.decode_tokens_per_second

    def decode(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(bench, "decode_tokens_per_second", decode)
    with pytest.raises(_Killed):
        bench.main(["--tiny", "--device", "cpu", "--compile", "none", "--batch", "1", "2", "--tokens", "2",
                    "--prompt", "3", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("e2e_*_tiny.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["scheme"], r["batch"]) for r in rows] == [("bf16", "1"), ("bf16", "2")]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)


def test_sanitizer_driver_cases_cover_every_variant_and_are_right_on_the_emulator():
    """Every template instantiation of csrc/cuda gets a launch, and each case's packing and expected
    result hold on the CPU models of the kernels (so a GPU failure is the kernel's, not the driver's)."""
    from quantkern.kernels.cuda import emulate, layout as L

    drv = _load("sanitize_kernels")
    cases = list(drv.cases())
    gemm = {(d, b, 1 if m <= 16 else 2 if m <= 32 else 4) for p, d, b, m, *_ in cases if p == "gemm"}
    assert gemm == {(d, b, mt) for d in ("fp16", "bf16") for b in (4, 8) for mt in (1, 2, 4)}
    assert {(d, b) for p, d, b, *_ in cases if p == "gemv"} == {(d, b) for d in ("fp16", "bf16") for b in range(2, 9)}
    assert any(p == "gemm" and s > 1 for p, *_, s in cases) and any(p == "gemv" and s > 1 for p, *_, s in cases)
    for path, dname, bits, m, k, n, gs, splits in cases[::3] + [cases[-1]]:  # a third of them: CI time
        dtype = drv.DTYPES[dname]
        qw = drv.qweight(k, n, bits, gs, False, dtype, seed=bits * 100 + m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        if path == "gemm":
            assert L.gemm_unsupported(k, n, bits, gs, qw.g_idx) is None
            y = emulate.emulate_gemm(x, L.pack_gemm(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, gs, dtype), splits)
        else:
            y = emulate.emulate_gemv(x, L.pack_gemv(qw.codes, qw.scales, qw.zeros, qw.g_idx, bits, dtype), splits)
        ref = drv.reference(qw, x)
        assert float((y.float() - ref).norm() / ref.norm()) < 4 * torch.finfo(dtype).eps


def test_sanitizer_driver_without_extension_says_why(monkeypatch, capsys):
    drv = _load("sanitize_kernels")
    monkeypatch.setattr(drv.build, "load_extension", lambda: (False, "no nvcc (test)"))
    assert drv.main() == 2
    assert "CUDA extension unavailable: no nvcc (test)" in capsys.readouterr().out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

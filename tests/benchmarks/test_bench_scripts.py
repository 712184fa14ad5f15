"""The GPU benchmark scripts must run when a GPU session gets to them: a smoke run of bench_e2e.py on a
toy model on the CPU (eager), checking what it writes. No timing is asserted."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra", [["--batch", "1", "2", "--tokens", "3", "--prompt", "5"],
                                   ["--gptq", "--nsamples", "2", "--seq-len", "32"]])
def test_bench_e2e_tiny_on_cpu(tmp_path, extra):
    _load("bench_e2e").main(["--tiny", "--device", "cpu", "--compile", "none", "--out", str(tmp_path), *extra])
    (path,) = tmp_path.glob("e2e_*_tiny.csv")
    rows = list(csv.DictReader(path.open()))
    assert all(r["gpu"] and r["torch"] and r["transformers"] for r in rows)
    if "--gptq" in extra:
        assert [r["kind"] for r in rows] == ["gptq"] and float(rows[0]["wall_s"]) > 0
    else:
        assert [(r["scheme"], r["batch"]) for r in rows] == [("bf16", "1"), ("bf16", "2"), ("W4 g128", "1"),
                                                              ("W4 g128", "2")]
        assert all(float(r["tokens_per_s"]) > 0 for r in rows)
        assert [float(r["ratio_vs_bf16"]) for r in rows[:2]] == [1.0, 1.0]


def test_moe_decode_tiny_on_cpu(tmp_path):
    _load("moe_decode").main(["--tiny", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / next(p.name for p in tmp_path.glob("moe_decode_*_tiny.csv"))).open()))
    variants = [r["variant"] for r in rows]
    assert variants[:2] == ["fp32 (transformers)", "bf16 (transformers)"]
    assert "W4 g128 RTN, grouped reference" in variants
    assert all(float(r["ms_min"]) > 0 and r["cpu"] and r["torch"] for r in rows)


def test_moe_kernels_smoke_on_cpu(tmp_path, capsys):
    """The MoE benchmark skips cleanly without CUDA; its CPU smoke run writes a row a point."""
    bench = _load("moe_kernels")
    assert bench.main(["--out", str(tmp_path)]) == 0
    if "no CUDA GPU" not in capsys.readouterr().out:
        pytest.skip("a GPU is present: the skip path is not taken")
    assert bench.main(["--device", "cpu", "--tokens", "1,3", "--hidden", "64", "--intermediate", "32", "--experts",
                       "4", "--top-k", "2", "--group-size", "32", "--backends", "reference", "--reps", "1",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("moe_kernels_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["T"], r["projection"]) for r in rows] == [("1", "gate_up"), ("1", "down"), ("3", "gate_up"),
                                                         ("3", "down")]
    assert all(float(r["time_us"]) > 0 and float(r["rel_err"]) == 0 for r in rows)

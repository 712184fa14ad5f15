"""The environment report lists versions, devices and every registered backend's answer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quantkern import env
from quantkern.kernels import registered_kernels


def test_backend_table_covers_every_backend_device_dtype_and_scheme():
    table = env.backend_table()
    backends = {k.backend.value for k in registered_kernels("gptq")}
    assert {r[0] for r in table} == backends
    assert {r[1] for r in table} == {str(d) for d in env.devices()}
    assert {r[3] for r in table} == {p[0] for p in env.PROBE_SCHEMES}
    assert len(table) == len(backends) * len(env.devices()) * 3 * len(env.PROBE_SCHEMES)
    for backend, dev, dtype, scheme, ok, reason in table:
        assert ok or (isinstance(reason, str) and reason), f"{backend}: no without a reason, {dev}/{dtype}/{scheme}"
    # the reference runs everything; the CUDA backend cannot run CPU tensors and says why
    assert all(ok for b, *_, ok, _ in table if b == "reference")
    cpu_cuda = [r for r in table if r[0] == "cuda" and r[1] == "cpu"]
    assert cpu_cuda and all(not r[4] and "CUDA" in r[5] for r in cpu_cuda)


def test_probe_layer_act_order_is_shuffled():
    layer = env.probe_layer(4, 128, False, True, torch.float16, "cpu")
    g = layer.g_idx
    assert sorted(g.tolist()) == sorted((torch.arange(env.PROBE_FEATURES) // 128).tolist())
    assert not bool((g[1:] >= g[:-1]).all())


def test_report_text():
    text = env.report()
    assert f"torch        {torch.__version__}" in text
    for k in registered_kernels("gptq"):
        assert f"\n  {k.backend.value}\n" in text
    if not torch.cuda.is_available():
        assert "no CUDA devices" in text


def test_main_runs_as_module_and_validates_args(capsys):
    with pytest.raises(SystemExit):
        env.main(["--rows", "0"])
    assert "--rows must be >= 1" in capsys.readouterr().err
    p = subprocess.run([sys.executable, "-m", "quantkern.env", "--rows", "2"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "M=2" in p.stdout and "backends" in p.stdout


def test_long_reasons_are_printed_once_as_notes(monkeypatch):
    log = "nvcc error: " + "x" * 1000
    rows = [("cuda", "cuda:0", dt, label, False, log) for dt in ("float16", "bfloat16") for label in ("a", "b")]
    rows.append(("cuda", "cuda:0", "float32", "a", False, "activation dtype is not fp16 / bf16"))
    monkeypatch.setattr(env, "backend_table", lambda rows_=1: rows)
    text = env.report()
    assert text.count(log) == 1 and "note 1:" in text
    assert text.count("[see note 1]") == 4
    assert "no: activation dtype is not fp16 / bf16" in text

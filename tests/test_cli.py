"""The command line on a tiny model saved to disk (no network, no real model)."""

import json
import re

import pytest
import torch

import quantkern as qk
from quantkern.cli import main


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize()
    return qk.save_quantized(tiny_llama, tmp_path / "ckpt")


def test_inspect_and_export(ckpt, tmp_path, capsys):
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["consistent"] is True
    assert main(["export", str(ckpt), "--format", "gptq", "--checkpoint-format", "gptq_v2",
                 "--out", str(tmp_path / "v2")]) == 0
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert cfg["quantization_config"]["checkpoint_format"] == "gptq_v2"
    a, b = qk.load_quantized(ckpt), qk.load_quantized(tmp_path / "v2")
    ids = torch.arange(12)[None]
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) != 0
    assert "error" in capsys.readouterr().err.lower()


def test_quantize_rejects_bad_bits_before_loading(capsys):
    assert main(["quantize", "--model", "/nonexistent-model-dir", "--bits", "9", "--out", "x"]) == 2


def test_device_map_argument(ckpt, capsys):
    from quantkern.devices import parse_device_map

    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {"model.layers.0": 0, "lm_head": "cpu"}
    with pytest.raises(ValueError, match="--device-map must be one of"):
        parse_device_map("[1, 2]")
    assert main(["eval", str(ckpt), "--device-map", "fastest"]) == 2
    assert "--device-map must be one of" in capsys.readouterr().err
    assert main(["quantize", "--offload", "disk", "--device-map", "auto", "--out", "x"]) == 2
    assert "does not take --device-map" in capsys.readouterr().err
    assert main(["quantize", "--method", "awq", "--offload", "disk", "--out", "x"]) == 2
    assert "safetensors weights" in capsys.readouterr().err  # every method streams: only the model is refused
    assert main(["quantize", "--method", "smoothquant", "--alpha", "1.5", "--out", "x"]) == 2
    assert "alpha must be a number in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("method,extra,layer", [
    ("awq", ["--bits", "4", "--group-size", "32"], "QuantLinear"),
    ("fp8", ["--fp8-gptq"], "FP8Linear"),
    ("smoothquant", [], "W8A8Linear"),
])
def test_quantize_every_method_end_to_end(cli_serves_tiny_llama, tmp_path, method, extra, layer):
    tiny_llama = cli_serves_tiny_llama
    out = tmp_path / method
    assert main(["quantize", "--model", "tiny", "--method", method, "--nsamples", "4", "--seq-len", "32",
                 "--out", str(out), *extra]) == 0
    loaded = qk.load_quantized(out)
    assert type(loaded.model.layers[1].mlp.down_proj).__name__ == layer
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tiny_llama(ids).logits, rtol=1e-3, atol=1e-3)


# --- issue #14: one line naming the cause, a traceback only under --verbose -----------------------

def _one_error_line(capsys, cmd):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"quantkern {cmd}: error: "), err
    return lines[-1]


@pytest.mark.parametrize("path", ["/nonexistent/path", "./no-such-model", "~/no-such-model-dir", "a/b/c"])
def test_missing_local_model_is_no_such_directory(capsys, path):
    assert main(["eval", path]) == 2
    assert _one_error_line(capsys, "eval").endswith(f"no such directory: {path}")
    assert main(["quantize", "--model", path, "--out", "x"]) == 2
    assert _one_error_line(capsys, "quantize").endswith(f"no such directory: {path}")


def test_hub_ids_still_go_to_transformers():
    from quantkern.models import resolve_model

    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    assert resolve_model("gpt2") == ("gpt2", None)


def test_verbose_prints_the_traceback(capsys):
    assert main(["--verbose", "eval", "/nonexistent/path"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1] == "quantkern eval: error: no such directory: /nonexistent/path"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_a_gpu(ckpt, capsys):
    assert main(["eval", str(ckpt), "--device", "cuda"]) == 2
    assert "device 'cuda': CUDA is not available" in _one_error_line(capsys, "eval")
    assert main(["quantize", "--model", str(ckpt), "--device", "cuda:0", "--out", "x"]) == 2
    assert "device 'cuda:0': CUDA is not available" in _one_error_line(capsys, "quantize")
    from quantkern.env import DeviceUnavailableError

    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        qk.load_quantized(ckpt, device="cuda")


def test_pickle_only_dense_model_is_refused_before_unpickling(tiny_llama, tmp_path, capsys, monkeypatch):
    d = tmp_path / "dense"
    tiny_llama.config.save_pretrained(d)
    torch.save(tiny_llama.state_dict(), d / "pytorch_model.bin")

    def boom(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", boom)
    assert main(["generate", str(d)]) == 2
    line = _one_error_line(capsys, "generate")
    assert "holds only pickle weights ['pytorch_model.bin']; quantkern loads safetensors only" in line


def _io_hostile():
    """tests/io/test_io_hostile.py as a module, whether or not tests/io was collected in this run."""
    import importlib.util
    import sys
    from pathlib import Path

    if "test_io_hostile" in sys.modules:
        return sys.modules["test_io_hostile"]
    spec = importlib.util.spec_from_file_location("test_io_hostile", Path(__file__).parent / "io" / "test_io_hostile.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["test_io_hostile"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_hostile_gguf_is_one_line(tmp_path, capsys):
    from fixtures.quant_models import quantize_linears, tiny_llama
    from quantkern.core import WeightScheme
    hostile_ggufs = _io_hostile().hostile_ggufs

    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    data = qk.save_quantized(model, tmp_path / "m.gguf", format="gguf").read_bytes()
    for name, match in hostile_ggufs(data, tmp_path).items():
        assert main(["generate", str(tmp_path / name)]) == 2
        assert re.search(match, _one_error_line(capsys, "generate"))
        assert main(["inspect", str(tmp_path / name)]) in (0, 1, 2)  # as before: no traceback either
        assert "Traceback" not in capsys.readouterr().err


def test_deeply_nested_config_is_one_line(ckpt, capsys):
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    for cmd in (["eval", str(ckpt)], ["inspect", str(ckpt)], ["export", str(ckpt), "--format", "gptq", "--out", "x"]):
        assert main(cmd) == 2
        assert "config.json is nested too deeply" in _one_error_line(capsys, cmd[0])


def test_moe_expert_options_reach_the_config():
    from quantkern.cli import _config, build_parser

    a = build_parser().parse_args(["quantize", "--out", "x", "--expert-calibration", "all", "--expert-fallback", "rtn",
                                   "--min-expert-tokens", "7"])
    c = _config(a)
    assert (c.expert_calibration, c.expert_fallback, c.min_expert_tokens) == ("all", "rtn", 7)
    d = _config(build_parser().parse_args(["quantize", "--out", "x"]))
    assert (d.expert_calibration, d.expert_fallback, d.min_expert_tokens) == ("routed", "all_tokens", None)

"""Streaming every calibrated method (issue #21): AWQ, SmoothQuant, W8A8 / FP8 / PTQ static scales,
FP8-GPTQ, and GPTQ / RTN to compressed-tensors, block by block through the same ``process_block`` as
in memory. Each streamed checkpoint must hold exactly what ``save_quantized`` writes from the
in-memory quantized model (every tensor bit for bit, the same configs), load to the same logits, and
report what the in-memory quantizer reports; an interrupted run resumes to the same files.

Synthetic Llamas with random weights (``make_llama`` of test_offload.py) and tiny MoE models.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import quantkern as qk
from offload.test_offload import assert_same_checkpoint, calib, make_llama
from quantkern.api.registry import quantizer_for
from quantkern.offload import quantize_streaming

VOCAB = 512


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both paths of every comparison run in this process with one thread (tiny matmuls; and the
    same thread count keeps their rounding identical)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "llama"
    make_llama(path)
    return path


def in_memory(path: Path, config, data, out: Path, fmt: str, checkpoint_format=None):
    """(quantized model, saved checkpoint, report) of the in-memory path, from the same source."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cls = quantizer_for(config)
    kw = {"use_triton": False} if cls.__name__ in ("GPTQQuantizer", "RTNQuantizer") else {}
    q = cls(model, config, verbose=False, **kw)
    q.quantize(data, export_format=fmt)
    saved = qk.save_quantized(model, out, format=fmt, checkpoint_format=checkpoint_format)
    return model, saved, q.report


# (config, calibrated, the format written by default or asked for, the report keys the method fills)
CASES = {
    "awq-w4g64": (lambda: qk.AWQConfig(bits=4, group_size=64, batch_size=2), True, None, {"awq_errors"}),
    "awq-w3g32-asym": (lambda: qk.AWQConfig(bits=3, group_size=32, sym=False), True, None, {"awq_errors"}),
    "smoothquant-static": (lambda: qk.SmoothQuantConfig(alpha=0.5, act_static=True), True, None, {"smoothed"}),
    "w8a8-static": (lambda: qk.W8A8Config(act_static=True), True, None, set()),
    "w8a8-dynamic": (lambda: qk.W8A8Config(), False, None, set()),
    "fp8-static": (lambda: qk.FP8Config(act_static=True), True, None, set()),
    "fp8-gptq": (lambda: qk.FP8Config(weight_method="gptq", actorder=True, batch_size=2), True, None,
                 {"gptq_losses"}),
    "ptq-percentile-fp8": (lambda: qk.PTQConfig(observer="percentile", weight_dtype="float8_e4m3fn",
                                                act_dtype="float8_e4m3fn"), True, None, set()),
    "gptq-compressed": (lambda: qk.GPTQConfig(bits=4, group_size=64, sym=False, batch_size=2), True,
                        "compressed-tensors", {"gptq_losses"}),
    "rtn-compressed": (lambda: qk.RTNConfig(bits=8, group_size=-1), False, "compressed-tensors", set()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_in_memory(src, tmp_path, case):
    make, calibrated, fmt, keys = CASES[case]
    config = make()
    data = calib() if calibrated else None
    report = {}
    out = quantize_streaming(src, config, data, tmp_path / "stream", checkpoint_format=fmt, verbose=False,
                             report=report)
    qlayer = quantizer_for(config)(torch.nn.Module(), config, verbose=False).produces
    save_fmt = fmt or ("gptq" if qlayer == "QuantLinear" else "compressed-tensors")
    ckpt = None if save_fmt != "gptq" else ("gptq" if config.sym else "gptq_v2")
    model, ref, ref_report = in_memory(src, config, data, tmp_path / "ref", save_fmt, ckpt)
    assert_same_checkpoint(out, ref)
    assert set(report) == keys
    assert all(report[k] == ref_report[k] for k in keys) and all(ref_report[k] for k in keys)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ("gptq" if save_fmt == "gptq" else "compressed-tensors")
    loaded = qk.load_quantized(out)
    assert type(loaded.model.layers[2].self_attn.o_proj).__name__ == qlayer  # the last block too
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


class _Stop(Exception):
    pass


def _stop_after_0(info):
    if info["block"] == 0:
        raise _Stop


@pytest.mark.parametrize("case", ["smoothquant-static", "awq-w4g64"])
def test_interrupted_run_resumes_to_the_same_files(src, tmp_path, case):
    """Stopped after block 0, then run again: block 0 is not redone, the files equal an uninterrupted
    run's (compressed-tensors: its config groups merged from the first run's manifest) and the report
    holds block 0's entries too."""
    make, _, fmt, keys = CASES[case]
    config, data, out = make(), calib(), tmp_path / "q"
    with pytest.raises(_Stop):
        quantize_streaming(src, config, data, out, checkpoint_format=fmt, verbose=False, callback=_stop_after_0)
    assert json.loads((tmp_path / ".q.partial" / "manifest.json").read_text())["finished"] == [0]
    seen, report = [], {}
    quantize_streaming(src, config, data, out, checkpoint_format=fmt, verbose=False, report=report,
                       callback=lambda i: seen.append(i["block"]))
    assert seen == [1, 2]
    whole = {}
    ref = quantize_streaming(src, config, data, tmp_path / "whole", checkpoint_format=fmt, verbose=False,
                             report=whole)
    assert_same_checkpoint(out, ref)
    (key,) = keys
    def as_json(x):  # block 0's entries come from the manifest: JSON values (lists for tuples)
        return json.loads(json.dumps(x))

    assert as_json(report[key]) == as_json(whole[key])
    assert any(str(k).startswith("model.layers.0.") for k in report[key])


def test_mixed_compressed_groups_merge_across_blocks(src, tmp_path):
    """Per-layer overrides make several config groups (named layers, no "Linear" target): the streamed
    config lists every block's layers in each group, as the in-memory one does."""
    config = qk.GPTQConfig(bits=4, group_size=64, batch_size=2,
                           overrides={"model.layers.[02].mlp.down_proj": {"bits": 8}})
    data = calib()
    out = quantize_streaming(src, config, data, tmp_path / "s", checkpoint_format="compressed-tensors", verbose=False)
    _, ref, _ = in_memory(src, config, data, tmp_path / "ref", "compressed-tensors")
    assert_same_checkpoint(out, ref)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    eight = next(g for g in groups.values() if g["weights"]["num_bits"] == 8)
    assert eight["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]


# -- MoE ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_streaming_moe_awq_equals_in_memory(tmp_path, family):
    """AWQ of fused experts streamed from a per-expert source (as save_pretrained writes it): the same
    checkpoint, report (scale errors, tokens per expert) and logits as AWQ in memory."""
    from api.test_moe import calib as moe_calib, ids, tiny_moe
    from offload.test_offload_moe import write_source

    dense = tiny_moe(family)
    path = write_source(dense, tmp_path / "src", per_expert=True)
    config, data = qk.AWQConfig(bits=4, group_size=32, batch_size=4), moe_calib(8)
    report = {}
    out = quantize_streaming(path, config, data, tmp_path / "q", verbose=False, report=report)
    model = copy.deepcopy(dense)
    q = qk.AWQQuantizer(model, config, verbose=False)
    q.quantize(data)
    ref = qk.save_quantized(model, tmp_path / "ref", checkpoint_format="gptq" if config.sym else "gptq_v2")
    assert_same_checkpoint(out, ref)
    assert "awq_errors" in report and all(report[k] == q.report[k] for k in report)
    assert set(report) == {k for k in q.report if k in ("awq_errors", "expert_tokens", "expert_fallbacks")}
    x = ids()
    with torch.no_grad():
        assert torch.equal(qk.load_quantized(out)(x).logits, model(x).logits)

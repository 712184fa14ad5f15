"""Hostile and broken checkpoints: every defect is a clear error naming what is wrong, never a crash
in a kernel, never an unpickle; interrupted saves leave nothing that loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.quant_models import quantize_linears, tiny_llama
from quantkern.core import WeightScheme
from quantkern.io import (CheckpointConfigError, CheckpointFileError, CheckpointTensorError, load_quantized,
                          save_quantized)

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, False, False))
    return save_quantized(model, tmp_path_factory.mktemp("good") / "ckpt", checkpoint_format="gptq")


@pytest.fixture
def ckpt(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, match", [
    (lambda q: q.update(group_szie=32), r"unknown key\(s\) \['group_szie'\]"),
    (lambda q: q.update(bits=9), r"'bits' must be one of"),
    (lambda q: q.update(bits="4"), r"'bits' must be int"),
    (lambda q: q.update(group_size=0), r"'group_size' must be -1"),
    (lambda q: q.update(sym="yes"), r"'sym' must be bool"),
    (lambda q: q.update(checkpoint_format="gptq_v3"), r"'checkpoint_format' must be one of"),
    (lambda q: q.update(quant_method="exl2"), r"'quant_method' must be one of"),
    (lambda q: q.update(dynamic={"+:(": {}}), r"invalid regex"),
    (lambda q: q.update(dynamic={"+:.*q_proj": {"bitz": 8}}), r"unknown key\(s\) \['bitz'\]"),
    (lambda q: q.pop("bits"), r"missing required key 'bits'"),
])
def test_bad_quantization_config(ckpt, edit, match):
    _edit_config(ckpt, lambda c: edit(c["quantization_config"]))
    with pytest.raises(CheckpointConfigError, match=match):
        load_quantized(ckpt)


def test_config_problems(ckpt):
    _edit_config(ckpt, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointConfigError, match="not a quantized checkpoint"):
        load_quantized(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFileError, match="not valid JSON"):
        load_quantized(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointFileError, match="config.json not found"):
        load_quantized(ckpt)
    with pytest.raises(CheckpointFileError, match="not a checkpoint directory"):
        load_quantized(ckpt / "nope")


def test_config_bits_contradict_tensors(ckpt):
    _edit_config(ckpt, lambda c: c["quantization_config"].update(bits=8))
    with pytest.raises(CheckpointTensorError, match=r"model\.layers\.0\.mlp\.down_proj\.qweight: shape \(16, 64\) "
                                                    r"does not match the config, expected \(32, 64\)"):
        load_quantized(ckpt)


def test_pickles_are_never_loaded(ckpt, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", boom)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointFileError, match=r"only pickle weights \['pytorch_model.bin'\]"):
        load_quantized(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "huge_header"])
def test_corrupt_safetensors(ckpt, damage):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = os.urandom(4096)
    elif damage == "empty":
        data = b""
    else:
        data = (2**62).to_bytes(8, "little") + data[8:]
    f.write_bytes(data)
    with pytest.raises(CheckpointFileError, match="not a readable safetensors file"):
        load_quantized(ckpt)


def test_index_naming_missing_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "other.safetensors"}}))
    with pytest.raises(CheckpointFileError, match="shard other.safetensors is missing"):
        load_quantized(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointFileError, match="not a plain .safetensors file name"):
        load_quantized(ckpt)


def _nan(t):
    t[f"{Q}.scales"][0, 3] = float("nan")


def _zero_scale(t):
    t[f"{Q}.scales"][1, 0] = 0


def _neg_scale(t):
    t[f"{Q}.scales"][1, 0] = -1


def _g_idx_high(t):
    t[f"{Q}.g_idx"][5] = 2


def _g_idx_neg(t):
    t[f"{Q}.g_idx"][5] = -1


def _v1_overflow(t):
    t[f"{Q}.qzeros"][0, 0] = 0xF  # a v1 nibble of 15 means a zero of 16 in 4 bits


@pytest.mark.parametrize("edit, match", [
    (_nan, rf"{Q}\.scales: holds non-finite"),
    (_zero_scale, rf"{Q}\.scales: holds values <= 0"),
    (_neg_scale, rf"{Q}\.scales: holds values <= 0"),
    (_g_idx_high, rf"{Q}\.g_idx: values must lie in \[0, 2\)"),
    (_g_idx_neg, rf"{Q}\.g_idx: values must lie in \[0, 2\)"),
    (_v1_overflow, rf"{Q}\.qzeros: qzeros hold a v1 zero of 16"),
    (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:4]}), rf"{Q}\.qweight: shape \(4, 64\)"),
    (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}), rf"{Q}\.qweight: dtype torch.float32"),
    (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].to(torch.int16)}), rf"{Q}\.scales: dtype torch.int16"),
    (lambda t: t.update({f"{Q}.g_idx": t[f"{Q}.g_idx"][:10]}), rf"{Q}\.g_idx: shape \(10,\)"),
    (lambda t: t.update({f"{Q}.bias": torch.zeros(3)}), rf"{Q}\.bias: shape \(3,\)"),
    (lambda t: t.pop(f"{Q}.qzeros"), rf"{Q}\.qzeros: missing"),
    (lambda t: t.pop("model.norm.weight"), r"lacks 1 tensor\(s\): \['model.norm.weight'\]"),
    (lambda t: t.update(extra=torch.zeros(2)), r"extra: unexpected tensor"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(3)}), r"model.norm.weight: shape \(3,\)"),
    (lambda t: t.update({"model.norm.weight": torch.full((64,), float("inf"))}),
     r"model.norm.weight: holds non-finite"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}),
     r"model.norm.weight: dtype torch.int32"),
    (lambda t: t.update({"model.norm.qweight": torch.zeros(2, 64, dtype=torch.int32)}),
     r"model.norm.qweight: module 'model.norm' is a LlamaRMSNorm"),
])
def test_bad_tensors_are_named(ckpt, edit, match):
    _edit_tensors(ckpt, edit)
    with pytest.raises(CheckpointTensorError, match=match):
        load_quantized(ckpt)


def test_dynamic_exclusion_contradicting_file(ckpt):
    _edit_config(ckpt, lambda c: c["quantization_config"].update(dynamic={"-:.*q_proj": {}}))
    with pytest.raises(CheckpointTensorError, match=r"q_proj\.qweight: the config excludes"):
        load_quantized(ckpt)


def test_interrupted_save_leaves_old_checkpoint(ckpt, tmp_path, monkeypatch):
    import quantkern.io.save as save_mod

    model = quantize_linears(tiny_llama(seed=3), WeightScheme(8, 32, True, False))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(save_mod, "write_side_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, ckpt, overwrite=True)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the temporary directory is gone
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()
    save_quantized(model, ckpt, overwrite=True)  # a completed save replaces the old directory
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(hidden_size=-64), r"config.json: cannot build the model it describes"),
    (lambda c: c.update(model_type="no-such-model"), r"config.json: cannot build a 'no-such-model' config"),
    (lambda c: c.update(model_type=7), r"'model_type' must be a string"),
])
def test_model_config_that_cannot_be_built(ckpt, edit, match):
    _edit_config(ckpt, edit)
    with pytest.raises(CheckpointConfigError, match=match):
        load_quantized(ckpt)


# --- issue #14 -----------------------------------------------------------------------------------

IDS = torch.arange(12)[None]


def _logits(path):
    with torch.no_grad():
        return load_quantized(path)(IDS).logits


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def saved_v2(tmp_path_factory):
    model = quantize_linears(tiny_llama(seed=1), WeightScheme(4, 32, False, False))
    return save_quantized(model, tmp_path_factory.mktemp("v2") / "ckpt", checkpoint_format="gptq_v2")


@pytest.fixture(scope="module")
def saved_sym_v2(tmp_path_factory):
    model = quantize_linears(tiny_llama(seed=2), WeightScheme(4, 32, True, False))
    return save_quantized(model, tmp_path_factory.mktemp("symv2") / "ckpt", checkpoint_format="gptq_v2")


def _copy(src, tmp_path, name="c"):
    return shutil.copytree(src, tmp_path / name)


def test_gptq_v2_stated_only_in_quantize_config(saved_v2, tmp_path):
    ckpt = _copy(saved_v2, tmp_path)
    _edit_config(ckpt, lambda c: c["quantization_config"].pop("checkpoint_format"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stated format is used without a warning
        assert torch.equal(_logits(ckpt), _logits(saved_v2))
    from quantkern.io import inspect_checkpoint

    info = inspect_checkpoint(ckpt)
    assert info["format"] == "gptq_v2" and info["consistent"], info["problems"]


def test_gptq_format_sources_that_disagree_are_refused(saved_v2, tmp_path):
    ckpt = _copy(saved_v2, tmp_path)
    _edit_config(ckpt, lambda c: c["quantization_config"].update(checkpoint_format="gptq"))
    with pytest.raises(CheckpointConfigError, match=r"stated inconsistently \(config.json quantization_config"
                                                    r"\.checkpoint_format='gptq', quantize_config.json "
                                                    r"checkpoint_format='gptq_v2'\)"):
        load_quantized(ckpt)
    from quantkern.io import inspect_checkpoint

    info = inspect_checkpoint(ckpt)
    assert not info["consistent"] and any("stated inconsistently" in p for p in info["problems"])


def _drop_format(ckpt):
    _edit_config(ckpt, lambda c: c["quantization_config"].pop("checkpoint_format"))
    _edit_json(ckpt / "quantize_config.json", lambda d: d.pop("checkpoint_format"))


def test_gptq_format_missing_everywhere_is_detected_and_warned(saved_sym_v2, saved, tmp_path):
    from quantkern.io.config import CheckpointFormatWarning

    ckpt = _copy(saved_sym_v2, tmp_path, "sym")
    _drop_format(ckpt)
    with pytest.warns(CheckpointFormatWarning, match=r"no checkpoint_format .* say 'gptq_v2', loading as 'gptq_v2'"):
        got = _logits(ckpt)
    assert torch.equal(got, _logits(saved_sym_v2))
    ckpt = _copy(saved, tmp_path, "asym")  # asymmetric v1 zeros do not tell: v1, said out loud
    _drop_format(ckpt)
    with pytest.warns(CheckpointFormatWarning, match=r"do not tell v1 from v2; loading as 'gptq' \(v1"):
        got = _logits(ckpt)
    assert torch.equal(got, _logits(saved))


def test_inspect_takes_k_from_the_config_and_reports_a_bits_mismatch(ckpt):
    from quantkern.io import inspect_checkpoint

    _edit_config(ckpt, lambda c: c["quantization_config"].update(bits=2))
    info = inspect_checkpoint(ckpt)
    down = next(layer for layer in info["layers"] if layer["name"] == "model.layers.0.mlp.down_proj")
    assert (down["in_features"], down["out_features"], down["bits"]) == (128, 64, 2)
    assert not info["consistent"]
    assert any(p.startswith("model.layers.0.mlp.down_proj.qweight: shape [16, 64], expected [8, 64] for a "
                            "128->64") for p in info["problems"]), info["problems"]
    with pytest.raises(CheckpointTensorError, match=r"down_proj\.qweight: shape \(16, 64\)"):
        load_quantized(ckpt)


@pytest.fixture
def sharded(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, False, False))
    return save_quantized(model, tmp_path / "sharded", max_shard_size="20KB")


def test_shard_left_out_of_the_index_is_not_consistent(sharded):
    from quantkern.io import inspect_checkpoint

    index = sharded / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"]
    last = sorted(set(wm.values()))[-1]
    _edit_json(index, lambda d: d.update(weight_map={k: v for k, v in wm.items() if v != last}))
    info = inspect_checkpoint(sharded)
    assert not info["consistent"]
    assert any(f"{last}: safetensors file that is not read (the index" in p for p in info["problems"])
    with pytest.raises(CheckpointFileError, match=rf"{last}: safetensors file that is not read"):
        load_quantized(sharded)


def test_index_that_misplaces_or_omits_a_tensor(sharded):
    from quantkern.io import inspect_checkpoint

    index = sharded / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(wm.values()), key=lambda f: -list(wm.values()).count(f))
    first, second = shards[:2]  # first holds more than one tensor: it stays in the index
    name = next(k for k, v in wm.items() if v == first)
    _edit_json(index, lambda d: d["weight_map"].update({name: second}))
    with pytest.raises(CheckpointFileError, match=rf"maps '{re.escape(name)}' to {second}, but it is in {first}"):
        load_quantized(sharded)
    _edit_json(index, lambda d: d["weight_map"].pop(name))
    assert any(f"holds '{name}', which the index" in p for p in inspect_checkpoint(sharded)["problems"])


def test_inspect_reports_tensors_no_shard_provides(ckpt):
    from quantkern.io import inspect_checkpoint

    _edit_tensors(ckpt, lambda t: t.pop("model.norm.weight"))
    info = inspect_checkpoint(ckpt)
    assert not info["consistent"]
    assert "1 tensor(s) the model config expects are in no shard: ['model.norm.weight']" in info["problems"]


EVIL = "+:(.*.*)*X"


@pytest.mark.timeout(60)
def test_catastrophic_override_pattern_is_matched_in_linear_time(ckpt, saved):
    from quantkern.io import inspect_checkpoint, parse_quantization_config

    cfg = parse_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 32,
                                     "dynamic": {EVIL: {"bits": 8}, "-:(a|aa)*$": {},
                                                 "+:(?:(?:){99999}){99999}Z": {"bits": 2}}})
    t = time.perf_counter()
    assert cfg.scheme_for("model.layers.0.self_attn.q_proj" * 20) == cfg.scheme
    assert cfg.scheme_for("model.layers.0.self_attn.q_projX").bits == 8
    assert cfg.scheme_for("a" * 3000) is None
    assert time.perf_counter() - t < 0.5
    _edit_config(ckpt, lambda c: c["quantization_config"].update(dynamic={EVIL: {"bits": 8}}))
    t = time.perf_counter()
    assert torch.equal(_logits(ckpt), _logits(saved))
    assert inspect_checkpoint(ckpt)["consistent"]
    assert time.perf_counter() - t < 10


@pytest.mark.parametrize("pattern, match", [
    (r"+:(a)\1", "groupref cannot be matched in linear time"),
    (r"+:(?=q)", "assert cannot be matched in linear time"),
    (r"+:(?i)Q_PROJ", "inline flags are not supported"),
    ("+:" + "a" * 1001, "longer than 1000 characters"),
    (r"+:(?:(?:a{50}){50}){50}", "more than 5000 states"),
])
def test_override_patterns_beyond_linear_time_are_refused(ckpt, pattern, match):
    _edit_config(ckpt, lambda c: c["quantization_config"].update(dynamic={pattern: {"bits": 8}}))
    t = time.perf_counter()
    with pytest.raises(CheckpointConfigError, match=rf"dynamic: invalid regex .*{match}"):
        load_quantized(ckpt)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("pattern", [r".*\.18\..*gate.*", r"^model\.layers\.(0|1)\.", r".*layers\.(1[0-9]|2[0-3])\..*",
                                     r"^model\.layers\.\d+\.self_attn\.(q|k|v)_proj$", r"(?:.*\.)?down_proj$",
                                     r"\bq_proj\b", r"[^.]+\.[^.]+$", r"(ab|a)*b{1,3}c?", r"x*$", ""])
def test_override_matcher_agrees_with_re(pattern):
    names = ["model.layers.18.mlp.gate_proj", "model.layers.0.self_attn.q_proj", "model.layers.21.mlp.down_proj",
             "model.layers.1.self_attn.v_proj", "lm_head", "", "ababbbc", "abbbb", "a.b", "a.b.c", "q_proj", "xq_proj"]
    from quantkern.io.config import override_matcher as m

    assert [m(pattern)(n) for n in names] == [re.match(pattern, n) is not None for n in names]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(num_hidden_layers=100_000), r"'num_hidden_layers'=100000, but the weights do not hold "
                                                    r"layers 0\.\.99999: layers found: 2 \(model\.layers\.0 \.\. "
                                                    r"model\.layers\.1\)"),
    (lambda c: c.update(num_hidden_layers=10_000_000), r"'num_hidden_layers'=10000000, but the weights do not "
                                                       r"hold layers 0\.\.9999999: layers found: 2"),
    (lambda c: c.update(num_hidden_layers=0), r"'num_hidden_layers' must be a positive int <= 4096, got 0"),
    (lambda c: c.update(num_hidden_layers=3), r"'num_hidden_layers'=3, but the weights do not hold layers 0\.\.2"),
    (lambda c: c.update(num_attention_heads=0), r"'num_attention_heads' must be a positive int <= 16384, got 0"),
    (lambda c: c.update(num_key_value_heads=-2), r"'num_key_value_heads' must be a positive int"),
    (lambda c: c.update(intermediate_size=1.5), r"'intermediate_size' must be a positive int"),
])
def test_model_config_checked_against_the_tensors_before_building(ckpt, edit, match):
    from quantkern.io import inspect_checkpoint

    _edit_config(ckpt, edit)
    t = time.perf_counter()
    with pytest.raises(CheckpointConfigError, match=match):
        load_quantized(ckpt)
    info = inspect_checkpoint(ckpt)
    assert not info["consistent"] and any(re.search(match, p) for p in info["problems"])
    assert time.perf_counter() - t < 5


def test_skeleton_buffers_are_bounded(ckpt, monkeypatch):
    import quantkern.io.load as load_mod

    monkeypatch.setattr(load_mod, "MAX_SKELETON_BUFFER_BYTES", 16)  # the rotary table alone is more
    with pytest.raises(CheckpointConfigError, match=r"GiB of buffers \(over 0 GiB\)"):
        load_quantized(ckpt)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("target", ["config.json", "quantize_config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_a_checkpoint_error(ckpt, target):
    from quantkern.io import inspect_checkpoint

    (ckpt / target).write_text(DEEP)
    with pytest.raises(CheckpointFileError, match=rf"{re.escape(target)}: .* is nested too deeply"):
        load_quantized(ckpt)
    if target != "quantize_config.json":
        with pytest.raises(CheckpointFileError, match="nested too deeply"):
            inspect_checkpoint(ckpt)
    else:
        assert any("nested too deeply" in p for p in inspect_checkpoint(ckpt)["problems"])


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    return save_quantized(model, tmp_path_factory.mktemp("gguf") / "m.gguf", format="gguf").read_bytes()


def hostile_ggufs(data: bytes, tmp_path):
    """A GGUF whose architecture string is not UTF-8, and one truncated inside its metadata."""
    bad = bytearray(data)
    bad[data.find(b"llama", 30)] = 0xFF
    (tmp_path / "utf8.gguf").write_bytes(bytes(bad))
    (tmp_path / "trunc.gguf").write_bytes(data[:200])
    return {"utf8.gguf": r"corrupt GGUF metadata value 'general.architecture' \(UnicodeDecodeError",
            "trunc.gguf": r"trunc.gguf: corrupt GGUF file"}


def test_hostile_gguf_given_to_load_model(gguf_bytes, tmp_path):
    from quantkern.io import inspect_checkpoint
    from quantkern.models import load_model

    for name, match in hostile_ggufs(gguf_bytes, tmp_path).items():
        with pytest.raises(CheckpointFileError, match=match):
            load_model(str(tmp_path / name))
        if name == "utf8.gguf":
            inspect_checkpoint(tmp_path / name)  # inspect reads what it can, as before

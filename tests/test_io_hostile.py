"""Hostile and broken checkpoints: every defect is a clear error naming what is wrong, never a crash
in a kernel, never an unpickle; interrupted saves leave nothing that loads."""

from __future__ import annotations

import json
import os
import shutil

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

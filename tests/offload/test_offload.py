"""Streaming quantization (quantkern.offload): same bytes as the in-memory path, bounded memory, resume
after a kill, refusal of a changed run, and the CLI options.

Memory and kill tests run the driver in a child process (peak RSS and ``os._exit`` need their own
process). Models are synthetic Llamas with random weights built from a config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantkern as qk
from quantkern import GPTQConfig, GPTQQuantizer, RTNConfig, RTNQuantizer
from quantkern.io.files import CheckpointFileError
from quantkern.offload import StreamStateError, quantize_streaming
from quantkern.offload.cli import run_streaming_from_args

VOCAB = 512


def make_llama(path: Path, hidden=128, inter=256, layers=3, vocab=VOCAB, heads=4, kv=2, tie=False, seed=0) -> int:
    """Save a random-weight Llama at ``path``; returns its fp32 bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def calib(n=4, length=24, vocab=VOCAB, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor bit-identical (same names, dtypes, values) and the same configs (quantize_config.json
    in both or in neither: compressed-tensors has none)."""
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb), sorted(set(ta) ^ set(tb))[:8]
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    ca.pop("_name_or_path", None)
    cb.pop("_name_or_path", None)
    assert ca == cb
    qa, qb = (p / "quantize_config.json" for p in (a, b))
    assert qa.is_file() == qb.is_file()
    if qa.is_file():
        assert json.loads(qa.read_text()) == json.loads(qb.read_text())


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "llama"
    make_llama(path)
    return path


# -- same result as the in-memory quantizers ----------------------------------------------------------
@pytest.mark.parametrize("settings", [dict(bits=4, group_size=64),
                                      dict(bits=3, group_size=32, sym=False, actorder=True)],
                         ids=["w4g64-sym", "w3g32-asym-actorder"])
def test_streaming_gptq_is_bit_identical_to_in_memory(src, tmp_path, settings):
    from transformers import LlamaForCausalLM

    config = GPTQConfig(batch_size=2, **settings)
    data = calib()
    out = quantize_streaming(src, config, data, tmp_path / "stream", verbose=False)
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    GPTQQuantizer(model, config, use_triton=False, verbose=False).quantize(data)
    ref = qk.save_quantized(model, tmp_path / "ref", checkpoint_format="gptq" if config.sym else "gptq_v2")
    assert_same_checkpoint(out, ref)
    # one shard per block + one for the rest, named for the index, nothing left of the work directory
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(set(index["weight_map"].values())) == shards
    assert {k for k, f in index["weight_map"].items() if f.startswith("model-00003")} == \
        {k for k in tensors_of(out) if k.startswith("model.layers.1.")}
    assert not (tmp_path / ".stream.partial").exists() and not list(out.glob("acts-*"))
    loaded = qk.load_quantized(out)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_streaming_rtn_tied_embeddings_and_cpu_offload(tmp_path):
    from transformers import LlamaForCausalLM

    path = tmp_path / "tied"
    make_llama(path, layers=2, tie=True)
    config = RTNConfig(bits=4, group_size=32)
    disk = quantize_streaming(path, config, None, tmp_path / "disk", verbose=False)
    cpu = quantize_streaming(path, config, None, tmp_path / "cpu", offload="cpu", verbose=False)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    RTNQuantizer(model, config, verbose=False, use_triton=False).quantize()
    ref = qk.save_quantized(model, tmp_path / "ref", checkpoint_format="gptq")
    assert_same_checkpoint(disk, ref)
    assert_same_checkpoint(cpu, ref)
    assert "lm_head.weight" not in tensors_of(disk)  # tied: re-tied from the embedding at load
    assert qk.load_quantized(disk).lm_head.weight is not None
    mask = os.umask(0)
    os.umask(mask)
    for p in [disk, *disk.iterdir()]:  # published with the umask's modes, not tempfile's 0600 / 0700
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p


# -- errors -------------------------------------------------------------------------------------------
def test_bad_arguments_fail_before_any_work(src, tmp_path):
    cfg = GPTQConfig(bits=4, group_size=64)
    with pytest.raises(ValueError, match="offload must be one of"):
        quantize_streaming(src, cfg, calib(), tmp_path / "o", offload="gpu", verbose=False)
    for other in (qk.ZeroQuantConfig(), qk.FP4Config()):  # layers no streamed format holds: named, with what streams
        with pytest.raises(TypeError, match=rf"{type(other).__name__} .*streamed configs: AWQConfig, FP8Config, "
                                            "GPTQConfig, PTQConfig, RTNConfig, SmoothQuantConfig, W8A8Config"):
            quantize_streaming(src, other, calib(), tmp_path / "o", verbose=False)
    with pytest.raises(ValueError, match="'\\*.down_prj' matches no quantized layer"):
        quantize_streaming(src, GPTQConfig(bits=4, group_size=64, overrides={"*.down_prj": {"bits": 8}}), calib(),
                           tmp_path / "o", verbose=False)
    with pytest.raises(ValueError, match=f"calibration item 1.* id {VOCAB}"):  # outside the embedding, named
        quantize_streaming(src, cfg, [torch.arange(8), torch.arange(VOCAB - 3, VOCAB + 1)], tmp_path / "o",
                           verbose=False)
    with pytest.raises(ValueError, match="only checkpoint_format='compressed-tensors' holds, got 'gptq'"):
        quantize_streaming(src, qk.W8A8Config(), None, tmp_path / "o", checkpoint_format="gptq", verbose=False)
    with pytest.raises(ValueError, match="act-order"):  # what the format cannot hold, before any data is read
        quantize_streaming(src, GPTQConfig(bits=4, group_size=64, actorder=True), calib(), tmp_path / "o",
                           checkpoint_format="compressed-tensors", verbose=False)
    with pytest.raises(ValueError, match="checkpoint_format must be"):
        quantize_streaming(src, cfg, calib(), tmp_path / "o", checkpoint_format="v3", verbose=False)
    with pytest.raises(ValueError, match="calibration data is required"):
        quantize_streaming(src, cfg, None, tmp_path / "o", verbose=False)
    with pytest.raises(ValueError, match="max_memory for cpu is .* one decoder block needs"):
        quantize_streaming(src, cfg, calib(), tmp_path / "o", max_memory="100KB", verbose=False)
    with pytest.raises(ValueError, match="max_memory for cpu is"):
        quantize_streaming(src, cfg, calib(), tmp_path / "o", max_memory={"cpu": 100_000}, verbose=False)
    with pytest.raises(ValueError, match="max_memory must be .* got 'lots'"):
        quantize_streaming(src, cfg, calib(), tmp_path / "o", max_memory="lots", verbose=False)
    with pytest.raises(ValueError, match="cannot be quantized with bits=4, group_size=512"):
        quantize_streaming(src, GPTQConfig(bits=4, group_size=512), calib(), tmp_path / "o", verbose=False)
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text((src / "config.json").read_text())
    (pickles / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointFileError, match="only pickle weights"):
        quantize_streaming(pickles, cfg, calib(), tmp_path / "o", verbose=False)
    assert not (tmp_path / "o").exists()


class _Stop(Exception):
    pass


def _stop_after(k):
    def cb(info):
        if info["block"] == k:
            raise _Stop

    return cb


def test_changed_model_config_or_data_is_refused(tmp_path):
    path = tmp_path / "m"
    make_llama(path, layers=3)
    cfg, data, out = GPTQConfig(bits=4, group_size=64, batch_size=2), calib(), tmp_path / "q"
    with pytest.raises(_Stop):
        quantize_streaming(path, cfg, data, out, verbose=False, callback=_stop_after(0))
    partial = tmp_path / ".q.partial"
    assert json.loads((partial / "manifest.json").read_text())["finished"] == [0]
    with pytest.raises(StreamStateError, match="different config"):
        quantize_streaming(path, GPTQConfig(bits=3, group_size=64, batch_size=2), data, out, verbose=False)
    with pytest.raises(StreamStateError, match="different calibration"):
        quantize_streaming(path, cfg, calib(seed=1), out, verbose=False)
    with pytest.raises(StreamStateError, match="different dtype"):
        quantize_streaming(path, cfg, data, out, dtype=torch.bfloat16, verbose=False)
    make_llama(path, layers=3, seed=1)  # same shapes, new values
    with pytest.raises(StreamStateError, match="different model"):
        quantize_streaming(path, cfg, data, out, verbose=False)
    assert json.loads((partial / "manifest.json").read_text())["finished"] == [0]  # refusals change nothing
    done = quantize_streaming(path, cfg, data, out, resume=False, verbose=False)
    assert qk.load_quantized(done) is not None and not partial.exists()


# -- kill and resume ----------------------------------------------------------------------------------
KILL_CHILD = r"""
import os, sys, torch
from quantkern import GPTQConfig
from quantkern.offload import quantize_streaming
src, out, kill = sys.argv[1], sys.argv[2], int(sys.argv[3])
g = torch.Generator().manual_seed(0)
data = [torch.randint(0, 512, (24,), generator=g) for _ in range(4)]
def cb(info):
    print("block", info["block"], flush=True)
    if info["block"] == kill:
        os._exit(75)  # no cleanup, no flush of anything else: as if killed
quantize_streaming(src, GPTQConfig(bits=4, group_size=64, batch_size=2), data, out, verbose=False, callback=cb)
"""


def _child(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def test_kill_and_resume_is_bit_identical(tmp_path):
    path = tmp_path / "m"
    make_llama(path, layers=4)
    out = tmp_path / "q"
    r = _child(KILL_CHILD, path, out, 1)
    assert r.returncode == 75, r.stderr[-2000:]
    partial = tmp_path / ".q.partial"
    assert not out.exists() and json.loads((partial / "manifest.json").read_text())["finished"] == [0, 1]
    # debris of a write the kill interrupted: must be ignored and removed
    (partial / ".model-00004-of-00005.safetensors.tmp-1").write_bytes(b"half a file")
    r = _child(KILL_CHILD, path, out, -1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("block")] == ["block 2", "block 3"]
    assert not partial.exists() and not list(out.glob(".*tmp*")) and not list(out.glob("acts-*"))
    # the children run with one thread; a multi-threaded matmul may round differently, so match it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = quantize_streaming(path, GPTQConfig(bits=4, group_size=64, batch_size=2), calib(), tmp_path / "ref",
                                 verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert_same_checkpoint(out, ref)


# -- bounded memory -----------------------------------------------------------------------------------
MEM_CHILD = r"""
import json, sys, torch, transformers, accelerate, safetensors  # noqa: F401  (library baseline)
import transformers.models.llama.modeling_llama  # noqa: F401
from quantkern import GPTQConfig, RTNConfig
from quantkern.offload import quantize_streaming
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
src, warm, out, method = sys.argv[1:5]
g = torch.Generator().manual_seed(0)
data = [torch.randint(0, 256, (64,), generator=g) for _ in range(4)]
cfg = GPTQConfig(bits=4, group_size=128, batch_size=4) if method == "gptq" else RTNConfig(bits=4, group_size=128)
quantize_streaming(warm, cfg, data, out + ".warm", verbose=False)  # touch the code paths: library baseline
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
quantize_streaming(src, cfg, data, out, verbose=False)
print(json.dumps({"baseline": base, "peak": status("VmHWM")}))
"""


def _peak_increment(tmp_path: Path, layers: int, method: str) -> tuple[int, int]:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    src = tmp_path / "big"
    size = make_llama(src, hidden=512, inter=1536, layers=layers, vocab=4096, heads=8, kv=8)
    make_llama(tmp_path / "warm", hidden=128, inter=256, layers=2, vocab=256)
    r = _child(MEM_CHILD, src, tmp_path / "warm", tmp_path / "q", method)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()
    return m["peak"] - m["baseline"], size


def test_peak_memory_rtn_streaming_is_a_fraction_of_the_model(tmp_path):
    """24 blocks, 336 MiB in fp32: the increment of peak RSS must stay under a quarter of that (one
    block is 13.6 MiB; measured here: ~45 MiB)."""
    inc, size = _peak_increment(tmp_path, 24, "rtn")
    print(f"model {size / 2**20:.0f} MiB, peak RSS increment {inc / 2**20:.1f} MiB")
    assert inc < size / 4, f"peak RSS grew by {inc / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB model"


@pytest.mark.slow
def test_peak_memory_gptq_streaming_is_a_fraction_of_the_model(tmp_path):
    """48 blocks, 650 MiB in fp32: GPTQ's peak RSS increment must stay under a third of that (GPTQ
    holds a few in_features² fp32 Hessian-sized temporaries per Linear: ~110 MiB measured here)."""
    inc, size = _peak_increment(tmp_path, 48, "gptq")
    print(f"model {size / 2**20:.0f} MiB, peak RSS increment {inc / 2**20:.1f} MiB")
    assert inc < size / 3, f"peak RSS grew by {inc / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB model"


# -- command line -------------------------------------------------------------------------------------
def _quantize_parser() -> argparse.ArgumentParser:
    from quantkern.cli import _add_quantize

    sub = argparse.ArgumentParser().add_subparsers(dest="cmd")
    _add_quantize(sub)
    return sub.choices["quantize"]  # _add_quantize also adds the streaming options


def _word_tokenizer(path: Path) -> None:
    """A word-level tokenizer trained on the built-in text, saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantkern.calibration import builtin_text

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([builtin_text("calibration")[:200_000]],
                            trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_cli_options(tmp_path, capsys):
    from quantkern.cli import main

    path = tmp_path / "m"
    make_llama(path, layers=2)
    _word_tokenizer(path)
    assert _quantize_parser().parse_args(["--out", "x"]).resume is True
    assert main(["quantize", "--model", str(path), "--bits", "4", "--group-size", "64", "--nsamples", "4",
                 "--seq-len", "16", "--offload", "disk", "--out", str(tmp_path / "q"), "--max-memory", "1GiB"]) == 0
    err = capsys.readouterr().err
    assert "block 1/2 done in" in err and "block 2/2 done in" in err and "s left" in err
    assert (tmp_path / "q" / "tokenizer.json").is_file() and qk.load_quantized(tmp_path / "q") is not None
    assert main(["quantize", "--model", str(path), "--method", "rtn", "--offload", "cpu", "--no-resume",
                 "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["quantize", "--offload", "disk", "--out", "x"]) == 2
    assert "safetensors weights" in capsys.readouterr().err
    assert main(["quantize", "--model", str(path), "--offload", "disk", "--format", "awq", "--out", "x"]) == 2
    assert "gptq or compressed-tensors checkpoints, got --format awq" in capsys.readouterr().err
    # a W8A8 method streams to compressed-tensors (its default format), calibrated from the built-in text
    assert main(["quantize", "--model", str(path), "--method", "smoothquant", "--nsamples", "4", "--seq-len", "16",
                 "--offload", "disk", "--out", str(tmp_path / "s")]) == 0
    qc = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert type(qk.load_quantized(tmp_path / "s").model.layers[0].mlp.down_proj).__name__ == "W8A8Linear"
    with pytest.raises(ValueError, match="needs --offload cpu or disk"):
        run_streaming_from_args(_quantize_parser().parse_args(["--model", str(path), "--out", "x"]), None)
    with pytest.raises(SystemExit):
        _quantize_parser().parse_args(["--offload", "gpu", "--out", "x"])

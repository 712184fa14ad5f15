"""Where a save may write (issue #14): nothing it did not write is ever removed, a bad destination is
refused before calibration naming the user's path, a previous checkpoint is replaced only with
``overwrite``, and a save killed between its two renames is undone by the next save or load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkern as qk
from fixtures.quant_models import quantize_linears, tiny_llama
from quantkern.cli import main
from quantkern.core import WeightScheme
from quantkern.io import CheckpointFileError, load_quantized, save_quantized

SCHEME = WeightScheme(4, 32, True, False)


@pytest.fixture(scope="module")
def qmodel():
    return quantize_linears(tiny_llama(), SCHEME)


def listing(d: Path) -> dict[str, bytes | None]:
    """Every path under ``d`` (hidden ones included) with its bytes (None for a directory)."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def user_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    (d / "data").mkdir()
    (d / "data" / "train.jsonl").write_text("{}\n")
    return d


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model (let alone calibrating it)."""
    import quantkern.models

    def load_model(*a, **k):
        raise AssertionError("the model was loaded: the destination was not checked first")

    monkeypatch.setattr(quantkern.models, "load_model", load_model)
    monkeypatch.setattr(qk, "load_quantized", load_model)


def cli_rtn(monkeypatch, out, *extra) -> int:
    """``quantkern quantize --method rtn`` on the tiny model (no calibration data, seconds)."""
    import quantkern.models

    class Tok:
        def save_pretrained(self, path):
            pass

    monkeypatch.setattr(quantkern.models, "load_model", lambda name, device="cpu", **kw: (tiny_llama(), Tok()))
    return main(["quantize", "--model", "tiny", "--method", "rtn", "--group-size", "32", "--out", str(out), *extra])


# -- a directory that is not a checkpoint ----------------------------------------------------------------
def test_non_checkpoint_directory_is_refused_and_untouched(qmodel, tmp_path):
    d = user_dir(tmp_path / "work")
    before = listing(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(CheckpointFileError, match=rf"{d} is not empty and is not a quantized checkpoint "
                                                      r"\(it holds data/, notes.txt\)"):
            save_quantized(qmodel, d, overwrite=overwrite)
    with pytest.raises(CheckpointFileError, match="not a quantized checkpoint"):
        save_quantized(qmodel, d, format="gguf", overwrite=True)  # a GGUF into a directory too
    assert listing(tmp_path) == before  # nothing removed, no temporary directory left


def test_dense_model_directory_is_not_a_checkpoint(qmodel, tmp_path):
    d = tmp_path / "dense"
    tiny_llama().save_pretrained(d)  # the user's source model: config.json without quantization_config
    before = listing(d)
    with pytest.raises(CheckpointFileError, match="is not empty and is not a quantized checkpoint"):
        save_quantized(qmodel, d, overwrite=True)
    assert listing(d) == before


def test_cli_out_dot_is_refused_before_loading(tmp_path, monkeypatch, capsys, no_loading):
    d = user_dir(tmp_path / "cwd")
    monkeypatch.chdir(d)
    before = listing(tmp_path)
    assert main(["quantize", "--out", "."]) == 2
    assert main(["quantize", "--out", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "quantkern quantize: error: . is not empty and is not a quantized checkpoint" in err
    assert listing(tmp_path) == before


def test_checkpoint_with_other_files_is_refused_even_with_overwrite(qmodel, tmp_path):
    ckpt = save_quantized(qmodel, tmp_path / "ckpt")
    (ckpt / "README.md").write_text("model card")
    (ckpt / "eval").mkdir()
    before = listing(tmp_path)
    with pytest.raises(CheckpointFileError, match=r"holds a checkpoint but also README.md, eval/, which quantkern "
                                                  "does not write"):
        save_quantized(qmodel, ckpt, overwrite=True)
    assert listing(tmp_path) == before


# -- a previous checkpoint -------------------------------------------------------------------------------
def test_existing_checkpoint_needs_overwrite(tmp_path):
    ckpt = save_quantized(quantize_linears(tiny_llama(seed=0), SCHEME), tmp_path / "ckpt")
    before = listing(tmp_path)
    other = quantize_linears(tiny_llama(seed=1), WeightScheme(8, 32, True, False))
    with pytest.raises(CheckpointFileError, match=r"ckpt already holds a checkpoint; pass overwrite=True "
                                                  r"\(--overwrite\) to replace it"):
        save_quantized(other, ckpt)
    assert listing(tmp_path) == before
    save_quantized(other, ckpt, overwrite=True)
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    # every format's own files count as a checkpoint: each can replace the one before
    for fmt in ("compressed-tensors", "awq", "gguf", "gptq"):
        save_quantized(quantize_linears(tiny_llama(), SCHEME), ckpt, format=fmt, overwrite=True)
        assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    # a GGUF into a directory replaces it as a whole: no GPTQ files left beside model.gguf
    model = quantize_linears(tiny_llama(), SCHEME)
    path = save_quantized(model, ckpt, format="gguf", overwrite=True)
    assert path == ckpt / "model.gguf" and os.listdir(ckpt) == ["model.gguf"]
    with pytest.raises(CheckpointFileError, match="already holds a checkpoint"):
        save_quantized(model, ckpt, format="gguf")


def test_cli_existing_checkpoint_needs_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert cli_rtn(monkeypatch, out) == 0
    before = listing(tmp_path)
    assert cli_rtn(monkeypatch, out) == 2
    assert f"{out} already holds a checkpoint; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert listing(tmp_path) == before
    assert cli_rtn(monkeypatch, out, "--overwrite") == 0
    assert load_quantized(out) is not None and sorted(os.listdir(tmp_path)) == ["out"]


def test_cli_export_checks_out_before_reading(qmodel, tmp_path, capsys, no_loading):
    ckpt = save_quantized(qmodel, tmp_path / "ckpt")
    dest = save_quantized(qmodel, tmp_path / "dest")
    before = listing(tmp_path)
    assert main(["export", str(ckpt), "--format", "gptq", "--out", str(dest)]) == 2
    assert "already holds a checkpoint; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert listing(tmp_path) == before


# -- an existing file ------------------------------------------------------------------------------------
def test_existing_file_is_refused(qmodel, tmp_path):
    f = tmp_path / "model.out"
    f.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(CheckpointFileError, match=rf"{f} is an existing file, not a directory; refusing"):
            save_quantized(qmodel, f, overwrite=overwrite)
    g = tmp_path / "notes.gguf"
    g.write_text("not a gguf")
    with pytest.raises(CheckpointFileError, match=rf"{g} exists and is not a GGUF file; refusing to replace it"):
        save_quantized(qmodel, g, format="gguf", overwrite=True)
    gguf = save_quantized(qmodel, tmp_path / "m.gguf", format="gguf")
    with pytest.raises(CheckpointFileError, match=r"m.gguf already holds a GGUF checkpoint; pass overwrite=True"):
        save_quantized(qmodel, gguf, format="gguf")
    assert f.read_text() == "precious" and g.read_text() == "not a gguf"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "model.out", "notes.gguf"]
    save_quantized(qmodel, gguf, format="gguf", overwrite=True)


def test_cli_existing_file_is_refused_before_loading(tmp_path, capsys, no_loading):
    f = tmp_path / "out"
    f.write_text("precious")
    for extra in ([], ["--offload", "disk", "--method", "rtn"], ["--overwrite"]):
        assert main(["quantize", "--out", str(f), *extra]) == 2
        assert f"{f} is an existing file, not a directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out"] and f.read_text() == "precious"


def test_streaming_refuses_a_file_before_reading_the_source(tmp_path):
    from quantkern.offload import quantize_streaming

    src = tmp_path / "src"
    tiny_llama(tie=False).save_pretrained(src)
    f = tmp_path / "out"
    f.write_text("precious")
    with pytest.raises(CheckpointFileError, match=rf"{f} is an existing file"):
        quantize_streaming(src, qk.RTNConfig(bits=4, group_size=32), None, f, verbose=False)
    assert f.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["out", "src"]  # no .out.partial


def test_streaming_checkpoint_needs_overwrite_and_resume_still_works(tmp_path):
    from quantkern.offload import quantize_streaming

    src = tmp_path / "src"
    tiny_llama(tie=False).save_pretrained(src)
    cfg, out = qk.RTNConfig(bits=4, group_size=32), tmp_path / "out"
    quantize_streaming(src, cfg, None, out, verbose=False)
    with pytest.raises(CheckpointFileError, match="already holds a checkpoint; pass overwrite=True"):
        quantize_streaming(src, cfg, None, out, verbose=False)
    assert not (tmp_path / ".out.partial").exists()

    class Stop(Exception):
        pass

    def stop(info):
        raise Stop

    with pytest.raises(Stop):  # an interrupted run: its state lives in .out.partial, beside --out
        quantize_streaming(src, qk.RTNConfig(bits=8, group_size=32), None, out, verbose=False, callback=stop,
                           overwrite=True)
    assert (tmp_path / ".out.partial" / "manifest.json").is_file()
    quantize_streaming(src, qk.RTNConfig(bits=8, group_size=32), None, out, verbose=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_streaming_failed_final_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from quantkern.offload import quantize_streaming

    src = tmp_path / "src"
    tiny_llama(tie=False).save_pretrained(src)
    out = quantize_streaming(src, qk.RTNConfig(bits=4, group_size=32), None, tmp_path / "out", verbose=False)
    before = listing(out)
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:  # the previous checkpoint is away, the new one fails to take its place
            raise OSError(18, "Invalid cross-device link")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        quantize_streaming(src, qk.RTNConfig(bits=8, group_size=32), None, out, verbose=False, overwrite=True)
    monkeypatch.undo()
    assert listing(out) == before and not list(tmp_path.glob(".out.old-*"))
    quantize_streaming(src, qk.RTNConfig(bits=8, group_size=32), None, out, verbose=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# -- an unusable place -----------------------------------------------------------------------------------
def test_unusable_destination_is_refused_naming_the_users_path(qmodel, tmp_path, monkeypatch, capsys, no_loading):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointFileError, match=rf"{f}/sub/ckpt: {f} is not a directory"):
        save_quantized(qmodel, f / "sub" / "ckpt")
    assert main(["quantize", "--out", str(f / "ckpt")]) == 2
    assert f"{f}/ckpt: {f} is not a directory" in capsys.readouterr().err

    import tempfile

    real = tempfile.mkdtemp

    def read_only(*a, dir=None, **k):  # what a read-only parent answers (root ignores file modes)
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied", os.path.join(dir, ".ckpt.tmp-abcdefgh"))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(CheckpointFileError, match=rf"^{tmp_path}/ckpt: cannot write in {tmp_path} "
                                                  r"\(Permission denied\)$"):
        save_quantized(qmodel, tmp_path / "ckpt")
    assert main(["quantize", "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/ckpt: cannot write in {tmp_path} (Permission denied)" in err and ".tmp-" not in err


def test_read_only_place_is_refused(qmodel):
    import tempfile

    try:  # /sys refuses new entries even to root, where it is mounted as usual
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    with pytest.raises(CheckpointFileError, match=r"^/sys/qk-ckpt: cannot write in /sys \("):
        save_quantized(qmodel, "/sys/qk-ckpt")


# -- a save killed between its two renames ---------------------------------------------------------------
KILL_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
from fixtures.quant_models import quantize_linears, tiny_llama
from quantkern.core import WeightScheme
from quantkern.io import save_quantized
model = quantize_linears(tiny_llama(seed=5), WeightScheme(8, 32, True, False))
real, calls = os.rename, []
def rename(a, b):
    calls.append((a, b))
    if len(calls) == 2:  # the old checkpoint is away, the new one not yet in place
        os._exit(75)
    real(a, b)
os.rename = rename
try:
    save_quantized(model, sys.argv[1], overwrite=True)
except TypeError:  # the starting code had no overwrite (and replaced silently)
    save_quantized(model, sys.argv[1])
"""


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A directory where a save over ``ckpt`` was killed between its renames, and ckpt's bytes before."""
    w = tmp_path_factory.mktemp("killed")
    ckpt = save_quantized(quantize_linears(tiny_llama(), SCHEME), w / "ckpt")
    before = listing(ckpt)
    r = subprocess.run([sys.executable, "-c", KILL_CHILD, str(ckpt), str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 75, r.stderr[-2000:]
    names = sorted(os.listdir(w))
    assert len(names) == 2 and names[0].startswith(".ckpt.old-") and names[1].startswith(".ckpt.tmp-"), names
    return w, before


def test_kill_between_renames_is_restored_by_the_next_load(killed, tmp_path, caplog):
    w = shutil.copytree(killed[0], tmp_path / "w")
    with caplog.at_level("WARNING"):
        model = load_quantized(w / "ckpt")
    assert "killed between its two renames; restored the previous checkpoint" in caplog.text
    assert listing(w / "ckpt") == killed[1] and model.model.layers[0].mlp.down_proj.bits == 4


def test_kill_between_renames_is_restored_by_the_next_save(killed, tmp_path, qmodel):
    w = shutil.copytree(killed[0], tmp_path / "w")
    with pytest.raises(CheckpointFileError, match="already holds a checkpoint; pass overwrite=True"):
        save_quantized(qmodel, w / "ckpt")  # the previous checkpoint is back, and not silently replaced
    assert os.listdir(w) == ["ckpt"] and listing(w / "ckpt") == killed[1]  # the unfinished one is cleaned


def test_several_leftovers_are_reported_not_guessed(killed, tmp_path, qmodel):
    w = shutil.copytree(killed[0], tmp_path / "w")
    old = next(w.glob(".ckpt.old-*"))
    shutil.copytree(old, w / ".ckpt.old-zzzzzzzz")
    with pytest.raises(CheckpointFileError, match=r"ckpt is missing: interrupted saves left 2 previous checkpoints"):
        load_quantized(w / "ckpt")
    with pytest.raises(CheckpointFileError, match=r"rename the one to keep back to"):
        save_quantized(qmodel, w / "ckpt")


def test_failed_second_rename_puts_the_old_checkpoint_back(qmodel, tmp_path, monkeypatch):
    ckpt = save_quantized(qmodel, tmp_path / "ckpt")
    before = listing(tmp_path)
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(18, "Invalid cross-device link")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        save_quantized(quantize_linears(tiny_llama(seed=2), WeightScheme(8, 32, True, False)), ckpt, overwrite=True)
    assert listing(tmp_path) == before  # the old checkpoint in place, no .tmp-* / .old-* left


def test_stale_temporary_files_are_cleaned_by_the_next_save(qmodel, tmp_path):
    (tmp_path / ".ckpt.tmp-abcd1234").mkdir()  # what a killed save leaves (its files half written)
    (tmp_path / ".ckpt.tmp-abcd1234" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".ckpt.trash-abcd1234").mkdir()
    (tmp_path / ".m.gguf.tmp-x1y2z3w4").write_bytes(b"half a gguf")
    (tmp_path / ".ckpt2.tmp-abcd1234").mkdir()  # another destination's: not ours to remove
    save_quantized(qmodel, tmp_path / "ckpt")
    save_quantized(qmodel, tmp_path / "m.gguf", format="gguf")
    assert sorted(os.listdir(tmp_path)) == [".ckpt2.tmp-abcd1234", "ckpt", "m.gguf"]
    torch.testing.assert_close(load_quantized(tmp_path / "ckpt").model.layers[0].mlp.down_proj.scales,
                               qmodel.model.layers[0].mlp.down_proj.scales)

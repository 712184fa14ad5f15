"""Files of a checkpoint directory: atomic writing, sharded safetensors, safe reading.

Only safetensors is ever read. A directory that holds only pickles (``.bin`` / ``.pt`` / ``.pth`` /
``.ckpt``) is refused with a clear error: unpickling runs arbitrary code, and ``torch.load`` is never
called here.

Writing never removes what quantkern did not write: :func:`check_destination` refuses, before any
work, an existing file, a non-empty directory that is not a quantized checkpoint (recognised by its
files, and holding nothing else), a checkpoint unless ``overwrite=True``, and a destination whose
directory cannot be written. :func:`recover_interrupted` puts back what a save killed between its two
renames left next to the destination.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GGUF_DIR_NAME = "model.gguf"  # the file a GGUF save into a directory writes
# the tokenizer files the streaming path copies from the source checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# every file a quantkern save (any directory format, or --offload) may write, tokenizer.save_pretrained
# included; a directory holding a quantized config and nothing but these is a checkpoint that
# overwrite=True may replace
CHECKPOINT_FILES = frozenset({"config.json", "quantize_config.json", "quant_config.json", "generation_config.json",
                              SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, GGUF_DIR_NAME, *TOKENIZER_FILES,
                              "vocab.txt", "chat_template.json"})
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
GGUF_MAGIC = b"GGUF"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


log = logging.getLogger(__name__)


class CheckpointFileError(ValueError):
    """A checkpoint directory or file that cannot be read safely (missing, truncated, corrupt, pickle),
    or a destination that cannot be written without destroying what is there (see
    :func:`check_destination`)."""


def parse_size(size, what: str = "max_shard_size") -> int:
    """``"2GB"`` / ``"500MiB"`` / ``1_000_000`` -> bytes; raises ``ValueError`` naming ``what`` on anything else."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{what} must be a positive int or a string like '2GB' / '500MiB', got {size!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the modes a plain ``open`` /
    ``mkdir`` would have: ``tempfile`` creates 0600 files and 0700 directories, and so does
    safetensors' writer, which would leave a checkpoint that a serving process running as another
    user cannot read."""
    path = Path(path)
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _leftovers(path: Path) -> dict[str, list[Path]]:
    """What saves of ``path`` leave next to it: ``tmp`` (temporary directories / files, not yet renamed
    into place), ``old`` (the previous checkpoint, renamed away just before the new one is renamed in)
    and ``trash`` (a replaced checkpoint being deleted). Names are ``.<name>.<kind>-XXXXXXXX`` (the 8
    characters ``tempfile`` adds), so another destination's leftovers never match."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old|trash)-[a-z0-9_]{{8}}")
    found: dict[str, list[Path]] = {"tmp": [], "old": [], "trash": []}
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:  # no parent yet: nothing was left
        return found
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            found[m.group(1)].append(path.parent / name)
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def recover_interrupted(path: str | os.PathLike, clean: bool = True) -> bool:
    """Undo what a save of ``path`` killed part-way left next to it; returns True if ``path`` was restored.

    - ``path`` missing and one ``.<name>.old-*`` there: the save was killed between its two renames;
      the previous checkpoint is renamed back to ``path`` (logged). Several are reported, not guessed.
    - with ``clean`` (saves; loads pass False): ``.<name>.tmp-*`` and ``.<name>.trash-*`` are removed,
      and so is ``.<name>.old-*`` once ``path`` holds a checkpoint again (the new one was published).

    Raises :class:`CheckpointFileError` naming the leftovers when they cannot be put back. Saves to one
    path from two processes at once are not supported (one would remove the other's temporary files)."""
    path = Path(path).absolute()
    left = _leftovers(path)
    restored = False
    if left["old"] and not os.path.lexists(path):
        olds = left["old"]
        if len(olds) > 1:
            raise CheckpointFileError(
                f"{path} is missing: interrupted saves left {len(olds)} previous checkpoints next to it "
                f"({', '.join(p.name for p in olds)}); rename the one to keep back to {path}")
        try:
            os.rename(olds[0], path)
        except OSError as e:
            raise CheckpointFileError(
                f"{path} is missing: a save to it was killed between its two renames and left the previous "
                f"checkpoint as {olds[0]}; putting it back failed ({e.strerror}): rename it to {path}") from None
        log.warning("%s: a save to it was killed between its two renames; restored the previous checkpoint "
                    "from %s", path, olds[0].name)
        left["old"], restored = [], True
    if clean:
        for p in left["tmp"] + left["trash"]:
            _remove(p)
        if left["old"]:
            if path.is_dir() and _is_checkpoint(path):
                for p in left["old"]:
                    _remove(p)
            else:
                log.warning("%s: kept %s (left by an interrupted save); %s is not a checkpoint", path,
                            ", ".join(p.name for p in left["old"]), path)
    return restored


def _is_gguf_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _is_checkpoint(path: Path) -> bool:
    """A quantized checkpoint: ``config.json`` with a ``quantization_config``, or a ``model.gguf``."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict):
            return True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return _is_gguf_file(path / GGUF_DIR_NAME)


def _is_checkpoint_file(p: Path) -> bool:
    return (p.name in CHECKPOINT_FILES or bool(_SHARD_NAME.fullmatch(p.name))) and p.is_file() \
        and not p.is_symlink()


def _listing(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_destination(path: str | os.PathLike, overwrite: bool = False, file: bool = False) -> Path:
    """Check, before any work, that a save may write ``path``; returns it absolute. Errors name ``path``
    as given (:class:`CheckpointFileError`).

    ``file=False`` (a checkpoint directory): a missing or empty directory is fine; a directory holding a
    quantized checkpoint (``config.json`` with ``quantization_config``, or ``model.gguf``) and nothing
    but the files quantkern writes (:data:`CHECKPOINT_FILES`, ``model-*-of-*.safetensors``) is replaced
    only with ``overwrite=True``; any other directory, an existing file and a symbolic link are refused.
    ``file=True`` (a ``.gguf`` file): a missing path is fine, an existing GGUF file needs ``overwrite``,
    anything else is refused. Either way the directory that will hold ``path`` (or its nearest existing
    ancestor) must be a writable directory. Runs :func:`recover_interrupted` first."""
    given = str(path)
    path = Path(path).absolute()
    if not path.name:
        raise CheckpointFileError(f"{given}: cannot write a checkpoint in place of the root directory")
    recover_interrupted(path)
    again = "pass overwrite=True (--overwrite) to replace it"
    if path.is_symlink():
        raise CheckpointFileError(f"{given} is a symbolic link; refusing to replace it (give its target instead)")
    if file and path.exists():
        if not path.is_file():
            raise CheckpointFileError(f"{given} exists and is not a file; refusing to replace it")
        if not _is_gguf_file(path):
            raise CheckpointFileError(f"{given} exists and is not a GGUF file; refusing to replace it")
        if not overwrite:
            raise CheckpointFileError(f"{given} already holds a GGUF checkpoint; {again}")
    elif path.exists():
        if not path.is_dir():
            raise CheckpointFileError(f"{given} is an existing file, not a directory; refusing to replace it "
                                      "(give a new or empty directory)")
        try:
            entries = sorted(os.listdir(path))
        except OSError as e:
            raise CheckpointFileError(f"{given}: cannot list the directory ({e.strerror})") from None
        if entries:
            foreign = [n + ("/" if (path / n).is_dir() else "") for n in entries
                       if not _is_checkpoint_file(path / n)]
            if not _is_checkpoint(path):
                raise CheckpointFileError(
                    f"{given} is not empty and is not a quantized checkpoint (it holds "
                    f"{_listing(foreign or entries)}); refusing to write there: give a new or empty directory")
            if foreign:
                raise CheckpointFileError(
                    f"{given} holds a checkpoint but also {_listing(foreign)}, which quantkern does not write; "
                    "refusing to replace it: move those away or give another directory")
            if not overwrite:
                raise CheckpointFileError(f"{given} already holds a checkpoint; {again}")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointFileError(f"{given}: {ancestor} is not a directory")
    try:  # the very operation a save starts with; catches read-only mounts and ACLs as well as modes
        probe = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=ancestor)
    except OSError as e:
        raise CheckpointFileError(f"{given}: cannot write in {ancestor} ({e.strerror})") from None
    os.rmdir(probe)
    return path


def replace_directory(src: Path, path: Path) -> None:
    """Rename the finished directory ``src`` to ``path`` (same parent). An existing ``path`` is renamed to
    ``.<name>.old-*`` first and deleted after; if the second rename fails, it is put back. A kill between
    the two renames leaves it there, and :func:`recover_interrupted` (run by the next save or load of
    ``path``) restores it."""
    path = Path(path)
    old = None
    if os.path.lexists(path):
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rmdir(old)
        os.rename(path, old)
    try:
        os.rename(src, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            os.rename(old, path)
        raise
    _fsync_path(path.parent, directory=True)
    if old is not None:
        trash = path.parent / f".{path.name}.trash-{old.name[-8:]}"
        try:  # no longer a restorable "old": a kill while deleting it must not bring half of it back
            os.rename(old, trash)
        except OSError:
            trash = old
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a fresh temporary directory next to ``path``; on normal exit fsync its files and rename it
    to ``path`` (an existing ``path`` is replaced only then, see :func:`replace_directory`). On an
    exception the temporary directory is removed and ``path`` is untouched, so an interrupted save never
    leaves a directory that loads. The caller checks ``path`` first (:func:`check_destination`)."""
    given = path
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{given} exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:  # name the user's path, not the temporary one
        raise CheckpointFileError(f"{given}: cannot write in {path.parent} ({e.strerror})") from None
    try:
        yield tmp
        publish_modes(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp, directory=True)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size="2GB",
                      metadata: dict | None = None) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or as shards ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` when they exceed ``max_shard_size``. Returns the file names."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(directory / SAFE_WEIGHTS_NAME), metadata=meta)
        return [SAFE_WEIGHTS_NAME]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [SAFE_WEIGHTS_INDEX_NAME]


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON object file; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFileError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointFileError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of checkpoint directory ``path`` (via the index when there is one).

    Raises :class:`CheckpointFileError` for a missing directory, an index naming missing / foreign
    files, or a directory holding only pickle weights (never unpickled)."""
    if not path.is_dir():
        raise CheckpointFileError(f"{path} is not a directory")
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        data = read_json(index, "safetensors index")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointFileError(f"{index}: 'weight_map' must map tensor names to file names")
        files = []
        for fname in sorted(set(wm.values())):
            f = (path / fname)
            if Path(fname).name != fname or not fname.endswith(".safetensors"):
                raise CheckpointFileError(f"{index}: shard name {fname!r} is not a plain .safetensors file name")
            if not f.is_file():
                raise CheckpointFileError(f"{index}: shard {fname} is missing")
            files.append(f)
        return files
    single = path / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if found:
        return found
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointFileError(f"{path} holds only pickle weights {pickles}; quantkern loads safetensors only "
                                  "(unpickling can run arbitrary code). Convert them to safetensors first.")
    raise CheckpointFileError(f"{path}: no .safetensors weights found")


def read_headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """``{tensor name: (file, safetensors dtype string, shape)}`` without reading tensor data.
    Raises :class:`CheckpointFileError` for a corrupt / truncated file or a name present twice."""
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    if k in out:
                        raise CheckpointFileError(f"tensor {k!r} appears in both {out[k][0].name} and {f.name}")
                    out[k] = (f, sl.get_dtype(), tuple(sl.get_shape()))
        except CheckpointFileError:
            raise
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise CheckpointFileError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read every tensor of ``files`` on the CPU; errors name the file."""
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        except Exception as e:
            raise CheckpointFileError(f"{f}: not a readable safetensors file ({e})") from None
    return out

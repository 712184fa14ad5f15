"""Files of a checkpoint directory: atomic writing, sharded safetensors, safe reading.

Only safetensors is ever read. A directory that holds only pickles (``.bin`` / ``.pt`` / ``.pth`` /
``.ckpt``) is refused with a clear error: unpickling runs arbitrary code, and ``torch.load`` is never
called here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointFileError(ValueError):
    """A checkpoint directory or file that cannot be read safely (missing, truncated, corrupt, pickle)."""


def parse_size(size) -> int:
    """``"2GB"`` / ``"500MiB"`` / ``1_000_000`` -> bytes; raises ``ValueError`` on anything else."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive int or a string like '2GB' / '500MiB', got {size!r}")
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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a fresh temporary directory next to ``path``; on normal exit fsync its files and rename it
    to ``path`` (an existing ``path`` is replaced only then). On an exception the temporary directory
    is removed and ``path`` is untouched, so an interrupted save never leaves a directory that loads."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        publish_modes(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp, directory=True)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_path(path.parent, directory=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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

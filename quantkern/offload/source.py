"""The dense source checkpoint, read tensor by tensor: nothing is loaded until a block asks for it.

``offload="disk"`` reads each requested tensor from its safetensors file when a block asks for it;
``offload="cpu"`` reads every tensor into CPU memory once, up front (for a compute device smaller than
the host's RAM). Reads use safetensors' ``pread`` backend where it exists: with the default memory
map, safetensors 0.8 keeps the pages a block touched mapped (and counted in the process's resident
set) after the block's tensors are gone, so resident memory grew by one block per block.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..io.files import read_headers, read_json, safetensors_files

OFFLOAD_MODES = ("cpu", "disk")
_SAMPLE_BYTES = 1 << 16  # bytes of tensor data hashed at each end of a file for the fingerprint
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def resolve_model_dir(model_dir_or_id) -> Path:
    """A local directory as is; anything else is taken as a Hugging Face id and fetched (its
    ``*.json`` / ``*.safetensors`` / tokenizer files only) with ``huggingface_hub.snapshot_download``."""
    p = Path(model_dir_or_id)
    if p.is_dir():
        return p
    if p.exists() or str(model_dir_or_id).startswith((".", "/")):
        raise FileNotFoundError(f"model {model_dir_or_id!r} is not a directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model_dir_or_id),
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))


def open_safetensors(path):
    """``safe_open`` with the ``pread`` backend (plain reads into private memory) when the installed
    safetensors has it, else the memory-mapped default."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors without the backend argument
        return safe_open(str(path), framework="pt", device="cpu")


class SourceCheckpoint:
    """A dense Hugging Face checkpoint directory (``config.json`` + safetensors, sharded or not).

    ``names`` / ``shape(name)`` / ``nbytes(name)`` come from the file headers alone; :meth:`load`
    returns CPU tensors cast to ``dtype``. Raises ``CheckpointFileError`` (a ``ValueError``) for a
    missing config, pickle-only weights or a corrupt file, ``ValueError`` for an unknown offload mode.
    """

    def __init__(self, path: Path, offload: str = "disk"):
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        self.path = Path(path)
        self.config_dict = read_json(self.path / "config.json", "config.json")
        self.files = safetensors_files(self.path)
        self.headers = read_headers(self.files)  # {name: (file, dtype string, shape)}
        self.offload = offload
        self._cache: dict[str, torch.Tensor] | None = None
        if offload == "cpu":
            self._cache = self._read(list(self.headers))

    @property
    def names(self) -> list[str]:
        return list(self.headers)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.headers[name][2]

    def torch_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``; ``ValueError`` for one torch has no name for."""
        st = self.headers[name][1]
        if st not in _TORCH_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {st}, which quantkern cannot read")
        return _TORCH_DTYPES[st]

    def is_floating(self, name: str) -> bool:
        return self.torch_dtype(name).is_floating_point

    def _read(self, names) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.headers[n][0], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with open_safetensors(f) as h:
                for n in ns:
                    out[n] = h.get_tensor(n)
        return out

    def load(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{name: CPU tensor}``, floating tensors cast to ``dtype`` (None: as stored). Raises
        ``KeyError`` naming the first tensor the checkpoint lacks."""
        names = list(names)
        missing = [n for n in names if n not in self.headers]
        if missing:
            raise KeyError(f"the source checkpoint {self.path} lacks tensor {missing[0]!r}")
        raw = {n: self._cache[n] for n in names} if self._cache is not None else self._read(names)
        if dtype is None:
            return raw
        return {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in raw.items()}

    @contextmanager
    def reader(self, dtype: torch.dtype | None = None):
        """``get(name)`` for many single-tensor reads (one expert's tensors at a time): each file is
        opened once for the ``with`` block; floating tensors are cast to ``dtype``. ``KeyError`` names a
        tensor the checkpoint lacks."""
        handles: dict[Path, object] = {}

        def get(name: str) -> torch.Tensor:
            if name not in self.headers:
                raise KeyError(f"the source checkpoint {self.path} lacks tensor {name!r}")
            if self._cache is not None:
                t = self._cache[name]
            else:
                f = self.headers[name][0]
                if f not in handles:
                    handles[f] = open_safetensors(f).__enter__()
                t = handles[f].get_tensor(name)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        try:
            yield get
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)

    def fingerprint(self) -> dict:
        """Identity of the source without reading it all: ``config.json`` hash, and per weight file its
        name, size, header hash and a hash of the first and last 64 KiB of tensor data (a re-saved
        model with the same shapes but new values is caught by the data sample; a change confined to
        the middle of a file is not — hashing 100+ GB on every start would cost minutes)."""
        cfg = hashlib.sha256(json.dumps(self.config_dict, sort_keys=True).encode()).hexdigest()
        files = []
        for f in self.files:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = fh.read(n)
                data_start = 8 + n
                head = fh.read(_SAMPLE_BYTES)
                fh.seek(max(data_start, size - _SAMPLE_BYTES))
                tail = fh.read(_SAMPLE_BYTES)
            files.append({"name": f.name, "size": size, "header_sha256": hashlib.sha256(header).hexdigest(),
                          "data_sample_sha256": hashlib.sha256(head + tail).hexdigest()})
        return {"config_sha256": cfg, "files": files}

"""The resumable state of a streaming run, kept in a work directory next to the output.

Layout of ``<out>.partial/`` (``.`` + out name + ``.partial`` in the output's parent):

- ``manifest.json``: the run's identity (source fingerprint, quantization config, calibration hash,
  dtype, checkpoint format, shard plan), the finished blocks and each one's report (GPTQ losses, MoE
  expert tokens and fallbacks), so a resumed run reports every block. Rewritten atomically after
  each block.
- ``model-000NN-of-000MM.safetensors``: finished shards, already under their final names.
- ``acts-000KK.safetensors``: the calibration hidden states after block KK (the inputs of block KK+1),
  so a resumed run starts there without recomputing earlier blocks. At most two exist at a time, and
  all are deleted when the run finishes.

Every file is written to a temporary name, fsynced and renamed, so a kill at any moment leaves either
the old file or the new one; the manifest is updated only after a block's files are in place, so a
block is either finished (listed) or redone from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..io.files import check_destination, publish_modes, replace_directory

MANIFEST = "manifest.json"
STATE_VERSION = 1


class StreamStateError(ValueError):
    """A work directory that cannot be resumed: it was made by a different run (model, config, data)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def atomic_save_safetensors(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], get, path: Path) -> int:
    """Write a safetensors file atomically, one tensor at a time: ``specs`` gives each tensor's dtype and
    shape (the header comes first), ``get(name)`` returns the CPU tensor when it is written, so at most
    one tensor is alive here and its bytes are written from its own memory (``safetensors.save_file``
    builds a bytes copy of every tensor first). Returns the data bytes. Raises ``ValueError`` for a
    tensor that does not match its spec or a dtype safetensors cannot store."""
    header, offset = {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the format pads the header so that tensor data starts 8-aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name in sorted(specs):
            t = get(name).detach().to("cpu").contiguous()
            if t.dtype != specs[name][0] or tuple(t.shape) != tuple(specs[name][1]):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, announced {specs[name]}")
            if t.numel():
                # flat first: a contiguous [N, 1] may keep a stride of N in its last dim
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offset


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """:func:`atomic_save_safetensors` for tensors already in memory."""
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    return atomic_save_safetensors(specs, tensors.__getitem__, path)


def acts_name(block: int) -> str:
    return f"acts-{block:05d}.safetensors"


class RunState:
    """Open (or start) the work directory ``work`` for a run with identity ``identity`` (a JSON-able
    dict). With ``resume`` and a manifest present, the identities must match key by key, else
    :class:`StreamStateError` names what differs; without ``resume`` any old state is deleted."""

    def __init__(self, work: Path, identity: dict, resume: bool = True):
        self.work = Path(work)
        self.identity = json.loads(json.dumps(identity))  # normalise tuples etc. as JSON would
        self.finished: list[int] = []
        self.shards: dict[str, dict] = {}  # file name -> {"keys": [...], "bytes": n}
        self.reports: dict[str, dict] = {}  # block index (str) -> that block's report
        mpath = self.work / MANIFEST
        if self.work.exists() and not resume:
            shutil.rmtree(self.work)
        if mpath.exists():
            try:
                m = json.loads(mpath.read_text())
            except json.JSONDecodeError as e:  # cannot happen with atomic writes unless edited by hand
                raise StreamStateError(f"{mpath} is not valid JSON ({e}); delete {self.work} or pass resume=False")
            old = m.get("identity", {})
            diff = [k for k in sorted(set(old) | set(self.identity)) if old.get(k) != self.identity.get(k)]
            if diff:
                raise StreamStateError(
                    f"{self.work} holds an interrupted run made with a different {', '.join(diff)}; refusing to "
                    "mix it with this one. Rerun with the original settings, or pass resume=False "
                    "(--no-resume) to discard it and start over.")
            self.finished = sorted(int(b) for b in m.get("finished", []))
            self.shards = dict(m.get("shards", {}))
            self.reports = dict(m.get("reports", {}))
        else:
            self.work.mkdir(parents=True, exist_ok=True)
        for f in self.work.glob(".*.tmp-*"):  # half-written files of a killed run
            f.unlink()

    @property
    def resumed(self) -> bool:
        return bool(self.finished or self.shards)

    def save_manifest(self) -> None:
        data = {"version": STATE_VERSION, "identity": self.identity, "finished": self.finished,
                "shards": self.shards, "reports": self.reports}
        atomic_write_bytes(self.work / MANIFEST, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor] | None = None, specs=None, get=None) -> None:
        """Write shard ``name`` from ``tensors``, or lazily from ``specs`` / ``get`` (see
        :func:`atomic_save_safetensors`), and record its keys."""
        if tensors is not None:
            n = save_tensors(tensors, self.work / name)
            specs = tensors
        else:
            n = atomic_save_safetensors(specs, get, self.work / name)
        self.shards[name] = {"keys": sorted(specs), "bytes": n}

    def commit_block(self, block: int, shard: str | None, tensors: dict[str, torch.Tensor] | None,
                     acts: list[torch.Tensor] | None, report: dict | None = None) -> None:
        """Write block ``block``'s shard and the activations after it, then mark it finished (with its
        JSON-able ``report``) and drop the previous activations (only now: until the manifest names
        this block, they are the resume point)."""
        if shard is not None:
            self.write_shard(shard, tensors)
        if acts is not None:
            save_tensors({f"h{j}": h for j, h in enumerate(acts)}, self.work / acts_name(block))
        if report is not None:
            self.reports[str(block)] = json.loads(json.dumps(report))
        self.finished = sorted(set(self.finished) | {block})
        self.save_manifest()
        for f in self.work.glob("acts-*.safetensors"):
            if f.name != acts_name(block):
                f.unlink()

    def load_acts(self, block: int, count: int) -> list[torch.Tensor]:
        """The hidden states saved after ``block`` (``count`` batches, on the CPU)."""
        from .source import open_safetensors

        path = self.work / acts_name(block)
        if not path.exists():
            raise StreamStateError(f"{path} is missing: the saved activations of block {block} are gone; "
                                   "pass resume=False to start over")
        with open_safetensors(path) as h:
            d = {k: h.get_tensor(k) for k in h.keys()}
        if len(d) != count:
            raise StreamStateError(f"{path} holds {len(d)} batches, the calibration set has {count}")
        return [d[f"h{j}"] for j in range(count)]

    def finish(self, out_dir: Path, overwrite: bool = False) -> Path:
        """Delete the scratch files and the manifest, then move the work directory to ``out_dir``
        (an existing checkpoint there is replaced, with ``overwrite``, only once the new one is
        complete: :func:`~quantkern.io.files.replace_directory`). ``out_dir`` is checked again first
        (:func:`~quantkern.io.files.check_destination`): a refusal leaves the work directory resumable."""
        out_dir = check_destination(out_dir, overwrite)
        for f in self.work.glob("acts-*.safetensors"):
            f.unlink()
        (self.work / MANIFEST).unlink()
        publish_modes(self.work)
        replace_directory(self.work, out_dir)
        return out_dir

"""``quantize_streaming``: quantize a model larger than memory, one decoder block at a time.

The model is never assembled. Its skeleton is built on the meta device from ``config.json``; the
embeddings are materialised only to capture the first block's inputs; then each block is read from
the source safetensors, moved to the compute device, quantized with the very step the in-memory
quantizer runs (its ``process_block``, through :func:`~quantkern.calibration.loop.calibrate_block`:
GPTQ, AWQ, SmoothQuant, W8A8 / FP8 / PTQ static scales; RTN and other data-free configs without
data), written as its own shard and sent back to the meta device. Peak memory ≈ one block + the
method's statistics + the calibration activations (+ the embeddings during capture), whatever the
number of blocks. GPTQ-type layers go to a GPTQ checkpoint (or compressed-tensors), W8A8 / FP8 ones
to compressed-tensors, tensor for tensor what ``save_quantized`` writes from the in-memory model.

MoE blocks (fused experts of transformers 5) are read from a source that stores the experts fused or
per expert under the original HF names (:mod:`.blocks`), quantized as in memory (GPTQ: routing-aware,
one Hessian per expert; RTN: ``rtn_experts``) and written per expert under the HF names, as
``save_quantized`` writes them (the family's key renames, e.g. Mixtral's ``block_sparse_moe``, apply to
every key of the checkpoint).

Calibration activations live on the CPU (moved to the device one batch at a time by ``run_block``)
unless ``max_memory`` says the device holds them next to a block. Progress is kept in a work
directory (:mod:`.state`), so a killed run started again with the same arguments continues after the
last finished block and writes the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api.awq import AWQQuantizer
from ..api.quantizers import GPTQBlockDriver
from ..api.registry import quantizer_for, registered_configs
from ..api.targets import check_overrides_apply, set_module
from ..arch import architecture_for
from ..calibration import BlockInput, InputCatcher, group_batches
from ..calibration.loop import calibrate_block
from ..io.files import SAFE_WEIGHTS_INDEX_NAME, TOKENIZER_FILES, check_destination, parse_size
from ..io.load import build_skeleton
from ..io.hf import dense_state_dict, hf_config_dict, write_side_files
from ..io.compressed import compressed_config, compressed_tensors_of, dense_linears
from ..io.experts import quant_experts, rename
from ..io.save import gptq_quantization_config, gptq_tensors
from ..nn import QuantLinear
from ..nn.quant_experts import QuantExperts
from .blocks import load_block, plan_block
from .source import SourceCheckpoint, resolve_model_dir
from .state import RunState, StreamStateError


def _release_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and RSS would grow with blocks)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _bound_heap() -> None:
    """Make glibc serve buffers of 1 MiB and more with their own mmap (returned to the OS when freed).

    By default glibc raises that threshold as buffers are freed and then carves big buffers from the
    heap, whose fragmentation grew the peak RSS block after block here (GPTQ, 16 blocks: +45 MiB over
    the run; with the fixed threshold the peak is flat after the second block). Process-wide setting;
    a no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def calibration_hash(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _budget(max_memory, device: torch.device) -> int | None:
    """Bytes allowed on ``device`` from ``max_memory`` (bytes, "8GiB", or ``{device: size}``)."""
    if max_memory is None:
        return None
    size = max_memory
    if isinstance(max_memory, dict):
        keys = {str(device), device.type, device.index}
        size = next((v for k, v in max_memory.items() if k in keys or str(k) in keys), None)
        if size is None:
            return None
    try:
        return parse_size(size)
    except ValueError:
        raise ValueError(f"max_memory must be a positive number of bytes, a size like '20GiB' or a dict "
                         f"{{device: size}}, got {max_memory!r}") from None


def _output_weight_name(model: nn.Module) -> str | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return None
    return next((f"{n}.weight" for n, m in model.named_modules() if m is out), None)


def _materialise(root: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, where: str) -> None:
    """Assign ``tensors`` (names relative to ``root``) in place of ``root``'s meta tensors, on ``device``;
    raises ``ValueError`` naming any parameter left on the meta device."""
    root.load_state_dict({k: t.to(device) for k, t in tensors.items()}, strict=False, assign=True)
    left = [n for n, p in root.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"the source checkpoint lacks {where} tensor(s) {left[:4]}")


class _BlockView(nn.Module):
    """Block ``block`` of the model under its full path (``model.layers.3``) with the model's config:
    what :func:`~quantkern.io.save.gptq_tensors` needs to name (and rename) its tensors as it does for
    the whole model. Holds no other module."""

    def __init__(self, config, path: str, block: nn.Module):
        super().__init__()
        self.config = config
        parent = self
        *dirs, leaf = path.split(".")
        for d in dirs:
            child = nn.Module()
            parent.add_module(d, child)
            parent = child
        parent.add_module(leaf, block)

    def get_output_embeddings(self):
        return None

    def get_input_embeddings(self):
        return None


def _block_tensors(model: nn.Module, path: str, block: nn.Module, quantized: bool, fmt: str, renames
                   ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Block ``block``'s checkpoint tensors under their full checkpoint names, as ``save_quantized``
    writes them for the whole model: quantized experts per expert under the HF names, and every key
    renamed with ``renames`` (the family's, applied by the in-memory save to every key as soon as the
    model holds quantized experts) — also in a block without quantized experts of its own.

    Also returns, for compressed-tensors, how the block's quantized layers group (JSON-able
    ``{"groups": [[key, names]], "experts": [[key, regexes]]}``, see
    :func:`~quantkern.io.compressed.compressed_tensors_of`), merged over the blocks into the config."""
    view = _BlockView(model.config, path, block)
    own_renames = bool(quant_experts(block))  # then the format's export renamed the keys already
    groups = None
    if not quantized:
        sd = dense_state_dict(view)
    elif fmt == "compressed-tensors":
        sd, by_key, expert_targets = compressed_tensors_of(view)
        ren = (lambda n: n) if own_renames or not renames else (lambda n: rename(n, renames))
        groups = {"groups": [[list(k), [ren(n) for n in names]] for k, names in by_key.items()],
                  "experts": [[list(k), pats] for k, pats in expert_targets.items()]}
    else:
        sd = gptq_tensors(view, fmt)[0]
    if renames and not own_renames:
        sd = {rename(k, renames): t for k, t in sd.items()}
    return sd, groups


STREAMED_LAYERS = ("QuantLinear", "W8A8Linear", "FP8Linear")  # what the streamed directory formats hold


def _streamed_names() -> str:
    """The config classes :func:`quantize_streaming` takes (block processors writing streamed layers)."""
    names = []
    for cfg in registered_configs():
        cls = quantizer_for(cfg())
        if hasattr(cls, "process_block") and hasattr(cls, "plan_blocks") and \
                _quantizer(cls, nn.Module(), cfg()).produces in STREAMED_LAYERS:  # (the config decides it)
            names.append(cfg.__name__)
    return ", ".join(sorted(names))


def _quantizer(cls, model: nn.Module, config):
    """``cls(model, config)`` quiet, and without Triton (the stream's layers are written, not run)."""
    import inspect

    kwargs = {"use_triton": False} if "use_triton" in inspect.signature(cls.__init__).parameters else {}
    return cls(model, config, verbose=False, **kwargs)


def _block_report(q, prefix: str) -> dict:
    """The report entries of the block at ``prefix``: what the method's ``process_block`` wrote to
    ``q.report`` (GPTQ losses, AWQ errors, smoothed norms, MoE expert tokens / fallbacks), by name."""
    out = {}
    for key, entries in q.report.items():
        if isinstance(entries, dict):
            out[key] = {k: v for k, v in entries.items() if k.startswith(prefix)}
        elif isinstance(entries, list):
            out[key] = [k for k in entries if str(k).startswith(prefix)]
    return out


def _plan_rest_shards(source: SourceCheckpoint, names: list[str], itemsize: int, limit: int) -> list[list[str]]:
    shards, size = [[]], 0
    for n in names:
        nb = itemsize * math.prod(source.shape(n))
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    return shards


def quantize_streaming(model_dir_or_id, config, calibration_data=None, out_dir=None, *,
                       device=None, offload: str = "disk", resume: bool = True, max_memory=None, dtype=None,
                       tokenizer=None, checkpoint_format: str | None = None, max_shard_size="1GB",
                       verbose: bool = True, callback=None, overwrite: bool = False,
                       report: dict | None = None) -> Path:
    """Quantize the dense safetensors checkpoint ``model_dir_or_id`` (a directory or a Hugging Face id)
    block by block into a checkpoint at ``out_dir``; returns ``out_dir``.

    - ``config``: the config of any method whose quantizer is a block processor (see
      :mod:`quantkern.calibration.loop`) and writes layers a directory format holds: GPTQ, RTN, AWQ
      (QuantLinear), FP8 (RTN or GPTQ weights), W8A8, SmoothQuant and PTQ (W8A8Linear / FP8Linear).
      Calibrated methods need ``calibration_data``, as their ``quantize`` does; each block is
      calibrated exactly as in memory (the same ``process_block``). Linears outside the decoder blocks
      (``lm_head``) stay dense.
    - ``device``: compute device (default ``config.device`` or "cpu"); ``dtype``: compute and storage
      dtype of dense tensors (default: the checkpoint's). ``offload``: "disk" reads each block's tensors
      from the safetensors files when it is processed; "cpu" reads the whole source into CPU memory
      first (see :mod:`.source`).
    - ``out_dir`` is written only when complete. It must be new, an empty directory or, with
      ``overwrite=True``, a previous checkpoint (replaced then); anything else (a file, a directory of
      other files, an unwritable place) raises ``CheckpointFileError`` before any data is read. See
      :func:`~quantkern.io.files.check_destination`.
    - ``resume``: continue an interrupted run from ``.<out name>.partial`` next to ``out_dir``; a run
      made with another model, config, calibration set, dtype or format is refused with
      :class:`~quantkern.offload.state.StreamStateError`. ``resume=False`` discards it.
    - ``max_memory``: budget of the compute device (bytes, "20GiB", or ``{"cuda:0": "20GiB"}``): a
      block that cannot fit raises ``ValueError`` before any work; activations go to the device only if
      they fit next to a block, else they stay on the CPU.
    - ``checkpoint_format``: None (QuantLinear methods: "gptq" (v1) for symmetric schemes, "gptq_v2"
      for asymmetric ones, since a v1 zero of -1 cannot be ruled out before every block is done; W8A8 /
      FP8: "compressed-tensors"), "gptq", "gptq_v2" or "compressed-tensors" (what the format cannot
      hold is refused before any data is read, as ``save_quantized`` would refuse it).
    - ``callback(info)``: called after every finished block with ``{"block", "num_blocks",
      "seconds", "eta_seconds"}``.
    - ``report``: a dict filled with what the in-memory quantizer reports per layer: ``gptq_losses``
      (GPTQ), ``awq_errors`` (AWQ), ``smoothed`` (SmoothQuant) and, for MoE models,
      ``expert_tokens`` / ``expert_fallbacks``; blocks of an interrupted run are reported from its
      work directory.

    MoE models: fused experts (transformers 5) are read from a source that stores them fused or per
    expert under the original HF names (see :mod:`.blocks`; a missing expert tensor is named before any
    block is processed), quantized as in memory, and written per expert under the HF names like
    ``save_quantized``.

    The output has one shard per block plus shards for the other tensors, an index, ``config.json``
    with ``quantization_config`` (and ``quantize_config.json`` for GPTQ); it loads with
    ``load_quantized``. Side effect: sets glibc's mmap threshold for the process (see :func:`_bound_heap`).
    """
    cls = quantizer_for(config)
    if not hasattr(cls, "process_block") or not hasattr(cls, "plan_blocks"):
        raise TypeError(f"{type(config).__name__} cannot be streamed; streamed configs: {_streamed_names()}")
    produces = _quantizer(cls, nn.Module(), config).produces  # (the config decides it, not the model)
    if produces not in STREAMED_LAYERS:
        raise TypeError(f"{type(config).__name__} writes {produces} layers, which no streamed format holds; "
                        f"streamed configs: {_streamed_names()}")
    if out_dir is None:
        raise ValueError("out_dir is required")
    if checkpoint_format not in (None, "gptq", "gptq_v2", "compressed-tensors"):
        raise ValueError(f"checkpoint_format must be None, 'gptq', 'gptq_v2' or 'compressed-tensors', "
                         f"got {checkpoint_format!r}")
    batches = None
    device = torch.device(device or config.device or "cpu")
    check_destination(out_dir, overwrite)  # before the source is read; checked again before the rename
    out_dir = Path(out_dir).absolute()
    _bound_heap()
    source = SourceCheckpoint(resolve_model_dir(model_dir_or_id), offload)
    model = build_skeleton(source.config_dict, dtype).eval()
    model.config._name_or_path = str(source.path)
    cdtype = next(model.parameters()).dtype
    q = _quantizer(cls, model, config)
    calibrated = bool(q.needs_data)
    if calibrated:
        items = q.calibration_items(calibration_data, tokenizer)
        q.check_calibration_ids(items)  # ids outside the embedding, named, before any block is read
        batches = group_batches(items, q.calibration_batch_size())
    # RTN plans like GPTQ here (within the blocks): the output head is written dense either way
    q.plan_blocks()  # validates every Linear's shape on the skeleton, before any data is read
    check_overrides_apply(config, q.plan)
    if checkpoint_format is None:
        checkpoint_format = ("gptq" if config.sym else "gptq_v2") if q.produces == "QuantLinear" \
            else "compressed-tensors"
    fmt = checkpoint_format
    if fmt != "compressed-tensors" and q.produces != "QuantLinear":
        raise ValueError(f"{type(config).__name__} writes {q.produces} layers, which only checkpoint_format="
                         f"'compressed-tensors' holds, got {fmt!r}")
    q.check_export("gptq" if fmt.startswith("gptq") else fmt)  # what the format cannot hold, before any data
    kind = _stats_kind(q)
    blocks, bname, n_blocks = q.blocks, q.blocks_name, len(q.blocks)
    # the in-memory save renames every key (Mixtral: .mlp. -> .block_sparse_moe.) once experts are quantized
    renames = next(iter(q.plan.experts.values())).layout.checkpoint_renames if q.plan.experts else ()

    # which tensors go where: the dense rest first, then one shard per block (final names from the start)
    out_w = _output_weight_name(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    expected = [k for k in model.state_dict() if not k.startswith(bname + ".")]
    rest_names = [k for k in expected if not (tied and k == out_w)]
    missing = [k for k in rest_names if k not in source.headers]
    if missing:
        raise ValueError(f"the source checkpoint {source.path} lacks {missing[:4]}")
    arch = architecture_for(model)  # every block's tensors found in the headers before any work
    sources = [plan_block(blocks[i], f"{bname}.{i}.", arch, source, f"block {i}") for i in range(n_blocks)]
    itemsize = torch.empty(0, dtype=cdtype).element_size()
    rest = _plan_rest_shards(source, rest_names, itemsize, parse_size(max_shard_size))
    total = len(rest) + n_blocks
    shard = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    _check_budget(q, batches, itemsize, device, max_memory, kind)
    acts_device = _acts_device(q, batches, itemsize, device, max_memory, kind) if calibrated else None

    identity = {"model": source.fingerprint(), "config": config.to_dict(), "dtype": str(cdtype),
                "calibration": calibration_hash(batches) if calibrated else None, "checkpoint_format": fmt,
                "shards": shard}
    state = RunState(out_dir.parent / f".{out_dir.name}.partial", identity, resume=resume)
    resumed = state.resumed
    if state.finished != list(range(len(state.finished))):
        raise StreamStateError(f"{state.work}: finished blocks {state.finished} are not a prefix; start over")
    for j, names in enumerate(rest):
        if shard[j] not in state.shards:  # one tensor in memory at a time (embeddings can be GBs)
            src_of = {rename(n, renames): n for n in names}
            specs = {k: (cdtype if source.is_floating(n) else source.torch_dtype(n), source.shape(n))
                     for k, n in src_of.items()}
            state.write_shard(shard[j], specs=specs, get=lambda k: source.load([src_of[k]], cdtype)[src_of[k]])
            state.save_manifest()
    _release_memory()

    start = len(state.finished)
    inputs = None
    if calibrated and start < n_blocks:
        inputs = _capture(model, bname, source, batches, rest_names, out_w, device, acts_device, cdtype)
        if start:
            hidden = state.load_acts(start - 1, len(inputs))
            inputs = [BlockInput(h.to(acts_device), inp.kwargs, inp.token_mask) for inp, h in zip(inputs, hidden)]
    if resumed and verbose:
        tqdm.write(f"[quantkern] resuming {out_dir.name}: {start}/{n_blocks} blocks already done")

    t_run = time.perf_counter()
    bar = tqdm(total=n_blocks, initial=start, desc="quantizing blocks", disable=not verbose)
    for i in range(start, n_blocks):
        t0 = time.perf_counter()
        block = blocks[i]
        prefix = f"{bname}.{i}."
        _materialise(block, load_block(sources[i], source, cdtype), device, f"block {i}")
        with torch.no_grad():
            if calibrated:
                inputs, done = calibrate_block(q, i, block, inputs, device)
            else:
                targets, experts = q.plan.in_block(prefix)
                done, _ = q.process_block(block, prefix, targets, experts, None, device)
        for name, ql in done.items():
            set_module(model, name, ql)
        sd, groups = _block_tensors(model, prefix[:-1], block, bool(done), fmt, renames)
        last = i == n_blocks - 1
        state.commit_block(i, shard[len(rest) + i], sd,
                           [inp.hidden for inp in inputs] if calibrated and not last else None,
                           {**_block_report(q, prefix), **({"_groups": groups} if groups else {})})
        # release the block: its modules (QuantLinears / QuantExperts now, kept as meta placeholders)
        # and the dense modules they replaced, which the plan still references
        block.to("meta")
        for name in done:
            (q.plan.quantize[name] if name in q.plan.quantize else q.plan.experts[name].module).to("meta")
        del sd, done
        _release_memory()
        dt = time.perf_counter() - t0
        eta = (time.perf_counter() - t_run) / (i + 1 - start) * (n_blocks - 1 - i)
        bar.update(1)
        bar.set_postfix_str(f"block {i} {dt:.1f}s, ~{eta:.0f}s left")
        if callback is not None:
            callback({"block": i, "num_blocks": n_blocks, "seconds": dt, "eta_seconds": eta})
    bar.close()
    inputs = None
    _merge_reports(q, state, start, report)
    if verbose and q.report.get("expert_tokens"):
        tqdm.write(q.experts_summary())
    _finish_files(model, q, config, fmt, source, state, tokenizer, kind, renames)
    return state.finish(out_dir, overwrite)


def _merge_reports(q, state, start: int, report: dict | None) -> None:
    """Every block's report into ``q.report`` and ``report``, keyed as the in-memory quantizer keys
    them, in block order: blocks before ``start`` (an interrupted run's) from the manifest (JSON
    values: lists where the quantizer reports tuples), then this run's as ``process_block`` wrote them.
    Dict entries are merged, list entries concatenated. Keys starting with "_" are the stream's own."""
    merged: dict = {}

    def add(key, entries):
        if isinstance(entries, dict):
            merged.setdefault(key, {}).update(entries)
        else:
            merged.setdefault(key, []).extend(entries)

    for i in range(start):
        for key, entries in state.reports.get(str(i), {}).items():
            if not key.startswith("_"):
                add(key, entries)
    for key, entries in list(q.report.items()):
        if isinstance(entries, (dict, list)):
            add(key, entries)
    for key, entries in merged.items():
        q.report[key] = entries
        if report is not None:
            report[key] = entries


def _merged_groups(state, n_blocks: int) -> tuple[dict[tuple, list[str]], dict[tuple, list[str]]]:
    """The compressed-tensors groups of every block (see :func:`_block_tensors`), merged in block order."""
    groups: dict[tuple, list[str]] = {}
    experts: dict[tuple, list[str]] = {}
    for i in range(n_blocks):
        g = state.reports.get(str(i), {}).get("_groups") or {}
        for key, names in g.get("groups", []):
            groups.setdefault(tuple(key), []).extend(names)
        for key, pats in g.get("experts", []):
            experts.setdefault(tuple(key), []).extend(pats)
    return groups, experts


def _capture(model, bname, source, batches, rest_names, out_w, device, acts_device, cdtype) -> list[BlockInput]:
    """Materialise what runs before block 0 (not the output head), catch block 0's inputs, release."""
    needed = [k for k in rest_names if k != out_w]
    _materialise_partial(model, source.load(needed, cdtype), device)
    catcher = InputCatcher(model, model.get_submodule(bname)[0], offload_device=acts_device).install()
    try:
        for b in batches:
            model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device))
    finally:
        catcher.remove()
    if not catcher.inputs:
        raise RuntimeError("no calibration forward reached the first decoder block")
    model.to("meta")  # the embeddings are no longer needed; the rest of the skeleton stays empty
    return catcher.inputs


def _materialise_partial(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    model.load_state_dict({k: t.to(device) for k, t in tensors.items()}, strict=False, assign=True)
    if device.type != "cpu":  # real buffers (rotary inv_freq) must follow the embeddings
        for mod in model.modules():
            for n, b in list(mod.named_buffers(recurse=False)):
                if b.device.type not in ("meta", device.type):
                    setattr(mod, n, b.to(device))


def _block_bytes(block: nn.Module, itemsize: int) -> int:
    return sum(p.numel() for p in block.parameters()) * itemsize


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _hidden_size(q) -> int:
    lin = next(iter(q.plan.quantize.values()), None)
    if lin is not None:
        return lin.in_features
    site = next(iter(q.plan.experts.values()), None)
    return site.hidden_size if site is not None else int(getattr(q.model.config, "hidden_size", 0) or 0)


_STATS = {"gptq": "GPTQ statistics", "awq": "AWQ captured inputs", "observe": "int8 / fp8 weight copies",
          "rtn": "RTN codes"}


def _stats_kind(q) -> str:
    """What ``q.process_block`` holds beside a block's weights: "gptq" (Hessians, also FP8's GPTQ
    weights), "awq" (the block's captured Linear inputs), "observe" (activation ranges only: SmoothQuant,
    W8A8 / FP8 static, PTQ) or "rtn" (data-free: codes only)."""
    if isinstance(q, GPTQBlockDriver) and getattr(q, "gptq", True):
        return "gptq"
    if isinstance(q, AWQQuantizer):
        return "awq"
    return "observe" if q.needs_data else "rtn"


def _experts_bytes(site, itemsize: int, kind: str, bits: int) -> dict[str, int]:
    """What quantizing one fused experts module holds beyond the block's weights, at its peak.

    GPTQ (see ``GPTQBlockDriver._quantize_experts``): gate/up first, with one ``H x H`` fp32 Hessian
    per expert at once plus the shared all-token one, one expert's factorisation workspace, and, as
    experts are done, their int32 codes and dequantized weights (stacked at the end); then down with
    ``E x I x I`` fp32 Hessians while gate/up's codes are held. RTN and AWQ: every expert's int32 codes
    (AWQ's routed inputs are counted with the batch)."""
    e, h, i = site.num_experts, site.hidden_size, site.intermediate_size
    gu, dn = e * 2 * i * h, e * h * i
    codes = 4 * (gu + dn) + (gu + dn) * bits // 8  # int32 codes of every expert + the packed QuantExperts
    if kind != "gptq":
        return {"codes": codes, "peak": codes}
    def ws(k, n):  # one expert's GPTQ: H and its inverse factor copies, W in fp32
        return 4 * (2 * k * k + 2 * n * k)
    gate_up = max(4 * (e + 1) * h * h, (4 + 2 * itemsize) * gu) + ws(h, 2 * i)
    down = 4 * gu + max(4 * e * i * i, (4 + 2 * itemsize) * dn) + ws(i, h)
    return {"hessians_gate_up": 4 * (e + 1) * h * h, "hessians_down": 4 * e * i * i,
            "peak": max(gate_up, down, codes)}


def _block_need(q, i: int, batches, itemsize: int, kind: str) -> tuple[int, str]:
    """Bytes block ``i`` needs on the compute device and a breakdown: its weights (the experts'
    included), what the method holds (``kind``, see :func:`_stats_kind`: GPTQ ~3 K^2 fp32 for the
    widest Linear, or the experts' per-expert Hessians, whichever is larger, as the experts are
    quantized after the Linears; AWQ the fp32 inputs of every Linear over the calibration tokens
    unless ``offload``; otherwise one Linear's int32 codes or int8 copy) and one batch in flight."""
    prefix = f"{q.blocks_name}.{i}."
    weights = _block_bytes(q.blocks[i], itemsize)
    lins = [m for n, m in q.plan.quantize.items() if n.startswith(prefix)]
    sites = {n: s for n, s in q.plan.experts.items() if n.startswith(prefix)}
    widest = max((m.in_features for m in lins), default=0)
    tokens = sum(b.input_ids.numel() for b in batches) if batches else 0
    if kind == "gptq":
        stats = 3 * 4 * widest * widest
    elif kind == "awq" and not q.config.offload:
        stats = 4 * tokens * sum(m.in_features for m in lins)
    else:
        stats = 4 * max((m.in_features * m.out_features for m in lins), default=0)
    detail = []
    for n, site in sites.items():
        b = _experts_bytes(site, itemsize, kind, q.config.for_layer(n).bits)
        stats = max(stats, b["peak"])
        if kind == "gptq":
            detail.append(f"{site.num_experts} experts: {b['hessians_gate_up'] / 2**20:.1f} MiB of {site.hidden_size}^2 "
                          f"gate/up Hessians, then {b['hessians_down'] / 2**20:.1f} MiB of "
                          f"{site.intermediate_size}^2 down Hessians")
    batch = 0
    if kind != "rtn" and batches:
        t = max(b.input_ids.numel() for b in batches)
        batch = 8 * t * _hidden_size(q) * itemsize  # one batch in flight, a few intermediates
        for site in sites.values():  # the routed (token, expert) pairs' gate/up and gated outputs
            k = int(getattr(q.model.config, "num_experts_per_tok", None) or site.num_experts)
            batch += 3 * t * k * site.intermediate_size * itemsize + 2 * 4 * t * site.hidden_size
            if kind == "awq" and not q.config.offload:  # every routed pair's fp32 input, all batches
                batch += 4 * tokens * k * site.hidden_size
    what = (f"block {i}: weights {_size(weights)} + {_STATS[kind]} {_size(stats)}"
            + (f" ({'; '.join(detail)})" if detail else "") + (f" + one batch {_size(batch)}" if batch else ""))
    return weights + stats + batch, what


def _largest_need(q, batches, itemsize, kind) -> tuple[int, str, int]:
    """``(need, breakdown, weights)`` of the block that needs the most (MoE blocks after dense ones,
    e.g. DeepSeek's first dense layers, need more than block 0)."""
    needs = [(*_block_need(q, i, batches, itemsize, kind), _block_bytes(q.blocks[i], itemsize))
             for i in range(len(q.blocks))]
    return max(needs, key=lambda x: x[0])


def _check_budget(q, batches, itemsize, device, max_memory, kind) -> None:
    budget = _budget(max_memory, device)
    if budget is None:
        return
    need, what, _ = _largest_need(q, batches, itemsize, kind)
    if need > budget:
        raise ValueError(f"max_memory for {device} is {_size(budget)} but one decoder block needs about "
                         f"{_size(need)} ({what}); raise max_memory")


def _acts_device(q, batches, itemsize, device, max_memory, kind) -> torch.device:
    """Keep all calibration activations on the device only when they fit next to the largest block."""
    cpu = torch.device("cpu")
    budget = _budget(max_memory, device)
    if device.type == "cpu" or budget is None:
        return cpu
    acts = 2 * sum(b.input_ids.numel() for b in batches) * _hidden_size(q) * itemsize  # inputs + outputs of a block
    need, _, weights = _largest_need(q, batches, itemsize, kind)
    return device if acts + max(2 * weights, need) <= budget else cpu


def _finish_files(model, q, config, fmt, source, state, tokenizer, kind: str, renames) -> None:
    """Index, ``config.json`` (and ``quantize_config.json`` for GPTQ), generation config and tokenizer
    files, from meta stand-ins of the written layers and, for compressed-tensors, the blocks' groups."""
    import json

    if fmt != "compressed-tensors":
        for name, lin in q.plan.quantize.items():  # meta QuantLinears stand in for the written layers
            scheme = config.for_layer(name).scheme()
            ql = QuantLinear(lin.in_features, lin.out_features, scheme.bits, scheme.group_size, scheme.sym,
                             scheme.act_order, bias=lin.bias is not None, dtype=config.torch_scale_dtype,
                             backend=config.backend, device="meta")
            set_module(model, name, ql)
    for name, site in q.plan.experts.items():  # and meta QuantExperts for the written experts modules
        lc = config.for_layer(name)
        scheme = lc.scheme()
        act_order = scheme.act_order if kind == "gptq" else False  # RTN / AWQ experts carry no act-order
        qe = QuantExperts(site.num_experts, site.hidden_size, site.intermediate_size, scheme.bits, scheme.group_size,
                          scheme.sym, act_order, layout=site.layout, bias=site.layout.gate_up_bias is not None,
                          dtype=lc.torch_scale_dtype, device="meta", name=name)
        set_module(model, name, qe)
    model.quantkern_config = config.to_dict()
    if fmt == "compressed-tensors":
        groups, expert_targets = _merged_groups(state, len(q.blocks))
        qcfg = compressed_config(groups, expert_targets, dense_linears(model, quantized=set(q.plan.quantize)))
        extra = {}
    else:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        qcfg = gptq_quantization_config(model, layers, fmt)
        extra = {"quantize_config.json": qcfg}
    config_dict = hf_config_dict(model, qcfg)
    weight_map = {k: f for f, info in sorted(state.shards.items()) for k in info["keys"]}
    index = {"metadata": {"total_size": sum(info["bytes"] for info in state.shards.values())},
             "weight_map": weight_map}
    (state.work / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    gen = source.path / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(source.path))
    write_side_files(model, state.work, tokenizer, config_dict, extra)
    if tokenizer is None:
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copyfile(source.path / name, state.work / name)

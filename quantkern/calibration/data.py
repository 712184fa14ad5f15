"""Calibration data: normalise what users pass into batches of token ids, and build sets from text."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """``input_ids`` and ``attention_mask``: LongTensor ``[B, L]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _as_ids(x, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise TypeError(f"{where}: cannot make token ids from {type(x).__name__}: {e}") from None
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"{where}: token ids must be integers, got dtype {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{where}: token ids must be 1-D or 2-D, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{where}: empty sequence")
    return x.long()


def normalize_calibration_data(data, tokenizer=None, max_length: int | None = None) -> list[Batch]:
    """Turn ``data`` into a list of :class:`Batch` (one per item, no padding added).

    Accepted: a list (or iterable) of 1-D LongTensors; a 2-D LongTensor (one row per sample); a list of
    ``{"input_ids", "attention_mask"}`` dicts (tensors or lists, 1-D or 2-D); a list of strings with a
    ``tokenizer``. Raises ``ValueError`` for empty / exhausted data or strings without a tokenizer,
    ``TypeError`` for anything else, naming the offending item.
    """
    if data is None:
        raise ValueError("calibration data is required for this algorithm (got None)")
    if isinstance(data, (str, bytes)):
        data = [data]
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = [data]
        elif data.dim() == 2:
            data = list(data)
        else:
            raise ValueError(f"a tensor of calibration token ids must be 1-D or 2-D, got {tuple(data.shape)}")
    elif isinstance(data, dict):
        data = [data]
    elif isinstance(data, Iterable):
        data = list(data)
    else:
        raise TypeError(f"calibration data must be a list of token-id tensors, dicts or strings, got {type(data).__name__}")
    if not data:
        raise ValueError("calibration data is empty (was an iterator already consumed?)")

    batches: list[Batch] = []
    for i, item in enumerate(data):
        where = f"calibration item {i}"
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("calibration data holds strings but no tokenizer was given: pass tokenizer=...")
            if not item.strip():
                raise ValueError(f"{where}: empty string")
            enc = tokenizer(item, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
            ids, mask = enc["input_ids"], enc.get("attention_mask")
        elif isinstance(item, dict) or hasattr(item, "keys"):
            if "input_ids" not in item:
                raise ValueError(f"{where}: a dict must have 'input_ids' (keys: {sorted(item.keys())})")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids, mask = item, None
        ids = _as_ids(ids, where)
        if mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = _as_ids(mask, where + " attention_mask")
            if mask.shape != ids.shape:
                raise ValueError(f"{where}: attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
        if max_length is not None and ids.shape[1] > max_length:
            ids, mask = ids[:, :max_length], mask[:, :max_length]
        if int(mask.sum()) == 0:
            raise ValueError(f"{where}: attention_mask masks every token")
        batches.append(Batch(ids, mask))
    return batches


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, where: str) -> None:
    """Raise ``TypeError`` for non-integer ids and ``ValueError`` naming the row, position and id when
    an id is negative or ``>= vocab_size`` (the input embedding's rows); one host sync when all are valid.
    ``where`` names the batch (``"calibration item 3"``); rows are counted within it."""
    if not isinstance(ids, torch.Tensor):
        return
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise TypeError(f"{where}: input_ids must be integer token ids, got dtype {ids.dtype}")
    if vocab_size is None or ids.numel() == 0 or ids.device.type == "meta":
        return
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids.long())).tolist())
    if lo >= 0 and hi < vocab_size:
        return
    ids2 = ids.reshape(-1, ids.shape[-1]) if ids.dim() else ids.reshape(1, 1)
    bad = ((ids2 < 0) | (ids2 >= vocab_size)).nonzero()
    row, pos = (int(v) for v in bad[0].tolist())
    raise ValueError(f"{where}, row {row}: token id {int(ids2[row, pos])} at position {pos} is outside the "
                     f"model's input embedding (valid ids 0..{vocab_size - 1}); {len(bad)} such id(s) in all")


def group_batches(batches: list[Batch], batch_size: int) -> list[Batch]:
    """Concatenate consecutive single-row batches of equal length into batches of ``batch_size`` rows
    (padding is never introduced, so results do not depend on the batch size)."""
    out: list[Batch] = []
    pending: list[Batch] = []

    def flush():
        if pending:
            out.append(Batch(torch.cat([b.input_ids for b in pending]), torch.cat([b.attention_mask for b in pending])))
            pending.clear()

    for b in batches:
        if pending and (b.input_ids.shape[1] != pending[0].input_ids.shape[1]
                        or sum(p.input_ids.shape[0] for p in pending) + b.input_ids.shape[0] > batch_size):
            flush()
        pending.append(b)
    flush()
    return out


def sample_windows(token_ids: torch.Tensor, nsamples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """``nsamples`` random windows of ``seq_len`` tokens from a 1-D token stream (GPTQ's recipe)."""
    token_ids = token_ids.flatten()
    if token_ids.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens of calibration text, got {token_ids.numel()}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, token_ids.numel() - seq_len) for _ in range(nsamples)]
    return [token_ids[s:s + seq_len].clone() for s in starts]

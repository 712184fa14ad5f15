"""Perplexity on held-apart text and greedy generation."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the text's token ids (no special tokens), truncated to ``max_tokens``."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


def windows_of(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``[n, seq_len]``: the non-overlapping windows of ``token_ids`` (a trailing partial one dropped)."""
    ids = token_ids.flatten()
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
               max_windows: int | None = None, progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens of ``token_ids``.

    Each window is scored independently (the first token of a window is context only), so results do
    not depend on ``batch_size``. A trailing partial window is dropped.
    """
    windows = windows_of(token_ids, seq_len, max_windows)
    n = windows.shape[0]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, leave=False):
        x = windows[i:i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = True, decode: str = "transformers",
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stats=None, int8_activations: bool = False) -> str:
    """Continuation of ``prompt`` (through the chat template when the tokenizer has one); greedy unless
    ``do_sample``.

    ``decode``: ``"transformers"`` (``model.generate``), ``"fast"`` (:mod:`quantkern.generation`:
    static KV cache, the step under ``torch.compile``; compiling takes a while, then each token is
    cheap) or ``"eager"`` (the same static-cache code uncompiled). A model the fast path cannot run
    falls back to transformers with one logged message saying why. ``stats``: a
    :class:`quantkern.generation.DecodeStats` filled with timings (fast / eager). ``int8_activations``
    (fast / eager): the C++ CPU kernels quantize activations to int8 per block of 32
    (:class:`quantkern.generation.FastDecoder`)."""
    if decode not in ("transformers", "fast", "eager"):
        raise ValueError(f"decode must be 'transformers', 'fast' or 'eager', got {decode!r}")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else \
        dict(do_sample=False)
    if seed is not None:
        torch.manual_seed(seed)
    if decode == "transformers":
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             **sampling)
    else:
        from ..generation import generate_ids

        out = generate_ids(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           compile=decode == "fast", eos_token_id=eos, pad_token_id=pad, stats=stats,
                           int8_activations=int8_activations, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

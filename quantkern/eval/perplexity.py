"""Perplexity on held-apart text and greedy generation."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the text's token ids (no special tokens), truncated to ``max_tokens``."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
               max_windows: int | None = None, progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens of ``token_ids``.

    Each window is scored independently (the first token of a window is context only), so results do
    not depend on ``batch_size``. A trailing partial window is dropped.
    """
    ids = token_ids.flatten()
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}")
    windows = ids[: n * seq_len].view(n, seq_len)
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
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> str:
    """Greedy continuation of ``prompt`` (through the chat template when the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    device = next(model.parameters()).device
    out = model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

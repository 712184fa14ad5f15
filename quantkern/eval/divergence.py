"""How far a quantized model's predictions are from the dense model's, on the same tokens: the KL
divergence of the next-token distributions, top-1 agreement and Δ perplexity (the quantities
llama.cpp's ``perplexity --kl-divergence`` reports).

Both models score the same non-overlapping windows batch by batch; only one batch of logits of each
is alive at a time, so memory does not grow with the text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .perplexity import windows_of


@dataclass(frozen=True)
class Divergence:
    """Per-token statistics over ``tokens`` predicted positions: ``kl_*`` = KL(reference ‖ model) in
    nats; ``top1``: share of positions where both models' most likely next token agree."""

    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float
    ppl: float
    ppl_reference: float
    tokens: int

    @property
    def delta_ppl(self) -> float:
        return self.ppl - self.ppl_reference

    def to_dict(self) -> dict:
        d = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}
        d["delta_ppl"] = round(self.delta_ppl, 6)
        return d


@torch.no_grad()
def kl_divergence(model, reference, token_ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
                  max_windows: int | None = None, progress: bool = True) -> Divergence:
    """Compare ``model`` with ``reference`` (the dense model) on non-overlapping ``seq_len`` windows of
    ``token_ids`` (as :func:`~quantkern.eval.perplexity` scores them: the first token of a window is
    context only). Raises ``ValueError`` if the two models' vocabularies differ."""
    windows = windows_of(token_ids, seq_len, max_windows)
    dev_q = next(model.parameters()).device
    dev_r = next(reference.parameters()).device
    kls, nll_q, nll_r, agree, count = [], 0.0, 0.0, 0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="kl-divergence", disable=not progress, leave=False):
        x = windows[i:i + batch_size]
        lq = model(input_ids=x.to(dev_q), use_cache=False).logits[:, :-1].float()
        lr = reference(input_ids=x.to(dev_r), use_cache=False).logits[:, :-1].float().to(lq.device)
        if lq.shape != lr.shape:
            raise ValueError(f"the models' logits differ in shape ({tuple(lq.shape)} vs {tuple(lr.shape)}): "
                             "they do not share a vocabulary")
        y = x[:, 1:].to(lq.device)
        logq, logr = torch.log_softmax(lq, -1), torch.log_softmax(lr, -1)
        kls.append((logr.exp() * (logr - logq)).sum(-1).flatten().clamp_(min=0).cpu())
        nll_q -= float(logq.gather(-1, y[..., None]).sum())
        nll_r -= float(logr.gather(-1, y[..., None]).sum())
        agree += int((lq.argmax(-1) == lr.argmax(-1)).sum())
        count += y.numel()
    kl = torch.cat(kls).double()
    return Divergence(kl_mean=float(kl.mean()), kl_median=float(kl.median()), kl_p99=float(torch.quantile(kl, 0.99)),
                      kl_max=float(kl.max()), top1=agree / count, ppl=math.exp(nll_q / count),
                      ppl_reference=math.exp(nll_r / count), tokens=count)

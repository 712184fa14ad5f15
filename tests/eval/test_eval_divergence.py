"""KL divergence / top-1 agreement / delta perplexity against the dense model (issue #17's evaluation)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import quantkern as qk
from quantkern.eval import kl_divergence, perplexity


@pytest.fixture
def ids():
    return torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3))


def test_a_model_against_itself(tiny_llama, ids):
    d = kl_divergence(tiny_llama, tiny_llama, ids, seq_len=32, progress=False)
    assert d.kl_mean == 0 and d.kl_max == 0 and d.top1 == 1.0 and d.delta_ppl == 0
    assert d.tokens == 6 * 31 and d.ppl == pytest.approx(perplexity(tiny_llama, ids, seq_len=32, progress=False))


def test_matches_a_direct_computation_and_does_not_depend_on_the_batch(tiny_llama, ids):
    q = copy.deepcopy(tiny_llama)
    qk.RTNQuantizer(q, bits=2, group_size=32, verbose=False).quantize()
    d1 = kl_divergence(q, tiny_llama, ids, seq_len=32, batch_size=1, progress=False)
    d4 = kl_divergence(q, tiny_llama, ids, seq_len=32, batch_size=4, progress=False)
    assert d1.kl_mean == pytest.approx(d4.kl_mean, rel=1e-5) and d1.top1 == d4.top1
    x = ids[:192].view(6, 32)
    with torch.no_grad():
        lq = torch.log_softmax(q(input_ids=x).logits[:, :-1].float(), -1)
        lr = torch.log_softmax(tiny_llama(input_ids=x).logits[:, :-1].float(), -1)
    kl = (lr.exp() * (lr - lq)).sum(-1)
    assert d1.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4) and d1.kl_mean > 0
    assert d1.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    assert d1.top1 == pytest.approx(float((lq.argmax(-1) == lr.argmax(-1)).float().mean()))
    nll = -float(lq.gather(-1, x[:, 1:, None]).mean())
    assert d1.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    with pytest.raises(ValueError, match="at least seq_len"):
        kl_divergence(q, tiny_llama, ids[:10], seq_len=32, progress=False)


def test_cli_eval_reference(cli_serves_tiny_llama, tmp_path, capsys):
    from quantkern.cli import main

    assert main(["eval", "smollm2", "--reference", "smollm2", "--seq-len", "32", "--max-windows", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kl_mean"] == 0 and out["top1"] == 1.0 and out["delta_ppl"] == 0 and out["tokens"] == 93

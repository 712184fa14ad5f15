"""PEFT LoRA on quantized models (issue #17, training on top): adapters train, base weights stay frozen,
gradients equal those of the dequantized dense model."""

from __future__ import annotations

import copy

import pytest
import torch

import quantkern as qk

peft = pytest.importorskip("peft")


def _dequantized_dense(model):
    """The same model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    from quantkern.api.targets import set_module

    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, qk.QuantLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            lin.weight.requires_grad_(False)
            set_module(dense, name, lin)
    return dense


def _lora(model, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                          **kw)
    return cfg


def _train(model, batch, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_gradients_equal_the_dequantized_dense_model(tiny_llama):
    q = qk.RTNQuantizer(copy.deepcopy(tiny_llama), bits=4, group_size=32, sym=False, verbose=False,
                        scale_dtype="float32").quantize()
    ref = _dequantized_dense(q)
    pq = qk.lora.get_peft_model(q, _lora(q))
    torch.manual_seed(0)
    pr = peft.get_peft_model(ref, _lora(ref))  # plain peft on nn.Linear, the same init
    names = [n for n, p in pq.named_parameters() if p.requires_grad]
    assert names == [n for n, p in pr.named_parameters() if p.requires_grad] and len(names) == 2 * 3 * 2
    qp = dict(pq.named_parameters())
    torch.manual_seed(1)
    with torch.no_grad():  # B != 0 (peft starts it at 0), so A's gradient is not trivially zero
        for n, p in qp.items():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    for n, b in pr.named_parameters():
        if b.requires_grad:
            with torch.no_grad():
                b.copy_(qp[n])
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    lq, lr = pq(input_ids=x, labels=x).loss, pr(input_ids=x, labels=x).loss
    torch.testing.assert_close(lq, lr, atol=1e-5, rtol=1e-5)
    lq.backward()
    lr.backward()
    gq = dict((n, p.grad) for n, p in pq.named_parameters() if p.requires_grad)
    for n, p in pr.named_parameters():
        if p.requires_grad:
            assert gq[n] is not None and gq[n].abs().max() > 0, n
            torch.testing.assert_close(gq[n], p.grad, atol=1e-5, rtol=1e-4)


def test_lora_trains_and_base_stays_frozen(tiny_llama):
    q = qk.RTNQuantizer(copy.deepcopy(tiny_llama), bits=4, group_size=32, verbose=False).quantize()
    frozen = {n: t.clone() for n, t in q.state_dict().items()}
    pm = qk.lora.get_peft_model(q, _lora(q))
    batch = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    losses = _train(pm, batch, steps=40, lr=2e-2)
    assert losses[-1] < losses[0] - 0.5 and min(losses[-5:]) < min(losses[:5]), losses
    base = pm.get_base_model().state_dict()
    for n, t in frozen.items():
        key = next(k for k in base if k == n or k.replace(".base_layer", "") == n)
        assert torch.equal(base[key], t), n
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="merging a LoRA adapter"):
        layer.merge()
    w = qk.lora.merged_dense(layer)
    assert w.shape == (64, 64) and not torch.equal(w, layer.get_base_layer().dequantized_weight())
    with pytest.raises(ValueError, match="LoraConfig"):
        qk.lora.get_peft_model(q, {"r": 4})


@pytest.mark.model
def test_lora_on_smollm2_w4(tmp_path):
    """SmolLM2 W4 g64 (RTN): a LoRA adapter on q/v trained a few steps on real text lowers the loss;
    the packed weights are bit-identical afterwards."""
    from quantkern.calibration import builtin_text
    from quantkern.eval import tokenize_text
    from quantkern.models import load_model

    model, tok = load_model("smollm2")
    qk.RTNQuantizer(model, bits=4, group_size=64, verbose=False).quantize()
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n.endswith(("qweight", "scales", "qzeros"))}
    ids = tokenize_text(tok, builtin_text("calibration"), max_tokens=4 * 128)
    batch = ids[: 4 * 128].reshape(4, 128)
    pm = qk.lora.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0))
    pm.train()
    losses = _train(pm, batch, steps=6, lr=2e-3)
    assert losses[-1] < losses[0] - 0.05, losses
    sd = pm.get_base_model().state_dict()
    for n, t in frozen.items():
        assert torch.equal(sd[n.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")], t)

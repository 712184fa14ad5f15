"""The fused C++ decode step (quantkern_cpu::llama_decode, quantkern/kernels/cpu/decode.py) against its
reference, FastDecoder's own pure-PyTorch ``_forward`` over the same quantized modules.

Tolerance: both compute in fp32 over the same packed weights; the op sums in another order (its GEMM
kernels are the ones the reference calls, but its norms, attention and softmax are its own loops), so
logits agree to a few fp32 ulps of their magnitude times the depth, far below what one wrong code, head
or cache slot moves (checked by the mutation-style asserts below: another position, another cache
entry). Across thread counts the op is bit-identical: every column and every head is computed by one
thread with the same arithmetic whatever the split.
"""

from __future__ import annotations

import platform

import pytest
import torch

import quantkern as qk
from quantkern.generation import FastDecoder, quantize_output

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the C++ CPU kernels are x86-64 only")


def _model(bits=4, group=32, sym=True, actorder=False, tied=True, seed=0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied, initializer_range=0.2)
    kw.update(over)
    m = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    if actorder:
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(0, 256, (32,), generator=g) for _ in range(4)]
        qk.GPTQQuantizer(m, bits=bits, group_size=group, sym=sym, actorder=True, verbose=False).quantize(data)
    else:
        qk.RTNQuantizer(m, bits=bits, group_size=group, sym=sym, verbose=False).quantize()
    return m


def _prompt(b=1, t=6, seed=3, vocab=256):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _pair(m, b=1, max_len=40, **kw):
    ref = FastDecoder(m, max_len=max_len, batch_size=b, compile=False, fused_step=False, **kw)
    fused = FastDecoder(m, max_len=max_len, batch_size=b, compile=False, fused_step=True, **kw)
    assert ref.fused_step is None and fused.fused_step is not None
    return ref, fused


def _compare(ref, fused, ids, steps=12, attention_mask=None, rtol=2e-5):
    """Steps both decoders with the same tokens; returns the largest logit difference relative to the
    logits' magnitude, and checks the caches they wrote."""
    la, tok = ref.prefill(ids, attention_mask)
    lb, _ = fused.prefill(ids, attention_mask)
    assert torch.equal(la, lb)  # prefill is the same code in both
    worst = 0.0
    for _ in range(steps):
        la, nxt = ref.step(tok)
        lb, _ = fused.step(tok)
        worst = max(worst, ((la - lb).abs().max() / la.abs().max()).item())
        tok = nxt
    t = ref._t
    for kc_r, kc_f, vc_r, vc_f in zip(ref.k_cache, fused.k_cache, ref.v_cache, fused.v_cache):
        scale = kc_r.abs().max()
        assert ((kc_r[:, :, :t] - kc_f[:, :, :t]).abs().max() / scale) < 10 * rtol
        assert ((vc_r[:, :, :t] - vc_f[:, :, :t]).abs().max() / vc_r.abs().max()) < 10 * rtol
        assert not kc_f[:, :, t:].any()  # nothing written past the last slot
    assert worst < rtol, worst
    return worst


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (2, 32, False), (3, 32, True),
                                            (8, -1, True), (8, 32, False)])
def test_matches_reference_per_scheme(bits, group, sym):
    m = _model(bits, group, sym)
    ref, fused = _pair(m)
    _compare(ref, fused, _prompt())


@pytest.mark.parametrize("over", [dict(), dict(num_key_value_heads=4), dict(num_key_value_heads=1),
                                  dict(attention_bias=True, mlp_bias=True),
                                  # hidden / MLP widths that leave padded column blocks, head_dim 16
                                  dict(hidden_size=80, intermediate_size=168, num_attention_heads=5,
                                       num_key_value_heads=5),
                                  # head_dim 24 (the AVX2 attention on an AVX-512 CPU) and 18 (portable)
                                  dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2),
                                  dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=4)])
def test_matches_reference_per_shape(over):
    m = _model(4, 32, False, tied=False, **over)
    ref, fused = _pair(m)
    _compare(ref, fused, _prompt(t=5))


def test_act_order_gathers_its_inputs():
    m = _model(4, 32, False, actorder=True)
    assert m.model.layers[0].self_attn.q_proj.desc_act
    ref, fused = _pair(m)
    assert any(k.packed.src is not None for k in fused.fused_step.kernels)  # the permuted path runs
    _compare(ref, fused, _prompt())


def test_batch_with_left_padding():
    m = _model()
    ids = _prompt(b=3, t=6)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    am[2, :5] = 0
    ids = ids.masked_fill(am == 0, 0)
    ref, fused = _pair(m, b=3)
    _compare(ref, fused, ids, attention_mask=am)
    # rows are independent: row 0 of the batch equals the same prompt decoded alone
    solo = FastDecoder(m, max_len=40, compile=False, fused_step=True)
    a = fused.generate(ids, 10, attention_mask=am)
    assert torch.equal(solo.generate(ids[:1], 10), a[:1])


def test_quantized_tied_head_and_generate_matches_transformers():
    m = _model()
    quantize_output(m, bits=8, group_size=32)
    assert FastDecoder(m, max_len=16, compile=False, fused_step=True).fused_step.has_head  # the W8 head in the op
    ids = _prompt(t=7)
    with torch.no_grad():
        hf = m.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert len(set(hf[0, 7:].tolist())) > 3
    d = FastDecoder(m, max_len=48, compile=False, fused_step=True)
    assert torch.equal(d.generate(ids, 20), hf)


@pytest.mark.parametrize("threads", [1, 3])
def test_bit_identical_across_thread_counts(threads):
    m = _model(4, 32, False, actorder=True, num_key_value_heads=4)
    ids = _prompt(b=2)
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (2, threads):
            torch.set_num_threads(n)
            d = FastDecoder(m, max_len=32, batch_size=2, compile=False, fused_step=True)
            _, tok = d.prefill(ids)
            logits = [d.step(tok)[0] for _ in range(6)]
            outs.append((torch.stack(logits), [c.clone() for c in d.k_cache]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_int8_activations_match_the_reference_over_the_same_kernels():
    """With int8 activations both paths quantize each GEMM's input rows the same way (per block of 32);
    an fp32 difference of a few ulps can move one rounding, so the bound is the int8 step's size. The
    mode is each projection's own (the op takes one flag per projection), as in the reference."""
    from quantkern.kernels.cpu.backend import int8_activations

    m = _model()
    ref, fused = _pair(m, int8_activations=True)
    assert fused.fused_step.int8_activations is True
    assert _compare(ref, fused, _prompt(), rtol=2e-3) > 0
    # a decoder without int8 activations switches the shared o / down back, not the fused q/k/v and
    # gate/up projections the other decoders own: mixed modes, the same in both paths
    exact = FastDecoder(m, max_len=40, compile=False, fused_step=True)
    assert exact.fused_step.int8_activations is False and fused.fused_step.int8_activations is None
    _compare(ref, fused, _prompt(), rtol=2e-3)
    for mod in fused._linears():
        int8_activations(mod, False)
    tok = exact.prefill(_prompt())[1]
    fused.prefill(_prompt())
    assert torch.equal(fused.step(tok)[0], exact.step(tok)[0])


@pytest.mark.parametrize("head_dim", [16, 24])
def test_every_isa_level_agrees(head_dim):
    """The op at each ISA level this CPU runs (portable, AVX2, AVX-512: GEMM block kernels and attention)
    against the best level, from the same cache state."""
    from quantkern.kernels.cpu import ops

    m = _model(4, 32, False, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2)
    d = FastDecoder(m, max_len=40, compile=False, fused_step=True)
    d.prefill(_prompt(t=9))
    levels = range(1, ops.ISA_LEVELS[ops.best_isa()] + 1)
    outs = {}
    for lv in levels:
        for head in ("none", "dense"):
            args = _op_args(d, torch.randn(1, 4 * head_dim, generator=torch.Generator().manual_seed(0)))
            args[8], args[7], args[16] = 9, torch.tensor([9]), lv
            if head == "dense":
                args[18], args[20] = [m.lm_head.weight.detach()], 256
            outs[lv, head] = torch.ops.quantkern_cpu.llama_decode(*args)
    for (lv, head), y in outs.items():
        best = outs[max(levels), head]
        assert y.shape == (1, 256 if head == "dense" else 4 * head_dim)
        assert ((y - best).abs().max() / best.abs().max()).item() < 1e-5, (lv, head)
    hidden, logits = outs[max(levels), "none"], outs[max(levels), "dense"]
    assert torch.allclose(logits, hidden @ m.lm_head.weight.detach().t(), rtol=1e-5, atol=1e-5)


def test_detects_a_wrong_position():
    """The comparison can fail: decoding the same token at another RoPE position moves the logits far
    beyond the tolerance."""
    m = _model()
    ref, fused = _pair(m)
    ids = _prompt()
    _, tok = ref.prefill(ids)
    fused.prefill(ids)
    la = ref.step(tok)[0]
    fused._pos = fused._pos + 1
    lb = fused.step(tok)[0]
    assert ((la - lb).abs().max() / la.abs().max()).item() > 1e-2


def test_when_it_runs():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = _model()
    assert FastDecoder(m, max_len=16, compile=False).fused_step is None  # eager: the reference, unless asked
    assert FastDecoder(m, max_len=16).fused_step is not None  # the default (compiled, CPU): decode runs the op
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="not a quantized linear layer"):
        FastDecoder(dense, max_len=16, compile=False, fused_step=True)
    d = FastDecoder(dense, max_len=16)  # the default falls back to the compiled graph and says why
    assert d.fused_step is None and "not a quantized linear layer" in d.fused_reason
    with pytest.raises(ValueError, match="could not be fused"):
        FastDecoder(m, max_len=16, compile=False, fused_step=True, fuse=False)
    with pytest.raises(ValueError, match="fp32"):
        FastDecoder(m, max_len=16, compile=False, fused_step=True, dtype=torch.bfloat16)


# --- the op's checks -------------------------------------------------------------------------------------
def _op_args(d, x=None):
    f = d.fused_step
    x = torch.randn(d.batch_size, d.blocks[0].ln1.numel()) if x is None else x
    return [x, list(f.params), list(f.cbs), d.k_cache, d.v_cache, d.cos, d.sin, torch.zeros(d.batch_size, dtype=torch.long),
            3, d.key_valid, d.norm_w, d.n_heads, d.n_kv, f.inter, float(d.eps), float(d.scaling), 0,
            [False] * len(f.cbs), [], 0, 0, False]


@pytest.mark.parametrize("bad,match", [
    (lambda a: a.__setitem__(0, a[0].double()), "x must be contiguous fp32"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "tensors per layer"),
    (lambda a: a.__setitem__(2, a[2][:-1]), "4 container widths"),
    (lambda a: a[2].__setitem__(0, 3), "container bits"),
    (lambda a: a.__setitem__(3, a[3][:1]), "one K and one V cache"),
    (lambda a: a.__setitem__(4, [c.half() for c in a[4]]), "caches of layer 0"),
    (lambda a: a.__setitem__(8, 40), "slot 40 is outside"),
    (lambda a: a.__setitem__(7, torch.full_like(a[7], 99)), "outside the RoPE table"),
    (lambda a: a.__setitem__(9, a[9].int()), "key_valid"),
    (lambda a: a.__setitem__(11, 3), "multiple of n_kv"),
    (lambda a: a.__setitem__(17, a[17][:-1]), "int8_act must hold"),
    (lambda a: a.__setitem__(13, a[13] + 16), "gate_up: .* do not match"),  # a wrong MLP width
    (lambda a: a[1].__setitem__(3, a[1][3][:, :-1]), "scales / zs"),  # layer 0 qkv scales
    (lambda a: a[1].__setitem__(5, a[1][5] + 1), "gptr must run from 0"),
    (lambda a: a[1].__setitem__(2, a[1][2][:-1]), "column blocks"),  # layer 0 qkv w
    (lambda a: a[1].__setitem__(0, a[1][0][:-1]), "ln1 of layer 0"),
    (lambda a: a.__setitem__(18, [torch.randn(256, 64)] * 2), "head must hold"),
    (lambda a: (a.__setitem__(18, [torch.randn(255, 64)]), a.__setitem__(20, 256)), "dense head must be"),
    (lambda a: (a.__setitem__(18, list(a[1][2:8])), a.__setitem__(19, 4), a.__setitem__(20, 500)),
     "head: .* do not match"),  # layer 0's qkv as a head of the wrong width
])
def test_bad_arguments_are_refused_before_any_work(bad, match):
    m = _model()
    d = FastDecoder(m, max_len=40, compile=False, fused_step=True)
    args = _op_args(d)
    before = [c.clone() for c in d.k_cache]
    bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.quantkern_cpu.llama_decode(*args)
    assert all(torch.equal(a, b) for a, b in zip(before, d.k_cache))


def test_bad_src_is_refused():
    m = _model(4, 32, False, actorder=True)
    d = FastDecoder(m, max_len=40, compile=False, fused_step=True)
    args = _op_args(d)
    i = next(i for i in range(2, 26, 6) if args[1][i + 4].numel())  # layer 0: a projection with src
    args[1][i + 4] = torch.full_like(args[1][i + 4], 10 ** 6)
    with pytest.raises(RuntimeError, match="src"):
        torch.ops.quantkern_cpu.llama_decode(*args)


def test_fake_and_schema():
    m = _model()
    d = FastDecoder(m, max_len=40, compile=False, fused_step=True)
    args = _op_args(d)
    torch.library.opcheck(torch.ops.quantkern_cpu.llama_decode.default, tuple(args), test_utils=("test_schema",
                                                                                                  "test_faketensor"))


@pytest.mark.parametrize("bits,actorder,n", [(8, False, 72), (4, True, 72), (3, True, 96), (2, False, 96)])
def test_packed_columns_are_the_tied_embedding_rows(bits, actorder, n):
    """quantkern_cpu::packed_columns (the fused step's embedding lookup) equals TiedQuantEmbedding bit for
    bit, for every container width and a permuted (act-order) input order."""
    from quantkern.algorithms import quantize_rtn
    from quantkern.core import QuantizedWeight, WeightScheme
    from quantkern.generation import TiedQuantEmbedding
    from quantkern.kernels.cpu.backend import CpuKernel
    from quantkern.nn import QuantLinear

    torch.manual_seed(0)
    k = 96  # n = 72: a padded last column block
    qw = quantize_rtn(torch.randn(n, k), WeightScheme(bits, 32, False), torch.float16)
    if actorder:
        perm = torch.randperm(k)
        qw = QuantizedWeight(codes=qw.codes, scales=qw.scales, zeros=qw.zeros, g_idx=qw.g_idx[perm].contiguous(),
                             scheme=qw.scheme)
    head = QuantLinear.from_quantized(qw, dtype=torch.float32, backend="cpu")
    emb = TiedQuantEmbedding(head)
    kern = head.kernel_for(torch.empty(1, k))
    assert isinstance(kern, CpuKernel) and (kern.packed.src is not None) == actorder
    p = kern.packed
    ids = torch.tensor([0, 5, n - 1, 16, 15, 5])
    rows = torch.ops.quantkern_cpu.packed_columns(ids, p.w, p.scales, p.zs, p.gptr, p.src, p.cb, n, k)
    assert torch.equal(rows.to(head.scales.dtype), emb(ids))
    with pytest.raises(RuntimeError, match=rf"ids\[0\] = {n} is outside"):
        torch.ops.quantkern_cpu.packed_columns(torch.tensor([n]), p.w, p.scales, p.zs, p.gptr, p.src, p.cb, n, k)

"""The fast decode path (quantkern.generation): token-identical to transformers' greedy generate."""

import logging

import pytest
import torch

import quantkern as qk
from quantkern.generation import (FastDecoder, TiedQuantEmbedding, generate_ids, quantize_output, sample,
                                  unsupported_reason)


def _tiny(tied=True, seed=0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied, initializer_range=0.2)
    kw.update(over)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def _prompts(b=1, t=7, seed=3):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _hf(model, ids, n, **kw):
    kw.setdefault("attention_mask", torch.ones_like(ids))  # else a token equal to pad_token_id reads as padding
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def test_eager_matches_transformers_dense():
    m = _tiny()
    ids = _prompts()
    ref = _hf(m, ids, 24)
    assert len(set(ref[0, 7:].tolist())) > 3  # a continuation that varies, not one repeated token
    d = FastDecoder(m, max_len=64, compile=False)
    assert d.fused == 4  # q/k/v and gate/up fused in both blocks
    assert torch.equal(d.generate(ids, 24), ref)
    assert torch.equal(d.generate(ids, 24), ref)  # the cache is reset by the next prompt


def test_eager_matches_transformers_quantized_and_unfused():
    m = _tiny(tied=False, attention_bias=True)
    qk.RTNQuantizer(m, bits=4, group_size=32, sym=False, verbose=False).quantize()
    assert isinstance(m.model.layers[0].self_attn.q_proj, qk.QuantLinear)
    ids = _prompts(t=5)
    ref = _hf(m, ids, 20)
    for fuse in (True, False):
        assert torch.equal(FastDecoder(m, max_len=32, compile=False, fuse=fuse).generate(ids, 20), ref)


def test_small_batch_left_padding_matches_transformers():
    m = _tiny()
    ids = _prompts(b=3, t=6)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    am[2, :4] = 0
    ids = ids.masked_fill(am == 0, 0)
    ref = _hf(m, ids, 12, attention_mask=am)
    out = FastDecoder(m, max_len=32, batch_size=3, compile=False).generate(ids, 12, attention_mask=am)
    assert torch.equal(out, ref)


def test_quantized_tied_output_stays_tied():
    m = _tiny()
    w = m.lm_head.weight.detach().clone()
    quantize_output(m, bits=8, group_size=32)
    assert isinstance(m.lm_head, qk.QuantLinear) and isinstance(m.model.embed_tokens, TiedQuantEmbedding)
    assert m.model.embed_tokens.head[0] is m.lm_head  # one quantized tensor serves both ends
    deq = m.lm_head.to_quantized().dequantize()
    rows = m.model.embed_tokens(torch.arange(256))
    assert (rows - w).abs().max() < 0.02  # W8 g32 of a 0.2-std matrix
    assert torch.allclose(rows, deq.to(rows.dtype), atol=1e-6)
    ids = _prompts()
    ref = _hf(m, ids, 16)
    assert torch.equal(FastDecoder(m, max_len=32, compile=False).generate(ids, 16), ref)


def test_untied_output_quantization_keeps_embeddings_dense():
    m = _tiny()
    quantize_output(m, bits=4, group_size=32, embeddings=False)
    assert isinstance(m.model.embed_tokens, torch.nn.Embedding)
    assert m.model.embed_tokens.weight.data_ptr() != m.lm_head.qweight.data_ptr()
    assert not m.config.tie_word_embeddings


def test_sampling():
    m = _tiny()
    d = FastDecoder(m, max_len=64, compile=False)
    ids = _prompts()
    greedy = d.generate(ids, 16)
    assert torch.equal(d.generate(ids, 16, do_sample=True, top_k=1), greedy)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = d.generate(ids, 16, do_sample=True, temperature=1.5, top_p=0.9, generator=g1)
    b = d.generate(ids, 16, do_sample=True, temperature=1.5, top_p=0.9, generator=g2)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    x = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert set(sample(x.repeat(64, 1), top_p=0.5).tolist()) == {2}  # the top token alone holds > 50%


def test_eos_stops_and_pads():
    m = _tiny()
    ids = _prompts()
    ref = _hf(m, ids, 24)
    eos = int(ref[0, 10])
    out = FastDecoder(m, max_len=64, compile=False).generate(ids, 24, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, _hf(m, ids, 24, eos_token_id=eos))


def test_fallback_says_why_once(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).eval()
    assert "gpt2" in unsupported_reason(m)
    with pytest.raises(ValueError, match="cannot run this model"):
        FastDecoder(m)
    ids = torch.randint(0, 64, (1, 4))
    with caplog.at_level(logging.WARNING, logger="quantkern"):
        out = generate_ids(m, ids, max_new_tokens=5, pad_token_id=0)
    assert out.shape == (1, 9)
    msgs = [r.getMessage() for r in caplog.records if "fast decode path" in r.getMessage()]
    assert len(msgs) == 1 and "gpt2" in msgs[0]
    assert torch.equal(out, _hf(m, ids, 5))


@pytest.mark.slow  # ~25-35 s: inductor compiles C++ on CPU
def test_compiled_matches_transformers_dense_and_quantized():
    """The compiled graph (inductor on CPU) with QuantLinear kernels inside: token-identical."""
    torch._dynamo.reset()
    m = _tiny(num_hidden_layers=1)
    qk.RTNQuantizer(m, bits=4, group_size=32, sym=True, verbose=False).quantize()
    quantize_output(m, bits=8, group_size=32)
    ids = _prompts(t=6)
    ref = _hf(m, ids, 12)
    d = FastDecoder(m, max_len=32, compile=True)
    assert torch.equal(d.generate(ids, 12), ref)
    # the decode step is one graph: no graph break, no recompilation on the next prompt
    from torch._dynamo.utils import counters

    before = dict(counters["stats"])
    assert torch.equal(d.generate(ids, 12), ref)
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)
    assert not counters["graph_break"]


@pytest.mark.slow
def test_compiled_matches_transformers_dense_two_blocks():
    torch._dynamo.reset()
    m = _tiny()
    ids = _prompts()
    ref = _hf(m, ids, 24)
    assert torch.equal(FastDecoder(m, max_len=64, compile=True).generate(ids, 24), ref)


def test_unsupported_reasons():
    m = _tiny()
    assert unsupported_reason(m) is None
    m.config.hidden_act = "gelu"
    assert "hidden_act" in unsupported_reason(m)


def test_int8_activations_run_the_q8_kernels_and_match_transformers_with_them():
    """``int8_activations``: every C++ CPU kernel the decoder runs is switched to int8 activations; the
    decode then equals transformers' greedy generate over the same switched kernels, and its logits
    differ from the fp32-activation decoder's by the int8 rounding only."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the C++ CPU kernels are x86-64 only")
    from quantkern.kernels.cpu.backend import CpuKernel, int8_activations
    from quantkern.nn import build_kernels

    m = _tiny()
    qk.RTNQuantizer(m, bits=4, group_size=32, sym=True, verbose=False).quantize()
    ids = _prompts(t=6)
    ref = _hf(m, ids, 16)
    exact = FastDecoder(m, max_len=48, compile=False)
    la = exact.prefill(ids)[0]
    q8 = FastDecoder(m, max_len=48, compile=False, int8_activations=True)  # switches the shared o / down too
    kernels = [k for mod in q8._linears() if isinstance(mod, qk.QuantLinear) for k in mod._kernels.prepared()]
    assert kernels and all(isinstance(k, CpuKernel) and k.int8_activations for k in kernels)
    lb = q8.prefill(ids)[0]
    rel = ((la - lb).norm() / la.norm()).item()
    assert 0 < rel < 0.05, rel
    out = q8.generate(ids, 16)
    build_kernels(m, dtype=torch.float32)
    assert int8_activations(m) > 0
    assert torch.equal(out, _hf(m, ids, 16))
    # a decoder without int8 activations switches the shared modules back
    assert torch.equal(FastDecoder(m, max_len=48, compile=False).generate(ids, 16), ref)


def test_generate_ids_rebuilds_the_cached_decoder_for_another_activation_mode():
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the C++ CPU kernels are x86-64 only")
    from quantkern import generation

    m = _tiny()
    qk.RTNQuantizer(m, bits=4, group_size=32, sym=True, verbose=False).quantize()
    ids = _prompts(t=5)
    generate_ids(m, ids, max_new_tokens=4, compile=False)
    first = generation._DECODERS[id(m)]
    generate_ids(m, ids, max_new_tokens=4, compile=False, int8_activations=True)
    d = generation._DECODERS[id(m)]
    assert d is not first and d.int8_activations
    assert all(k.int8_activations for k in m.model.layers[0].mlp.down_proj._kernels.prepared())

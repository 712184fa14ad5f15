"""Both front doors, config validation and every documented bad-input error."""

import copy

import pytest
import torch

import quantkern as qk
from quantkern.api import registered_configs
from quantkern.calibration import group_batches, normalize_calibration_data


def test_gptq_both_doors_give_identical_weights(tiny_llama, token_data):
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    cfg = qk.GPTQConfig(bits=4, group_size=32, actorder=True, batch_size=4)
    qk.GPTQQuantizer(a, cfg, verbose=False).quantize(token_data)
    b = qk.prepare(b, cfg)
    for batch in group_batches(normalize_calibration_data(token_data), 4):
        assert b(input_ids=batch.input_ids, attention_mask=batch.attention_mask) is None
    b = qk.convert(b, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(a.model.layers[0].mlp.down_proj, qk.QuantLinear)
    assert not isinstance(a.lm_head, qk.QuantLinear)


def test_rtn_both_doors_and_no_data(tiny_llama):
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    qk.RTNQuantizer(a, bits=3, group_size=32, sym=False, verbose=False).quantize()
    cfg = qk.RTNConfig(bits=3, group_size=32, sym=False)
    b = qk.convert(qk.prepare(b, cfg), cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_prepare_not_inplace_leaves_model_untouched(tiny_llama, token_data):
    before = copy.deepcopy(tiny_llama.state_dict())
    cfg = qk.GPTQConfig(bits=4, group_size=32)
    m = qk.prepare(tiny_llama, cfg, inplace=False)
    m(input_ids=token_data[0][None])
    qk.convert(m, cfg)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert not any(isinstance(x, qk.QuantLinear) for x in tiny_llama.modules())


def test_data_forms_are_equivalent(tiny_llama, token_data):
    stacked = torch.stack(token_data)
    dicts = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in token_data]
    results = []
    for data in (token_data, stacked, dicts):
        m = copy.deepcopy(tiny_llama)
        qk.GPTQQuantizer(m, bits=4, group_size=32, batch_size=4, verbose=False).quantize(data)
        results.append(m.model.layers[1].self_attn.o_proj.qweight)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_padding_tokens_do_not_reach_the_hessian(tiny_llama, token_data):
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    qk.GPTQQuantizer(a, bits=4, group_size=32, batch_size=1, verbose=False).quantize(token_data[:2])
    padded = []
    for t in token_data[:2]:
        ids = torch.cat([t, torch.zeros(5, dtype=torch.long)])
        mask = torch.cat([torch.ones_like(t), torch.zeros(5, dtype=torch.long)])
        padded.append({"input_ids": ids, "attention_mask": mask})
    qk.GPTQQuantizer(b, bits=4, group_size=32, batch_size=1, verbose=False).quantize(padded)
    # right padding with a causal model leaves real tokens' activations unchanged
    qa = a.model.layers[0].self_attn.q_proj.to_quantized().dequantize()
    qb = b.model.layers[0].self_attn.q_proj.to_quantized().dequantize()
    assert torch.allclose(qa, qb, atol=1e-3)


def test_registry_has_both_configs():
    assert {qk.GPTQConfig, qk.RTNConfig} <= set(registered_configs())


# ---------------------------------------------------------------- bad input, before calibration
@pytest.mark.parametrize("bits,match", [(1, "bits must be one of"), (9, "bits must be one of"),
                                        (4.0, "must be an int"), ("4", "must be an int"), (True, "must be an int")])
def test_bad_bits(bits, match):
    with pytest.raises(ValueError, match=match):
        qk.GPTQConfig(bits=bits)


@pytest.mark.parametrize("gs", [0, -2, 1.5])
def test_bad_group_size(gs):
    with pytest.raises(ValueError, match="group_size must be -1"):
        qk.RTNConfig(group_size=gs)


def test_group_size_larger_than_in_features_lists_layers(tiny_llama):
    with pytest.raises(ValueError, match=r"(?s)group_size=256 > in_features=64.*q_proj"):
        qk.RTNQuantizer(tiny_llama, bits=4, group_size=256, verbose=False).quantize()


def test_unpackable_shapes_rejected_before_calibration(tiny_llama):
    tiny_llama.model.layers[0].mlp.extra = torch.nn.Linear(64, 40)

    def boom(*a, **k):
        raise AssertionError("calibration must not start")

    with pytest.raises(ValueError, match=r"model.layers.0.mlp.extra \(64->40\): out_features=40"):
        q = qk.GPTQQuantizer(tiny_llama, bits=3, group_size=32, verbose=False)
        q.calibrate = boom
        q.quantize([torch.arange(10)])


@pytest.mark.parametrize("data,match", [
    ([], "calibration data is empty"),
    (iter([]), "calibration data is empty"),
    (None, "calibration data is required"),
    (["some text"], "no tokenizer was given"),
    ([torch.randn(8)], "must be integers"),
    ([{"ids": torch.arange(3)}], "must have 'input_ids'"),
    ([torch.zeros(0, dtype=torch.long)], "empty sequence"),
])
def test_bad_calibration_data(tiny_llama, data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(data)
    assert not any(isinstance(m, qk.QuantLinear) for m in tiny_llama.modules())


def test_exhausted_generator(tiny_llama):
    gen = (torch.arange(10) for _ in range(2))
    list(gen)
    with pytest.raises(ValueError, match="empty"):
        qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(gen)


def test_strings_with_tokenizer(tiny_llama):
    class Tok:
        def __call__(self, text, return_tensors=None, truncation=False, max_length=None):
            ids = torch.tensor([[ord(c) % 256 for c in text]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize(["hello world", "abc"], tokenizer=Tok())
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, qk.QuantLinear)


def test_no_linear_layers():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no nn.Linear layers to quantize"):
        qk.RTNQuantizer(model, bits=4, group_size=8, verbose=False).quantize()


def test_everything_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match="all matched skip_layers"):
        qk.RTNQuantizer(model, bits=4, group_size=32, skip_layers=["0"], verbose=False).quantize()


def test_already_quantized(tiny_llama):
    qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize()
    with pytest.raises(ValueError, match="already quantized"):
        qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize()


def test_quantization_config_gptq_counts_as_quantized(tiny_llama):
    tiny_llama.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        qk.RTNQuantizer(tiny_llama, verbose=False).quantize()


def test_gguf_quantization_config_is_a_dense_model(tiny_llama):
    tiny_llama.config.quantization_config = {"quant_method": "gguf"}
    qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize()
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, qk.QuantLinear)


def test_convert_without_calibration(tiny_llama):
    cfg = qk.GPTQConfig(bits=4, group_size=32)
    m = qk.prepare(tiny_llama, cfg)
    with pytest.raises(RuntimeError, match="no calibration forwards"):
        qk.convert(m, cfg)


def test_convert_with_other_config(tiny_llama, token_data):
    m = qk.prepare(tiny_llama, qk.GPTQConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="different config"):
        qk.convert(m, qk.GPTQConfig(bits=3, group_size=32))


def test_unknown_config_keys_rejected():
    with pytest.raises(ValueError, match=r"unknown keys for GPTQConfig: \['act_order'\]"):
        qk.GPTQConfig.from_dict({"bits": 4, "act_order": True})
    assert qk.GPTQConfig.from_dict(qk.GPTQConfig(bits=3).to_dict()) == qk.GPTQConfig(bits=3)


def test_other_invalid_settings():
    with pytest.raises(ValueError, match="damp_percent"):
        qk.GPTQConfig(damp_percent=0)
    with pytest.raises(ValueError, match="scale_dtype"):
        qk.RTNConfig(scale_dtype="float8")
    with pytest.raises(TypeError, match="not both"):
        qk.GPTQQuantizer(torch.nn.Linear(2, 2), qk.GPTQConfig(), bits=4)
    with pytest.raises(TypeError, match="needs a GPTQConfig"):
        qk.GPTQQuantizer(torch.nn.Linear(2, 2), qk.RTNConfig())

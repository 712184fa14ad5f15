"""Front door 1: GPTQQuantizer(...).quantize(data) on SmolLM2-135M, then save and reload.

    python examples/gptq_quantizer.py
"""

import quantkern as qk
from quantkern.calibration import builtin_text, sample_windows
from quantkern.eval import generate, tokenize_text
from quantkern.models import load_model

model, tok = load_model("smollm2")  # or any HF id / directory / .gguf file
calib = sample_windows(tokenize_text(tok, builtin_text("calibration")), nsamples=32, seq_len=512)

qk.GPTQQuantizer(model, bits=4, group_size=128, actorder=True, use_triton=True).quantize(calib)
path = qk.save_quantized(model, "quantkern-out/example-gptq", tokenizer=tok, overwrite=True)  # a rerun replaces it

reloaded = qk.load_quantized(path)
print(generate(reloaded, tok, "Name three primary colors."))

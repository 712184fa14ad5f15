"""Quantize once, write it for each serving engine: compressed-tensors (vLLM, transformers), GGUF
(llama.cpp), AWQ and GPTQ — every one holding the very codes GPTQ chose.

    python examples/export_for_serving.py

Act-order with static groups keeps each group in the original column order, which is what lets
compressed-tensors and GGUF store the result exactly; group 64 divides every SmolLM2 layer
(576 / 1536 inputs), which AWQ and compressed-tensors need. ``export_format`` checks all of that
before calibration starts, so a setting a format cannot hold fails in a second, not after GPTQ.
"""

import quantkern as qk
from quantkern.calibration import builtin_text, group_batches, normalize_calibration_data, sample_windows
from quantkern.eval import tokenize_text
from quantkern.models import load_model

model, tok = load_model("smollm2")
calib = sample_windows(tokenize_text(tok, builtin_text("calibration")), nsamples=16, seq_len=256)
config = qk.GPTQConfig(bits=4, group_size=64, actorder=True, static_groups=True)
formats = ["compressed-tensors", "gguf", "awq", "gptq"]

q = qk.GPTQQuantizer(model, config)
q.prepare(export_format=formats[0])  # plans the layers and checks them against the format: no data yet
for fmt in formats[1:]:
    q.check_export(fmt)  # the same plan against the other formats
q.calibrate(group_batches(normalize_calibration_data(calib), config.batch_size))
q.convert()

out = "quantkern-out/serving"
paths = {fmt: qk.save_quantized(model, f"{out}/{fmt}" + (".gguf" if fmt == "gguf" else ""), tokenizer=tok,
                                format=fmt, overwrite=True) for fmt in formats}  # a rerun replaces its own output
for fmt, path in paths.items():
    print(f"{fmt:20s} {path}")
print(f"""
vLLM:       vllm serve {paths['compressed-tensors']}      (or {paths['gptq']} / {paths['awq']})
llama.cpp:  llama-cli -m {paths['gguf']} -p "What is the capital of France?"
transformers: AutoModelForCausalLM.from_pretrained("{paths['compressed-tensors']}")""")

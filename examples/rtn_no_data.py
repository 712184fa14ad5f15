"""RTN needs no data: quantize every Linear (except lm_head) to 8 bits per channel and compare logits.

    python examples/rtn_no_data.py
"""

import copy

import torch

import quantkern as qk
from quantkern.models import load_model

model, tok = load_model("smollm2")
dense = copy.deepcopy(model)
qk.RTNQuantizer(model, bits=8, group_size=-1).quantize()

ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
with torch.no_grad():
    a, b = dense(ids).logits, model(ids).logits
print("max |logit difference| at 8 bits:", float((a - b).abs().max()))

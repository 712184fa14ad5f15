"""Front door 2: prepare -> your own calibration loop -> convert, dispatching on the config type.

    python examples/prepare_convert.py
"""

import torch

import quantkern as qk
from quantkern.calibration import builtin_text
from quantkern.models import load_model

model, tok = load_model("smollm2")
config = qk.GPTQConfig(bits=4, group_size=64, sym=False, actorder=True)

model = qk.prepare(model, config)  # validates everything and installs the observers
texts = builtin_text("calibration").split("\n\n")[:64]
with torch.no_grad():
    for text in texts:  # any loop you like: strings, dataloaders, chat templates ...
        enc = tok(text, return_tensors="pt", truncation=True, max_length=512)
        model(**enc)  # returns None while prepared: the forward stops at the first block
model = qk.convert(model, config)
print(model.model.layers[0].mlp.down_proj)

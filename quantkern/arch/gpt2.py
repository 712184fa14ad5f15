"""GPT-2: blocks at ``transformer.h``, LayerNorms ``ln_1`` / ``ln_2`` / ``ln_f``, a fused ``attn.c_attn``
([q | k | v]). Its projections are transformers ``Conv1D`` (``y = x @ W + b`` with ``W [in, out]``), which
the quantizers refuse (see :func:`quantkern.api.targets.plan_targets`: their quantized checkpoints could
not be loaded back); :func:`quantkern.transforms.conv1d_to_linear` turns them into equivalent
``nn.Linear`` layers, after which the scale groups below apply."""

from __future__ import annotations

from .base import LINEAR, Architecture, ScaleGroup, ScaleSpec

GPT2 = Architecture(
    "gpt2", ("gpt2",), blocks="transformer.h",
    scales=ScaleSpec(
        groups=(ScaleGroup("ln_1", ("attn.c_attn",)),
                # attention output channels are linear in V's channels: scale through c_attn's V rows
                ScaleGroup("attn.c_attn", ("attn.c_proj",), LINEAR, prev_part=(2, 3)),
                ScaleGroup("ln_2", ("mlp.c_fc",))),
        no_clip=("attn.c_attn",),  # holds q and k
        conv1d=True,
    ),
    norms=("ln_1", "ln_2", "ln_f"), routers=())

"""OPT: blocks at ``model.decoder.layers``, LayerNorms ``self_attn_layer_norm`` / ``final_layer_norm``
(also the name of the decoder's last norm), a ReLU MLP ``fc1 -> fc2``."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LINEAR, Architecture, ScaleGroup, ScaleSpec


@dataclass(frozen=True)
class OPTArchitecture(Architecture):
    def scale_spec(self, config) -> ScaleSpec | None:
        spec = self.scales
        if spec is not None and getattr(config, "activation_function", "relu") != "relu":
            # fc1 -> fc2 folding relies on ReLU being positively homogeneous
            spec = ScaleSpec(tuple(g for g in spec.groups if g.prev != "fc1"), spec.no_clip, spec.conv1d)
        return spec


OPT = OPTArchitecture(
    "opt", ("opt",), blocks="model.decoder.layers",
    scales=ScaleSpec(
        groups=(
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), LINEAR),
            ScaleGroup("final_layer_norm", ("fc1",)),
            ScaleGroup("fc1", ("fc2",), LINEAR),  # through ReLU
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    ),
    norms=("self_attn_layer_norm", "final_layer_norm"), routers=())

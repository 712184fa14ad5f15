"""No silent skips: every >= 2-D floating-point tensor in the decoder blocks is quantized or skipped
with a reason, and a large one that no rule covers (fused 3-D MoE experts) is refused before
calibration, naming it."""

import pytest
import torch
from torch import nn

import quantkern as qk


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_experts=4,
                         num_experts_per_tok=2)
    return Qwen3MoeForCausalLM(cfg).eval()


def checksums(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# RTN and GPTQ quantize fused experts (tests/api/test_moe.py); the other methods still refuse them
QUANTIZERS = {
    "fp8": lambda m, **kw: qk.FP8Quantizer(m, **kw).quantize([torch.randint(0, 256, (16,)) for _ in range(4)]),
    "w8a8": lambda m, **kw: qk.W8A8Quantizer(m, **kw).quantize([torch.randint(0, 256, (16,)) for _ in range(4)]),
}


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_fused_moe_experts_are_refused_not_left_dense(method):
    model = tiny_qwen3_moe()
    before = checksums(model)
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.mlp\.experts\.gate_up_proj \(2x \[4, 64, 64\], "
                                         r"Qwen3MoeExperts; fused MoE experts, 44\.1% of the blocks"):
        QUANTIZERS[method](model)
    after = checksums(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, qk.QuantLinear) for m in model.modules())


def test_experts_kept_dense_knowingly_are_reported():
    model = tiny_qwen3_moe()
    q = qk.RTNQuantizer(model, bits=4, group_size=32, skip_layers=["lm_head", "experts"])
    q.quantize()
    skipped = dict(q.report["skipped"])
    assert skipped["model.layers.0.mlp.experts.gate_up_proj"] == "matches skip_layers"
    assert skipped["model.layers.1.mlp.experts.down_proj"] == "matches skip_layers"
    assert skipped["model.layers.0.mlp.gate"] == "MoE router (Qwen3MoeTopKRouter), kept dense"
    attn = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64)
    experts = 2 * (4 * 64 * 64 + 4 * 64 * 32)
    router = 2 * 4 * 64
    assert q.report["quantized_share"] == pytest.approx(attn / (attn + experts + router))
    assert "of the decoder blocks' weights" in q.plan.summary()


def test_dense_model_is_fully_accounted(tiny_llama):
    q = qk.RTNQuantizer(tiny_llama, bits=4, group_size=32)
    q.quantize()
    assert q.report["quantized_share"] == 1.0


class Scaled(nn.Module):
    """A Linear with an extra learned 2-D parameter that no rule knows."""

    def __init__(self, lin: nn.Linear, extra_shape):
        super().__init__()
        self.lin = lin
        self.mix = nn.Parameter(torch.zeros(extra_shape))

    def forward(self, x):
        return self.lin(x)


def test_small_unknown_tensors_are_listed_large_ones_refused(tiny_llama):
    mlp = tiny_llama.model.layers[0].mlp
    mlp.down_proj = Scaled(mlp.down_proj, (2, 4))  # 8 values: far under 1% of the blocks
    q = qk.RTNQuantizer(tiny_llama, bits=4, group_size=32)
    q.quantize()
    reason = dict(q.report["skipped"])["model.layers.0.mlp.down_proj.mix"]
    assert reason.startswith("Scaled parameter of shape [2, 4]: not a kind quantkern quantizes")

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    mlp = model.model.layers[1].mlp
    mlp.down_proj = Scaled(mlp.down_proj, (64, 64))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.mix \(1x \[64, 64\], Scaled; "):
        qk.RTNQuantizer(model, bits=4, group_size=32).quantize()

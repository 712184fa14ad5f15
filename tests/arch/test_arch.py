"""Architecture files (quantkern/arch): every registered family passes the same conformance checks on a
tiny random model built from its transformers config, so a new family gets them by being registered:

- its decoder blocks are found at the path its file gives (not by the generic fallback);
- every scale group names modules of a block, with matching shapes, and folding random scales through
  the groups leaves the float model's logits unchanged;
- its explicit norm and router rules pick exactly the modules the generic class-name rules pick (so the
  plan of every model is what it was before the rules became explicit), and every block has a norm;
- MoE families: every fused experts module is found, its declared layout agrees with the flags
  transformers records, every MoE block has a router;
- families with GGUF names: every tensor of the model has a GGUF name.
"""

import copy
import logging

import pytest
import torch
import transformers
from torch import nn

from quantkern.algorithms.awq import fold_into_linear_outputs, fold_into_norm, scale_input_channels
from quantkern.arch import (ARCHITECTURES, GEMMA_NORM, GENERIC, LINEAR, Architecture, architecture_for,
                            find_decoder_blocks, register)
from quantkern.arch.base import generic_is_norm, generic_is_router
from quantkern.arch.moe import experts_layout, experts_shape
from quantkern.transforms import conv1d_to_linear

# One set of small sizes for every family; names a config does not know are kept as plain attributes.
# Multi-head attention (as many KV heads as heads): every scale group applies, v_proj -> o_proj included.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=256, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
           shared_expert_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
           kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
EVAL = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
MODEL_TYPES = sorted(ARCHITECTURES)


def tiny_model(model_type: str) -> nn.Module:
    """A random 2-block model of ``model_type`` (skipped when the installed transformers lacks it)."""
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    kw = {**TINY, **MOE}
    while True:
        try:
            cfg = transformers.AutoConfig.for_model(model_type, **kw)
            break
        except AttributeError as e:  # a derived property without a setter (Falcon's head_dim): leave it derived
            key = next((k for k in kw if f"'{k}'" in str(e)), None)
            if key is None:
                raise
            kw.pop(key)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so that folding into them is exercised
        for name, mod in model.named_modules():
            if generic_is_norm(mod):
                for p in mod.parameters(recurse=False):
                    p.add_(0.1 * torch.randn_like(p))
    return model


def _leaves_with_params(model):
    return {n: m for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}


@pytest.fixture(scope="module", params=MODEL_TYPES)
def family(request):
    model_type = request.param
    return model_type, ARCHITECTURES[model_type], tiny_model(model_type)


def test_blocks_found_at_the_declared_path(family, caplog):
    model_type, arch, model = family
    assert architecture_for(model) is arch
    with caplog.at_level(logging.INFO, logger="quantkern"):
        name, blocks = find_decoder_blocks(model)
    assert arch.blocks is not None and name == arch.blocks, (name, arch.blocks)
    assert len(blocks) == model.config.num_hidden_layers
    assert not caplog.records  # the generic fallback logs; a declared path does not


def test_scale_groups_name_block_modules_with_matching_shapes(family):
    model_type, arch, model = family
    spec = arch.scale_spec(model.config)
    if spec is None:
        return  # AWQ / SmoothQuant refuse the family, naming it
    model = copy.deepcopy(model)
    _, blocks = find_decoder_blocks(model)
    if spec.conv1d:
        assert conv1d_to_linear(blocks) > 0
    with torch.no_grad():
        ref = model(EVAL).logits
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            modules = dict(block.named_modules())
            for grp in spec.groups:
                where = f"{arch.name} block {i}: {grp}"
                assert grp.prev in modules and all(n in modules for n in grp.linears), where
                prev, lins = modules[grp.prev], [modules[n] for n in grp.linears]
                layout = arch.experts_layout(lins[0])
                if layout is not None:  # the norm feeding a sparse MoE block: experts, routers, shared expert
                    from quantkern.api.awq_experts import fold_moe_input_scale

                    h = experts_shape(lins[0], layout)[1]
                    assert prev.weight.shape == (h,) and all(m.in_features == h for m in lins[1:]), where
                    fold_moe_input_scale(block, grp, layout, torch.rand(h, generator=g) + 0.5)
                    continue
                assert all(isinstance(m, nn.Linear) for m in lins), where
                k = lins[0].in_features
                assert all(m.in_features == k for m in lins), where
                if grp.prev_kind == LINEAR:
                    assert isinstance(prev, nn.Linear), where
                    rows = grp.prev_rows(prev.out_features)
                    assert rows.stop - rows.start == k, where
                    fold_into_linear_outputs(prev.weight.data[rows], None if prev.bias is None else prev.bias.data[rows],
                                             s := torch.rand(k, generator=g) + 0.5)
                else:
                    assert arch.is_norm(f"{grp.prev}", prev) and prev.weight.shape == (k,), where
                    fold_into_norm(prev.weight.data, getattr(prev, "bias", None), s := torch.rand(k, generator=g) + 0.5,
                                   1.0 if grp.prev_kind == GEMMA_NORM else 0.0)
                for m in lins:
                    scale_input_channels(m.weight.data, s)
            for n in spec.no_clip:
                assert n in modules, f"{arch.name}: no_clip names {n!r}, not in block {i}"
        out = model(EVAL).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_norms_recognised(family):
    model_type, arch, model = family
    mods = dict(model.named_modules())  # parameter-free norms too (OLMo's LayerNorm)
    explicit = {n for n, m in mods.items() if arch.is_norm(n, m)}
    generic = {n for n, m in mods.items() if generic_is_norm(m)}
    assert explicit == generic, (sorted(explicit - generic), sorted(generic - explicit))
    name, blocks = find_decoder_blocks(model)
    for i in range(len(blocks)):
        assert any(n.startswith(f"{name}.{i}.") for n in explicit), f"block {i} has no norm"


def test_routers_and_experts_found(family):
    model_type, arch, model = family
    mods = _leaves_with_params(model)
    explicit = {n for n, m in mods.items() if arch.is_router(n, m, model)}
    generic = {n for n, m in mods.items() if generic_is_router(n, m, model)}
    assert explicit == generic, (sorted(explicit - generic), sorted(generic - explicit))
    experts = {n: m for n, m in model.named_modules() if arch.experts_layout(m) is not None}
    if arch.experts is None:
        assert not experts and not explicit, f"{arch.name}: MoE modules but no experts layout declared"
        return
    assert experts, f"{arch.name}: declares an experts layout, the model has no fused experts"
    for name, mod in experts.items():
        declared, flags = arch.experts_layout(mod), experts_layout(mod)  # the file's, transformers' flags
        for f in ("transposed", "interleaved", "gate_up_bias", "down_bias", "gate_up", "down"):
            assert getattr(declared, f) == getattr(flags, f), (name, f)
        e, h, i = experts_shape(mod, declared)
        assert (e, h) == (4, model.config.hidden_size)
        parent = name.rpartition(".")[0]
        assert any(r.startswith(parent + ".") for r in explicit), f"{parent}: experts without a router"


def test_gguf_names_cover_every_tensor(family):
    model_type, arch, model = family
    if arch.gguf is None:
        return  # refused by the export check
    gguf = pytest.importorskip("gguf")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf.arch), model.config.num_hidden_layers)
    missing = [p for p, _ in model.named_parameters() if names.get_name(p.rpartition(".")[0]) is None]
    assert not missing, missing
    assert {arch.gguf.permute_heads(n, model.config) for n in ("blk.0.attn_q", "blk.0.attn_k")} <= \
        {model.config.num_attention_heads, model.config.num_key_value_heads}


# -- the registry ----------------------------------------------------------------------------------
def test_unknown_model_falls_back_to_the_generic_rules(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.ln = nn.Linear(8, 8), nn.LayerNorm(8)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "toy"})()
            self.stack, self.pair = nn.ModuleList([Block() for _ in range(3)]), nn.ModuleList([Block(), Block()])

    model = Toy()
    assert architecture_for(model) is GENERIC
    with caplog.at_level(logging.INFO, logger="quantkern"):
        name, blocks = find_decoder_blocks(model)
    assert name == "stack" and len(blocks) == 3
    assert "no architecture for model_type='toy'" in caplog.text
    assert GENERIC.is_norm("stack.0.ln", model.stack[0].ln) and not GENERIC.is_norm("stack.0.lin", model.stack[0].lin)
    with pytest.raises(ValueError, match="cannot find the decoder blocks of Linear"):
        find_decoder_blocks(nn.Linear(2, 2))


def test_a_model_type_belongs_to_one_architecture():
    with pytest.raises(ValueError, match="'llama' is already covered by architecture 'llama'"):
        register(Architecture("another llama", ("llama",), blocks="model.layers"))
    assert ARCHITECTURES["llama"].name == "llama"

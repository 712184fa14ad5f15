"""Device maps (accelerate): quantizing a dispatched model block by block where each block lives, and
loading a quantized checkpoint over several devices. On this CPU-only machine the maps place modules
on "cpu" with accelerate's hooks attached (the same code path as GPUs, minus the copies); the GPU
test splits a model between cuda:0 and the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

import quantkern as qk
from fixtures.quant_models import quantize_linears, tiny_llama, tokens
from quantkern.core import WeightScheme
from quantkern.devices import block_device, dispatch, infer_device_map
from quantkern.io import load_quantized, save_quantized

CPU_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
           "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _hooked(model) -> int:
    return sum(hasattr(m, "_hf_hook") for m in model.modules())


@pytest.fixture
def saved(tmp_path):
    model = quantize_linears(tiny_llama(), WeightScheme(4, 32, False, True))
    return model, save_quantized(model, tmp_path / "q")


@pytest.mark.parametrize("device_map", [CPU_MAP, "auto", "sequential"])
def test_load_with_a_device_map_gives_the_same_logits(saved, device_map):
    model, path = saved
    loaded = load_quantized(path, device_map=device_map)
    assert _hooked(loaded) > 0 and set(loaded.hf_device_map.values()) == {"cpu"}
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, load_quantized(path)(x).logits)  # same kernels, same numbers
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert block_device(loaded.model.layers[1], None) == torch.device("cpu")


@pytest.mark.parametrize("device_map,match", [
    ({**CPU_MAP, "model.layers.1": "disk"}, "on 'disk'"),
    ({**CPU_MAP, "model.layers.7": "cpu"}, "'model.layers.7', which is not a module"),
    ({k: v for k, v in CPU_MAP.items() if k != "model.layers.1"}, "places no device for .*model.layers.1"),
    ({**CPU_MAP, "model.layers.1": "cuda:7"}, "this machine has"),
    ("fastest", "device_map must be a dict or one of"),
])
def test_bad_device_maps_are_refused(saved, device_map, match):
    if not isinstance(device_map, str) and "cuda:7" in device_map.values() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8+ GPUs")
    with pytest.raises(ValueError, match=match):
        load_quantized(saved[1], device_map=device_map)


def test_gptq_on_a_dispatched_model_matches_the_plain_model(token_data):
    plain = tiny_llama()
    hooked = dispatch(copy.deepcopy(plain), CPU_MAP)
    assert _hooked(hooked) > 0
    cfg = qk.GPTQConfig(bits=4, group_size=32, actorder=True)
    for m in (plain, hooked):
        qk.GPTQQuantizer(m, cfg, verbose=False).quantize(token_data)
    sa, sb = plain.state_dict(), hooked.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(hooked(x).logits, plain(x).logits)


def test_a_linear_placed_by_the_map_keeps_its_hook_when_replaced():
    model = dispatch(tiny_llama(), {**{k: v for k, v in CPU_MAP.items() if k != "model.layers.1"},
                                    **{f"model.layers.1.{n}": "cpu" for n in ("self_attn", "mlp.gate_proj",
                                       "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", "input_layernorm",
                                       "post_attention_layernorm")}})
    qk.RTNQuantizer(model, bits=4, group_size=32, verbose=False).quantize()
    down = model.model.layers[1].mlp.down_proj
    assert type(down).__name__ == "QuantLinear" and hasattr(down, "_hf_hook")


def test_offloaded_blocks_are_refused_before_calibration(tmp_path, token_data):
    from accelerate import dispatch_model

    model = tiny_llama()
    dm = {**CPU_MAP, "model.layers.1": "disk"}
    model = dispatch_model(model, dm, main_device="cpu", offload_dir=str(tmp_path / "off"))
    model.hf_device_map = dm
    with pytest.raises(ValueError, match=r"model\.layers\.1\..* is offloaded by accelerate.*--offload"):
        qk.GPTQQuantizer(model, bits=4, group_size=32, verbose=False).quantize(token_data)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # nothing was touched


def test_infer_device_map_on_this_machine():
    dm = infer_device_map(tiny_llama(), "balanced")
    assert dm and set(dm.values()) <= {"cpu"} | set(range(torch.cuda.device_count()))


@pytest.mark.gpu
def test_gpu_and_cpu_split_quantize_and_run(token_data):
    plain = tiny_llama()
    split = {**CPU_MAP, "model.embed_tokens": 0, "model.layers.0": 0, "lm_head": 0}
    model = dispatch(copy.deepcopy(plain), split)
    assert next(model.model.layers[0].parameters()).device.type == "cuda"
    assert next(model.model.layers[1].parameters()).device.type == "cpu"
    cfg = qk.GPTQConfig(bits=4, group_size=32)
    qk.GPTQQuantizer(model, cfg, verbose=False).quantize(token_data)
    qk.GPTQQuantizer(plain, cfg, verbose=False).quantize(token_data)
    assert model.model.layers[0].mlp.up_proj.qweight.device.type == "cuda"
    assert model.model.layers[1].mlp.up_proj.qweight.device.type == "cpu"
    x = tokens()
    with torch.no_grad():
        a, b = model(x).logits.float().cpu(), plain(x).logits.float()
    assert (a - b).norm() / b.norm() < 0.05  # GPU matmuls round differently during calibration

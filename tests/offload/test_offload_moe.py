"""Streaming quantization of MoE models (issue #15): fused experts of transformers 5, read from a source
that stores them fused or per expert under the original HF names, quantized block by block with GPTQ
(routing-aware) or RTN, written as ``save_quantized`` writes the in-memory model (same tensors, same
configs), resumable, one block materialised at a time.

Tiny random models of ``tests/api/test_moe.py``: Qwen3-MoE, Mixtral (``block_sparse_moe`` / ``w1 w3 w2``
in its checkpoints) and DeepSeek-V3 (a first dense layer, shared experts). transformers 5.24's
``save_pretrained`` writes the per-expert layout (checked here against the hand-written one); the
fused layout is the model's own state dict.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import quantkern as qk
from api.test_moe import calib, ids, tiny_moe
from offload.test_offload import assert_same_checkpoint, tensors_of
from quantkern import GPTQConfig, GPTQQuantizer, RTNConfig, RTNQuantizer
from quantkern.offload import quantize_streaming

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]
# (the sparse block's name in HF checkpoints, the per-expert (gate, up, down) names)
HF_NAMES = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
            "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
            "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
METHODS = {"gptq": lambda **kw: GPTQConfig(bits=4, group_size=32, actorder=True, batch_size=4, **kw),
           "rtn": lambda **kw: RTNConfig(bits=4, group_size=32, sym=False, **kw)}
DATA = calib(8)


def write_source(model, path: Path, per_expert: bool) -> Path:
    """A dense source directory by hand: ``config.json`` + one safetensors file holding the model's
    state dict (fused experts), or with every fused experts tensor split per expert under the HF names
    (gate = rows [0, I) of gate_up, up = rows [I, 2I)) and the family's sparse-block name."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    sd = {k: t.detach().clone().contiguous() for k, t in model.state_dict().items()}
    if per_expert:
        moe, (g, u, d) = HF_NAMES[model.config.model_type]
        out = {}
        for k, t in sd.items():
            k2 = k.replace(".mlp.", f".{moe}.")
            if re.search(r"\.experts\.(gate_up|down)_proj$", k):
                base = k2.rsplit(".", 1)[0]
                for e in range(t.shape[0]):
                    if k.endswith("gate_up_proj"):
                        half = t.shape[1] // 2
                        out[f"{base}.{e}.{g}.weight"] = t[e, :half].clone()
                        out[f"{base}.{e}.{u}.weight"] = t[e, half:].clone()
                    else:
                        out[f"{base}.{e}.{d}.weight"] = t[e].clone()
            else:
                out[k2] = t
        sd = out
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is several times faster here (both paths of
    every comparison run in this process, with the same thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{family: (dense model, {"fused": dir, "per_expert": dir})}"""
    root = tmp_path_factory.mktemp("moe_src")
    out = {}
    for fam in FAMILIES:
        m = tiny_moe(fam)
        out[fam] = (m, {kind: write_source(m, root / fam / kind, kind == "per_expert")
                        for kind in ("fused", "per_expert")})
    return out


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory):
    """{(family, method): (in-memory quantized model, saved checkpoint, report)}, made lazily."""
    root = tmp_path_factory.mktemp("moe_ref")
    cache = {}

    def get(fam, method, **kw):
        key = (fam, method, tuple(sorted(kw.items())))
        if key not in cache:
            cfg = METHODS[method](**kw)
            model = copy.deepcopy(sources[fam][0])
            if method == "gptq":
                q = GPTQQuantizer(model, cfg, use_triton=False, verbose=False)
                q.quantize(DATA)
            else:
                q = RTNQuantizer(model, cfg, use_triton=False, verbose=False)
                q.quantize()
            path = qk.save_quantized(model, root / f"{fam}-{method}-{len(cache)}",
                                     checkpoint_format="gptq" if cfg.sym else "gptq_v2")
            cache[key] = (model, path, q.report)
        return cache[key]

    return get


def test_hand_written_per_expert_source_is_what_save_pretrained_writes(sources, tmp_path):
    """transformers 5.24's save_pretrained writes MoE experts per expert under the original HF names
    (and Mixtral's router as block_sparse_moe.gate): the per-expert source of these tests is that."""
    for fam in FAMILIES:
        model, dirs = sources[fam]
        model.save_pretrained(tmp_path / fam)
        got, want = tensors_of(tmp_path / fam), tensors_of(dirs["per_expert"])
        assert sorted(got) == sorted(want), fam
        assert all(torch.equal(got[k], want[k]) for k in got), fam
        assert not any("gate_up_proj" in k for k in got)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_moe_equals_in_memory(sources, references, tmp_path, family, layout, method):
    model, path, ref_report = references(family, method)
    report = {}
    out = quantize_streaming(sources[family][1][layout], METHODS[method](), DATA if method == "gptq" else None,
                             tmp_path / "q", verbose=False, report=report)
    assert_same_checkpoint(out, path)
    keys = tensors_of(out)
    moe, (g, u, d) = HF_NAMES[family]
    assert {f"model.layers.1.{moe}.experts.3.{p}.qweight" for p in (g, u, d)} <= set(keys)
    assert not any("gate_up_proj" in k for k in keys)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k, f in index.items() if f.startswith("model-00003")} == \
        {k for k in keys if k.startswith("model.layers.1.")}  # the block's experts in the block's shard
    if method == "gptq":
        assert set(report) == {"gptq_losses", "expert_tokens", "expert_fallbacks"}
        assert all(report[k] == ref_report[k] for k in report)
        assert any(".experts.3.down_proj" in k for k in report["gptq_losses"])
    else:
        assert report == {}
    loaded, ref_loaded = qk.load_quantized(out), qk.load_quantized(path)
    x = ids()
    with torch.no_grad():
        got = loaded(x).logits
        assert torch.equal(got, ref_loaded(x).logits)
        assert torch.equal(got, model(x).logits)


def test_moe_resume_after_interruption_with_fallbacks(sources, references, tmp_path):
    """Stopped after block 0 (a callback raising, as a kill would leave it), then resumed: the same
    checkpoint as in memory, and the report (expert tokens, fallbacks of the first run's block too)."""

    class Stop(Exception):
        pass

    def stop_after_0(info):
        if info["block"] == 0:
            raise Stop

    src = sources["qwen3_moe"][1]["per_expert"]
    cfg = METHODS["gptq"](min_expert_tokens=120)
    out = tmp_path / "q"
    with pytest.raises(Stop):
        quantize_streaming(src, cfg, DATA, out, verbose=False, callback=stop_after_0)
    manifest = json.loads((tmp_path / ".q.partial" / "manifest.json").read_text())
    assert manifest["finished"] == [0] and set(manifest["reports"]) == {"0"}
    seen, report = [], {}
    quantize_streaming(src, cfg, DATA, out, verbose=False, callback=lambda i: seen.append(i["block"]), report=report)
    assert seen == [1]
    _, path, ref_report = references("qwen3_moe", "gptq", min_expert_tokens=120)
    assert_same_checkpoint(out, path)
    fb = ref_report["expert_fallbacks"]
    assert any(k.startswith("model.layers.0.") for k in fb) and any(k.startswith("model.layers.1.") for k in fb)
    assert all(report[k] == ref_report[k] for k in ("gptq_losses", "expert_tokens", "expert_fallbacks"))


def _drop(src: Path, dst: Path, name: str) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    t = tensors_of(src)
    del t[name]
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_expert_tensor_is_named_before_any_block_work(sources, tmp_path, monkeypatch):
    import quantkern.offload.source as source_mod

    reads = []
    monkeypatch.setattr(source_mod, "open_safetensors", lambda f: reads.append(f) or pytest.fail("a tensor was read"))
    dirs = sources["mixtral"][1]
    bad = _drop(dirs["per_expert"], tmp_path / "per", "model.layers.1.block_sparse_moe.experts.2.w3.weight")
    for cfg, data in ((METHODS["gptq"](), DATA), (METHODS["rtn"](), None)):
        with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight' "
                                             r"\(block 1: expert 2 of model\.layers\.1\.mlp\.experts, 4 experts"):
            quantize_streaming(bad, cfg, data, tmp_path / "o", verbose=False)
    bad = _drop(dirs["fused"], tmp_path / "fused", "model.layers.0.mlp.experts.down_proj")
    with pytest.raises(ValueError, match=r"block 0: fused experts of model\.layers\.0\.mlp\.experts; found neither "
                                         r"'model\.layers\.0\.mlp\.experts\.down_proj' / "
                                         r"'model\.layers\.0\.block_sparse_moe\.experts\.down_proj' nor per-expert "
                                         r"tensors model\.layers\.0\.block_sparse_moe\.experts\.\{e\}\.w2\.weight"):
        quantize_streaming(bad, METHODS["rtn"](), None, tmp_path / "o", verbose=False)
    assert reads == [] and not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_one_block_materialised_at_a_time(sources, tmp_path, monkeypatch):
    """Proxy of peak memory: at every tensor read and after every block, the parameters not on the meta
    device (in the skeleton, and in the dense modules the plan still references) belong to one block at
    most, the one being read; each block's source tensors are read once, block after block."""
    import quantkern.offload.source as source_mod
    import quantkern.offload.stream as stream_mod

    seen = {}
    build, plan = stream_mod.build_skeleton, GPTQQuantizer.plan_blocks

    def build_skeleton(*a, **kw):
        seen["model"] = build(*a, **kw)
        return seen["model"]

    def plan_blocks(self):
        plan(self)
        seen["q"] = self

    monkeypatch.setattr(stream_mod, "build_skeleton", build_skeleton)
    monkeypatch.setattr(GPTQQuantizer, "plan_blocks", plan_blocks)

    def live() -> dict[int, int]:
        """{block: its materialised parameters} (skeleton block + planned modules of the block)."""
        q, out = seen["q"], {}
        for i, block in enumerate(q.blocks):
            p = f"{q.blocks_name}.{i}."
            mods = [block] + [m for n, m in q.plan.quantize.items() if n.startswith(p)] + \
                [s.module for n, s in q.plan.experts.items() if n.startswith(p)]
            params = {id(t): t for m in mods for t in m.parameters()}
            n = sum(t.numel() for t in params.values() if t.device.type != "meta")
            if n:
                out[i] = n
        return out

    events = []
    opener = source_mod.open_safetensors

    class Recording:
        def __init__(self, f):
            self.h = opener(f)

        def __enter__(self):
            self.h.__enter__()
            return self

        def __exit__(self, *exc):
            return self.h.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_tensor(self, name):
            if "model" in seen and "q" in seen:
                events.append(("read", name, live()))
            return self.h.get_tensor(name)

    monkeypatch.setattr(source_mod, "open_safetensors", Recording)
    model, dirs = sources["deepseek_v3"]
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in model.model.layers]
    quantize_streaming(dirs["per_expert"], METHODS["gptq"](), DATA, tmp_path / "q", verbose=False,
                       callback=lambda info: events.append(("done", info["block"], live())))
    order = []
    for kind, what, now in events:
        if kind == "done":
            assert now == {}, (what, now)  # the block and the modules it replaced are released
            continue
        m = re.match(r"model\.layers\.(\d+)\.", what)
        if m is None:  # embeddings, norms, saved activations: no block may be live
            assert now == {}, (what, now)
            continue
        i = int(m.group(1))
        order.append((i, what))
        assert set(now) <= {i}, (what, now)
        assert now.get(i, 0) <= block_sizes[i]
    names = [n for _, n in order]
    assert len(names) == len(set(names))  # each block tensor read once
    assert set(names) == {k for k in tensors_of(dirs["per_expert"]) if k.startswith("model.layers.")}
    assert [i for i, _ in order] == sorted(i for i, _ in order)
    assert {i for i, _ in order} == {0, 1}


def test_budget_counts_experts_and_per_expert_hessians(sources):
    """DeepSeek-V3 tiny: block 0 is dense, block 1 MoE (4 experts, H=64, I=32). The MoE block's need
    holds its experts' weights and the E+1 (per expert + shared all-token) H x H fp32 Hessians."""
    from quantkern.io.load import build_skeleton
    from quantkern.offload.stream import _block_need, _check_budget, _largest_need

    model, dirs = sources["deepseek_v3"]
    cfg = METHODS["gptq"]()
    skel = build_skeleton(json.loads((dirs["fused"] / "config.json").read_text()), None)
    q = GPTQQuantizer(skel, cfg, use_triton=False, verbose=False)
    GPTQQuantizer.plan_blocks(q)
    e, h, i = 4, 64, 32
    need0, _ = _block_need(q, 0, None, 4, "gptq")
    need1, what = _block_need(q, 1, None, 4, "gptq")
    weights1 = 4 * sum(p.numel() for p in model.model.layers[1].parameters())
    assert weights1 > 4 * 3 * e * h * i  # the fused experts' parameters are counted
    assert need1 >= weights1 + 4 * (e + 1) * h * h
    assert need1 > need0 and _largest_need(q, None, 4, "gptq")[1].startswith("block 1:")
    assert f"{e} experts: {4 * (e + 1) * h * h / 2**20:.1f} MiB of {h}^2 gate/up Hessians" in what
    assert f"{4 * e * i * i / 2**20:.1f} MiB of {i}^2 down Hessians" in what
    with pytest.raises(ValueError, match=r"one decoder block needs about .*\(block 1: weights"):
        _check_budget(q, None, 4, torch.device("cpu"), (need0 + need1) // 2, "gptq")
    _check_budget(q, None, 4, torch.device("cpu"), need1, "gptq")
    rtn, _ = _block_need(q, 1, None, 4, "rtn")
    assert weights1 + 4 * 3 * e * h * i <= rtn < need1  # RTN: the experts' int32 codes, no Hessians


def test_dense_experts_block_overrides_and_rtn_resume(sources, tmp_path):
    """Mixtral, RTN, layer 1's experts kept dense (skip_layers), layer 0's 8-bit g16, stopped after
    block 0 and resumed (with offload="cpu": the source read into memory first): layer 1 has no quantized experts, yet the in-memory save renames its keys
    (router and fused experts under block_sparse_moe) as soon as the model holds quantized experts; the
    base scheme (8-bit: the experts are most of the Linears written) and the GPTQModel ``dynamic``
    entries count block 0's experts, finished by the first run, through the meta QuantExperts
    stand-ins."""

    class Stop(Exception):
        pass

    def stop_after_0(info):
        if info["block"] == 0:
            raise Stop

    model, dirs = sources["mixtral"]
    cfg = RTNConfig(bits=4, group_size=32, skip_layers=["lm_head", "model.layers.1.mlp.experts"],
                    overrides={"*.experts": {"bits": 8, "group_size": 16}})
    ref = copy.deepcopy(model)
    RTNQuantizer(ref, cfg, use_triton=False, verbose=False).quantize()
    path = qk.save_quantized(ref, tmp_path / "ref", checkpoint_format="gptq")
    with pytest.raises(Stop):
        quantize_streaming(dirs["per_expert"], cfg, None, tmp_path / "q", verbose=False, callback=stop_after_0)
    out = quantize_streaming(dirs["per_expert"], cfg, None, tmp_path / "q", offload="cpu", verbose=False)
    assert_same_checkpoint(out, path)
    keys = tensors_of(out)
    assert "model.layers.1.block_sparse_moe.experts.gate_up_proj" in keys  # dense, fused, renamed
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert "model.layers.0.block_sparse_moe.experts.3.w2.qweight" in keys
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (8, 16)
    assert any("self_attn" in k and v.get("bits") == 4 for k, v in qc["dynamic"].items()), qc
    x = ids()
    with torch.no_grad():
        assert torch.equal(qk.load_quantized(out)(x).logits, ref(x).logits)

"""Per-layer overrides for every method (``overrides={pattern: {setting: value}}``, ``--override`` on the
CLI): RTN and GPTQ here (the calibrated families' own tests cover theirs), planned and validated before
calibration, honoured by the quantizer, written to the checkpoint (GPTQModel ``dynamic``) and read back."""

import pytest
import torch

import quantkern as qk
from quantkern.cli import main, parse_overrides

OVERRIDES = {"*.down_proj": {"bits": 8}, "model.layers.0.self_attn.v_proj": {"group_size": 32, "sym": False}}


def _schemes(model) -> dict[str, tuple]:
    return {n: (m.bits, m.group_size, m.sym) for n, m in model.named_modules() if isinstance(m, qk.QuantLinear)}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_overrides_are_quantized_saved_and_loaded(method, tiny_llama, token_data, tmp_path):
    cfg = (qk.RTNConfig if method == "rtn" else qk.GPTQConfig)(bits=4, group_size=64, overrides=OVERRIDES)
    q = qk.api.quantizer_for(cfg)(tiny_llama, cfg, verbose=False)
    q.quantize(None if method == "rtn" else token_data)
    got = _schemes(tiny_llama)
    assert got["model.layers.1.mlp.down_proj"] == (8, 64, True) and got["model.layers.0.mlp.down_proj"][0] == 8
    assert got["model.layers.0.self_attn.v_proj"] == (4, 32, False)
    assert got["model.layers.1.self_attn.v_proj"] == got["model.layers.0.mlp.up_proj"] == (4, 64, True)
    path = qk.save_quantized(tiny_llama, tmp_path / method)
    loaded = qk.load_quantized(path)
    assert _schemes(loaded) == got
    ids = torch.arange(16)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tiny_llama(ids).logits, rtol=0, atol=0)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_an_override_that_cannot_pack_is_refused_before_calibration(tiny_llama):
    with pytest.raises(ValueError, match=r"o_proj \(64->64, override bits=4, group_size=128\): group_size=128 > "
                                         r"in_features=64"):
        qk.GPTQQuantizer(tiny_llama, bits=4, group_size=32, overrides={"*.o_proj": {"group_size": 128}},
                         verbose=False).prepare()
    # and an override can rescue a layer the base settings cannot pack
    q = qk.RTNQuantizer(tiny_llama, bits=4, group_size=128, overrides={"*.layers.*": {"group_size": 64}},
                        verbose=False)
    q.quantize()
    assert {m.group_size for m in tiny_llama.modules() if isinstance(m, qk.QuantLinear)} == {64}


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "w8a8"])
def test_an_override_that_changes_nothing_is_refused_before_calibration(method, tiny_llama):
    """A pattern that matches no quantized layer (a regex where a glob is expected, a typo, a skipped
    layer) or only layers an earlier pattern takes would be silently ignored: refused in prepare, naming it."""
    cls = {"rtn": qk.RTNQuantizer, "gptq": qk.GPTQQuantizer, "awq": qk.AWQQuantizer, "w8a8": qk.W8A8Quantizer}[method]
    key = {"w8a8": {"act_static": True}}.get(method, {"bits": 8})
    base = {} if method == "w8a8" else {"group_size": 32}
    before = {n: t.clone() for n, t in tiny_llama.state_dict().items()}
    for overrides, what in [({r"model\.layers\.0\.mlp\.down_proj": key}, "matches no quantized layer"),
                            ({"*.down_prj": key}, "'\\*.down_prj' matches no quantized layer"),
                            ({"lm_head": key}, "'lm_head' matches no quantized layer"),
                            ({"*.mlp.*": key, "*.down_proj": key}, "'\\*.down_proj' only layers an earlier pattern")]:
        with pytest.raises(ValueError, match=what):
            cls(tiny_llama, overrides=overrides, verbose=False, **base).prepare()
    assert all(torch.equal(t, before[n]) for n, t in tiny_llama.state_dict().items())  # nothing changed
    q = cls(tiny_llama, overrides={"model.layers.0.mlp.down_proj": key}, verbose=False, **base)  # exact names apply
    q.prepare()


def test_override_keys_are_per_method():
    with pytest.raises(ValueError, match=r"RTNConfig cannot override \['actorder'\] per layer"):
        qk.RTNConfig(overrides={"*": {"actorder": True}})
    assert qk.GPTQConfig(overrides={"*.q_proj": {"actorder": True}}).for_layer("a.q_proj").actorder


def test_cli_override_parsing():
    assert parse_overrides(["*.down_proj:bits=8", "*.self_attn.*:bits=8,group_size=64,sym=false"]) == (
        ("*.down_proj", {"bits": 8}), ("*.self_attn.*", {"bits": 8, "group_size": 64, "sym": False}))
    for bad in ("bits=8", "*.down_proj:", "*.down_proj:bits"):
        with pytest.raises(ValueError, match="expected PATTERN:KEY=VALUE"):
            parse_overrides([bad])


def test_cli_quantize_with_overrides(cli_serves_tiny_llama, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(["quantize", "--model", "tiny", "--method", "rtn", "--group-size", "64", "--override",
                 "*.down_proj:bits=8", "--out", str(out)]) == 0
    loaded = qk.load_quantized(out)
    assert loaded.model.layers[1].mlp.down_proj.bits == 8 and loaded.model.layers[1].mlp.up_proj.bits == 4
    assert main(["quantize", "--model", "tiny", "--method", "rtn", "--override", "*.down_proj:nbits=8",
                 "--out", str(tmp_path / "x")]) == 2
    assert "cannot override ['nbits'] per layer" in capsys.readouterr().err


def _produced_spec(mod):
    ks = mod.kernel_spec()
    return ks.scheme, ks.activation


@pytest.mark.parametrize("cfg", [
    qk.RTNConfig(bits=4, group_size=64, overrides=OVERRIDES),
    qk.GPTQConfig(bits=3, group_size=32, actorder=True, overrides={"*.down_proj": {"bits": 8, "actorder": False}}),
    qk.AWQConfig(bits=4, group_size=32), qk.W8A8Config(overrides={"*.o_proj": {"act_static": True}}),
    qk.SmoothQuantConfig(), qk.FP8Config(overrides={"*.down_proj": {"act_dtype": None}}),
    qk.PTQConfig(), qk.ZeroQuantConfig(w_bits=4, w_group_size=32), qk.FP4Config(),
], ids=lambda c: type(c).__name__)
def test_site_plan_is_what_the_quantizer_produces(cfg, tiny_llama, token_data):
    """The {Site: Spec} plan made before calibration names every quantized weight with the weight and
    activation schemes of the module that replaces it."""
    q = qk.api.quantizer_for(cfg)(tiny_llama, cfg, verbose=False)
    q.quantize(token_data if q.needs_data else None)
    plan = dict(q.sites)  # made by prepare(), before calibration
    assert plan and all(s.expert is None and s.param == "weight" for s in plan)
    produced = {n: m for n, m in tiny_llama.named_modules() if hasattr(m, "kernel_spec") and n}
    assert {s.name for s in plan} == set(produced)
    for site, spec in plan.items():
        assert (spec.weight, spec.activation) == _produced_spec(produced[site.name]), site
    assert sum(q.report["specs"].values()) == len(plan)

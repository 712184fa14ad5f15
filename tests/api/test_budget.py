"""Mixed precision under a size budget (issue #16): sizes, sensitivity, allocation, the planner, the
checkpoints it leads to and the CLI."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import quantkern as qk
from quantkern.algorithms.gptq import GPTQ
from quantkern.algorithms.sensitivity import Option, _weighted_error, allocate, candidate_errors
from quantkern.api.budget import default_candidates, parse_target_size
from quantkern.core import WeightScheme
from quantkern.formats.sizes import stored_bytes
from quantkern.io.inspect import format_inspection, inspect_checkpoint


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKERN_CACHE", str(tmp_path / "cache"))


def _gptq(n=48, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    gp = GPTQ(w)
    gp.add_batch(torch.randn(300, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3)
    return gp


# -- sizes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_stored_bytes_match_the_written_checkpoint_layer_by_layer(tiny_llama, token_data, tmp_path, fmt):
    """Every (bits, group, sym) at once in one model: the size model counts exactly the bytes of the
    tensors each layer writes (inspect reads them from the headers)."""
    schemes = [(2, 32, False), (3, 64, True), (4, 48, False), (8, 32, True), (4, -1, True), (3, 32, False),
               (2, 64, True)]
    names = [n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    overrides = {n: dict(zip(("bits", "group_size", "sym"), schemes[i % len(schemes)])) for i, n in enumerate(names)}
    if fmt == "compressed-tensors":  # (ragged groups are GPTQ-only; 128 does not divide 64)
        overrides = {n: {**o, "group_size": 32 if o["group_size"] == 48 else o["group_size"]}
                     for n, o in overrides.items()}
    dims = {n: (m.in_features, m.out_features) for n, m in tiny_llama.named_modules() if n in overrides}
    qk.RTNQuantizer(tiny_llama, overrides=overrides, verbose=False).quantize()
    qk.save_quantized(tiny_llama, tmp_path / "ck", format=fmt)
    info = inspect_checkpoint(tmp_path / "ck")
    assert info["consistent"], info["problems"]
    by_name = {la["name"]: la for la in info["layers"]}
    for name, o in overrides.items():
        k, n = dims[name]
        assert by_name[name]["bytes"] == stored_bytes(fmt, WeightScheme(o["bits"], o["group_size"], o["sym"]), k, n)
        assert by_name[name]["scheme"] == WeightScheme(o["bits"], o["group_size"], o["sym"]).describe()
    text = format_inspection(info)
    assert "per layer:" in text and f"bpw:        {info['bpw']:.3f}" in text
    table = format_inspection(info, layers=True).splitlines()
    name = names[0]
    k, n = dims[name]
    line = next(li for li in table if li.strip().startswith(name + " "))
    assert f"{by_name[name]['bytes']} B" in line and f"{8 * by_name[name]['bytes'] / (k * n):.3f} bpw" in line
    back = qk.load_quantized(tmp_path / "ck")  # every scheme combination reloads bit-identically
    for name in overrides:
        got, want = back.get_submodule(name).to_quantized(), tiny_llama.get_submodule(name).to_quantized()
        assert got.scheme == want.scheme and torch.equal(got.dequantize(), want.dequantize()), name


def test_parse_target_size():
    assert parse_target_size("20GiB") == 20 * 2**30
    assert parse_target_size("1.5MB") == 1_500_000
    assert parse_target_size(123) == 123
    for bad in ("lots", "-3GB", 0, True):
        with pytest.raises(ValueError, match="target_size"):
            parse_target_size(bad)


# -- sensitivity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_stacked_candidate_errors_equal_one_gptq_run_per_scheme(act_order, static):
    gp = _gptq()
    schemes = [WeightScheme(b, gs, s, act_order=act_order) for b, gs, s in
               [(2, 32, False), (3, 32, True), (4, 64, False), (8, 96, True), (4, -1, True), (3, 40, False)]]
    got = candidate_errors(gp, schemes, act_order=act_order, static_groups=static, blocksize=128)
    narrow = candidate_errors(gp, schemes, act_order=act_order, static_groups=static)  # (the faster default)
    assert narrow == pytest.approx(got, rel=0.03)  # (rounding ties may fall the other way)
    for s, e in zip(schemes, got):
        qw, _ = gp.quantize(s, static_groups=static)
        ref = _weighted_error(gp.weight.float(), qw.dequantize(), gp.H, None)
        assert e == pytest.approx(ref, rel=1e-5), s.describe()
    assert got[0] > got[2] > got[3]  # more bits, less error


def test_candidate_errors_weights_and_rtn():
    gp = _gptq()
    s = [WeightScheme(3, 32, False)]
    f = torch.rand(gp.weight.shape[0]) * 3
    plain = candidate_errors(gp, s, method="rtn")[0]
    weighted = candidate_errors(gp, s, method="rtn", row_weights=f)[0]
    from quantkern.algorithms.rtn import quantize_rtn

    d = gp.weight.float() - quantize_rtn(gp.weight, s[0], torch.float16).dequantize()
    per_row = ((d @ gp.H) * d).sum(1) / 2
    assert plain == pytest.approx(float(per_row.sum()), rel=1e-5)
    assert weighted == pytest.approx(float((per_row * f).sum()), rel=1e-5)
    assert candidate_errors(gp, s)[0] < plain  # GPTQ beats RTN on its own objective


# -- allocation ----------------------------------------------------------------------------------------
def _brute(sites, budget):
    best = None
    for combo in itertools.product(*[range(len(s)) for s in sites]):
        b = sum(s[i].bytes for s, i in zip(sites, combo))
        if b <= budget:
            e = sum(s[i].error for s, i in zip(sites, combo))
            best = e if best is None or e < best else best
    return best


def test_allocation_is_feasible_and_near_the_exhaustive_optimum():
    rng = random.Random(0)
    gaps = []
    for trial in range(60):
        sites = []
        for _ in range(rng.randint(2, 5)):
            opts = [Option(rng.randint(10, 100), rng.random() * rng.choice([1, 10, 100])) for _ in range(rng.randint(1, 5))]
            sites.append(opts)
        lo = sum(min(o.bytes for o in s) for s in sites)
        hi = sum(max(o.bytes for o in s) for s in sites)
        budget = rng.randint(lo, hi)
        seeds = [[min(r, len(s) - 1) for s in sites] for r in range(5)]
        choice = allocate(sites, budget, seeds)
        used = sum(s[i].bytes for s, i in zip(sites, choice))
        err = sum(s[i].error for s, i in zip(sites, choice))
        assert used <= budget
        opt = _brute(sites, budget)
        assert err >= opt - 1e-9
        for uni in seeds:  # never worse than a seed that fits
            if sum(s[i].bytes for s, i in zip(sites, uni)) <= budget:
                assert err <= sum(s[i].error for s, i in zip(sites, uni)) + 1e-9
        gaps.append(err / opt - 1 if opt > 0 else 0)
    assert sum(gaps) / len(gaps) < 0.02 and sorted(gaps)[len(gaps) // 2] == 0  # median: exactly optimal
    with pytest.raises(ValueError, match="below the smallest plan"):
        allocate([[Option(10, 1.0)], [Option(10, 1.0)]], 19)


def test_allocation_spends_more_budget_for_less_error():
    rng = random.Random(1)
    sites = [[Option(b, rng.random() * 2 ** -(b / 10)) for b in (20, 30, 40, 80)] for _ in range(50)]
    errs = []
    for budget in range(1000, 4001, 250):
        c = allocate(sites, budget)
        errs.append(sum(s[i].error for s, i in zip(sites, c)))
    assert all(a >= b for a, b in zip(errs, errs[1:])) and errs[0] > errs[-1]


# -- the planner -----------------------------------------------------------------------------------------
def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_planned_checkpoint_meets_the_budget_and_reloads_bit_identically(tiny_llama, token_data, tmp_path, fmt):
    base = qk.GPTQConfig(actorder=True, static_groups=fmt == "compressed-tensors", group_size=32)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    plan = qk.BudgetPlanner(target_bpw=3.5, format=fmt, verbose=False).plan(tiny_llama, token_data, base)
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())  # measured, not changed
    assert not hasattr(tiny_llama, "quantkern_config")
    assert plan.measured and 3.4 < plan.bpw <= 3.5 and len(plan.schemes()) > 1
    m = _copy(tiny_llama)
    qk.GPTQQuantizer(m, plan.config, verbose=False).quantize(token_data)
    qk.save_quantized(m, tmp_path / "ck", format=fmt)
    info = inspect_checkpoint(tmp_path / "ck")
    assert info["consistent"], info["problems"]
    assert info["quantized_bytes"] == plan.quantized_bytes and info["total_bytes"] == plan.total_bytes
    assert abs(info["bpw"] - plan.bpw) < 0.01
    by_name = {la["name"]: la for la in info["layers"]}
    for name, c in plan.sites.items():  # (compressed-tensors has no g_idx: its groups are plain, act-order or not)
        want = c.scheme.describe() if fmt == "gptq" else WeightScheme(c.scheme.bits, c.scheme.group_size,
                                                                       c.scheme.sym).describe()
        assert by_name[name]["scheme"] == want
    back = qk.load_quantized(tmp_path / "ck")
    for name, mod in m.named_modules():
        if isinstance(mod, qk.QuantLinear):
            got = back.get_submodule(name).to_quantized()
            want = mod.to_quantized()
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
            assert torch.equal(got.dequantize(), want.dequantize()), name
    # a new budget re-plans from the cache, without measuring again
    plan2 = qk.BudgetPlanner(target_bpw=4.5, format=fmt, verbose=False).plan(tiny_llama, token_data, base)
    assert not plan2.measured and plan2.bpw > plan.bpw and plan2.estimated_error < plan.estimated_error


def test_both_front_doors_take_the_plan(tiny_llama, token_data):
    """plan.config through prepare -> calibration forwards -> convert gives what GPTQQuantizer gives."""
    base = qk.GPTQConfig(actorder=True, group_size=32)
    plan = qk.BudgetPlanner(target_bpw=4.0, verbose=False).plan(tiny_llama, token_data, base)
    a, b = _copy(tiny_llama), _copy(tiny_llama)
    qk.GPTQQuantizer(a, plan.config, verbose=False).quantize(token_data)
    model = qk.prepare(b, plan.config, export_format="gptq")
    for ids in token_data:
        model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    qk.convert(model)
    for name, c in plan.sites.items():
        qa, qb = a.get_submodule(name), b.get_submodule(name)
        assert (qa.bits, qa.group_size, qa.sym) == (c.scheme.bits, c.scheme.group_size, c.scheme.sym)
        assert torch.equal(qa.qweight, qb.qweight) and torch.equal(qa.scales, qb.scales), name


def test_target_size_counts_the_dense_tensors(tiny_llama, token_data, tmp_path):
    base = qk.GPTQConfig(group_size=32)
    small = qk.BudgetPlanner(target_bpw=3.0, verbose=False).plan(tiny_llama, token_data, base)
    size = small.total_bytes + 3000
    plan = qk.BudgetPlanner(target_size=size, verbose=False).plan(tiny_llama, token_data, base)
    assert plan.total_bytes <= size and plan.total_bytes > size - 1500
    qk.GPTQQuantizer(tiny_llama, plan.config, verbose=False).quantize(token_data)
    qk.save_quantized(tiny_llama, tmp_path / "ck")
    assert inspect_checkpoint(tmp_path / "ck")["total_bytes"] == plan.total_bytes


def test_user_overrides_and_skips_are_constraints(tiny_llama, token_data):
    base = qk.GPTQConfig(group_size=32, skip_layers=["lm_head", "*.o_proj"],
                         overrides={"*.down_proj": {"bits": 8, "damp_percent": 0.05}, "*.k_proj": {"group_size": 16}})
    plan = qk.BudgetPlanner(target_bpw=5.0, verbose=False).plan(tiny_llama, token_data, base)
    assert not any(n.endswith("o_proj") for n in plan.sites)
    for name, c in plan.sites.items():
        if name.endswith("down_proj"):
            assert c.scheme.bits == 8 and not c.pinned
            assert plan.config.for_layer(name).damp_percent == 0.05  # the user's other settings kept
        if name.endswith("k_proj"):  # no candidate has group 16: pinned to the override's own scheme
            assert c.pinned and c.scheme.group_size == 16 and c.scheme.bits == 4
    assert 4.9 < plan.bpw <= 5.0


def test_refused_before_measuring(tiny_llama, token_data, monkeypatch):
    from quantkern.api import budget

    def boom(*a, **k):
        raise AssertionError("measured")

    monkeypatch.setattr(budget.BudgetPlanner, "measure", boom)
    with pytest.raises(ValueError, match="below the smallest plan"):
        qk.BudgetPlanner(target_bpw=1.5, verbose=False).plan(tiny_llama, token_data, qk.GPTQConfig())
    with pytest.raises(ValueError, match="permuted g_idx"):
        qk.BudgetPlanner(target_bpw=4, format="compressed-tensors").plan(tiny_llama, token_data,
                                                                          qk.GPTQConfig(actorder=True))
    with pytest.raises(ValueError, match="v_proj: no candidate scheme fits it.*does not divide in_features"):
        qk.BudgetPlanner(target_bpw=4, format="compressed-tensors").plan(
            tiny_llama, token_data, qk.GPTQConfig(overrides={"*.v_proj": {"group_size": 48}}))
    with pytest.raises(ValueError, match="GPTQConfig or RTNConfig"):
        qk.BudgetPlanner(target_bpw=4).plan(tiny_llama, token_data, qk.AWQConfig())
    with pytest.raises(ValueError, match="dense tensors alone"):
        qk.BudgetPlanner(target_size=1000).plan(tiny_llama, token_data, qk.GPTQConfig())
    with pytest.raises(ValueError, match="format"):
        qk.BudgetPlanner(target_bpw=4, format="awq")
    with pytest.raises(ValueError, match="exactly one"):
        qk.BudgetPlanner(target_bpw=4, target_size="1GB")
    with pytest.raises(ValueError, match="target_bpw"):
        qk.BudgetPlanner(target_bpw=0.5)


def test_rtn_base_and_sensitivity_file(tiny_llama, token_data, tmp_path):
    pl = qk.BudgetPlanner(target_bpw=3.5, fisher_samples=0, cache_dir=False, verbose=False,
                          candidates=default_candidates((2, 4), (32,)))
    s = pl.measure(tiny_llama, token_data, qk.RTNConfig(group_size=32))
    assert s.fisher_tokens == 0 and len(s.candidates) == 4
    path = s.save(tmp_path / "s.json")
    back = qk.Sensitivity.load(path)
    assert back.errors == s.errors and back.candidates == s.candidates
    plan = pl.plan(tiny_llama, token_data, qk.RTNConfig(group_size=32), sensitivity=back)
    assert {c.scheme.bits for c in plan.sites.values()} == {2, 4} and 3.4 < plan.bpw <= 3.5
    qk.RTNQuantizer(tiny_llama, plan.config, verbose=False).quantize()
    bits = {n: m.bits for n, m in tiny_llama.named_modules() if isinstance(m, qk.QuantLinear)}
    assert bits == {n: c.scheme.bits for n, c in plan.sites.items()}
    bad = json.loads(path.read_text())
    bad["errors"][next(iter(bad["errors"]))][0] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json.*negative"):
        qk.Sensitivity.load(tmp_path / "bad.json")


def test_fisher_weights_follow_the_loss(tiny_llama, token_data):
    from quantkern.api.budget import loss_gradient_weights
    from quantkern.calibration import normalize_calibration_data

    lin = {n: m for n, m in tiny_llama.named_modules() if n.endswith(("o_proj", "down_proj"))}
    f, tokens = loss_gradient_weights(tiny_llama, normalize_calibration_data(token_data[:2]), lin, "cpu")
    assert tokens == 64 and all(v.shape == (m.out_features,) and bool((v > 0).all()) for (n, m), v in
                                zip(lin.items(), f.values()))
    assert all(p.grad is None for p in tiny_llama.parameters())
    # by hand for one Linear: the gradient of the summed loss at its output
    name, mod = next(iter(lin.items()))
    grads = []
    def keep(m, a, out):
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    h = mod.register_forward_hook(keep)
    try:
        for ids in token_data[:2]:
            emb = tiny_llama.get_input_embeddings()
            h2 = emb.register_forward_hook(lambda m, a, out: out.requires_grad_())
            with torch.enable_grad():
                logits = tiny_llama(input_ids=ids[None]).logits[:, :-1]
                torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[None, 1:].reshape(-1),
                                                  reduction="sum").backward()
            h2.remove()
    finally:
        h.remove()
    want = sum(g.pow(2).reshape(-1, g.shape[-1]).sum(0) for g in grads) / 64
    assert torch.allclose(f[name], want, rtol=1e-4)


def test_cli_target_bpw(cli_serves_tiny_llama, tmp_path, capsys, monkeypatch):
    import copy

    import quantkern.models
    from quantkern.cli import main

    pristine, load = copy.deepcopy(cli_serves_tiny_llama), quantkern.models.load_model
    monkeypatch.setattr(quantkern.models, "load_model",  # a fresh model per run (the CLI quantizes in place)
                        lambda *a, **k: (copy.deepcopy(pristine), load(*a, **k)[1]))

    args = ["quantize", "--method", "gptq", "--group-size", "32", "--nsamples", "4", "--seq-len", "32",
            "--candidate-bits", "2,4,8", "--candidate-groups", "32,64"]
    assert main(args + ["--target-bpw", "3.5", "--out", str(tmp_path / "a")]) == 0
    assert "measured" in capsys.readouterr().out
    info = inspect_checkpoint(tmp_path / "a")
    assert info["consistent"] and 3.4 < info["bpw"] <= 3.5
    assert {la["bits"] for la in info["layers"]} <= {2, 4, 8}
    assert main(args + ["--target-bpw", "4.5", "--out", str(tmp_path / "b")]) == 0
    assert "sensitivity from the cache" in capsys.readouterr().out
    assert 4.4 < inspect_checkpoint(tmp_path / "b")["bpw"] <= 4.5
    assert main(["quantize", "--method", "awq", "--target-bpw", "3", "--out", str(tmp_path / "c")]) == 2
    assert "use --method gptq or rtn" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_benchmark_report_compares_at_each_uniform_bpw(tmp_path, capsys):
    """benchmarks/quality_budget.py's comparison (run on a CSV written here, no model)."""
    import csv
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("quality_budget", Path(__file__).resolve().parents[2] /
                                                  "benchmarks" / "quality_budget.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [dict(kind="fp32", name="fp32", bpw=32, ppl=15.0, cpu="x", threads=2, torch="t"),
            dict(kind="planned", name="bpw3", bpw=3.0, ppl=30.0, cpu="x", threads=2, torch="t"),
            dict(kind="planned", name="bpw4", bpw=4.0, ppl=18.0, cpu="x", threads=2, torch="t"),
            dict(kind="uniform", name="w3g64a", bpw=3.5, ppl=25.0, cpu="x", threads=2, torch="t"),
            dict(kind="uniform", name="w4g128s", bpw=3.75, ppl=20.0, cpu="x", threads=2, torch="t"),
            dict(kind="uniform", name="w8g128s", bpw=8.2, ppl=15.1, cpu="x", threads=2, torch="t")]
    path = tmp_path / "q.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, mod.FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    mod.plot(path)
    out = capsys.readouterr().out
    assert "w3g64a   3.500 bpw: uniform 25.000, planned 24.000 -> planned lower" in out
    assert "w4g128s  3.750 bpw: uniform 20.000, planned 21.000 -> UNIFORM LOWER" in out
    assert "w8g128s" not in out  # outside the planned range: not compared

"""PTQ: observers on synthetic data, prepare -> calibrate -> convert freezing static scales, errors."""

import copy

import pytest
import torch

import quantkern as qk
from quantkern.algorithms.observers import (MinMaxObserver, MovingAverageObserver, MSEObserver, PercentileObserver,
                                            make_observer)
from quantkern.calibration import group_batches, normalize_calibration_data
from quantkern.nn.fp8_linear import FP8Linear
from quantkern.nn.w8a8_linear import W8A8Linear

EVAL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))


def test_minmax_and_moving_average():
    a, b = MinMaxObserver(), MovingAverageObserver(averaging_constant=0.5)
    for x in (torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5]])):
        a.update(x)
        b.update(x)
    assert a.range() == (-2.0, 3.0) and a.amax.item() == 3.0
    assert b.range() == (-0.75, 2.0)  # lo: -2 + 0.5*(0.5 - (-2)); hi: 1 + 0.5*(3 - 1)
    assert a.count == 2


def test_observer_ranges_include_zero_and_need_data():
    o = MinMaxObserver()
    o.update(torch.tensor([[1.0, 2.0]]))
    assert o.range() == (0.0, 2.0)
    with pytest.raises(RuntimeError, match="saw no calibration data"):
        MinMaxObserver().range()
    assert MinMaxObserver().amax is None
    with pytest.raises(ValueError, match="inf/NaN"):
        o.update(torch.tensor([[float("nan"), 1.0]]))


def test_percentile_ignores_a_rare_outlier():
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    x[7, 3] = 1000.0
    mm, pc = MinMaxObserver(), PercentileObserver(99.9)
    for o in (mm, pc):
        o.update(x)
    assert mm.amax.item() == 1000.0
    assert 2.5 < pc.amax.item() < 5.0


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_search_lowers_the_error(bits):
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    mm, mse = MinMaxObserver(), MSEObserver(bits=bits)
    for part in x.split(512):
        mm.update(part)
        mse.update(part)
    qmax = (1 << (bits - 1)) - 1

    def err(amax):
        s = amax / qmax
        return float(((x / s).round().clamp(-qmax, qmax) * s - x).pow(2).mean())

    assert mse.amax.item() <= mm.amax.item()
    assert err(mse.amax.item()) <= err(mm.amax.item())
    if bits == 4:  # few levels: the optimum clips well inside the Gaussian's max (~2.5 sigma)
        assert mse.amax.item() < 0.75 * mm.amax.item() and err(mse.amax.item()) < 0.8 * err(mm.amax.item())


def test_make_observer_errors():
    with pytest.raises(ValueError, match="observer must be one of"):
        make_observer("histogram")
    with pytest.raises(ValueError, match="percentile must be in"):
        make_observer("percentile", percentile=0)
    with pytest.raises(ValueError, match="averaging_constant"):
        make_observer("moving_average", averaging_constant=2.0)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_ptq_both_doors_and_static_scales(tiny_llama, token_data, observer, dtype):
    with torch.no_grad():
        ref = tiny_llama(EVAL).logits
    a, b = tiny_llama, copy.deepcopy(tiny_llama)
    cfg = qk.PTQConfig(weight_dtype=dtype, act_dtype=dtype, observer=observer, percentile=99.9, batch_size=4)
    q = qk.PTQQuantizer(a, cfg, verbose=False)
    q.quantize(token_data)
    b = qk.prepare(b, cfg)
    for batch in group_batches(normalize_calibration_data(token_data), 4):
        # the one calibration loop: a prepared forward stops at block 0 (returns None), as for GPTQ / AWQ
        assert b(input_ids=batch.input_ids, attention_mask=batch.attention_mask) is None
    b = qk.convert(b, cfg)
    cls = W8A8Linear if dtype == "int8" else FP8Linear
    mods = {n: m for n, m in a.named_modules() if isinstance(m, cls)}
    assert len(mods) == 14
    for n, m in mods.items():
        other = b.get_submodule(n)
        assert m.input_scale is not None and m.input_scale.item() > 0
        assert torch.equal(m.input_scale, other.input_scale)
    with torch.no_grad():
        out = a(EVAL).logits
    assert (out - ref).norm() / ref.norm() < 0.1


def test_ptq_minmax_scale_is_the_observed_abs_max(tiny_llama, token_data):
    seen = []
    h = tiny_llama.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    with torch.no_grad():
        for t in token_data:
            tiny_llama(t[None])
    h.remove()
    qk.PTQQuantizer(tiny_llama, verbose=False).quantize(token_data)
    s = tiny_llama.model.layers[0].mlp.down_proj.input_scale.item()
    assert s == pytest.approx(float(max(seen)) / 127, rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_dtype="int8", act_dtype="float8_e4m3fn"), r"unsupported \(weight_dtype, act_dtype\) pair"),
    (dict(weight_dtype="int4"), "unsupported"),
    (dict(observer="kl"), "observer must be one of"),
    (dict(percentile=101), "percentile"),
    (dict(averaging_constant=0), "averaging_constant"),
    (dict(backend="scaled_mm"), "backend for int8 must be one of"),
])
def test_ptq_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.PTQConfig(**kwargs)


def test_ptq_convert_without_forwards(tiny_llama):
    cfg = qk.PTQConfig()
    with pytest.raises(RuntimeError, match="no calibration forwards"):
        qk.convert(qk.prepare(tiny_llama, cfg))

"""GPTQ on synthetic layers: it must beat RTN on the layer-wise objective it optimises."""

import pytest
import torch

from quantkern.algorithms import GPTQ, quantize_rtn
from quantkern.core import WeightScheme


def _layer(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    # correlated inputs with a few high-variance channels, like real activations
    X = torch.randn(2048, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.2)
    X[:, :8] *= 10
    return W, X


def _out_err(W, X, qw):
    return float(((X @ (qw.dequantize() - W).T) ** 2).mean())


@pytest.mark.parametrize("bits,gs,sym", [(4, 64, True), (4, 128, False), (3, 64, True), (2, 32, False), (8, -1, True)])
@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_beats_rtn_on_output_error(bits, gs, sym, actorder):
    W, X = _layer()
    g = GPTQ(W)
    g.add_batch(X[:1000])
    g.add_batch(X[1000:])
    qw, loss = g.quantize(WeightScheme(bits, gs, sym, act_order=actorder))
    qw.validate()
    rtn = quantize_rtn(W, WeightScheme(bits, gs, sym))
    assert loss >= 0
    assert _out_err(W, X, qw) < 0.8 * _out_err(W, X, rtn)


def test_act_order_g_idx_is_a_permuted_group_map():
    W, X = _layer(k=128)
    g = GPTQ(W)
    g.add_batch(X)
    qw, _ = g.quantize(WeightScheme(4, 32, True, act_order=True))
    counts = torch.bincount(qw.g_idx.long(), minlength=4)
    assert counts.tolist() == [32, 32, 32, 32]
    assert not torch.equal(qw.g_idx, torch.arange(128, dtype=torch.int32) // 32)  # columns were reordered
    # the highest-variance input channels are visited first, so they land in group 0
    assert set(qw.g_idx[:8].tolist()) == {0}


def test_static_groups_keep_original_group_order():
    W, X = _layer(k=128)
    g = GPTQ(W)
    g.add_batch(X)
    qw, _ = g.quantize(WeightScheme(4, 32, False, act_order=True), static_groups=True)
    assert torch.equal(qw.g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_ragged_last_group():
    W, X = _layer(k=160)
    g = GPTQ(W)
    g.add_batch(X[:, :160] if X.shape[1] > 160 else X)
    qw, _ = g.quantize(WeightScheme(4, 64, True))
    assert qw.scales.shape == (3, 96)
    assert torch.bincount(qw.g_idx.long()).tolist() == [64, 64, 32]


def test_dead_columns_are_zeroed_and_do_not_break_cholesky():
    W, X = _layer(k=128)
    X[:, 5] = 0
    X[:, 77] = 0
    g = GPTQ(W)
    g.add_batch(X)
    qw, _ = g.quantize(WeightScheme(4, 32, True))
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.allclose(deq[:, [5, 77]], torch.zeros(96, 2), atol=float(qw.scales.float().max()))


def test_singular_hessian_gets_more_damping():
    W = torch.randn(32, 64)
    X = torch.randn(4, 64)  # rank 4 << 64: H is singular, tiny damping alone can fail
    g = GPTQ(W, "rank_deficient")
    g.add_batch(X)
    qw, _ = g.quantize(WeightScheme(4, 32, True), damp_percent=1e-12)
    assert torch.isfinite(qw.dequantize()).all()


def test_no_inputs_is_a_clear_error():
    with pytest.raises(RuntimeError, match="saw no calibration inputs"):
        GPTQ(torch.randn(8, 32), "empty").quantize(WeightScheme(4, 32, True))


def test_mse_clipping_never_worse_than_minmax_for_rtn():
    W, _ = _layer()
    s = WeightScheme(3, 64, True)
    plain = float(((quantize_rtn(W, s).dequantize() - W) ** 2).sum())
    mse = float(((quantize_rtn(W, s, mse=True).dequantize() - W) ** 2).sum())
    assert mse <= plain


# -- the fp8 grid -----------------------------------------------------------------------------------
def _fp8_rtn(W):
    from quantkern.core.fp8 import quantize_fp8_per_row

    return quantize_fp8_per_row(W)


@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_fp8_beats_rtn_and_stores_exact_fp8(actorder):
    from quantkern.core.fp8 import FP8_DTYPE, FP8_MAX

    W, X = _layer()
    g = GPTQ(W)
    g.add_batch(X)
    q8, scale, loss = g.quantize_fp8(act_order=actorder)
    r8, rscale = _fp8_rtn(W)
    assert q8.dtype == FP8_DTYPE and q8.shape == W.shape and loss >= 0
    assert torch.equal(scale, rscale)  # per-channel scales are fixed from the original rows
    assert not q8.float().isnan().any() and q8.float().abs().max() <= FP8_MAX
    err = float(((X @ (q8.float() * scale - W).T) ** 2).mean())
    err_rtn = float(((X @ (r8.float() * rscale - W).T) ** 2).mean())
    assert err < 0.7 * err_rtn, (err, err_rtn)


@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_fp8_with_a_diagonal_hessian_is_round_to_nearest(actorder):
    # uncorrelated input channels: no error to propagate, so GPTQ must reproduce plain rounding
    # exactly -- also checks the act-order permutation is undone column for column
    W, _ = _layer(n=40, k=96)
    X = torch.diag(torch.rand(96) * 3 + 0.1)  # H diagonal, distinct entries (a real visiting order)
    g = GPTQ(W)
    g.add_batch(X)
    q8, scale, _ = g.quantize_fp8(act_order=actorder)
    r8, rscale = _fp8_rtn(W)
    assert torch.equal(q8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(scale, rscale)


def test_gptq_tracks_the_input_abs_max():
    g = GPTQ(torch.randn(4, 8))
    g.add_batch(torch.tensor([[1.0, -7.5, 0, 0, 0, 0, 0, 2]]))
    g.add_batch(torch.tensor([[3.0, 0, 0, 0, 0, 0, 0, 0]]))
    assert g.input_amax == 7.5

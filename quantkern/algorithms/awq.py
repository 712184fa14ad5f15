"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): the math for one group of Linears that share an input, model-agnostic.

1. Scale search. For input activations ``X [T, K]`` and the group's stacked weight ``W [N, K]``,
   try per-input-channel scales ``s = mean|X|^α`` (or, with ``duo_scaling``, ``mean|X|^α /
   mean|Ŵ|^(1-α)`` with ``Ŵ`` the weight normalised per group, as AutoAWQ does) for ``α`` on a grid
   of ``n_grid`` points in ``[0, 1)``, normalised so ``max(s)·min(s) = 1``, and keep the one that
   minimises ``‖X W^T − (X/s) Q(W·s)^T‖²`` (``Q``: fake quantization with the target scheme). The
   identity ``s = 1`` is always a candidate, so the group's error never exceeds plain RTN's.
2. The caller folds ``1/s`` into the op that produced ``X`` (norm weight/bias or the previous Linear's
   output rows) — helpers below.
3. Clipping search, per Linear: for each (output row, group), shrink ``max|w|`` by ``1 - i/n_grid``
   for ``i < max_shrink·n_grid``, clamp the weight to ``±max``, fake-quantize, and keep the ratio that
   minimises that group's partial output error on a subsample of tokens.

All inputs are fp32 ``[T, K]`` with padding rows removed; weights ``[N, K]`` (``nn.Linear`` layout).
"""

from __future__ import annotations

import torch

from ..core import WeightScheme, find_qparams


def group_slices(k: int, group_size: int) -> list[slice]:
    gs = k if group_size == -1 else group_size
    return [slice(s, min(s + gs, k)) for s in range(0, k, gs)]


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``w [N, K]`` fp32 -> ``[N, G, gs]`` (the ragged last group zero-padded) and the group size.
    Zero padding leaves every group's min/max range unchanged (ranges always include 0)."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    return torch.nn.functional.pad(w.float(), (0, g * gs - k)).view(n, g, gs), gs


def _fake_quant_rows(flat: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype) -> torch.Tensor:
    """Per-row min/max fake quantization of ``flat [R, C]`` fp32: the same arithmetic as
    ``core.fake_quantize`` (so the same values), in place on a copy and without int round trips,
    because the searches call it many times."""
    s, z = find_qparams(flat, scheme.bits, scheme.sym, scale_dtype)
    s, z = s[:, None], z.float()[:, None]
    q = torch.div(flat, s).round_().add_(z).clamp_(0, scheme.maxq)
    return q.sub_(z).mul_(s)


def fake_quantize_groups(w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype) -> torch.Tensor:
    """``w [N, K]`` -> its per-(row, group) min/max fake-quantized fp32 copy (what RTN would store)."""
    n, k = w.shape
    wg, gs = _grouped(w, scheme.group_size)
    return _fake_quant_rows(wg.reshape(-1, gs), scheme, scale_dtype).view(n, -1)[:, :k]


def _weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |w| normalised by each (row, group)'s max |w|: ``[K]``."""
    n, k = w.shape
    wg, _ = _grouped(w.abs(), group_size)
    wg = wg / wg.amax(dim=2, keepdim=True).clamp(min=1e-8)
    return wg.reshape(n, -1)[:, :k].mean(dim=0)


def _segments(scheme, n: int) -> list[tuple[int, WeightScheme]]:
    segs = [(n, scheme)] if isinstance(scheme, WeightScheme) else list(scheme)
    if sum(r for r, _ in segs) != n:
        raise ValueError(f"scheme segments cover {sum(r for r, _ in segs)} rows, the weight has {n}")
    return segs


def _per_segment(fn, w: torch.Tensor, segs, cat_dim: int) -> torch.Tensor:
    outs, start = [], 0
    for rows, sch in segs:
        outs.append(fn(w[start:start + rows], sch))
        start += rows
    return torch.cat(outs, dim=cat_dim)


@torch.no_grad()
def search_scale(x: torch.Tensor, weight: torch.Tensor, scheme, scale_dtype: torch.dtype,
                 x_mean: torch.Tensor | None = None, n_grid: int = 20, duo_scaling: bool = True
                 ) -> tuple[torch.Tensor, float, float]:
    """Best input-channel scale for ``weight [N, K]`` (the group's Linears stacked along N) on inputs
    ``x [T, K]``. ``x_mean`` (default ``mean|x|`` over rows) may come from more tokens than ``x``.
    ``scheme``: a :class:`WeightScheme`, or ``[(rows, scheme), ...]`` when the stacked Linears are
    quantized differently (per-layer overrides).

    Returns ``(s [K] fp32, best_error, error_at_s=1)`` (mean squared output errors)."""
    x = x.float()
    w = weight.float()
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the weight has {w.shape[1]} input channels")
    x_mean = (x.abs().mean(dim=0) if x_mean is None else x_mean.float()).clamp(min=1e-8)
    segs = _segments(scheme, w.shape[0])
    w_mean = (_per_segment(lambda ws, sch: _weight_mean(ws, sch.group_size)[None] * ws.shape[0], w, segs, 0)
              .sum(0) / w.shape[0]).clamp(min=1e-8)
    ref = x @ w.t()

    def error(s: torch.Tensor) -> float:
        q = _per_segment(lambda ws, sch: fake_quantize_groups(ws, sch, scale_dtype), w * s, segs, 0)
        return float(((x / s) @ q.t() - ref).pow_(2).mean())  # x/s: cheaper than dividing [N, K] by s

    return _grid_search(x_mean, w_mean, n_grid, duo_scaling, error)


@torch.no_grad()
def search_scale_routed(parts: list[tuple[torch.Tensor, torch.Tensor, WeightScheme]], scale_dtype: torch.dtype,
                        x_mean: torch.Tensor, n_grid: int = 20, duo_scaling: bool = True
                        ) -> tuple[torch.Tensor, float, float]:
    """One input-channel scale for weights that read the same channels, each on its own rows: ``parts``
    = ``[(x_i [T_i, K], w_i [N_i, K], scheme_i)]`` (MoE experts, each on the tokens routed to it; a shared
    expert on all of them). ``x_mean``: ``mean|x|`` over every token. The error is the squared output
    error summed over the parts, per output element. Returns ``(s [K] fp32, best_error, error_at_s=1)``."""
    ws = [w.float() for _, w, _ in parts]
    rows = sum(w.shape[0] for w in ws)
    w_mean = (sum(_weight_mean(w, sch.group_size) * w.shape[0] for w, (_, _, sch) in zip(ws, parts)) / rows
              ).clamp(min=1e-8)
    refs = [x.float() @ w.t() for (x, _, _), w in zip(parts, ws)]
    n_el = max(1, sum(r.numel() for r in refs))

    def error(s: torch.Tensor) -> float:
        total = 0.0
        for (x, _, sch), w, ref in zip(parts, ws, refs):
            if x.shape[0]:
                q = fake_quantize_groups(w * s, sch, scale_dtype)
                total += float(((x.float() / s) @ q.t() - ref).pow_(2).sum())
        return total / n_el

    return _grid_search(x_mean.float().clamp(min=1e-8), w_mean, n_grid, duo_scaling, error)


def _grid_search(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int, duo_scaling: bool, error
                 ) -> tuple[torch.Tensor, float, float]:
    """AWQ's grid over ``alpha`` in ``[0, 1)``: ``s = x_mean^a / w_mean^(1-a)`` (``duo_scaling``) or
    ``x_mean^a``, normalised; the ``s`` with the smallest ``error(s)``. Returns ``(s, error, error(1))``."""
    ones = torch.ones_like(x_mean)
    best_s, best = ones, error(ones)
    rtn_err = best
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a) / w_mean.pow(1 - a) if duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            continue
        err = error(s)
        if err < best:
            best, best_s = err, s
    return best_s, best, rtn_err


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-(row, group) clipping bound for ``weight [N, K]`` on inputs ``x [T, K]``.

    Returns ``max_val [N, G]`` fp32 (``G`` groups, ragged last group allowed); clamp with
    :func:`apply_clip`. Errors are each group's partial products ``x_g · w_g`` (all groups at once)."""
    n, k = weight.shape
    wg, gs = _grouped(weight, scheme.group_size)  # [N, G, gs]
    xg, _ = _grouped(x, scheme.group_size)  # [T, G, gs]
    xg = xg.permute(1, 0, 2)  # [G, T, gs]
    ref = torch.bmm(xg, wg.permute(1, 2, 0))  # [G, T, N]
    amax = wg.abs().amax(dim=2).clamp(min=1e-8)  # [N, G]
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        mv = amax * (1 - i / n_grid)
        cw = torch.maximum(torch.minimum(wg, mv[..., None]), -mv[..., None]).reshape(-1, gs)
        q = _fake_quant_rows(cw, scheme, scale_dtype).view(n, -1, gs)
        err = (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow_(2).mean(dim=1).t()  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, mv, best)
    return best


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: int) -> None:
    """Clamp ``weight [N, K]`` in place to ``±max_val [N, G]`` group by group."""
    for g, sl in enumerate(group_slices(weight.shape[1], group_size)):
        mv = max_val[:, g:g + 1].to(weight.dtype)
        weight[:, sl] = torch.maximum(torch.minimum(weight[:, sl], mv), -mv)


# -- folding: keep the float model's function unchanged ---------------------------------------------
def scale_input_channels(weight: torch.Tensor, s: torch.Tensor) -> None:
    """``W <- W·diag(s)`` in place (``weight [N, K]``, ``s [K]``)."""
    weight.mul_(s.to(weight.dtype)[None, :])


def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide a norm's output by ``s``: ``(offset + w) <- (offset + w)/s`` and ``b <- b/s`` (in place).
    ``offset = 1`` for Gemma-style norms that multiply by ``1 + w``."""
    s32 = s.float()
    weight.copy_(((weight.float() + offset) / s32 - offset).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.float() / s32).to(bias.dtype))


def fold_into_linear_outputs(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor) -> None:
    """Divide a Linear's outputs by ``s [N]``: rows of ``weight [N, K]`` and ``bias [N]`` (in place)."""
    weight.div_(s.to(weight.dtype)[:, None])
    if bias is not None:
        bias.div_(s.to(bias.dtype))

"""Per-site sensitivity and the bit allocation over sites (issue #16).

:func:`candidate_errors` measures, for one Linear and its collected Hessian, the output error of every
candidate scheme in **one** GPTQ sweep: the candidates' copies of the weight are stacked along the rows
(rows are independent in GPTQ: they share the Hessian, the column order and ``Hinv``), so the Cholesky
factor, the visiting order and the Python loop over columns are paid once, not once per candidate.
Each copy refits its group parameters at its own group boundaries and rounds to its own grid.

The error of a candidate is ``E ||(W - Q) x||²`` over the calibration rows, per output channel,
optionally weighted by ``row_weights`` (the mean squared gradient of the loss at each output channel:
then ``½ Σ_j f_j E[Δy_j²]`` is the second-order estimate of the loss increase, which makes errors of
different layers comparable). :func:`allocate` chooses one candidate per site to minimise the summed
error under a byte budget (a multiple-choice knapsack, solved on each site's convex hull by the
Lagrangian greedy, then topped up with the budget that is left).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from ..core import WeightScheme, find_qparams, find_qparams_mse
from .gptq import GPTQ


#: the sweep's lazy-update block: GPTQ's result does not depend on it (up to rounding), its speed does; the
#: stacked weight is ~24x taller than one layer's, and a narrow block keeps each column's update in cache
SWEEP_BLOCKSIZE = 32


@torch.no_grad()
def candidate_errors(g: GPTQ, schemes: list[WeightScheme], *, act_order: bool = False, damp_percent: float = 0.01,
                     blocksize: int = SWEEP_BLOCKSIZE, static_groups: bool = False, mse: bool = False,
                     scale_dtype: torch.dtype = torch.float16, row_weights: torch.Tensor | None = None,
                     method: str = "gptq") -> list[float]:
    """``E ||(W - Q_c) x||²`` (weighted per output channel by ``row_weights`` [N] when given) for each
    candidate ``c`` in ``schemes``, where ``Q_c`` is what GPTQ (``method="gptq"``, with the given
    act-order / static-groups / damping / clipping settings) or round-to-nearest (``"rtn"``) produces
    for that scheme. Equal, up to float summation order, to quantizing with each scheme on its own."""
    if not schemes:
        return []
    H = g.H
    if method == "rtn":
        W = g.weight.detach().float()
        out = []
        for s in schemes:
            out.append(_weighted_error(W, _rtn(W, s, scale_dtype, mse), H, row_weights))
        return out
    if method != "gptq":
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    W, perm, Hinv = g._setup(act_order, damp_percent, 8)
    n, k = W.shape
    c = len(schemes)
    Wc = W.repeat(c, 1)
    deq_cols = torch.empty(k, c * n, device=W.device)  # column-major: one contiguous row per visited column
    find = find_qparams_mse if mse else find_qparams
    maxq = torch.tensor([float(s.maxq) for s in schemes], device=W.device).repeat_interleave(n)
    scale = torch.ones(c * n, device=W.device)
    zero = torch.zeros(c * n, device=W.device)
    sizes = [k if s.group_size == -1 else s.group_size for s in schemes]
    rows = [slice(i * n, (i + 1) * n) for i in range(c)]
    static = None
    if static_groups:  # every candidate's groups fixed up front on the original column order
        Wo = W if perm is None else W[:, torch.argsort(perm)]
        static = []
        for s, gs in zip(schemes, sizes):
            qp = [find(Wo[:, i:i + gs], s.bits, s.sym, scale_dtype) for i in range(0, k, gs)]
            static.append((torch.stack([a for a, _ in qp], 1), torch.stack([b for _, b in qp], 1).float()))

    def quant_col(col: int, w: torch.Tensor, ahead) -> torch.Tensor:
        if static is not None:
            orig = int(perm[col]) if perm is not None else col
            for i, (gs, (sc, z)) in enumerate(zip(sizes, static)):
                scale[rows[i]] = sc[:, orig // gs]
                zero[rows[i]] = z[:, orig // gs]
        else:
            cache = {}
            for i, (s, gs) in enumerate(zip(schemes, sizes)):
                if col % gs == 0:
                    if gs not in cache:
                        cache[gs] = ahead(gs)
                    sc, z = find(cache[gs][rows[i]], s.bits, s.sym, scale_dtype)
                    scale[rows[i]], zero[rows[i]] = sc, z.float()
        q = torch.minimum((torch.round(w / scale) + zero).clamp_(min=0), maxq)
        deq = (q - zero) * scale
        deq_cols[col] = deq
        return deq

    GPTQ._sweep(Wc, Hinv, blocksize, quant_col, fused=True)
    deq_all = (deq_cols if perm is None else deq_cols[torch.argsort(perm)]).t()
    W0 = g.weight.detach().float()
    return [_weighted_error(W0, deq_all[r], H, row_weights) for r in rows]


def _rtn(W: torch.Tensor, s: WeightScheme, scale_dtype, mse: bool) -> torch.Tensor:
    find = find_qparams_mse if mse else find_qparams
    k = W.shape[1]
    gs = k if s.group_size == -1 else s.group_size
    out = torch.empty_like(W)
    for i in range(0, k, gs):
        w = W[:, i:i + gs]
        sc, z = find(w, s.bits, s.sym, scale_dtype)
        q = (torch.round(w / sc[:, None]) + z[:, None]).clamp_(0, s.maxq)
        out[:, i:i + gs] = (q - z[:, None]) * sc[:, None]
    return out


def _weighted_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, row_weights) -> float:
    """``Σ_j f_j ΔW_j (H/2) ΔW_jᵀ``: ``H`` is GPTQ's ``2 X Xᵀ / n``, so ``ΔW_j (H/2) ΔW_jᵀ`` is the mean
    squared error of output channel ``j`` over the calibration rows."""
    d = W - Q
    per_row = ((d @ H) * d).sum(1) / 2
    if row_weights is not None:
        per_row = per_row * row_weights.to(per_row)
    return float(per_row.sum())


# -- allocation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One way to store a site: its cost in bytes and its (estimated) error."""

    bytes: int
    error: float


def _pareto(options: list[Option]) -> list[int]:
    """Indices of the options no other option beats on both cost and error, by increasing cost."""
    order = sorted(range(len(options)), key=lambda i: (options[i].bytes, options[i].error))
    out, best = [], math.inf
    for i in order:
        if options[i].error < best:
            out.append(i)
            best = options[i].error
    return out


def _hull(options: list[Option], pareto: list[int]) -> list[int]:
    """The lower convex hull of the Pareto front (cost increasing, error decreasing, slopes rising)."""
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            p = options[i]
            # b lies on or above the segment a-p: drop it
            if (b.error - a.error) * (p.bytes - a.bytes) >= (p.error - a.error) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(sites: list[list[Option]], budget: int, seeds=()) -> list[int]:
    """Choose one option per site so that the summed bytes stay within ``budget`` and the summed error
    is as small as the search finds. Returns the chosen index per site.

    Lagrangian greedy on each site's convex hull: start every site at its cheapest option and take the
    upgrade with the largest error reduction per byte while it fits; an upgrade that does not fit closes
    that site. The result, and each of ``seeds`` (other choices, e.g. one scheme for every site) that
    fits, is then improved by local search (:func:`_improve`), and the best is returned: never worse
    than a seed. Raises ``ValueError`` if even the cheapest choice of every site exceeds ``budget``."""
    paretos = [_pareto(opts) for opts in sites]
    hulls = [_hull(opts, p) for opts, p in zip(sites, paretos)]
    pos = [0] * len(sites)
    choice = [h[0] for h in hulls]
    used = sum(sites[s][c].bytes for s, c in enumerate(choice))
    if used > budget:
        raise ValueError(f"the budget of {budget} bytes is below the smallest plan ({used} bytes)")
    heap = []

    def push(s: int) -> None:
        h = hulls[s]
        if pos[s] + 1 < len(h):
            a, b = sites[s][h[pos[s]]], sites[s][h[pos[s] + 1]]
            heapq.heappush(heap, ((b.error - a.error) / (b.bytes - a.bytes), s))

    for s in range(len(sites)):
        push(s)
    while heap:
        _, s = heapq.heappop(heap)
        nxt = hulls[s][pos[s] + 1]
        extra = sites[s][nxt].bytes - sites[s][choice[s]].bytes
        if used + extra > budget:
            continue  # this site's later steps cost more still: it stays where it is
        used += extra
        pos[s] += 1
        choice[s] = nxt
        push(s)
    starts = [choice] + [list(c) for c in seeds if sum(sites[s][i].bytes for s, i in enumerate(c)) <= budget]
    results = [_improve(sites, paretos, list(c), budget) for c in starts]
    return min(results, key=lambda c: sum(sites[s][i].error for s, i in enumerate(c)))


def _improve(sites: list[list[Option]], paretos: list[list[int]], choice: list[int], budget: int,
             reach: int = 2) -> list[int]:
    """Local search from ``choice``: move every site onto its Pareto front, then repeatedly make the move
    that lowers the summed error most while the bytes fit: one site to another option, or a pair of
    sites at once (one up, one down: the trade a greedy cannot make), each site within ``reach`` steps
    of its current place on the front."""
    for s, opts in enumerate(sites):  # a dominated choice: the front's option that is no larger and no worse
        cur = opts[choice[s]]
        if choice[s] not in paretos[s]:
            choice[s] = min((i for i in paretos[s] if opts[i].bytes <= cur.bytes), key=lambda i: opts[i].error)
    used = sum(sites[s][i].bytes for s, i in enumerate(choice))
    while True:
        moves = []  # (site, option, d_bytes, d_error)
        for s, front in enumerate(paretos):
            p = front.index(choice[s])
            cur = sites[s][choice[s]]
            for q in range(max(0, p - reach), min(len(front), p + reach + 1)):
                if q != p:
                    o = sites[s][front[q]]
                    moves.append((s, front[q], o.bytes - cur.bytes, o.error - cur.error))
        if not moves:
            return choice
        site = torch.tensor([m[0] for m in moves])
        db = torch.tensor([m[2] for m in moves], dtype=torch.float64)
        de = torch.tensor([m[3] for m in moves], dtype=torch.float64)
        room = budget - used
        single = torch.where(db <= room, de, torch.inf)
        pair = de[:, None] + de[None, :]
        pair = torch.where((db[:, None] + db[None, :] <= room) & (site[:, None] != site[None, :]), pair, torch.inf)
        best_single, i1 = single.min(0)
        best_pair, ij = pair.flatten().min(0)
        tol = 1e-12 * max(1.0, sum(sites[s][i].error for s, i in enumerate(choice)))
        if min(float(best_single), float(best_pair)) >= -tol:
            return choice
        if float(best_single) <= float(best_pair):
            picks = [int(i1)]
        else:
            picks = [int(ij) // len(moves), int(ij) % len(moves)]
        for k in picks:
            s, opt, d, _ = moves[k]
            choice[s] = opt
            used += d

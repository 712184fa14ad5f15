"""FP4 (E2M1) weight quantization with group scales: each (row, group) maps its abs-max onto 6, the
largest E2M1 magnitude; with ``mse=True`` the scale is shrunk by the factor in ``[1 - max_shrink, 1]``
(grid of ``grid`` steps) that minimises the group's squared error (clipping search).

Scales are rounded to their storage dtype *before* the codes are chosen, so decoding with the stored
scales reproduces what was optimised; a scale that would round to zero (or underflow fp8) is raised
to the dtype's smallest positive normal.
"""

from __future__ import annotations

import torch

from ..core.fp4 import E2M1_MAX, e2m1_table, encode_e2m1


def _store(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny
    if dtype == torch.float8_e4m3fn:
        scale = scale.clamp(max=448.0)
    return scale.clamp(min=tiny).to(dtype)


def quantize_fp4_groups(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16,
                        mse: bool = False, grid: int = 20, max_shrink: float = 0.3
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(codes uint8 [N, K], scales [N, G] in scale_dtype)``; raises ``ValueError``
    for non-finite weights."""
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("FP4: weight contains inf/NaN")
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    table = e2m1_table(w.device)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = []
    for start in range(0, k, gs):
        cols = w[:, start:start + gs]
        amax = cols.abs().amax(dim=1)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        best_s = _store(amax / E2M1_MAX, scale_dtype)
        if mse:
            best_err = torch.full_like(amax, float("inf"))
            for i in range(int(max_shrink * grid) + 1):
                s = _store(amax * (1 - i / grid) / E2M1_MAX, scale_dtype)
                sf = s.float()[:, None]
                err = (table[encode_e2m1(cols / sf).long()] * sf - cols).pow(2).sum(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, s.float(), best_s.float()).to(scale_dtype)
        codes[:, start:start + gs] = encode_e2m1(cols / best_s.float()[:, None])
        scales.append(best_s)
    return codes, torch.stack(scales, dim=1)

"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), for one Linear layer.

Names follow the paper: ``H = 2 X Xᵀ / n`` is the Hessian of the layer-wise squared error,
``Hinv`` the upper Cholesky factor of its (damped) inverse. Columns are quantized in blocks of
``blocksize``; each column's quantization error, scaled by ``Hinv``, is propagated into the columns not
yet quantized. With act-order, columns are visited by decreasing ``diag(H)``; the groups then follow
the visiting order (``g_idx`` is a permutation map) unless ``static_groups`` fixes them up front on
the original column order.
"""

from __future__ import annotations

import logging
import math

import torch

from ..core import QuantizedWeight, WeightScheme, find_qparams, find_qparams_mse, quantize
from ..core.fp8 import FP8_DTYPE, cast_to_fp8, quantize_fp8_per_row

logger = logging.getLogger("quantkern")


class GPTQ:
    """Accumulates ``H`` from a Linear's inputs, then quantizes its weight.

    ``weight``: ``[out_features, in_features]``. Feed inputs with :meth:`add_batch` (any leading dims,
    last dim in_features), then call :meth:`quantize`.
    """

    def __init__(self, weight: torch.Tensor, name: str = ""):
        self.name = name
        self.weight = weight
        self.columns = weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.nsamples = 0
        # max |x| seen, kept on the device (no host sync per batch): a static activation scale for W8A8
        self.input_amax = torch.zeros((), dtype=torch.float32, device=weight.device)

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        self.input_amax = torch.maximum(self.input_amax, x.abs().amax())
        # running mean of 2 x xᵀ over all rows seen so far
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2.0 / self.nsamples)
        self.H.addmm_(x.t(), x)

    @torch.no_grad()
    def quantize(
        self,
        scheme: WeightScheme,
        damp_percent: float = 0.01,
        blocksize: int = 128,
        static_groups: bool = False,
        mse: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        max_damp_tries: int = 8,
    ) -> tuple[QuantizedWeight, float]:
        """Integer grid: return the quantized weight and the summed squared error ``Σ (w - q)² / Hinv_jj²``."""
        W, perm, Hinv = self._setup(scheme.act_order, damp_percent, max_damp_tries)
        ncols = self.columns
        maxq = scheme.maxq
        gs = ncols if scheme.group_size == -1 else scheme.group_size
        find = find_qparams_mse if mse else find_qparams
        if static_groups:  # on the original column order (un-permute the dead-column-zeroed W)
            Wo = W if perm is None else W[:, torch.argsort(perm)]
            static = [find(Wo[:, i:i + gs], scheme.bits, scheme.sym, scale_dtype) for i in range(0, ncols, gs)]

        codes = torch.zeros_like(W, dtype=torch.int32)
        scales = torch.zeros(-(-ncols // gs), W.shape[0], dtype=torch.float32, device=W.device)
        zeros = torch.zeros_like(scales, dtype=torch.int32)
        qp: list = [None, None]  # the current group's (scale, zero)

        def quant_col(col: int, w: torch.Tensor, ahead) -> torch.Tensor:
            if static_groups:
                orig = int(perm[col]) if perm is not None else col
                qp[:] = static[orig // gs]
            elif col % gs == 0:  # the group's columns as they are now, errors of earlier columns included
                qp[:] = find(ahead(gs), scheme.bits, scheme.sym, scale_dtype)
                scales[col // gs], zeros[col // gs] = qp
            scale, zero = qp
            q = quantize(w.unsqueeze(1), scale, zero, maxq).squeeze(1)
            codes[:, col] = q
            return (q.float() - zero.float()) * scale

        loss = self._sweep(W, Hinv, blocksize, quant_col)
        k = torch.arange(ncols, device=W.device)
        if static_groups:
            g_idx = (k // gs).to(torch.int32)
            scales = torch.stack([s for s, _ in static])
            zeros = torch.stack([z for _, z in static])
        elif perm is not None:
            g_idx = (torch.argsort(perm) // gs).to(torch.int32)  # column c was visited at position invperm[c]
        else:
            g_idx = (k // gs).to(torch.int32)
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        qw = QuantizedWeight(codes=codes.contiguous(), scales=scales.to(scale_dtype), zeros=zeros,
                             g_idx=g_idx, scheme=scheme)
        return qw, loss

    @torch.no_grad()
    def quantize_fp8(self, damp_percent: float = 0.01, blocksize: int = 128, act_order: bool = False,
                     max_damp_tries: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
        """FP8 E4M3 grid with one scale per output channel (``amax / 448`` of the original row, fixed
        before the sweep; later columns that grow past it saturate at ±448). Returns ``(weight
        float8_e4m3fn [N, K], scale fp32 [N, 1], loss)``: the same tensors
        :class:`~quantkern.nn.fp8_linear.FP8Linear` holds."""
        _, scale = quantize_fp8_per_row(self.weight.detach().float())
        W, perm, Hinv = self._setup(act_order, damp_percent, max_damp_tries)
        q8 = torch.empty(W.shape, dtype=FP8_DTYPE, device=W.device)

        def quant_col(col: int, w: torch.Tensor, ahead) -> torch.Tensor:
            q = cast_to_fp8(w.unsqueeze(1), scale).squeeze(1)
            q8[:, col] = q
            return q.float() * scale[:, 0]

        loss = self._sweep(W, Hinv, blocksize, quant_col)
        if perm is not None:
            q8 = q8[:, torch.argsort(perm)]
        return q8.contiguous(), scale, loss

    def check_finite(self) -> None:
        """Raise ``ValueError`` if inf / NaN reached this layer's inputs (its ``H`` is then not finite and
        no damping can make it positive definite). One host sync."""
        if not bool(torch.isfinite(self.H).all()):
            raise ValueError(f"{self.name or 'GPTQ layer'}: non-finite inputs (inf/NaN) reached this layer during "
                             "calibration, so its Hessian is not finite; a layer before it (or the block's input) "
                             "produces inf/NaN on the calibration data")

    def _setup(self, act_order: bool, damp_percent: float, max_damp_tries: int):
        """``(W, perm, Hinv)``: the fp32 weight with dead columns zeroed, permuted by decreasing
        ``diag(H)`` when ``act_order`` (``perm`` maps position -> original column, else None), and the
        upper Cholesky factor of the damped inverse Hessian in the same order."""
        if self.nsamples == 0:
            raise RuntimeError(f"GPTQ layer {self.name!r} saw no calibration inputs")
        self.check_finite()
        W = self.weight.detach().to(torch.float32).clone()
        H = self.H.clone()
        # Columns that never saw a non-zero input cannot affect the output: zero them, make H invertible.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
        return W, perm, self._inverse_cholesky(H, damp_percent, max_damp_tries)

    @staticmethod
    def _sweep(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int, quant_col, fused: bool = False) -> float:
        """The error-feedback loop every grid shares. Columns are visited in order, in blocks of
        ``blocksize``; ``quant_col(col, w, ahead)`` quantizes column ``col`` (current values ``w``) and
        returns it dequantized, where ``ahead(n)`` gives columns ``col .. col+n-1`` as they are now (for
        parameters fitted on a group). The column's error, scaled by ``Hinv``, is spread over the
        columns not yet visited. Modifies ``W``; returns ``Σ (w - deq)² / Hinv_jj² / 2``.

        ``fused``: spread each column's error with one in-place rank-1 update (``addr_``) instead of a
        product and a subtraction: faster on wide ``W`` (the sensitivity sweep stacks every candidate's
        rows), equal up to rounding; quantization keeps the unfused order its checkpoints were pinned with."""
        ncols = W.shape[1]
        losses = torch.zeros(W.shape[0], device=W.device)
        for i1 in range(0, ncols, blocksize):
            i2 = min(i1 + blocksize, ncols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, i]
                d = Hinv1[i, i]
                ahead = lambda n, i=i: torch.cat([W1[:, i:], W[:, i2:i2 + n]], dim=1)[:, :n]  # noqa: E731
                deq = quant_col(i1 + i, w, ahead)
                losses += (w - deq) ** 2 / d**2
                err = (w - deq) / d
                if fused:
                    W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
                else:
                    W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        return float(losses.sum()) / 2

    def _inverse_cholesky(self, H: torch.Tensor, damp_percent: float, max_tries: int) -> torch.Tensor:
        """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp·mean(diag H)``; on failure the damping
        grows tenfold, up to ``max_tries`` times, before giving up with a clear error."""
        mean_diag = torch.mean(torch.diag(H))
        damp = damp_percent
        idx = torch.arange(H.shape[0], device=H.device)
        for attempt in range(max_tries):
            Hd = H.clone()
            Hd[idx, idx] += damp * mean_diag
            L, info = torch.linalg.cholesky_ex(Hd)
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info == 0 and torch.isfinite(U).all():
                    if attempt:
                        logger.info("GPTQ %s: Hessian needed damp_percent=%g", self.name, damp)
                    return U
            damp *= 10
        raise RuntimeError(f"GPTQ layer {self.name!r}: Hessian not positive definite even with "
                           f"damp_percent={damp / 10:g}; the calibration data may be degenerate")

    def free(self) -> None:
        self.H = None

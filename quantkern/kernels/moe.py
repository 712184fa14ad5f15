"""Grouped expert kernels: one call computes one projection (gate/up or down) of every routed expert
of a :class:`~quantkern.nn.QuantExperts`.

The routing of a batch is turned once into *pairs*, one per (token, selected expert), sorted by expert
(:func:`route`): ``rows[p]`` is the token of pair ``p`` and expert ``e`` owns pairs ``offsets[e] ..
offsets[e+1] - 1``. Pairs whose expert index is outside ``[0, E)`` (the "no expert" index of expert
parallelism) sort last, beyond ``offsets[E]``: kernels leave their output rows zero.

A grouped kernel is a :class:`~quantkern.kernels.registry.QuantKernel` for the ``"gptq_experts"``
layout: the canonical GPTQ tensors of ``E`` Linears of one shape stacked on a leading dim
(``qweight [E, K*b/32, N]``, ``qzeros [E, G, N*b/32]``, ``scales [E, G, N]``, ``g_idx [E, K]``,
``bias [E, N]`` or None). Its ``apply(x, rows, offsets)`` returns ``[P, N]`` with row ``p`` =
``x[rows[p]] @ W[e] (+ bias[e])`` for the expert ``e`` that owns ``p`` (``rows`` None: ``x`` already
has one row per pair, in pair order, as the down projection's input does). The pair count ``P`` is
``rows.numel()`` (or ``x.shape[0]``) and does not depend on the routing, so no call needs to read the
routing on the host except the kernels that loop over experts there (the reference).

Backends register here like the dense ones (selection per device, dtype and M bucket by
:class:`~quantkern.kernels.registry.KernelCache`); the reference (per expert: dequantize + matmul,
the ``quantkern::moe_wna16_ref`` op) always fits. The CPU backend's
:class:`~quantkern.kernels.cpu.moe.CpuGroupedKernel` runs the selected experts in one C++ call
(``quantkern_cpu::moe_gemm``); the Triton backend's
:class:`~quantkern.kernels.triton_backend.TritonGroupedKernel` runs every expert in one fused launch
(:mod:`quantkern.triton_kernels.moe_wna16`, the ``quantkern::moe_wna16_triton`` op).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import gptq_gemm_reference
from .reference_backend import ReferenceKernel
from .registry import Backend, QuantKernel, register_kernel

#: the :attr:`~quantkern.kernels.registry.KernelSpec.layout` of stacked experts
EXPERTS_LAYOUT = "gptq_experts"

@dataclass(frozen=True)
class Routing:
    """The (token, expert) pairs of one batch, sorted by expert (see the module docstring).

    ``rows`` int64 ``[P]``: each pair's token; ``order`` int64 ``[P]``: each pair's flat position
    ``t * k + j`` in ``top_k_index`` (to read its routing weight); ``offsets`` int64 ``[E + 1]`` on
    the routing's device."""

    rows: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.rows.numel()


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """The pairs of ``top_k_index [T, k]`` (any integer dtype), stably sorted by expert (within one
    expert, in token order). No host synchronisation."""
    t, k = top_k_index.shape
    flat = top_k_index.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return Routing(rows=order // k, order=order, offsets=offsets)


def moe_wna16_reference(x: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor, qweight: torch.Tensor,
                        qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The grouped projection, one expert at a time: gather its rows, dequantize it, matmul (the
    dense reference, :func:`~quantkern.kernels.reference.gptq_gemm_reference`). ``[P, N]`` in
    ``x.dtype``; rows of pairs beyond ``offsets[E]`` are zero."""
    p = rows.numel() if rows is not None else x.shape[0]
    out = x.new_zeros(p, scales.shape[-1])
    bounds = offsets.tolist()
    for e in range(qweight.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        xe = x[rows[a:b]] if rows is not None else x[a:b]
        out[a:b] = gptq_gemm_reference(xe, qweight[e], qzeros[e], scales[e], g_idx[e], bits,
                                       None if bias is None else bias[e])
    return out


@torch.library.custom_op("quantkern::moe_wna16_ref", mutates_args=())
def moe_wna16_ref_op(x: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor, qweight: torch.Tensor,
                     qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    return moe_wna16_reference(x, rows, offsets, qweight, qzeros, scales, g_idx, bits, bias)


@moe_wna16_ref_op.register_fake
def _(x, rows, offsets, qweight, qzeros, scales, g_idx, bits, bias=None):
    return x.new_empty(rows.shape[0] if rows is not None else x.shape[0], scales.shape[-1])


@register_kernel
class GroupedReferenceKernel(QuantKernel):
    """Per expert: dequantize + matmul on the canonical stacked tensors."""

    backend = Backend.REFERENCE
    priority = 100
    layouts = (EXPERTS_LAYOUT,)

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        return ReferenceKernel.can_implement(spec, shape, device, dtype)

    def __init__(self, tensors, dtype):
        super().__init__(tensors, dtype)
        t = tensors
        self._args = (t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.bias)

    def apply(self, x, rows, offsets):
        return moe_wna16_ref_op(x, rows, offsets, *self._args)

"""``Backend.CPU`` for the grouped expert layout ``"gptq_experts"`` (:mod:`quantkern.kernels.moe`):
one ``quantkern_cpu::moe_gemm`` call (csrc/cpu/moe.cpp) per projection of a
:class:`~quantkern.nn.QuantExperts`, with the dense CPU kernel's block kernels, dtypes and ISA
variants (:mod:`.backend`). The experts are repacked once, stacked, when the kernel is prepared
(:func:`.layout.pack_cpu_experts`); a call reads only the experts that have pairs.
"""

from __future__ import annotations

import torch

from ..moe import EXPERTS_LAYOUT
from ..registry import Backend, QuantKernel, register_kernel
from . import build, ops
from .backend import CpuKernel
from .layout import pack_cpu_experts


@register_kernel
class CpuGroupedKernel(QuantKernel):
    backend = Backend.CPU
    priority = 50
    layouts = (EXPERTS_LAYOUT,)
    owns_weights = True

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        return CpuKernel.can_implement(spec, shape, device, dtype)

    def __init__(self, tensors, dtype=None, isa: str | int | None = None):
        """Repack the stacked experts once; ``isa`` as for :class:`~.backend.CpuKernel`."""
        super().__init__(tensors, dtype)
        build.load()
        self.isa = ops.isa_level(isa)
        t = tensors
        self.packed = p = pack_cpu_experts(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.spec.in_features)
        self._op = torch.ops.quantkern_cpu.moe_gemm.default
        self._args = (p.w, p.scales, p.zs, p.gptr, p.src, p.cb, p.out_features)
        self._bias = None if t.bias is None else t.bias.detach().float().cpu().contiguous()

    def apply(self, x, rows, offsets):
        return self._op(x, rows, offsets, *self._args, self._bias, self.isa)

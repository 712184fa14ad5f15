"""Python face of the ``quantkern_cpu`` torch.library ops (defined in csrc/cpu/ops.cpp, csrc/cpu/moe.cpp and
csrc/cpu/decode.cpp).

Call :func:`quantkern.kernels.cpu.build.load` first; it registers the fake (meta) implementations
below once the C++ schemas exist, so the ops trace under ``torch.compile`` / FakeTensor mode.
"""

from __future__ import annotations

import torch

ISA_LEVELS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3, "avx512bf16": 4}
_registered = False


def register_fakes() -> None:
    global _registered
    if _registered:
        return

    @torch.library.register_fake("quantkern_cpu::gemm")
    def _gemm_fake(x, w, scales, zs, gptr, src, cb, n, bias, isa, int8_act=False):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("quantkern_cpu::moe_gemm")
    def _moe_gemm_fake(x, rows, offsets, w, scales, zs, gptr, src, cb, n, bias, isa):
        return x.new_empty(rows.shape[0] if rows is not None else x.shape[0], n)

    @torch.library.register_fake("quantkern_cpu::llama_decode")
    def _llama_decode_fake(x, params, cbs, k_cache, v_cache, cos, sin, pos, slot, key_valid, final_norm, n_heads,
                           n_kv, inter, eps, scaling, isa, int8_act, head, head_cb, head_n, head_int8):
        return x.new_empty(x.shape[0], head_n) if head else torch.empty_like(x)

    @torch.library.register_fake("quantkern_cpu::packed_columns")
    def _packed_columns_fake(ids, w, scales, zs, gptr, src, cb, n, K):
        return scales.new_empty(ids.shape[0], K)

    _registered = True


def isa_level(isa: str | int | None) -> int:
    """The integer the op takes for an ISA name (``auto``, ``portable``, ``avx2``, ``avx512``,
    ``avx512bf16``: AVX-512 plus BF16 dot products for bf16 activations on W2..W4)."""
    if isa is None:
        return 0
    if isinstance(isa, int) and isa in ISA_LEVELS.values():
        return isa
    if isinstance(isa, str) and isa.lower() in ISA_LEVELS:
        return ISA_LEVELS[isa.lower()]
    raise ValueError(f"unknown CPU isa {isa!r}; choose one of {list(ISA_LEVELS)}")


def best_isa() -> str:
    """The fastest kernel variant this CPU runs (needs the extension loaded)."""
    level = torch.ops.quantkern_cpu.best_isa()
    return {v: k for k, v in ISA_LEVELS.items()}[level]


def gemm(x: torch.Tensor, packed, bias: torch.Tensor | None = None, isa: str | int | None = None,
         int8_act: bool = False) -> torch.Tensor:
    """``x [M, K] @ W (+ bias) -> [M, N]`` in ``x.dtype`` for a :class:`~.layout.CpuPackedWeight`.

    ``int8_act``: quantize ``x`` per call to int8 in blocks of 32 (llama.cpp's Q8_0) and use the
    integer dot-product kernels; the result is ``xhat @ W`` with ``xhat`` from
    :func:`~.layout.q8_activations_reference`."""
    p = packed
    return torch.ops.quantkern_cpu.gemm(x, p.w, p.scales, p.zs, p.gptr, p.src, p.cb, p.out_features, bias,
                                        isa_level(isa), int8_act)


def moe_gemm(x: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor, packed,
             bias: torch.Tensor | None = None, isa: str | int | None = None) -> torch.Tensor:
    """The grouped projection (:mod:`quantkern.kernels.moe`) ``-> [P, N]`` in ``x.dtype`` for a
    :class:`~.layout.CpuPackedExperts`; ``bias`` ``[E, N]`` or None."""
    p = packed
    return torch.ops.quantkern_cpu.moe_gemm(x, rows, offsets, p.w, p.scales, p.zs, p.gptr, p.src, p.cb,
                                            p.out_features, bias, isa_level(isa))

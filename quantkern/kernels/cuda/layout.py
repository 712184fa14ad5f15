"""Weight layouts of the CUDA kernels (csrc/cuda), built once at load, and their CPU emulation.

Pure torch, runs anywhere: the repacks are what :class:`~quantkern.kernels.cuda.backend.CudaKernel`
stores, and the ``emulate_*`` functions decode a packed layout exactly the way the kernels read it (same
word index arithmetic, same shifts and masks, same magic-number dequantization in the activation dtype),
so the tests can prove layout and dequant bit-exact against the reference on a machine without a GPU.

Tensor-core GEMM (``csrc/cuda/gemm_wna16.cu``, 4 / 8 bits): codes padded to ``Kp x Np`` (multiples of
64 x 128), cut into 64 x 128 tiles stored ``[n_tile][k_tile]``, each tile ``256 * bits`` int32 words in
mma-fragment order (see the kernel's header comment); scales / zeros ``[Gp, Np]`` in the activation dtype.

GEMV (``csrc/cuda/gemv_wna16.cu``, 2..8 bits): the GPTQ row layout (bit stream along K) with K padded to
a multiple of 32; scales / zeros ``[G, N]`` in the activation dtype; ``g_idx`` int32 ``[Kp]``.

Act-order: both layouts hold K permuted so that groups are contiguous (``perm`` sorts ``g_idx``,
stably); the kernel wrapper applies ``x[:, perm]`` per call. ``perm`` is None when ``g_idx`` is
already sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...formats.bitpack import pack_rows

GEMM_BN, GEMM_BK = 128, 64  # must match QK_GEMM_BN / QK_GEMM_BK in csrc/cuda/qk_launch.h
GEMM_BITS = (4, 8)
GEMV_CHUNK = 32
GEMV_MAX_M = 8
_MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}


def _ceil_to(v: int, m: int) -> int:
    return -(-v // m) * m


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def act_order_perm(g_idx: torch.Tensor) -> torch.Tensor | None:
    """The stable sort of ``g_idx`` (int64 ``[K]``) when it is not already non-decreasing, else None."""
    if g_idx.numel() < 2 or bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None
    return torch.sort(g_idx.long(), stable=True).indices


def gemm_unsupported(in_features: int, out_features: int, bits: int, group_size: int,
                     g_idx: torch.Tensor | None = None) -> str | None:
    """Why the tensor-core GEMM cannot hold this weight, or None if it can.

    It needs 4 or 8 bits, ``in_features % 8 == 0`` (16-byte activation rows), an even
    ``out_features``, a group size of -1 or a multiple of 64, and groups that are contiguous runs of
    ``group_size`` columns once sorted (true of GPTQ act-order checkpoints; a hand-made ``g_idx`` may not be).
    Without ``g_idx`` only what the scheme and shape decide is checked.
    """
    if bits not in GEMM_BITS:
        return f"the tensor-core GEMM takes {GEMM_BITS[0]} or {GEMM_BITS[1]} bits, got {bits}"
    if in_features % 8:
        return f"the tensor-core GEMM needs in_features % 8 == 0, got {in_features}"
    if out_features % 2:
        return f"the tensor-core GEMM needs an even out_features, got {out_features}"
    if group_size != -1 and group_size % GEMM_BK:
        return f"the tensor-core GEMM needs group_size -1 or a multiple of {GEMM_BK}, got {group_size}"
    if g_idx is None:
        return None
    g = g_idx.long()
    perm = act_order_perm(g)
    gs = g if perm is None else g[perm]
    want = torch.zeros_like(gs) if group_size == -1 else torch.arange(in_features, device=gs.device) // group_size
    if not torch.equal(gs, want):
        return "g_idx is not a permutation of contiguous groups of group_size columns"
    return None


@dataclass
class GemmLayout:
    """Packed operands of ``quantkern::cuda_gemm_wna16`` for one layer."""

    qweight: torch.Tensor  # int32 [Np/128 * Kp/64 * 256 * bits]
    scales: torch.Tensor   # [Gp, Np], activation dtype
    zeros: torch.Tensor    # [Gp, Np], activation dtype (integer values)
    perm: torch.Tensor | None
    bits: int
    group_size: int        # in K, a multiple of 64 (Kp for per-channel)
    k: int
    n: int

    @property
    def kp(self) -> int:
        return _ceil_to(self.k, GEMM_BK)

    @property
    def np(self) -> int:
        return self.scales.shape[1]


def pack_gemm(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
              group_size: int, dtype: torch.dtype) -> GemmLayout:
    """Repack canonical ``codes`` (int32 ``[N, K]``), ``scales`` / ``zeros`` (``[G, N]``) and ``g_idx``
    (``[K]``) into the GEMM layout, scales and zeros cast to ``dtype`` (fp16 / bf16).

    Raises ValueError with the reason of :func:`gemm_unsupported`, or for another dtype.
    """
    n, k = codes.shape
    if dtype not in _MAGIC:
        raise ValueError(f"the CUDA kernels take fp16 or bf16 activations, got {dtype}")
    reason = gemm_unsupported(k, n, bits, group_size, g_idx)
    if reason:
        raise ValueError(reason)
    perm = act_order_perm(g_idx.long())
    c = codes.t() if perm is None else codes.t()[perm]  # [K, N], groups contiguous
    kp, np_ = _ceil_to(k, GEMM_BK), _ceil_to(n, GEMM_BN)
    cp = torch.zeros(kp, np_, dtype=torch.int64, device=codes.device)
    cp[:k, :n] = c
    kt, nt = kp // GEMM_BK, np_ // GEMM_BN
    # k = kt*64 + j*16 + half*8 + t*2 + e ; n = nt*128 + w*32 + f*16 + ti*8 + g
    v = cp.view(kt, 4, 2, 4, 2, nt, 4, 2, 2, 8)
    #           kt j  hf t  e  nt w  f  ti g
    if bits == 4:  # word [nt, kt, j, w, g, t, f], nibble p = e*4 + half*2 + ti
        v = v.permute(5, 0, 1, 6, 9, 3, 7, 4, 2, 8).reshape(-1, 8)
    else:  # word [nt, kt, j, w, g, t, f, half], byte p = e*2 + ti
        v = v.permute(5, 0, 1, 6, 9, 3, 7, 2, 4, 8).reshape(-1, 4)
    shifts = torch.arange(v.shape[1], device=v.device) * bits
    words = (v << shifts).sum(dim=1)
    gs = kp if group_size == -1 else group_size
    gp = -(-kp // gs)
    s = torch.zeros(gp, np_, dtype=dtype, device=codes.device)
    z = torch.zeros(gp, np_, dtype=dtype, device=codes.device)
    s[: scales.shape[0], :n] = scales.to(dtype)
    z[: zeros.shape[0], :n] = zeros.to(dtype)
    return GemmLayout(_to_int32(words), s, z, perm, bits, gs, k, n)


def _dequant_pair(words: torch.Tensor, pos: int, bits: int, z: torch.Tensor, s: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's ``Dequant<T, BITS>::pair<POS>``: the two values at bit offsets ``pos*bits`` and
    ``16 + pos*bits`` of int64 ``words``, as ``dtype`` tensors, in the kernel's arithmetic."""
    mask = 0x000F000F if bits == 4 else 0x00FF00FF
    t = (words >> (pos * bits)) & mask
    if dtype == torch.bfloat16 and bits == 8:  # fp32 path
        a = (t & 0xFF).float() - z.float()
        b = ((t >> 16) & 0xFF).float() - z.float()
        return (a * s.float()).to(dtype), (b * s.float()).to(dtype)
    magic, base = _MAGIC[dtype]
    zoff = (z.float() + base).to(dtype)  # __hadd(z, 1024) / bf16(z + 128): exact for these ranges
    lo = ((t & 0xFFFF) | magic).to(torch.int16).view(dtype)
    hi = (((t >> 16) & 0xFFFF) | magic).to(torch.int16).view(dtype)
    return (lo - zoff) * s, (hi - zoff) * s  # one rounding per op in dtype, like __hsub2 / __hmul2


def emulate_gemm_weight(layout: GemmLayout) -> torch.Tensor:
    """The ``[Kp, Np]`` matrix (activation dtype, K in the layout's permuted order) that the GEMM kernel
    feeds to its mma instructions, reconstructed from the packed words with the kernel's own indexing:
    word ``((j*4 + warp)*32 + lane) * 2*WPF + f*WPF + wi`` of tile ``(n_tile, k_tile)``, and the mma B
    fragment rule b0 = (k = 2t, 2t+1; n = g), b1 = (k = 2t+8, 2t+9; n = g)."""
    bits, dtype = layout.bits, layout.scales.dtype
    kp, np_ = layout.kp, layout.np
    kt_n, nt_n = kp // GEMM_BK, np_ // GEMM_BN
    wpf = bits // 4
    tile_words = GEMM_BK * GEMM_BN * bits // 32
    words = layout.qweight.long() & 0xFFFFFFFF
    out = torch.empty(kp, np_, dtype=dtype)
    nt = torch.arange(nt_n).view(-1, 1, 1)
    kt = torch.arange(kt_n).view(1, -1, 1)
    lane = torch.arange(32).view(1, 1, -1)
    g, t = lane // 4, lane % 4
    for j in range(GEMM_BK // 16):
        for warp in range(4):
            for f in range(2):
                for ti in range(2):
                    n, grp = torch.broadcast_tensors(nt * GEMM_BN + warp * 32 + f * 16 + ti * 8 + g,
                                                     (kt * GEMM_BK) // layout.group_size)
                    s, z = layout.scales[grp, n], layout.zeros[grp, n]
                    for half in range(2):
                        wi = half if bits == 8 else 0
                        idx = (nt * kt_n + kt) * tile_words + ((j * 4 + warp) * 32 + lane) * 2 * wpf + f * wpf + wi
                        pos = (half * 2 + ti) if bits == 4 else ti
                        lo, hi = _dequant_pair(words[idx], pos, bits, z, s, dtype)
                        k = (kt * GEMM_BK + j * 16 + 2 * t + 8 * half).expand_as(n)
                        out[k, n] = lo
                        out[k + 1, n] = hi
    return out


@dataclass
class GemvLayout:
    """Packed operands of ``quantkern::cuda_gemv_wna16`` for one layer."""

    qweight: torch.Tensor  # int32 [Kp/32 * bits, N]
    scales: torch.Tensor   # [G, N], activation dtype
    zeros: torch.Tensor    # [G, N], activation dtype (integer values)
    g_idx: torch.Tensor    # int32 [Kp]
    perm: torch.Tensor | None
    bits: int
    k: int


def pack_gemv(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
              dtype: torch.dtype) -> GemvLayout:
    """Repack canonical ``codes`` (int32 ``[N, K]``), ``scales`` / ``zeros`` ``[G, N]`` and ``g_idx``
    ``[K]`` into the GEMV layout. Raises ValueError for bits outside 2..8 or a dtype other than fp16 / bf16."""
    if bits not in range(2, 9):
        raise ValueError(f"the CUDA GEMV takes 2..8 bits, got {bits}")
    if dtype not in _MAGIC:
        raise ValueError(f"the CUDA kernels take fp16 or bf16 activations, got {dtype}")
    n, k = codes.shape
    g = g_idx.long()
    perm = act_order_perm(g)
    c = codes.t() if perm is None else codes.t()[perm]
    if perm is not None:
        g = g[perm]
    kp = _ceil_to(k, GEMV_CHUNK)
    cp = torch.zeros(kp, n, dtype=torch.int32, device=codes.device)
    cp[:k] = c
    gp = torch.cat([g, g[-1:].expand(kp - k)]).to(torch.int32)  # padding columns: a valid group, x = 0 there
    return GemvLayout(pack_rows(cp, bits), scales.to(dtype).contiguous(), zeros.to(dtype).contiguous(), gp,
                      perm, bits, k)


def emulate_gemv_weight(layout: GemvLayout) -> torch.Tensor:
    """The ``[Kp, N]`` weight the GEMV kernel multiplies, decoded like ``extract<BITS, I>`` does (word
    ``c*bits + off/32`` of column n, shift ``off % 32``, straddling words OR-ed) and dequantized as
    ``T((q - z) * s)`` in fp32."""
    bits, dtype = layout.bits, layout.scales.dtype
    words = layout.qweight.long() & 0xFFFFFFFF
    chunks = words.shape[0] // bits
    w = words.view(chunks, bits, -1)
    mask = (1 << bits) - 1
    q = torch.empty(chunks, GEMV_CHUNK, w.shape[2], dtype=torch.int64)
    for i in range(GEMV_CHUNK):
        wi, sh = divmod(i * bits, 32)
        v = w[:, wi] >> sh
        if sh + bits > 32:
            v = v | (w[:, wi + 1] << (32 - sh))
        q[:, i] = v & mask
    q = q.view(chunks * GEMV_CHUNK, -1).float()
    g = layout.g_idx.long()
    return ((q - layout.zeros.float()[g]) * layout.scales.float()[g]).to(dtype)

"""The weight layout the Triton WnA16 kernels read (pure torch; importing this needs no triton).

The GPTQ checkpoint layout is repacked once, at load, into :class:`TritonWeight`:

- ``qweight``: int32 ``[ceil(K / VPW), N]`` with ``VPW = 32 // bits`` codes per word, packed along
  K, lowest bits first: code ``k`` of column ``n`` is ``(qweight[k // VPW, n] >> (k % VPW) * bits)
  & (2**bits - 1)``. For 2 / 4 / 8 bits this *is* the GPTQ ``qweight`` (no copy is made). For
  3 / 5 / 6 / 7 bits the GPTQ bit stream straddles words; here each word holds ``VPW`` whole codes
  (3-bit: 10 codes in 30 bits, 3.2 bits a weight instead of 3) so a kernel needs one load and one
  shift per code, never two words.
- ``scales``: ``[G, N]`` (fp16 / bf16 / fp32, as stored by the layer).
- ``zeros``: uint8 ``[G, N]`` unpacked zero points, or an empty tensor when every zero equals
  ``zero_point`` (symmetric schemes), which the kernels then use as a compile-time constant.
- ``g_idx``: int32 ``[K]``, the group of each input column *in kernel order*.
- ``perm``: int64 ``[K]`` or ``None``. With act-order the columns are sorted by group once here
  (stable sort of ``g_idx``); kernel column ``k`` then reads activation column ``perm[k]``, so the
  activations are permuted per call (``x[:, perm]``) and the groups become contiguous again.
- ``group_size``: ``> 0`` promises ``g_idx[k] == k // group_size`` (the kernels load one row of
  scales per K tile); ``-1`` means a single group; ``0`` means an arbitrary ``g_idx`` that the kernels
  gather per column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.bitpack import unpack_cols, unpack_rows

_MASK32 = (1 << 32) - 1


def values_per_word(bits: int) -> int:
    """Whole ``bits``-bit codes held by one int32 word of the Triton layout."""
    if bits not in range(2, 9):
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return 32 // bits


def pack_k_words(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[K, N]`` (ints in ``[0, 2**bits)``) along K into int32 ``[ceil(K / VPW), N]``."""
    if codes_kn.dim() != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {tuple(codes_kn.shape)}")
    vpw = values_per_word(bits)
    k, n = codes_kn.shape
    v = codes_kn.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    pad = (-k) % vpw
    if pad:
        v = torch.cat([v, v.new_zeros(pad, n)])
    v = v.view(-1, vpw, n)
    words = v.new_zeros(v.shape[0], n)
    for i in range(vpw):
        words |= v[:, i] << (i * bits)
    words &= _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32).contiguous()


def unpack_k_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_k_words`: int32 ``[ceil(K / VPW), N]`` -> int32 ``[K, N]``."""
    vpw = values_per_word(bits)
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != -(-k // vpw):
        raise ValueError(f"expected int32 [{-(-k // vpw)}, N] for K={k}, bits={bits}; got "
                         f"{words.dtype} {tuple(words.shape)}")
    w = words.to(torch.int64) & _MASK32
    shifts = torch.arange(vpw, device=words.device, dtype=torch.int64) * bits
    out = (w.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return out.reshape(-1, words.shape[1])[:k].to(torch.int32)


@dataclass
class TritonWeight:
    """One Linear's weight in the Triton kernels' layout (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int
    zero_point: int
    in_features: int
    out_features: int

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def nbytes(self) -> int:
        """Bytes a kernel streams for the weight (codes + scales + zeros + g_idx when gathered)."""
        t = [self.qweight, self.scales, self.zeros] + ([self.g_idx] if self.group_size == 0 else [])
        return sum(x.numel() * x.element_size() for x in t)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[K, N]`` weight in *original* column order (tests and debugging)."""
        codes = unpack_k_words(self.qweight, self.bits, self.in_features)
        g = self.g_idx.long()
        z = float(self.zero_point) if self.zero_point >= 0 else self.zeros.to(torch.float32)[g]
        w = (codes.to(torch.float32) - z) * self.scales.to(torch.float32)[g]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w.to(dtype)


def _layout_group_size(g_idx: torch.Tensor, num_groups: int, group_size: int) -> int:
    """The ``group_size`` field for a (kernel-order) ``g_idx``: regular, single group or arbitrary."""
    k = g_idx.numel()
    if num_groups == 1 and bool((g_idx == 0).all()):
        return -1
    if group_size > 0 and num_groups == -(-k // group_size):
        regular = torch.arange(k, device=g_idx.device, dtype=torch.int32) // group_size
        if torch.equal(g_idx.to(torch.int32), regular):
            return group_size
    return 0


def pack_triton_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, group_size: int = 0, sort_act_order: bool = True) -> TritonWeight:
    """Build a :class:`TritonWeight` from the canonical form.

    ``codes`` int ``[N, K]``; ``scales`` ``[G, N]``; ``zeros`` int ``[G, N]`` (as-is, v2); ``g_idx``
    int ``[K]`` in ``[0, G)``; ``group_size`` is the scheme's (a hint; the layout checks it against
    ``g_idx``). With ``sort_act_order`` a non-monotonic ``g_idx`` is sorted (see ``perm``).
    Any K and N work here (no GPTQ divisibility). Raises ``ValueError`` on inconsistent shapes/ranges.
    """
    values_per_word(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if scales.dim() != 2 or scales.shape[1] != n or zeros.shape != scales.shape:
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [G, {n}]")
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    num_groups = scales.shape[0]
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
        raise ValueError(f"g_idx values must lie in [0, {num_groups})")
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > (1 << bits) - 1):
        raise ValueError(f"zeros outside [0, {(1 << bits) - 1}]")
    g_idx = g_idx.to(torch.int32)
    perm = None
    if sort_act_order and k > 1 and bool((g_idx[1:] < g_idx[:-1]).any()):
        perm = torch.sort(g_idx.to(torch.int64), stable=True).indices
        g_idx = g_idx[perm]
        codes = codes[:, perm]
    z0 = int(zeros.flatten()[0]) if zeros.numel() else 0
    constant_zero = bool((zeros == z0).all())
    return TritonWeight(
        qweight=pack_k_words(codes.t(), bits),
        scales=scales.contiguous(),
        zeros=zeros.new_empty(0, dtype=torch.uint8) if constant_zero else zeros.to(torch.uint8).contiguous(),
        g_idx=g_idx.contiguous(),
        perm=perm,
        bits=bits,
        group_size=_layout_group_size(g_idx, num_groups, group_size),
        zero_point=z0 if constant_zero else -1,
        in_features=k,
        out_features=n,
    )


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
              bits: int, in_features: int, group_size: int = 0, sort_act_order: bool = True) -> TritonWeight:
    """Repack GPTQ-layout tensors (v2 zeros, see :mod:`quantkern.formats.gptq`) into a :class:`TritonWeight`.

    For 2 / 4 / 8 bits without act-order the GPTQ ``qweight`` is reused as is (same bits, no copy).
    """
    n = scales.shape[1]
    zeros = unpack_cols(qzeros, bits, n)
    g = g_idx.to(torch.int32)
    monotonic = in_features < 2 or not bool((g[1:] < g[:-1]).any())
    if 32 % bits == 0 and (monotonic or not sort_act_order):
        z0 = int(zeros.flatten()[0])
        constant_zero = bool((zeros == z0).all())
        return TritonWeight(
            qweight=qweight, scales=scales.contiguous(),
            zeros=zeros.new_empty(0, dtype=torch.uint8) if constant_zero else zeros.to(torch.uint8).contiguous(),
            g_idx=g.contiguous(), perm=None, bits=bits,
            group_size=_layout_group_size(g, scales.shape[0], group_size),
            zero_point=z0 if constant_zero else -1, in_features=in_features, out_features=n)
    codes = unpack_rows(qweight, bits, in_features).t()
    return pack_triton_weight(codes, scales, zeros, g_idx, bits, group_size, sort_act_order)

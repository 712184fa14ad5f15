"""The weight layout the Triton WnA16 kernels read (pure torch; importing this needs no triton).

The GPTQ checkpoint layout is repacked once, at load, into :class:`TritonWeight`:

- ``qweight``: int32 ``[R, N]``, codes packed along K in *bit planes*: a ``bits``-bit code is split
  into its binary digits' widths (2 -> [2], 3 -> [1, 2], 4 -> [4], 6 -> [2, 4], 8 -> [8]), low bits
  first, and each plane of width ``w`` is a block of ``ceil(K / (32 / w))`` rows holding ``32 / w``
  values a word, lowest bits first: plane value ``k`` of column ``n`` is
  ``(plane[k // (32 / w), n] >> (k % (32 / w)) * w) & (2**w - 1)``. Every plane has a power-of-two
  count of values per word, so a kernel loads each word once and unpacks it in registers, and the
  storage is exactly ``bits`` bits a weight. For 2 / 4 / 8 bits there is a single plane and it *is*
  the GPTQ ``qweight`` (no copy is made); 3-bit GPTQ streams, which straddle words, are repacked.
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


def bit_planes(bits: int) -> list[int]:
    """Widths of the bit planes of a ``bits``-bit code, low bits first: its binary digits (3 -> [1, 2])."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    return [w for w in (1, 2, 4, 8) if bits & w]


def packed_rows(k: int, bits: int) -> int:
    """Rows of the Triton ``qweight`` for K input features: one block of ``ceil(K / (32 / w))``
    rows per plane of width ``w``."""
    return sum(-(-k // (32 // w)) for w in bit_planes(bits))


def pack_k_words(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[K, N]`` (ints in ``[0, 2**bits)``) along K into int32 ``[packed_rows(K), N]``."""
    planes = bit_planes(bits)
    if codes_kn.dim() != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {tuple(codes_kn.shape)}")
    k, n = codes_kn.shape
    v = codes_kn.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    out, low = [], 0
    for w in planes:
        vpw = 32 // w
        p = (v >> low) & ((1 << w) - 1)
        low += w
        pad = (-k) % vpw
        if pad:
            p = torch.cat([p, p.new_zeros(pad, n)])
        p = p.view(-1, vpw, n)
        words = p.new_zeros(p.shape[0], n)
        for i in range(vpw):
            words |= p[:, i] << (i * w)
        out.append(words)
    words = torch.cat(out) & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32).contiguous()


def unpack_k_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_k_words`: int32 ``[packed_rows(K), N]`` -> int32 ``[K, N]``."""
    planes = bit_planes(bits)
    rows = packed_rows(k, bits)
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != rows:
        raise ValueError(f"expected int32 [{rows}, N] for K={k}, bits={bits}; got {words.dtype} {tuple(words.shape)}")
    w64 = words.to(torch.int64) & _MASK32
    codes = torch.zeros(k, words.shape[1], dtype=torch.int64, device=words.device)
    row, low = 0, 0
    for w in planes:
        vpw = 32 // w
        r = -(-k // vpw)
        shifts = torch.arange(vpw, device=words.device, dtype=torch.int64) * w
        vals = (w64[row:row + r].unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << w) - 1)
        codes |= vals.reshape(-1, words.shape[1])[:k] << low
        row, low = row + r, low + w
    return codes.to(torch.int32)


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
    bit_planes(bits)
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


@dataclass
class TritonExperts(TritonWeight):
    """The weights of ``num_experts`` Linears of one shape in the Triton layout, stacked on a leading dim:
    what the grouped MoE kernel (:mod:`.moe_wna16`) reads. Each field is a :class:`TritonWeight`'s with
    an expert dim in front, unified over the experts so that one launch serves them all:

    - ``qweight`` int32 ``[E, R, N]``; ``scales`` ``[E, G, N]``; ``g_idx`` int32 ``[E, K]`` (kernel order);
    - ``zeros``: uint8 ``[E, G, N]``, or empty when every expert's zeros equal one ``zero_point``;
    - ``perm``: int32 ``[E, K]`` (expert ``e``'s kernel column ``k`` reads activation column
      ``perm[e, k]``; the identity for an expert whose ``g_idx`` was already sorted) or None when no
      expert was sorted;
    - ``group_size``: the experts' common layout group size, 0 (gathered) when they differ.
    """

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    def expert(self, e: int) -> TritonWeight:
        """Expert ``e`` as a dense :class:`TritonWeight` (views; tests and debugging)."""
        return TritonWeight(self.qweight[e], self.scales[e], self.zeros[e] if self.zero_point < 0 else self.zeros,
                            self.g_idx[e], None if self.perm is None else self.perm[e].long(), self.bits,
                            self.group_size, self.zero_point, self.in_features, self.out_features)


def experts_from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, in_features: int, group_size: int = 0) -> TritonExperts:
    """Repack stacked GPTQ tensors (``qweight [E, K*b/32, N]``, ``qzeros [E, G, N*b/32]`` v2,
    ``scales [E, G, N]``, ``g_idx [E, K]``) into :class:`TritonExperts`: :func:`from_gptq` per expert
    (act-order experts get K sorted by group), then stacked. For 2 / 4 / 8 bits without act-order
    every expert reuses its GPTQ words, so the stacked ``qweight`` (and ``scales``) are kept as they
    are, with no copy."""
    e = qweight.shape[0]
    ws = [from_gptq(qweight[i], qzeros[i], scales[i], g_idx[i], bits, in_features, group_size) for i in range(e)]
    shared = qweight.is_contiguous() and all(w.qweight.data_ptr() == qweight[i].data_ptr() for i, w in enumerate(ws))
    qw = qweight if shared else torch.stack([w.qweight for w in ws])
    points = {w.zero_point for w in ws}
    if len(points) == 1 and min(points) >= 0:
        zeros, zero_point = ws[0].zeros, ws[0].zero_point
    else:
        zeros = torch.stack([w.zeros if w.zero_point < 0 else
                             torch.full(w.scales.shape, w.zero_point, dtype=torch.uint8, device=w.scales.device)
                             for w in ws])
        zero_point = -1
    sizes = {w.group_size for w in ws}
    perm = None
    if any(w.perm is not None for w in ws):
        ident = torch.arange(in_features, device=qweight.device)
        perm = torch.stack([ident if w.perm is None else w.perm for w in ws]).to(torch.int32)
    return TritonExperts(qweight=qw, scales=scales.contiguous(), zeros=zeros,
                         g_idx=torch.stack([w.g_idx for w in ws]).contiguous(), perm=perm, bits=bits,
                         group_size=sizes.pop() if len(sizes) == 1 else 0, zero_point=zero_point,
                         in_features=in_features, out_features=ws[0].out_features)

"""The CPU kernels' private weight layout and the one-time repacking into it (see
csrc/cpu/gemm_kernels.h for how the kernels read it).

- codes go into fixed containers of ``cb`` bits (2 for W2, 4 for W3 / W4, 8 for W5..W8; a 3-bit code
  in a 4-bit container costs a third more bytes but decodes with the 4-bit path);
- K is reordered so that each group is one contiguous run (for act-order: a stable sort by g_idx),
  each run padded with zero codes to a multiple of ``vpw = 32 / cb`` k positions;
- words are ``[NB, KW, 16]``: 16 output columns per block, one int32 word per column holding ``vpw``
  consecutive (padded) k positions; position ``j`` sits at bit :func:`code_shift` ``(cb, j)`` (even
  positions in the low half-word, odd ones in the high half, so a pair (j, j+1) decodes into the two
  bf16 halves of a lane with one shift and one mask); N is padded to a multiple of 16 with zero
  scales.

``src`` maps each padded k position to the input column it reads (``K`` for padding, read as 0); it
is ``None`` when the padded order is the identity (no act-order, every group a multiple of ``vpw``),
which saves the per-call gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...formats.bitpack import unpack_cols, unpack_rows

CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
BLOCK_N = 16


def code_shift(cb: int, j: int) -> int:
    """Bit offset of k position ``j`` inside a word (csrc/cpu/gemm_kernels.h: code_shift)."""
    return (j & 1) * 16 + (j >> 1) * cb


@dataclass
class CpuPackedWeight:
    """``w`` int32 [NB, KW, 16]; ``scales`` / ``zs`` (= zero * scale) fp32 [NB, G, 16] (column block
    major: :meth:`scale_table` gives them as [G, N]); ``gptr`` int32
    [G+1] (group g spans word rows gptr[g]..gptr[g+1]-1); ``src`` int64 [KW*vpw] or None; ``cb``
    container bits."""

    w: torch.Tensor
    scales: torch.Tensor
    zs: torch.Tensor
    gptr: torch.Tensor
    src: torch.Tensor | None
    cb: int
    in_features: int
    out_features: int

    @property
    def vpw(self) -> int:
        return 32 // self.cb

    def scale_table(self, which: str = "scales") -> torch.Tensor:
        """``scales`` or ``zs`` as a [G, N] table (N = out_features), the canonical orientation."""
        t = getattr(self, which)
        return t.transpose(-3, -2).reshape(*t.shape[:-3], t.shape[-2], -1)[..., : self.out_features]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.scales, self.zs, self.gptr)
                   if t is not None)


def pack_cpu(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
             bits: int) -> CpuPackedWeight:
    """Repack canonical codes int32 [N, K], scales [G, N], zeros int32 [G, N], g_idx [K].

    Raises ``ValueError`` for bits outside 2..8, mismatched shapes or g_idx outside [0, G).
    """
    if bits not in CONTAINER_BITS:
        raise ValueError(f"bits must be one of {sorted(CONTAINER_BITS)}, got {bits}")
    n, k = codes.shape
    ng = scales.shape[0]
    if scales.shape != (ng, n) or zeros.shape != (ng, n) or g_idx.shape != (k,):
        raise ValueError(f"shapes do not match: codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, "
                         f"zeros {tuple(zeros.shape)}, g_idx {tuple(g_idx.shape)}")
    g = g_idx.long().cpu()
    if k and (int(g.min()) < 0 or int(g.max()) >= ng):
        raise ValueError(f"g_idx values must lie in [0, {ng})")
    cb = CONTAINER_BITS[bits]
    vpw = 32 // cb
    order = torch.sort(g, stable=True).indices
    counts = torch.bincount(g, minlength=ng)
    padded = (counts + vpw - 1) // vpw * vpw
    start = torch.cumsum(counts, 0) - counts  # exclusive prefix sums
    pstart = torch.cumsum(padded, 0) - padded
    kp = int(padded.sum())
    sg = g[order]
    pos = pstart[sg] + torch.arange(k) - start[sg]  # padded position of each sorted column
    src = torch.full((kp,), k, dtype=torch.int64)
    src[pos] = order
    identity = kp == k and bool(torch.equal(src, torch.arange(k)))

    nb = -(-n // BLOCK_N)
    npad = nb * BLOCK_N
    ct = codes.t().cpu().to(torch.int32)
    if identity and npad == n:  # no reordering, no padding: pack in place of a scatter
        cp = ct.reshape(kp // vpw, vpw, npad)
    else:
        cp = torch.zeros(kp, npad, dtype=torch.int32)
        cp[pos, :n] = ct if identity else ct[order]
        cp = cp.view(kp // vpw, vpw, npad)
    # int32 words: the shifts wrap into the sign bit as two's complement, which is the bit pattern wanted
    words = cp[:, 0] << code_shift(cb, 0)
    for j in range(1, vpw):
        words = words | (cp[:, j] << code_shift(cb, j))
    w = words.view(kp // vpw, nb, BLOCK_N).permute(1, 0, 2).contiguous()

    s = torch.zeros(ng, npad, dtype=torch.float32)
    s[:, :n] = scales.float().cpu()
    zs = torch.zeros(ng, npad, dtype=torch.float32)
    zs[:, :n] = zeros.float().cpu() * s[:, :n]
    s, zs = (t.view(ng, nb, BLOCK_N).transpose(0, 1).contiguous() for t in (s, zs))  # [NB, G, 16]
    gptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(padded // vpw, 0)]).to(torch.int32)
    return CpuPackedWeight(w=w, scales=s, zs=zs, gptr=gptr, src=None if identity else src, cb=cb,
                           in_features=k, out_features=n)


def pack_cpu_from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, in_features: int) -> CpuPackedWeight:
    """Repack a QuantLinear's GPTQ buffers (v2 zeros) into the CPU layout."""
    n = scales.shape[1]
    codes = unpack_rows(qweight.cpu(), bits, in_features).t()
    zeros = unpack_cols(qzeros.cpu(), bits, n)
    return pack_cpu(codes, scales, zeros, g_idx, bits)


def unpack_cpu(p: CpuPackedWeight) -> torch.Tensor:
    """Codes int32 [N, K] back from the packed layout (inverse of :func:`pack_cpu`, for tests)."""
    nb, kw, _ = p.w.shape
    words = p.w.permute(1, 0, 2).reshape(kw, nb * BLOCK_N).to(torch.int64) & 0xFFFFFFFF
    mask = (1 << p.cb) - 1
    cp = torch.stack([(words >> code_shift(p.cb, j)) & mask for j in range(p.vpw)], dim=1).reshape(kw * p.vpw, -1)
    k = p.in_features
    src = p.src if p.src is not None else torch.arange(k)
    valid = src < k
    out = torch.zeros(k, cp.shape[1], dtype=torch.int64)
    out[src[valid]] = cp[valid]
    return out[:, : p.out_features].t().to(torch.int32).contiguous()


def q8_activations_reference(x: torch.Tensor, p: CpuPackedWeight) -> torch.Tensor:
    """What the int8-activation kernels (``quantkern_cpu::gemm`` with ``int8_act``; csrc/cpu/gemm_kernels.h)
    multiply ``W`` with: ``x [M, K]`` (fp32) gathered into ``p``'s padded k order, quantized per block of
    32 positions that start at each group's first word row (``d = max|x| / 127``, ``q = round(x / d)``,
    ties to even; a block with a non-finite value gives NaN), and scattered back to ``[M, K]`` as
    ``d * q``. The kernels compute ``xhat @ W`` from the same integers, so they agree with
    ``F.linear(xhat, W)`` up to fp32 summation order."""
    x = x.float()
    m, k = x.shape
    src = p.src if p.src is not None else torch.arange(k)
    xp = torch.cat([x, x.new_zeros(m, 1)], 1)[:, src]  # padding slots read column K: zero
    vpw = p.vpw
    bounds = []
    gptr = p.gptr.tolist()
    for g in range(len(gptr) - 1):
        for rb in range(gptr[g], gptr[g + 1], p.cb):  # cb word rows = 32 positions
            bounds.append((rb * vpw, min(rb + p.cb, gptr[g + 1]) * vpw))
    out = torch.empty_like(xp)
    for k0, k1 in bounds:
        blk = xp[:, k0:k1]
        d = blk.abs().amax(1, keepdim=True) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(blk * inv).clamp(-127, 127)
        q = torch.where(torch.isfinite(d), q, torch.zeros_like(q))
        d = torch.where(torch.isfinite(d), d, torch.full_like(d, float("nan")))
        out[:, k0:k1] = q * d
    xhat = x.new_zeros(m, k + 1)
    xhat[:, src] = out  # padding slots all land in the dropped column K
    return xhat[:, :k]


@dataclass
class CpuPackedExperts(CpuPackedWeight):
    """The layout of :class:`CpuPackedWeight` stacked over ``E`` experts of one shape (the grouped op
    ``quantkern_cpu::moe_gemm``, csrc/cpu/moe.cpp): ``w`` int32 [E, NB, KW, 16]; ``scales`` / ``zs``
    fp32 [E, NB, G, 16]; ``gptr`` int32 [E, G+1] (each expert its own group boundaries); ``src`` int64
    [E, KW*vpw] or None (None only when every expert's padded order is the identity)."""

    @property
    def num_experts(self) -> int:
        return self.w.shape[0]


def pack_cpu_experts(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                     bits: int, in_features: int) -> CpuPackedExperts:
    """Repack the stacked GPTQ buffers of ``E`` experts (``qweight [E, K*b/32, N]``, ``qzeros [E, G,
    N*b/32]``, ``scales [E, G, N]``, ``g_idx [E, K]``, v2 zeros) expert by expert with
    :func:`pack_cpu_from_gptq` and stack the results.

    Act-order experts may pad their groups to different lengths: every expert is padded to the longest
    (zero code words appended to its last group, read against the zero padding slot of ``src``), so
    all share ``KW``; ``src`` is then given for every expert (the identity ones included)."""
    e = qweight.shape[0]
    if e < 1 or not (qzeros.shape[0] == scales.shape[0] == g_idx.shape[0] == e):
        raise ValueError(f"expert counts do not match: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}")
    parts = [pack_cpu_from_gptq(qweight[i], qzeros[i], scales[i], g_idx[i], bits, in_features) for i in range(e)]
    first = parts[0]
    kw = max(p.w.shape[1] for p in parts)
    vpw, k = first.vpw, in_features
    need_src = any(p.src is not None or p.w.shape[1] != kw for p in parts)
    ws, gptrs, srcs = [], [], []
    for p in parts:
        pad = kw - p.w.shape[1]
        ws.append(torch.nn.functional.pad(p.w, (0, 0, 0, pad)) if pad else p.w)
        gptr = p.gptr.clone()
        gptr[-1] = kw  # the appended rows belong to the last group
        gptrs.append(gptr)
        if need_src:
            src = p.src if p.src is not None else torch.arange(k, dtype=torch.int64)
            srcs.append(torch.cat([src, torch.full((kw * vpw - src.numel(),), k, dtype=torch.int64)]))
    return CpuPackedExperts(w=torch.stack(ws), scales=torch.stack([p.scales for p in parts]),
                            zs=torch.stack([p.zs for p in parts]), gptr=torch.stack(gptrs),
                            src=torch.stack(srcs) if need_src else None, cb=first.cb, in_features=k,
                            out_features=first.out_features)

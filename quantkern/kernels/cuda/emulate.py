"""Thread-level CPU models of the CUDA kernels, for tests on machines without a GPU.

Each function transliterates its kernel's index arithmetic (grid, splits, warps, lanes, shared-memory
addresses, the ldmatrix / mma.sync fragment rules of the PTX ISA, the epilogue's stores) into torch
on the CPU, vectorised over the 32 lanes of a warp. Running them against the reference checks that
the pieces fit together (x swizzle written by cp.async = swizzle read by ldmatrix, A / B / C fragment
ownership, per-stage group rows, K tails, split ranges) which the layout emulation of ``layout.py``
alone does not. They do not model timing or races: the pipeline's synchronisation is argued in the
kernel's header comment, not tested here.

Fragment rules used (PTX ISA, mma.m16n8k16 with .f16 / .bf16 inputs; g = lane / 4, t = lane % 4):
A a0 = (row g, cols 2t, 2t+1), a1 = row g+8, a2 = cols + 8, a3 = both; B b0 = (rows 2t, 2t+1; col g),
b1 = rows + 8; C c0, c1 = (row g; cols 2t, 2t+1), c2, c3 = row g+8. ldmatrix.x4: lane l gives the
address of row l % 8 of matrix l / 8, and thread T receives elements (T / 4, 2 (T % 4) + {0, 1}) of
each matrix, one register per matrix.
"""

from __future__ import annotations

import torch

from .layout import GEMM_BK, GEMM_BN, GEMV_CHUNK, GemmLayout, GemvLayout, _dequant_pair

_LANE = torch.arange(32)
_G, _T = _LANE // 4, _LANE % 4


def _a_fragments(s_a: torch.Tensor, mt: int, j: int) -> list[torch.Tensor]:
    """ldmatrix.x4 of the m16 x k16 block (mt, j) from the swizzled x tile ``s_a`` ([rows*8, 8] chunks):
    four ``[32, 2]`` registers per lane."""
    r = mt * 16 + (_LANE & 15)
    c = j * 2 + (_LANE >> 4)
    rows = s_a[r * 8 + (c ^ (r & 7))]  # the 8 halves at the address lane l supplies
    mats = rows.view(4, 8, 8)  # [matrix = l / 8][row = l % 8]
    return [mats[i, _G][torch.arange(32).unsqueeze(1), 2 * _T.unsqueeze(1) + torch.arange(2)] for i in range(4)]


def _mma(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """One m16n8k16 mma: fragments in, per-lane ``[32, 4]`` fp32 C fragment out."""
    A = torch.zeros(16, 16)
    B = torch.zeros(16, 8)
    for e in range(2):
        A[_G, 2 * _T + e] = a[0][:, e].float()
        A[_G + 8, 2 * _T + e] = a[1][:, e].float()
        A[_G, 2 * _T + 8 + e] = a[2][:, e].float()
        A[_G + 8, 2 * _T + 8 + e] = a[3][:, e].float()
        B[2 * _T + e, _G] = b[0][:, e].float()
        B[2 * _T + 8 + e, _G] = b[1][:, e].float()
    D = A @ B
    return torch.stack([D[_G, 2 * _T], D[_G, 2 * _T + 1], D[_G + 8, 2 * _T], D[_G + 8, 2 * _T + 1]], dim=1)


def emulate_gemm(x: torch.Tensor, p: GemmLayout, splits: int) -> torch.Tensor:
    """``quantkern::cuda_gemm_wna16(x, ...)`` modelled block by block; ``x`` ``[M, K]`` already permuted
    like the wrapper does. Returns ``[M, N]`` in ``x.dtype``."""
    m_rows, k = x.shape
    dtype, bits = p.scales.dtype, p.bits
    mt_n = 1 if m_rows <= 16 else 2 if m_rows <= 32 else 4
    bm = 16 * mt_n
    k_tiles = p.kp // GEMM_BK
    per = -(-k_tiles // splits)
    used = -(-k_tiles // per)
    tile_words = GEMM_BK * GEMM_BN * bits // 32
    wpf = bits // 4
    words = p.qweight.long() & 0xFFFFFFFF
    ws = torch.zeros(used, m_rows, p.n)
    chunk_r, chunk_c = torch.arange(bm * 8) // 8, torch.arange(bm * 8) % 8
    for n_tile in range(p.np // GEMM_BN):
        n0 = n_tile * GEMM_BN
        for m0 in range(0, m_rows, bm):
            for split in range(used):
                acc = torch.zeros(4, mt_n, 4, 32, 4)  # [warp][mt][nt][lane][c]
                for kt in range(split * per, min(split * per + per, k_tiles)):
                    # load_stage: x chunks, zero-filled outside [M, K], stored at the swizzled position
                    gm, gk = m0 + chunk_r, kt * GEMM_BK + chunk_c * 8
                    valid = (gm < m_rows) & (gk < k)
                    src = torch.zeros(bm * 8, 8, dtype=x.dtype)
                    src[valid] = x[gm[valid].unsqueeze(1), gk[valid].unsqueeze(1) + torch.arange(8)]
                    s_a = torch.empty_like(src)
                    s_a[chunk_r * 8 + (chunk_c ^ (chunk_r & 7))] = src
                    s_w = words[(n_tile * k_tiles + kt) * tile_words:][:tile_words]
                    grow = kt // (p.group_size // GEMM_BK)
                    s_scale, s_zero = p.scales[grow, n0:n0 + GEMM_BN], p.zeros[grow, n0:n0 + GEMM_BN]
                    for warp in range(4):  # compute_stage
                        n_loc = [[warp * 32 + f * 16 + ti * 8 + _G for ti in range(2)] for f in range(2)]
                        for j in range(GEMM_BK // 16):
                            w = s_w[((j * 4 + warp) * 32 + _LANE).unsqueeze(1) * 2 * wpf + torch.arange(2 * wpf)]
                            bfrag = [[None, None] for _ in range(4)]
                            for f in range(2):
                                for ti in range(2):
                                    for half in range(2):
                                        word = w[:, f] if bits == 4 else w[:, f * 2 + half]
                                        pos = half * 2 + ti if bits == 4 else ti
                                        n = n_loc[f][ti]
                                        lo, hi = _dequant_pair(word, pos, bits, s_zero[n], s_scale[n], dtype)
                                        bfrag[f * 2 + ti][half] = torch.stack([lo, hi], dim=1)
                            for mt in range(mt_n):
                                a = _a_fragments(s_a, mt, j)
                                for nt in range(4):
                                    acc[warp, mt, nt] += _mma(a, bfrag[nt])
                # epilogue
                for warp in range(4):
                    for mt in range(mt_n):
                        for nt in range(4):
                            col = n0 + warp * 32 + nt * 8 + 2 * _T
                            for h in range(2):
                                row = m0 + mt * 16 + _G + 8 * h
                                ok = (col < p.n) & (row < m_rows)
                                for e in range(2):
                                    ws[split, row[ok], col[ok] + e] = acc[warp, mt, nt, ok, 2 * h + e]
    if used == 1:  # the kernel rounds its fp32 sums straight to the output dtype
        return ws[0].to(dtype)
    total = torch.zeros(m_rows, p.n)
    for s in range(used):  # reduce_splits_kernel: split order
        total = total + ws[s]
    return total.to(dtype)


def emulate_gemv(x: torch.Tensor, p: GemvLayout, splits: int) -> torch.Tensor:
    """``quantkern::cuda_gemv_wna16(x, ...)`` modelled per block, warp and chunk; ``x`` ``[M, K]`` already
    permuted. Returns ``[M, N]`` in ``x.dtype``."""
    m_rows, k = x.shape
    dtype, bits = p.scales.dtype, p.bits
    n_cols = p.qweight.shape[1]
    chunks = -(-k // GEMV_CHUNK)
    per = -(-chunks // splits)
    used = -(-chunks // per)
    words = p.qweight.long() & 0xFFFFFFFF
    mask = (1 << bits) - 1
    ws = torch.zeros(used, m_rows, n_cols)
    s_all, z_all = p.scales.float(), p.zeros.float()
    for nb in range(-(-n_cols // 32)):
        n = nb * 32 + _LANE
        col_ok = n < n_cols
        ncol = torch.where(col_ok, n, n_cols - 1)
        for split in range(used):
            red = torch.zeros(8, m_rows, 32)
            c_begin, c_end = split * per, min(split * per + per, chunks)
            for warp in range(8):
                acc = torch.zeros(m_rows, 32)
                cur_group, s, z = -1, None, None
                for c in range(c_begin + warp, c_end, 8):
                    kk = c * 32 + _LANE
                    xs = torch.where(kk < k, x[:, kk.clamp(max=k - 1)].float(), torch.zeros(()))  # [M, 32]
                    cw = words[c * bits:(c + 1) * bits][:, ncol]  # [bits, 32 lanes]
                    q = torch.empty(32, 32)  # [code i, lane]
                    for i in range(32):
                        wi, sh = divmod(i * bits, 32)
                        v = cw[wi] >> sh
                        if sh + bits > 32:
                            v = v | (cw[wi + 1] << (32 - sh))
                        q[i] = (v & mask).float()
                    my_group = p.g_idx[kk].long()
                    wq = torch.empty(32, 32)
                    for i in range(32):  # the uniform branch is this loop with one group
                        gi = int(my_group[i])
                        if gi != cur_group:
                            cur_group, s, z = gi, s_all[gi, ncol], z_all[gi, ncol]
                        wq[i] = ((q[i] - z) * s).to(dtype).float()
                    acc += xs @ wq  # [M, 32 codes] @ [32 codes, 32 lanes]
                red[warp] = acc
            total = red[0]
            for w in range(1, 8):
                total = total + red[w]
            ws[split][:, n[col_ok]] = total[:, col_ok]
    if used == 1:
        return ws[0].to(dtype)
    out = torch.zeros(m_rows, n_cols)
    for s in range(used):
        out = out + ws[s]
    return out.to(dtype)

// What the op bindings share (ops.cpp: the dense quantkern_cpu::gemm, moe.cpp: the grouped
// quantkern_cpu::moe_gemm): the ISA resolution and block-kernel choice, the gptr / src checks, the
// per-call gather of activation rows into the padded k order with their per-group sums, and the
// cache-blocked run of one panel of column blocks. Layout and kernels: gemm_kernels.h.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "gemm_kernels.h"

namespace quantkern_cpu {

// The highest ISA level this CPU runs: 1 portable, 2 AVX2 + FMA, 3 AVX-512 (F/BW/DQ/VL), 4 AVX-512 + BF16.
inline int64_t best_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return 4;
  if (avx512) return 3;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
  return 1;
}

// AVX-512 VNNI (vpdpbusd), used by the int8-activation kernels from level 3 up where the CPU has it.
inline bool has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

// The requested level (0 = best) resolved against this CPU; raises if it is not available.
inline int64_t resolve_isa(int64_t isa, const char* op) {
  const int64_t best = best_isa();
  TORCH_CHECK(isa >= 0 && isa <= 4, op, ": isa must be 0 (auto), 1 (portable), 2 (avx2), 3 (avx512) or 4 ",
              "(avx512bf16), got ", isa);
  TORCH_CHECK(isa <= best, op, ": isa ", isa, " requested but this CPU supports at most ", best);
  return isa == 0 ? best : isa;
}

struct BlockKernel {
  BlockFn fn;
  bool bf16;  // the BF16 kernel: reads GemmArgs::xh (bf16 activations), not GemmArgs::x
};

// The block kernel for a resolved ISA level, the activation dtype and the container width. BF16 dot
// products only where they are exact: bf16 activations, codes < 128 (2- / 4-bit containers).
// `int8_act`: the q8 kernels (AVX-512 VNNI from level 3 up where the CPU has it, AVX2 from level 2 up,
// else portable; VNNI and AVX2 give bit-identical results), whatever the activation dtype.
inline BlockKernel choose_kernel(int64_t isa, at::ScalarType dtype, int64_t cb, const char* op, bool int8_act = false) {
  TORCH_CHECK(cb == 2 || cb == 4 || cb == 8, op, ": container bits must be 2, 4 or 8, got ", cb);
  const int c = static_cast<int>(cb);
  if (int8_act)
    return {isa >= 3 && has_avx512_vnni() ? block_fn_q8_vnni(c) : isa >= 2 ? block_fn_q8_avx2(c) : block_fn_q8_scalar(c),
            false};
  if (isa == 4 && dtype == at::kBFloat16 && cb != 8) return {block_fn_avx512bf16(c), true};
  return {isa >= 3 ? block_fn_avx512(c) : isa == 2 ? block_fn_avx2(c) : block_fn_scalar(c), false};
}

// gptr [G + 1] of one weight: from 0 to KW, monotonic.
inline void check_gptr(const int32_t* gp, int64_t G, int64_t KW, const char* op, const char* what = "gptr") {
  TORCH_CHECK(gp[0] == 0 && gp[G] == KW, op, ": ", what, " must run from 0 to KW=", KW, ", got ", gp[0], " .. ",
              gp[G]);
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(gp[g] <= gp[g + 1], op, ": ", what, " is not monotonic");
}

// src [Kp] of one weight: every entry a column of x in [0, K] (K: a padding slot, read as 0).
inline void check_src(const int64_t* src, int64_t Kp, int64_t K, const char* op) {
  for (int64_t k = 0; k < Kp; ++k)
    TORCH_CHECK(src[k] >= 0 && src[k] <= K, op, ": src[", k, "] = ", src[k], " is outside [0, ", K, "]");
}

// One packed weight (gemm_kernels.h) as the ops read it, checked by check_packed.
struct PackedWeight {
  const int32_t* w;
  const float* scales;
  const float* zs;
  const int32_t* gptr;
  const int64_t* src;  // nullptr: the padded order is the identity
  int64_t NB, KW, Np, G, Kp;
};

// Checks w / scales / zs / gptr / src of one packed weight with cb-bit containers and n output features
// against an input of K features (src: nullptr or an empty tensor for the identity order, whose Kp must
// then be K) and returns its pointers and sizes. `where` starts every message; `input` names the input.
inline PackedWeight check_packed(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zs,
                                 const at::Tensor& gptr, const at::Tensor* src, int64_t cb, int64_t n, int64_t K,
                                 const std::string& where, const char* input = "the input") {
  TORCH_CHECK(cb == 2 || cb == 4 || cb == 8, where, ": container bits must be 2, 4 or 8, got ", cb);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 16 && w.scalar_type() == at::kInt && w.is_contiguous(), where,
              ": w must be contiguous int32 [NB, KW, 16], got ", w.sizes(), " ", w.scalar_type());
  PackedWeight p{};
  p.NB = w.size(0);
  p.KW = w.size(1);
  p.Np = p.NB * 16;
  p.G = gptr.numel() - 1;
  p.Kp = p.KW * (32 / cb);
  TORCH_CHECK(n > p.Np - 16 && n <= p.Np, where, ": n=", n, " does not match ", p.NB, " column blocks (", n,
              " output features do not match a packed width of ", p.Np, ")");
  TORCH_CHECK(gptr.scalar_type() == at::kInt && gptr.dim() == 1 && p.G >= 1 && gptr.is_contiguous(), where,
              ": gptr must be contiguous int32 [G+1]");
  for (const at::Tensor* t : {&scales, &zs})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == p.NB &&
                    t->size(1) == p.G && t->size(2) == 16,
                where, ": scales / zs must be contiguous fp32 [", p.NB, ", ", p.G, ", 16], got ", t->sizes());
  p.gptr = gptr.data_ptr<int32_t>();
  check_gptr(p.gptr, p.G, p.KW, where.c_str());
  if (src != nullptr && src->numel() > 0) {
    TORCH_CHECK(src->scalar_type() == at::kLong && src->numel() == p.Kp && src->is_contiguous(), where,
                ": src must be contiguous int64 [", p.Kp, "]");
    p.src = src->data_ptr<int64_t>();
    check_src(p.src, p.Kp, K, where.c_str());
  } else {
    TORCH_CHECK(K == p.Kp, where, ": ", input, " has ", K, " features but the packed weight expects ", p.Kp);
  }
  p.w = w.data_ptr<int32_t>();
  p.scales = scales.data_ptr<float>();
  p.zs = zs.data_ptr<float>();
  return p;
}

// Where activation row i of a call comes from: row `row` of x, gathered by `src` (nullptr: the padded
// order is the identity), grouped by `gp`.
struct RowSource {
  int64_t row;
  const int64_t* src;
  const int32_t* gp;
};

template <class T>
inline void row_group_sums(const T* xr, const int32_t* gp, int64_t G, int64_t vpw, float* xs) {
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.f;
    for (int64_t k = gp[g] * vpw; k < gp[g + 1] * vpw; ++k) s += static_cast<float>(xr[k]);
    xs[g] = s;
  }
}

// The activation dtypes the gather reads directly; callers convert others to fp32 first.
inline bool gather_reads(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// For i in [0, M): dst row i (Kp values of O) = x row of(i).row in the padded k order (padding = 0),
// and xs row i (G floats) its per-group sums. x: contiguous 2-D, a dtype gather_reads() accepts;
// of(i).src entries already checked to lie in [0, K]. Parallel over rows.
template <class O, class Of>
void gather_rows(const at::Tensor& x, int64_t M, int64_t Kp, int64_t G, int64_t vpw, const Of& of, O* dst,
                 float* xs) {
  const int64_t K = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantkern_cpu_gather", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(Kp, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const RowSource s = of(i);
        const scalar_t* xr = xp + s.row * K;
        O* d = dst + i * Kp;
        if (s.src == nullptr) {
          for (int64_t k = 0; k < Kp; ++k) d[k] = static_cast<O>(static_cast<float>(xr[k]));
        } else {
          for (int64_t k = 0; k < Kp; ++k)
            d[k] = s.src[k] < K ? static_cast<O>(static_cast<float>(xr[s.src[k]])) : static_cast<O>(0.f);
        }
        row_group_sums(d, s.gp, G, vpw, xs + i * G);
      }
    });
  });
}

// xs row i = the per-group sums of row i of x (M rows of Kp values, already in the padded order).
template <class T, class Of>
void group_sums(const T* x, int64_t M, int64_t Kp, int64_t G, int64_t vpw, const Of& of, float* xs) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(Kp, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) row_group_sums(x + i * Kp, of(i).gp, G, vpw, xs + i * G);
  });
}

// The activations of a call as the block kernels read them (GemmArgs::x / xh / xsum): `xa` holds M rows
// of Kp values in the padded k order (fp32, or bf16 for the BF16 kernel), `xsum` their per-group sums.
struct PaddedActivations {
  at::Tensor xa, xsum;
  const float* x = nullptr;      // fp32 rows (the fp32 kernels)
  const uint16_t* xh = nullptr;  // bf16 rows (the BF16 kernel)
  const float* xs = nullptr;
};

// Row i of the call (i in [0, M)) is x row of(i).row gathered by of(i).src. `in_order`: row i is x row
// first + i and no row has a src, so x itself is read when it already has the kernel's dtype.
template <class Of>
PaddedActivations padded_activations(const at::Tensor& x_in, bool bf16, bool in_order, int64_t first, int64_t M,
                                     int64_t Kp, int64_t G, int64_t vpw, const Of& of) {
  const at::Tensor x = (gather_reads(x_in.scalar_type()) ? x_in : x_in.to(at::kFloat)).contiguous();
  const at::ScalarType dt = bf16 ? at::kBFloat16 : at::kFloat;
  const bool direct = in_order && x.scalar_type() == dt;
  PaddedActivations a;
  a.xa = direct ? x : at::empty({M, Kp}, x.options().dtype(dt));
  a.xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
  float* xs = a.xsum.data_ptr<float>();
  a.xs = xs;
  const int64_t r0 = direct ? first * Kp : 0;
  if (bf16) {
    at::BFloat16* d = a.xa.data_ptr<at::BFloat16>() + r0;
    if (direct) group_sums(d, M, Kp, G, vpw, of, xs);
    else gather_rows(x, M, Kp, G, vpw, of, d, xs);
    a.xh = reinterpret_cast<const uint16_t*>(d);
  } else {
    float* d = a.xa.data_ptr<float>() + r0;
    if (direct) group_sums(d, M, Kp, G, vpw, of, xs);
    else gather_rows(x, M, Kp, G, vpw, of, d, xs);
    a.x = d;
  }
  return a;
}

// round(v) to the nearest integer, ties to even, for |v| <= 2^22 (the fp32 add puts the integer in the
// low mantissa bits; the default rounding mode is the tie rule torch.round uses), vectorisable.
inline int32_t round_even(float v) {
  const float t = v + 12582912.f;  // 1.5 * 2^23
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  return bits - 0x4B400000;
}

// The int8 activations of the q8 kernels (gemm_kernels.h, "Int8 activations") of one row of Kp fp32
// values already in the padded k order: qr [Kp], dr [KW] (each block's d at its first word row), xs [G]
// (per group the sum of d * q). A block with a non-finite value gets q = 0 and d = NaN, so its row comes
// out NaN as in the fp32 kernels.
inline void quantize_row_q8(const float* xr, int64_t G, int64_t cb, const int32_t* gp, int8_t* qr, float* dr,
                            float* xs) {
  const int64_t vpw = 32 / cb, bw = cb;
  int pos[16];
  for (int j = 0; j < vpw; ++j) pos[j] = q8_position(static_cast<int>(cb), j);
  for (int64_t g = 0; g < G; ++g) {
    float gs = 0.f;
    for (int64_t rb = gp[g]; rb < gp[g + 1]; rb += bw) {
      const int64_t k0 = rb * vpw, k1 = std::min<int64_t>(rb + bw, gp[g + 1]) * vpw;
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      if (!std::isfinite(amax)) {
        std::memset(qr + k0, 0, k1 - k0);
        dr[rb] = NAN;
        gs = NAN;
        continue;
      }
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int32_t qs = 0;
      for (int64_t k = k0; k < k1; k += vpw)
        for (int64_t j = 0; j < vpw; ++j) {
          const int32_t q = std::min(127, std::max(-127, round_even(xr[k + j] * id)));
          qr[k + pos[j]] = static_cast<int8_t>(q);
          qs += q;
        }
      dr[rb] = d;
      gs += d * static_cast<float>(qs);
    }
    xs[g] = gs;
  }
}

// quantize_row_q8 for M rows: xq [M, Kp], xd [M, KW], xs [M, G]. Parallel over rows.
inline void quantize_rows_q8(const float* x, int64_t M, int64_t Kp, int64_t KW, int64_t G, int64_t cb,
                             const int32_t* gp, int8_t* xq, float* xd, float* xs) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(Kp, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) quantize_row_q8(x + i * Kp, G, cb, gp, xq + i * Kp, xd + i * KW, xs + i * G);
  });
}

// Cache blocking. Rows are taken 8 at a time (one register tile); the column blocks are grouped into
// "panels" whose packed weights (about kPanelBytes) stay in L2 while every 8-row chunk of x passes over
// them, so for large M neither x nor w is re-read from memory per block. For M <= 8 this is simply one
// pass over each block. Panels are the parallel tasks (a thread streams its own contiguous part of w):
// at least 4 per thread over the `work_blocks` column blocks of the call keep the split even.
constexpr int64_t kRowChunk = 8, kPanelBytes = 256 * 1024;

inline int64_t panel_blocks(int64_t KW, int64_t work_blocks, int64_t threads) {
  const int64_t block_bytes = std::max<int64_t>(KW * 16 * 4, 1);
  return std::max<int64_t>(1, std::min(kPanelBytes / block_bytes, work_blocks / (4 * threads)));
}

// Column blocks b0 .. b1-1 of y for all a.M rows.
inline void run_panel(BlockFn fn, const GemmArgs& a, int64_t b0, int64_t b1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kRowChunk)
    for (int64_t b = b0; b < b1; ++b) fn(a, b, m0, std::min(a.M, m0 + kRowChunk));
}

}  // namespace quantkern_cpu

// AVX-512 fused dequant-matmul (layout: gemm_kernels.h). One zmm holds one word of each of the 16
// columns of a block; codes are decoded in registers and never written back as floats.
//
// Decoding: for 2- and 4-bit containers a single vpermps both extracts and converts a code:
// vpermps looks only at the low 4 bits of each lane's index, so (word >> code_shift(CB, j)) indexes a
// 16-entry table of floats directly (the table is 0..15 for CB = 4, and i & 3 for CB = 2, which
// discards the neighbouring code in bits 2-3). 8-bit codes use shift + mask + convert.
//
// Register blocking: MT rows of x share each decoded vector; with few rows the FMA chain is split
// over NACC accumulators (by j) so the FMA latency is hidden.
//
// Compiled for AVX-512 through the target pragma only (the rest of the library is built for the
// baseline ISA); the ops (op_common.h) call these only when the CPU reports avx512f + avx512bw.
#include <immintrin.h>

#include <utility>

#include "gemm_kernels.h"

// GCC 12 warns about its own _mm512_undefined_ps() inside vpermps; the value is fully overwritten
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")

namespace quantkern_cpu {
namespace {

template <int CB, int J>
inline __attribute__((always_inline)) __m512 decode(__m512i w, __m512 lut) {
  if constexpr (CB == 8) {
    __m512i q = J == 0 ? w : _mm512_srli_epi32(w, code_shift(8, J));
    if constexpr (code_shift(8, J) != 24) q = _mm512_and_si512(q, _mm512_set1_epi32(0xFF));
    return _mm512_cvtepi32_ps(q);
  } else {
    const __m512i q = J == 0 ? w : _mm512_srli_epi32(w, code_shift(CB, J));
    return _mm512_permutexvar_ps(q, lut);
  }
}

template <int CB, int MT, int NACC, int J>
inline __attribute__((always_inline)) void step(__m512i w, const float* xk, int64_t kp, __m512 lut,
                                                __m512 (&acc)[MT][NACC]) {
  const __m512 f = decode<CB, J>(w, lut);
  for (int m = 0; m < MT; ++m)
    acc[m][J % NACC] = _mm512_fmadd_ps(f, _mm512_set1_ps(xk[m * kp + J]), acc[m][J % NACC]);
}

template <int CB, int MT, int NACC, int... J>
inline __attribute__((always_inline)) void word(__m512i w, const float* xk, int64_t kp, __m512 lut,
                                                __m512 (&acc)[MT][NACC], std::integer_sequence<int, J...>) {
  (step<CB, MT, NACC, J>(w, xk, kp, lut, acc), ...);
}

template <int CB, int MT>
void tile(const GemmArgs& a, int64_t b, int64_t m0) {
  constexpr int VPW = 32 / CB;
  constexpr int NACC = MT >= 4 ? 1 : 4 / MT;
  const __m512 lut = CB == 2 ? _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3)
                             : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int32_t* wb = a.w + b * a.KW * 16;
  const float* x0 = a.x + m0 * a.Kp;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t r0 = a.gptr[g], r1 = a.gptr[g + 1];
    if (r0 == r1) continue;
    __m512 acc[MT][NACC];
    for (int m = 0; m < MT; ++m)
      for (int i = 0; i < NACC; ++i) acc[m][i] = _mm512_setzero_ps();
    for (int64_t r = r0; r < r1; ++r) {
      const __m512i w = _mm512_loadu_si512(wb + r * 16);
      word<CB, MT, NACC>(w, x0 + r * VPW, a.Kp, lut, acc, std::make_integer_sequence<int, VPW>{});
    }
    const __m512 s = _mm512_loadu_ps(a.scales + (b * a.G + g) * 16);
    const __m512 z = _mm512_loadu_ps(a.zs + (b * a.G + g) * 16);
    for (int m = 0; m < MT; ++m) {
      __m512 sum = acc[m][0];
      for (int i = 1; i < NACC; ++i) sum = _mm512_add_ps(sum, acc[m][i]);
      float* yp = a.y + (m0 + m) * a.Np + b * 16;
      __m512 y = _mm512_fmadd_ps(sum, s, _mm512_loadu_ps(yp));
      y = _mm512_fnmadd_ps(z, _mm512_set1_ps(a.xsum[(m0 + m) * a.G + g]), y);
      _mm512_storeu_ps(yp, y);
    }
  }
}

template <int CB>
void block_avx512(const GemmArgs& a, int64_t b, int64_t m, int64_t m1) {
  for (; m + 8 <= m1; m += 8) tile<CB, 8>(a, b, m);
  if (m1 - m >= 4) { tile<CB, 4>(a, b, m); m += 4; }
  if (m1 - m >= 2) { tile<CB, 2>(a, b, m); m += 2; }
  if (m1 - m >= 1) tile<CB, 1>(a, b, m);
}

}  // namespace
}  // namespace quantkern_cpu

#pragma GCC pop_options

namespace quantkern_cpu {

BlockFn block_fn_avx512(int cb) {
  switch (cb) {
    case 2: return &block_avx512<2>;
    case 4: return &block_avx512<4>;
    case 8: return &block_avx512<8>;
    default: return nullptr;
  }
}

}  // namespace quantkern_cpu

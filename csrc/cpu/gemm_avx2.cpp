// AVX2 + FMA fused dequant-matmul (layout: gemm_kernels.h). A 16-column block is two ymm halves;
// codes are decoded with shift + mask + convert (vpermps on ymm indexes only 8 entries, too few for
// a 4-bit table). Compiled for AVX2 through the target pragma only; the ops (op_common.h) call it
// only when the CPU reports avx2 + fma.
#include <immintrin.h>

#include <utility>

#include "gemm_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace quantkern_cpu {
namespace {

template <int CB, int MT, int NACC, int J>
inline __attribute__((always_inline)) void step(__m256i w0, __m256i w1, const float* xk, int64_t kp,
                                                __m256 (&acc)[MT][NACC][2]) {
  const __m256i mask = _mm256_set1_epi32((1 << CB) - 1);
  const __m256 f0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w0, code_shift(CB, J)), mask));
  const __m256 f1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w1, code_shift(CB, J)), mask));
  for (int m = 0; m < MT; ++m) {
    const __m256 xv = _mm256_set1_ps(xk[m * kp + J]);
    acc[m][J % NACC][0] = _mm256_fmadd_ps(f0, xv, acc[m][J % NACC][0]);
    acc[m][J % NACC][1] = _mm256_fmadd_ps(f1, xv, acc[m][J % NACC][1]);
  }
}

template <int CB, int MT, int NACC, int... J>
inline __attribute__((always_inline)) void word(__m256i w0, __m256i w1, const float* xk, int64_t kp,
                                                __m256 (&acc)[MT][NACC][2], std::integer_sequence<int, J...>) {
  (step<CB, MT, NACC, J>(w0, w1, xk, kp, acc), ...);
}

template <int CB, int MT>
void tile(const GemmArgs& a, int64_t b, int64_t m0) {
  constexpr int VPW = 32 / CB;
  constexpr int NACC = MT >= 2 ? 1 : 2;  // 16 ymm registers: keep acc within 8 of them
  const int32_t* wb = a.w + b * a.KW * 16;
  const float* x0 = a.x + m0 * a.Kp;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t r0 = a.gptr[g], r1 = a.gptr[g + 1];
    if (r0 == r1) continue;
    __m256 acc[MT][NACC][2];
    for (int m = 0; m < MT; ++m)
      for (int i = 0; i < NACC; ++i) acc[m][i][0] = acc[m][i][1] = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; ++r) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * 16));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * 16 + 8));
      word<CB, MT, NACC>(w0, w1, x0 + r * VPW, a.Kp, acc, std::make_integer_sequence<int, VPW>{});
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(a.scales + (b * a.G + g) * 16 + 8 * h);
      const __m256 z = _mm256_loadu_ps(a.zs + (b * a.G + g) * 16 + 8 * h);
      for (int m = 0; m < MT; ++m) {
        __m256 sum = acc[m][0][h];
        for (int i = 1; i < NACC; ++i) sum = _mm256_add_ps(sum, acc[m][i][h]);
        float* yp = a.y + (m0 + m) * a.Np + b * 16 + 8 * h;
        __m256 y = _mm256_fmadd_ps(sum, s, _mm256_loadu_ps(yp));
        y = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.xsum[(m0 + m) * a.G + g]), y);
        _mm256_storeu_ps(yp, y);
      }
    }
  }
}

template <int CB>
void block_avx2(const GemmArgs& a, int64_t b, int64_t m, int64_t m1) {
  for (; m + 4 <= m1; m += 4) tile<CB, 4>(a, b, m);
  if (m1 - m >= 2) { tile<CB, 2>(a, b, m); m += 2; }
  if (m1 - m >= 1) tile<CB, 1>(a, b, m);
}

}  // namespace
}  // namespace quantkern_cpu

#pragma GCC pop_options

namespace quantkern_cpu {

BlockFn block_fn_avx2(int cb) {
  switch (cb) {
    case 2: return &block_avx2<2>;
    case 4: return &block_avx2<4>;
    case 8: return &block_avx2<8>;
    default: return nullptr;
  }
}

}  // namespace quantkern_cpu

// Fused dequant-matmul with int8 activations (the "q8" kernels; layout and the activation format:
// gemm_kernels.h, "Int8 activations"). The codes of 8 columns x 4 k positions are one ymm of bytes, the
// matching int8 activations one broadcast 32-bit word, and vpmaddubsw + vpmaddwd sum their products
// exactly: per 32 k positions and 8 columns about 3 instructions where the fp32 kernel spends 4 per
// weight. The portable version computes the same integers in scalar code.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_kernels.h"

namespace quantkern_cpu {
namespace {

template <int CB>
void block_q8_scalar(const GemmArgs& a, int64_t b, int64_t m0, int64_t m1) {
  constexpr int VPW = 32 / CB, BW = CB;  // BW word rows = one block of 32 k positions
  constexpr uint32_t MASK = (1u << CB) - 1u;
  const int32_t* wb = a.w + b * a.KW * 16;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xm = a.xq + m * a.Kp;
    const float* dm = a.xd + m * a.KW;
    float* ym = a.y + m * a.Np + b * 16;
    for (int64_t g = 0; g < a.G; ++g) {
      float acc[16] = {0};
      const int64_t r1 = a.gptr[g + 1];
      for (int64_t rb = a.gptr[g]; rb < r1; rb += BW) {
        int32_t iacc[16] = {0};
        for (int64_t r = rb; r < std::min<int64_t>(rb + BW, r1); ++r) {
          const int32_t* wr = wb + r * 16;
          for (int j = 0; j < VPW; ++j) {
            const int32_t xv = xm[r * VPW + q8_position(CB, j)];
            for (int c = 0; c < 16; ++c)
              iacc[c] += static_cast<int32_t>((static_cast<uint32_t>(wr[c]) >> code_shift(CB, j)) & MASK) * xv;
          }
        }
        for (int c = 0; c < 16; ++c) acc[c] += static_cast<float>(iacc[c]) * dm[rb];
      }
      const float* s = a.scales + (b * a.G + g) * 16;
      const float* z = a.zs + (b * a.G + g) * 16;
      const float xs = a.xsum[m * a.G + g];
      for (int c = 0; c < 16; ++c) ym[c] += s[c] * acc[c] - z[c] * xs;
    }
  }
}

}  // namespace

BlockFn block_fn_q8_scalar(int cb) {
  switch (cb) {
    case 2: return &block_q8_scalar<2>;
    case 4: return &block_q8_scalar<4>;
    case 8: return &block_q8_scalar<8>;
    default: return nullptr;
  }
}

}  // namespace quantkern_cpu

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace quantkern_cpu {
namespace {

inline __attribute__((always_inline)) __m256i bcast32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// MT rows x one 16-column block. Planes: CB = 2 / 4 have 8 / CB planes of CB-bit codes per byte, each
// with its own 4 activation bytes; CB = 8 splits each code into its low and high nibble (two planes
// against the same 4 activation bytes, summed as lo + 16 * hi), so every product fits vpmaddubsw.
template <int CB, int MT>
void tile_q8(const GemmArgs& a, int64_t b, int64_t m0) {
  constexpr int VPW = 32 / CB, BW = CB;
  constexpr int PB = CB == 8 ? 4 : CB;           // bits per plane
  constexpr int PL = CB == 8 ? 2 : 8 / CB;       // planes per word
  constexpr int NS = CB == 8 ? 2 : 1;            // int16 accumulators per row and half
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << PB) - 1));
  const __m256i ones = _mm256_set1_epi16(1);
  const int32_t* wb = a.w + b * a.KW * 16;
  __m256 yv[MT][2];  // this tile's outputs, in registers over all groups
  for (int m = 0; m < MT; ++m) yv[m][0] = yv[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t r0 = a.gptr[g], r1 = a.gptr[g + 1];
    if (r0 == r1) continue;
    __m256 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t rb = r0; rb < r1; rb += BW) {
      const int64_t re = std::min<int64_t>(rb + BW, r1);
      __m256i s16[MT][2][NS];
      for (int m = 0; m < MT; ++m)
        for (int h = 0; h < 2; ++h)
          for (int i = 0; i < NS; ++i) s16[m][h][i] = _mm256_setzero_si256();
      for (int64_t r = rb; r < re; ++r) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * 16));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * 16 + 8));
#pragma GCC unroll 4
        for (int pl = 0; pl < PL; ++pl) {
          const __m256i p0 = _mm256_and_si256(pl ? _mm256_srli_epi16(w0, pl * PB) : w0, mask);
          const __m256i p1 = _mm256_and_si256(pl ? _mm256_srli_epi16(w1, pl * PB) : w1, mask);
          const int i = CB == 8 ? pl : 0;
          for (int m = 0; m < MT; ++m) {
            const __m256i xv = bcast32(a.xq + (m0 + m) * a.Kp + r * VPW + (CB == 8 ? 0 : 4 * pl));
            s16[m][0][i] = _mm256_add_epi16(s16[m][0][i], _mm256_maddubs_epi16(p0, xv));
            s16[m][1][i] = _mm256_add_epi16(s16[m][1][i], _mm256_maddubs_epi16(p1, xv));
          }
        }
      }
      for (int m = 0; m < MT; ++m) {
        const __m256 d = _mm256_set1_ps(a.xd[(m0 + m) * a.KW + rb]);
        for (int h = 0; h < 2; ++h) {
          __m256i i32 = _mm256_madd_epi16(s16[m][h][0], ones);
          if (CB == 8) i32 = _mm256_add_epi32(i32, _mm256_slli_epi32(_mm256_madd_epi16(s16[m][h][NS - 1], ones), 4));
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), d, acc[m][h]);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(a.scales + (b * a.G + g) * 16 + 8 * h);
      const __m256 z = _mm256_loadu_ps(a.zs + (b * a.G + g) * 16 + 8 * h);
      for (int m = 0; m < MT; ++m) {
        yv[m][h] = _mm256_fmadd_ps(acc[m][h], s, yv[m][h]);
        yv[m][h] = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.xsum[(m0 + m) * a.G + g]), yv[m][h]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) {
      float* yp = a.y + (m0 + m) * a.Np + b * 16 + 8 * h;
      _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), yv[m][h]));
    }
}

template <int CB>
void block_q8_avx2(const GemmArgs& a, int64_t b, int64_t m, int64_t m1) {
  for (; m + 2 <= m1; m += 2) tile_q8<CB, 2>(a, b, m);
  if (m < m1) tile_q8<CB, 1>(a, b, m);
}

}  // namespace
}  // namespace quantkern_cpu

#pragma GCC pop_options

namespace quantkern_cpu {

BlockFn block_fn_q8_avx2(int cb) {
  switch (cb) {
    case 2: return &block_q8_avx2<2>;
    case 4: return &block_q8_avx2<4>;
    case 8: return &block_q8_avx2<8>;
    default: return nullptr;
  }
}

}  // namespace quantkern_cpu

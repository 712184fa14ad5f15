// Int8-activation kernels with AVX-512 VNNI (layout and activation format: gemm_kernels.h, "Int8
// activations"). One zmm holds one word row of the 16 columns of a block; a plane of it (the codes at one
// bit offset of every byte, masked) times one broadcast 32-bit word of int8 activations is one vpdpbusd:
// 64 exact code x activation products summed into the 16 columns' int32 accumulators. Unsigned codes
// times signed activations is exactly what vpdpbusd multiplies, and it sums in int32, so unlike the AVX2
// kernel's vpmaddubsw (int16, saturating) an 8-bit code needs no split into nibbles. Per block of 32
// positions the int32 sums are converted and scaled by the block's d, per group by the scales, in the
// same order as the AVX2 kernel (gemm_q8.cpp): the two give bit-identical results.
//
// Compiled for AVX-512 VNNI through the target pragma only; op_common.h (choose_kernel) calls it only when
// the CPU reports avx512vnni.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,fma,avx2")

namespace quantkern_cpu {
namespace {

inline __attribute__((always_inline)) __m512i bcast32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int CB, int MT>
void tile_q8_vnni(const GemmArgs& a, int64_t b, int64_t m0) {
  constexpr int VPW = 32 / CB, BW = CB;  // BW word rows = one block of 32 k positions
  constexpr int PL = 8 / CB;              // planes per byte (CB = 8: the byte itself)
  const __m512i mask = _mm512_set1_epi8(static_cast<char>(CB == 8 ? 0xFF : (1 << CB) - 1));
  const int32_t* wb = a.w + b * a.KW * 16;
  __m512 yv[MT];  // this tile's outputs, in registers over all groups
  for (int m = 0; m < MT; ++m) yv[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t r0 = a.gptr[g], r1 = a.gptr[g + 1];
    if (r0 == r1) continue;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t rb = r0; rb < r1; rb += BW) {
      const int64_t re = std::min<int64_t>(rb + BW, r1);
      __m512i i32[MT];
      for (int m = 0; m < MT; ++m) i32[m] = _mm512_setzero_si512();
      for (int64_t r = rb; r < re; ++r) {
        const __m512i w = _mm512_loadu_si512(wb + r * 16);
#pragma GCC unroll 4
        for (int pl = 0; pl < PL; ++pl) {
          const __m512i p = CB == 8 ? w : _mm512_and_si512(pl ? _mm512_srli_epi16(w, pl * CB) : w, mask);
          for (int m = 0; m < MT; ++m)
            i32[m] = _mm512_dpbusd_epi32(i32[m], p, bcast32(a.xq + (m0 + m) * a.Kp + r * VPW + (CB == 8 ? 0 : 4 * pl)));
        }
      }
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i32[m]), _mm512_set1_ps(a.xd[(m0 + m) * a.KW + rb]), acc[m]);
    }
    const __m512 s = _mm512_loadu_ps(a.scales + (b * a.G + g) * 16);
    const __m512 z = _mm512_loadu_ps(a.zs + (b * a.G + g) * 16);
    for (int m = 0; m < MT; ++m) {
      yv[m] = _mm512_fmadd_ps(acc[m], s, yv[m]);
      yv[m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(a.xsum[(m0 + m) * a.G + g]), yv[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float* yp = a.y + (m0 + m) * a.Np + b * 16;
    _mm512_storeu_ps(yp, _mm512_add_ps(_mm512_loadu_ps(yp), yv[m]));
  }
}

template <int CB>
void block_q8_vnni(const GemmArgs& a, int64_t b, int64_t m, int64_t m1) {
  for (; m + 4 <= m1; m += 4) tile_q8_vnni<CB, 4>(a, b, m);
  if (m1 - m >= 2) {
    tile_q8_vnni<CB, 2>(a, b, m);
    m += 2;
  }
  if (m < m1) tile_q8_vnni<CB, 1>(a, b, m);
}

}  // namespace
}  // namespace quantkern_cpu

#pragma GCC pop_options

namespace quantkern_cpu {

BlockFn block_fn_q8_vnni(int cb) {
  switch (cb) {
    case 2: return &block_q8_vnni<2>;
    case 4: return &block_q8_vnni<4>;
    case 8: return &block_q8_vnni<8>;
    default: return nullptr;
  }
}

}  // namespace quantkern_cpu

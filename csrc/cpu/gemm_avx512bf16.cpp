// AVX-512 BF16 fused dequant-matmul for bf16 activations and 2- / 4-bit containers
// (layout: gemm_kernels.h). vdpbf16ps multiplies 16 lanes x 2 bf16 pairs and adds both products to
// an fp32 lane: 32 multiply-adds per instruction, twice the fp32 FMA path.
//
// Decoding a code pair without a conversion: for 0 <= q < 128 the bf16 bit pattern 0x4300 | q is
// exactly 128 + q (128 = 0x4300 has 7 free mantissa bits). Thanks to the pair-interleaved layout,
//   ((word >> code_shift(CB, 2i)) & 0x000F000F) | 0x43004300          (mask 0x00030003 for CB = 2)
// -- one shift and one vpternlogd -- is the lane (128 + q[2i], 128 + q[2i+1]) in bf16. The offset
// is folded into the zero point: sum (q - z) x = sum (128 + q) x - (128 + z) sum x, computed per group
// in fp32 like the other kernels (the products of bf16 values are exact in fp32, so the only error is
// fp32 accumulation; the 128 offset adds magnitude to the running sums, which is accounted for in the
// tests' tolerance).
//
// Compiled for AVX-512 BF16 through the target pragma only; the ops (op_common.h) call it only when
// the CPU reports avx512bf16 (and the AVX-512 subsets the fp32 kernels need).
#include <immintrin.h>

#include <utility>

#include "gemm_kernels.h"

// GCC 12 warns about its own _mm512_undefined_*() placeholders inside the intrinsics; they are
// fully overwritten
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,avx2")

namespace quantkern_cpu {
namespace {

constexpr float kOffset = 128.f;

template <int CB, int MT, int NACC, int I>
inline __attribute__((always_inline)) void pair(__m512i w, const uint32_t* xk, int64_t kp2,
                                                __m512 (&acc)[MT][NACC]) {
  constexpr int sh = code_shift(CB, 2 * I);
  const __m512i mask = _mm512_set1_epi32(CB == 4 ? 0x000F000F : 0x00030003);
  const __m512i magic = _mm512_set1_epi32(0x43004300);
  const __m512i q = sh == 0 ? w : _mm512_srli_epi32(w, sh);
  const __m512bh v = (__m512bh)_mm512_ternarylogic_epi32(q, mask, magic, 0xEA);  // (q & mask) | magic
  for (int m = 0; m < MT; ++m) {
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xk[m * kp2 + I]));
    acc[m][I % NACC] = _mm512_dpbf16_ps(acc[m][I % NACC], v, xv);
  }
}

template <int CB, int MT, int NACC, int... I>
inline __attribute__((always_inline)) void word(__m512i w, const uint32_t* xk, int64_t kp2,
                                                __m512 (&acc)[MT][NACC], std::integer_sequence<int, I...>) {
  (pair<CB, MT, NACC, I>(w, xk, kp2, acc), ...);
}

template <int CB, int MT>
void tile(const GemmArgs& a, int64_t b, int64_t m0) {
  constexpr int PPW = 16 / CB;  // code pairs per word
  constexpr int NACC = MT >= 4 ? 1 : 4 / MT;
  const int32_t* wb = a.w + b * a.KW * 16;
  const int64_t kp2 = a.Kp / 2;  // activations as bf16 pairs
  const uint32_t* x0 = reinterpret_cast<const uint32_t*>(a.xh) + m0 * kp2;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t r0 = a.gptr[g], r1 = a.gptr[g + 1];
    if (r0 == r1) continue;
    __m512 acc[MT][NACC];
    for (int m = 0; m < MT; ++m)
      for (int i = 0; i < NACC; ++i) acc[m][i] = _mm512_setzero_ps();
    for (int64_t r = r0; r < r1; ++r) {
      const __m512i w = _mm512_loadu_si512(wb + r * 16);
      word<CB, MT, NACC>(w, x0 + r * PPW, kp2, acc, std::make_integer_sequence<int, PPW>{});
    }
    const __m512 s = _mm512_loadu_ps(a.scales + (b * a.G + g) * 16);
    // (z + 128) * s = zs + 128 * s
    const __m512 z = _mm512_fmadd_ps(s, _mm512_set1_ps(kOffset), _mm512_loadu_ps(a.zs + (b * a.G + g) * 16));
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
void block_avx512bf16(const GemmArgs& a, int64_t b, int64_t m, int64_t m1) {
  for (; m + 8 <= m1; m += 8) tile<CB, 8>(a, b, m);
  if (m1 - m >= 4) { tile<CB, 4>(a, b, m); m += 4; }
  if (m1 - m >= 2) { tile<CB, 2>(a, b, m); m += 2; }
  if (m1 - m >= 1) tile<CB, 1>(a, b, m);
}

}  // namespace
}  // namespace quantkern_cpu

#pragma GCC pop_options

namespace quantkern_cpu {

BlockFn block_fn_avx512bf16(int cb) {
  switch (cb) {
    case 2: return &block_avx512bf16<2>;
    case 4: return &block_avx512bf16<4>;
    default: return nullptr;
  }
}

}  // namespace quantkern_cpu

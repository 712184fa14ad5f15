// AVX-512 attention for the fused decode step (decode_kernels.h, decode_vec.h). Compiled for AVX-512
// through the target pragma only; decode.cpp calls it only at ISA level >= 3 and for D % 16 == 0.
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma,avx2")

#include "decode_vec.h"

namespace quantkern_cpu {
namespace {

struct V512 {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
  // Cephes' expf: n = round(x / ln 2), r = x - n ln 2 (in two parts), a degree-6 polynomial, scaled by 2^n
  static T exp(T x) {
    const T lo = set1(-87.3f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    T p = set1(1.9875691500e-4f);
    p = fma(p, r, set1(1.3981999507e-3f));
    p = fma(p, r, set1(8.3334519073e-3f));
    p = fma(p, r, set1(4.1665795894e-2f));
    p = fma(p, r, set1(1.6666665459e-1f));
    p = fma(p, r, set1(5.0000001201e-1f));
    p = fma(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.f)));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
  }
};

}  // namespace

void attend_avx512(const HeadArgs& a) { attend_vec<V512>(a); }
void dense_rows_avx512(const DenseArgs& a, int64_t r0, int64_t r1) { dense_rows_vec<V512>(a, r0, r1); }

}  // namespace quantkern_cpu

#pragma GCC pop_options

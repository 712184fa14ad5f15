// The vector kernels of decode_kernels.h (attention, dense rows), written once over a small vector type V (decode_avx2.cpp,
// decode_avx512.cpp include it inside their target pragmas). V: W floats per vector; zero, load, store,
// set1, add, fma (a * b + c), sum (horizontal add) and exp (of x <= 0; x < -87.3, -inf included, gives 0).
// D is a multiple of W.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

#include "decode_kernels.h"

namespace quantkern_cpu {
namespace {

template <class V>
inline void attend_vec(const HeadArgs& a) {
  using T = typename V::T;
  constexpr int W = V::W, kChunk = 8;  // output vectors held in registers per pass over the positions
  const int64_t n = a.slot + 1, D = a.D, nv = D / W;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (j != a.slot && !a.valid[j]) {
      a.p[j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float* kj = j == a.slot ? a.knew : a.kc + j * D;
    T acc0 = V::zero(), acc1 = V::zero();
    int64_t c = 0;
    for (; c + 2 <= nv; c += 2) {
      acc0 = V::fma(V::load(a.q + c * W), V::load(kj + c * W), acc0);
      acc1 = V::fma(V::load(a.q + (c + 1) * W), V::load(kj + (c + 1) * W), acc1);
    }
    if (c < nv) acc0 = V::fma(V::load(a.q + c * W), V::load(kj + c * W), acc0);
    a.p[j] = V::sum(V::add(acc0, acc1)) * a.scaling;
    mx = std::max(mx, a.p[j]);
  }
  // softmax: exp(p - max) W at a time, the tail in scalar code
  const T vmx = V::set1(mx);
  T vsum = V::zero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const T e = V::exp(V::sub(V::load(a.p + j), vmx));
    V::store(a.p + j, e);
    vsum = V::add(vsum, e);
  }
  float sum = V::sum(vsum);
  for (; j < n; ++j) {
    a.p[j] = std::exp(a.p[j] - mx);
    sum += a.p[j];
  }
  const float inv = 1.f / sum;
  for (int64_t c0 = 0; c0 < nv; c0 += kChunk) {
    const int nc = static_cast<int>(std::min<int64_t>(kChunk, nv - c0));
    T acc[kChunk];
    for (int c = 0; c < kChunk; ++c) acc[c] = V::zero();
    for (int64_t j = 0; j < n; ++j) {
      const float pj = a.p[j] * inv;
      if (pj == 0.f) continue;
      const float* vj = (j == a.slot ? a.vnew : a.vc + j * D) + c0 * W;
      const T bp = V::set1(pj);
      for (int c = 0; c < nc; ++c) acc[c] = V::fma(bp, V::load(vj + c * W), acc[c]);
    }
    for (int c = 0; c < nc; ++c) V::store(a.o + (c0 + c) * W, acc[c]);
  }
}

// y[m * ldy + r] = W[r] . x[m] for rows r in [r0, r1) of a dense [R, K] weight and B input rows.
template <class V>
inline void dense_rows_vec(const DenseArgs& a, int64_t r0, int64_t r1) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t K = a.K, kv = K / W * W;
  for (int64_t m = 0; m < a.B; ++m) {
    const float* xm = a.x + m * K;
    for (int64_t r = r0; r < r1; ++r) {
      const float* wr = a.w + r * K;
      T acc0 = V::zero(), acc1 = V::zero();
      int64_t k = 0;
      for (; k + 2 * W <= kv; k += 2 * W) {
        acc0 = V::fma(V::load(wr + k), V::load(xm + k), acc0);
        acc1 = V::fma(V::load(wr + k + W), V::load(xm + k + W), acc1);
      }
      if (k < kv) acc0 = V::fma(V::load(wr + k), V::load(xm + k), acc0);
      float dot = V::sum(V::add(acc0, acc1));
      for (k = kv; k < K; ++k) dot += wr[k] * xm[k];
      a.y[m * a.ldy + r] = dot;
    }
  }
}

}  // namespace
}  // namespace quantkern_cpu

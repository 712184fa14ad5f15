// The vector kernels of the fused decode step (csrc/cpu/decode.cpp). Attention of one query head over one
// KV head's cache:
// scores q . k_j * scaling for the positions j <= slot that `valid` allows (the new token's own position
// always, its K / V passed apart), softmax in fp32, o = sum_j p_j v_j. One portable version and AVX2 /
// AVX-512 versions (decode_avx2.cpp, decode_avx512.cpp: target pragmas, called only where the CPU has the
// ISA and D is a multiple of their vector width).
#pragma once
#include <cstdint>

namespace quantkern_cpu {

struct HeadArgs {
  const float* q;      // [D] rotated query
  const float* kc;     // [S, D] this KV head's key cache (position `slot` not read)
  const float* knew;   // [D] rotated key of the new token (position `slot`)
  const float* vc;     // [S, D] value cache (position `slot` not read)
  const float* vnew;   // [D] value of the new token
  const bool* valid;   // [S] positions the row may attend to (besides `slot`)
  int64_t slot, D;
  float scaling;
  float* p;  // [slot + 1] scratch
  float* o;  // [D] output
};

using AttendFn = void (*)(const HeadArgs&);

void attend_portable(const HeadArgs& a);
void attend_avx2(const HeadArgs& a);    // D % 8 == 0, AVX2 + FMA
void attend_avx512(const HeadArgs& a);  // D % 16 == 0, AVX-512F

// Dense rows of the output layer: y[m * ldy + r] = w[r] . x[m] for rows r0 .. r1-1 of w [R, K] (fp32).
struct DenseArgs {
  const float* w;  // [R, K]
  const float* x;  // [B, K]
  float* y;        // [B, ldy]
  int64_t B, K, ldy;
};

using DenseFn = void (*)(const DenseArgs&, int64_t r0, int64_t r1);

void dense_rows_portable(const DenseArgs& a, int64_t r0, int64_t r1);
void dense_rows_avx2(const DenseArgs& a, int64_t r0, int64_t r1);
void dense_rows_avx512(const DenseArgs& a, int64_t r0, int64_t r1);

}  // namespace quantkern_cpu

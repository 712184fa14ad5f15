// Fused dequantize + matmul for GPTQ-family weights on x86 CPUs: the private kernel layout.
//
// quantkern/kernels/cpu/layout.py repacks a QuantLinear once, at load, into:
//
//   w      int32 [NB, KW, 16]  NB = ceil(N / 16) blocks of 16 output columns. Word w[b, r, c] holds
//                              VPW = 32 / CB consecutive (padded) k positions r*VPW + j of column
//                              b*16 + c, each in a CB-bit container (CB = 2 for W2, 4 for W3/W4, 8 for
//                              W5..W8) at bit code_shift(CB, j): even j in the low half-word, odd j in
//                              the high half-word ("pair-interleaved"), so that one shift + mask leaves
//                              the pair (j, j+1) in the two halves of a lane, as a bf16 dot product
//                              wants it. One column block is one contiguous stream, so a thread owning
//                              a block reads memory linearly.
//   scales float [G, NB*16]    per group and column (fp32 copies of the layer's scales)
//   zs     float [G, NB*16]    zero * scale, per group and column
//   gptr   int32 [G + 1]       group g covers word rows gptr[g] .. gptr[g+1]-1
//
// K is reordered at load so that every group is one contiguous run (act-order: sorted by g_idx) and
// each run is padded to a multiple of VPW; the per-call activation is gathered into the same padded
// order (padding slots hold 0), so a padded code never contributes.
//
// Per group the kernels accumulate acc = sum_k q[k] * x[k] in fp32 and then add
// s * acc - z*s * sum_k x[k]  (== sum_k (q - z) * s * x), so the zero point costs two FMAs per group
// instead of one subtraction per weight.
#pragma once
#include <cstdint>

namespace quantkern_cpu {

// Bit offset of the code for k offset j (0 <= j < 32 / CB) inside a word.
constexpr int code_shift(int cb, int j) { return (j & 1) * 16 + (j >> 1) * cb; }

struct GemmArgs {
  const float* x;       // [M, Kp] activations in the padded k order, fp32
  const uint16_t* xh;   // [M, Kp] the same as bf16 bits (only for the BF16 kernels, else nullptr)
  const float* xsum;    // [M, G] per-row, per-group sums of x
  const int32_t* w;     // [NB, KW, 16]
  const float* scales;  // [G, Np]
  const float* zs;      // [G, Np]
  const int32_t* gptr;  // [G + 1]
  float* y;             // [M, Np], zero-initialised; accumulated into
  int64_t M, Kp, KW, G, Np;
};

// Computes y[m0:m1, b*16 : b*16+16] (one column block, a few rows; the ops schedule the blocks:
// op_common.h, ops.cpp, moe.cpp).
using BlockFn = void (*)(const GemmArgs&, int64_t b, int64_t m0, int64_t m1);

// Each returns nullptr for an unsupported container width. Only call the AVX2 / AVX-512 ones after
// checking the CPU supports them (op_common.h: best_isa(), choose_kernel()).
BlockFn block_fn_scalar(int cb);
BlockFn block_fn_avx2(int cb);
BlockFn block_fn_avx512(int cb);
BlockFn block_fn_avx512bf16(int cb);  // bf16 activations (a.xh), CB = 2 or 4

}  // namespace quantkern_cpu

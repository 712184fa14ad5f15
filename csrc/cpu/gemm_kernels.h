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
//   scales float [NB, G, 16]   per column block, group and column (fp32 copies of the layer's scales):
//                              block-major, so a thread streaming a block's words also reads its
//                              scales as one contiguous run (a [G, N] table would be G strided lines per
//                              block; at M = 1 those misses cost about a fifth of a decode step)
//   zs     float [NB, G, 16]   zero * scale, the same order
//   gptr   int32 [G + 1]       group g covers word rows gptr[g] .. gptr[g+1]-1
//
// K is reordered at load so that every group is one contiguous run (act-order: sorted by g_idx) and
// each run is padded to a multiple of VPW; the per-call activation is gathered into the same padded
// order (padding slots hold 0), so a padded code never contributes.
//
// Per group the kernels accumulate acc = sum_k q[k] * x[k] in fp32 and then add
// s * acc - z*s * sum_k x[k]  (== sum_k (q - z) * s * x), so the zero point costs two FMAs per group
// instead of one subtraction per weight.
//
// Int8 activations (the "q8" kernels, quantkern_cpu::gemm with int8_act): each row of x is quantized per
// call, in the padded k order, in blocks of 32 k positions that start at each group's first word row
// (a group's last block may be shorter): d = max|x| / 127 over the block, q = round(x / d) as int8
// (round half to even; d = 0 gives q = 0). Within a word row the int8 values are stored in the order the
// kernels unpack the codes, so one broadcast 32-bit load feeds a byte dot product (vpmaddubsw) with the
// codes of 8 columns: plane s of a word is (w >> s*CB) & mask per byte (planes 0 .. 8/CB - 1; for CB = 8
// the low and the high nibble), and the activation of byte p of plane s is the one at k offset j with
// code_shift(CB, j) = 8p + s*CB (for CB = 8: the same four bytes for both nibbles). Per block the codes x
// int8 products are summed exactly in int16 / int32 (at most 8 byte-pair sums of <= 2*15*127 per int16
// lane, so no saturation), converted to fp32 and scaled by d; xsum then holds per group the sum of
// d * q, so the result is exactly dequant(W) @ xhat with xhat = d * q, up to fp32 summation order.
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
  const float* scales;  // [NB, G, 16]
  const float* zs;      // [NB, G, 16]
  const int32_t* gptr;  // [G + 1]
  float* y;             // [M, Np], zero-initialised; accumulated into
  int64_t M, Kp, KW, G, Np;
  const int8_t* xq = nullptr;  // [M, Kp] int8 activations, word rows in the unpack order (q8 kernels only)
  const float* xd = nullptr;   // [M, KW] block scale d at each block's first word row (q8 kernels only)
};

// Byte position inside a word row of int8 activations for k offset j (see "Int8 activations" above).
constexpr int q8_position(int cb, int j) {
  return cb == 8 ? code_shift(8, j) / 8 : (code_shift(cb, j) % 8) / cb * 4 + code_shift(cb, j) / 8;
}

// Computes y[m0:m1, b*16 : b*16+16] (one column block, a few rows; the ops schedule the blocks:
// op_common.h, ops.cpp, moe.cpp).
using BlockFn = void (*)(const GemmArgs&, int64_t b, int64_t m0, int64_t m1);

// Each returns nullptr for an unsupported container width. Only call the AVX2 / AVX-512 ones after
// checking the CPU supports them (op_common.h: best_isa(), choose_kernel()).
BlockFn block_fn_scalar(int cb);
BlockFn block_fn_avx2(int cb);
BlockFn block_fn_avx512(int cb);
BlockFn block_fn_avx512bf16(int cb);  // bf16 activations (a.xh), CB = 2 or 4
BlockFn block_fn_q8_scalar(int cb);   // int8 activations (a.xq, a.xd)
BlockFn block_fn_q8_avx2(int cb);     // int8 activations with AVX2 byte dot products
BlockFn block_fn_q8_vnni(int cb);     // int8 activations with AVX-512 VNNI (vpdpbusd); same results as AVX2

}  // namespace quantkern_cpu

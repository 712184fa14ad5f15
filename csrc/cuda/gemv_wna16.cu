// Weight-only GEMV for decode: out[M, N] = x[M, K] @ dequant(W)[K, N] with M <= 8, any bits 2..8.
//
// Covers what the tensor-core GEMM does not: 2/3/5/6/7-bit codes, any group size (ragged last group
// included), arbitrary g_idx. Act-order layers are permuted along K once at load (codes and g_idx
// sorted by group, so the group changes rarely) and the activations' columns per call; the kernel itself
// accepts any g_idx, it only gets slower when the group changes within a 32-column chunk.
//
// LAYOUT. The GPTQ row layout: codes packed along K as one little-endian bit stream per output column,
// 32 codes in `bits` int32 words (3-bit codes straddle words), qweight int32 [Kp/32 * bits, N] with K
// zero-padded to Kp = ceil(K/32) * 32 at load. Scales and zeros [G, N] in the activation dtype (zeros as
// values), g_idx int32 [Kp] (padding columns point at a valid group; x is zero there).
//
// WORK SPLIT. A block of 256 threads (8 warps) owns 32 consecutive output columns, one per lane, so every
// weight read of a warp is one coalesced 128-byte row segment. The block's K range (a split of grid.y)
// is walked in 32-column chunks, chunk i by warp i % 8; a warp stages its chunk of x (M x 32, fp32) in its
// own shared slice, holds the next chunk's words in registers while it computes the current one, and
// accumulates M fp32 sums per lane. The eight warps' sums are added in shared memory; with several
// splits, fp32 partials go to a workspace summed by reduce_splits_kernel (qk_common.cuh, fixed order).
//
// NUMERICS. Each weight is dequantized as (q - z) * s in fp32 and rounded to the activation dtype, the
// exact value the reference's dequantized matrix holds; only the fp32 summation order differs.
#include <utility>

#include "qk_common.cuh"
#include "qk_launch.h"

namespace qk {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kMaxM = 8;

// Code i (0..31) of a 32-code block held in BITS words; fully unrolled by the caller, so the word index
// and shifts are compile-time constants.
template <int BITS, int I>
__device__ __forceinline__ uint32_t extract(const uint32_t (&w)[BITS]) {
  constexpr int off = I * BITS, wi = off / 32, sh = off % 32;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  if constexpr (sh + BITS <= 32) {
    return (w[wi] >> sh) & mask;
  } else {
    return ((w[wi] >> sh) | (w[wi + 1] << (32 - sh))) & mask;
  }
}

template <int BITS, int... I>
__device__ __forceinline__ void extract_all(const uint32_t (&w)[BITS], float (&q)[32],
                                            std::integer_sequence<int, I...>) {
  ((q[I] = static_cast<float>(extract<BITS, I>(w))), ...);
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kGemvThreads)
gemv_wna16_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const T* __restrict__ scales,
                  const T* __restrict__ zeros, const int* __restrict__ g_idx, T* __restrict__ out,
                  float* __restrict__ workspace, int M, int K, int N, int chunks, int chunks_per_split) {
  __shared__ __align__(16) float xs[kGemvWarps][kMaxM][32];  // read back as float4
  __shared__ float red[kGemvWarps][kMaxM][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * 32 + lane;
  const bool col_ok = n < N;
  const int ncol = col_ok ? n : N - 1;  // keep loads in bounds; results of this lane are dropped
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(c_begin + chunks_per_split, chunks);

  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.f;

  uint32_t cur[BITS], nxt[BITS];
  int c = c_begin + warp;
  if (c < c_end) {
#pragma unroll
    for (int b = 0; b < BITS; ++b) cur[b] = __ldg(qweight + static_cast<size_t>(c * BITS + b) * N + ncol);
  }
  int cur_group = -1;
  float s = 0.f, z = 0.f;
  for (; c < c_end; c += kGemvWarps) {
    const int cn = c + kGemvWarps;
    if (cn < c_end) {
#pragma unroll
      for (int b = 0; b < BITS; ++b) nxt[b] = __ldg(qweight + static_cast<size_t>(cn * BITS + b) * N + ncol);
    }
    const int k = c * 32 + lane;
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < M) xs[warp][m][lane] = k < K ? to_float(x[static_cast<size_t>(m) * K + k]) : 0.f;
    const int my_group = g_idx[k];
    __syncwarp();

    float q[32];
    extract_all<BITS>(cur, q, std::make_integer_sequence<int, 32>{});
    const int g0 = __shfl_sync(0xffffffffu, my_group, 0);
    if (__all_sync(0xffffffffu, my_group == g0)) {
      if (g0 != cur_group) {  // warp-uniform branch
        cur_group = g0;
        s = to_float(scales[static_cast<size_t>(g0) * N + ncol]);
        z = to_float(zeros[static_cast<size_t>(g0) * N + ncol]);
      }
#pragma unroll
      for (int i = 0; i < 32; ++i) q[i] = to_float(from_float<T>((q[i] - z) * s));
    } else {  // a group boundary (ragged groups, arbitrary g_idx) inside this chunk
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int gi = __shfl_sync(0xffffffffu, my_group, i);
        if (gi != cur_group) {
          cur_group = gi;
          s = to_float(scales[static_cast<size_t>(gi) * N + ncol]);
          z = to_float(zeros[static_cast<size_t>(gi) * N + ncol]);
        }
        q[i] = to_float(from_float<T>((q[i] - z) * s));
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
        const float4* xv = reinterpret_cast<const float4*>(xs[warp][m]);
        float a = acc[m];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float4 v = xv[i];
          a = fmaf(v.x, q[4 * i], a);
          a = fmaf(v.y, q[4 * i + 1], a);
          a = fmaf(v.z, q[4 * i + 2], a);
          a = fmaf(v.w, q[4 * i + 3], a);
        }
        acc[m] = a;
      }
    }
    __syncwarp();  // xs is rewritten by the next chunk
#pragma unroll
    for (int b = 0; b < BITS; ++b) cur[b] = nxt[b];
  }

#pragma unroll
  for (int m = 0; m < kMaxM; ++m)
    if (m < M) red[warp][m][lane] = acc[m];
  __syncthreads();
  if (warp == 0 && col_ok) {
    for (int m = 0; m < M; ++m) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kGemvWarps; ++w) v += red[w][m][lane];
      if (workspace == nullptr) {
        out[static_cast<size_t>(m) * N + n] = from_float<T>(v);
      } else {
        workspace[(static_cast<size_t>(blockIdx.y) * M + m) * N + n] = v;
      }
    }
  }
}

template <typename T, int BITS>
int launch_gemv(const void* x, const void* qw, const void* sc, const void* zr, const int* gi, void* out, float* ws,
                int M, int K, int N, int splits, cudaStream_t stream) {
  const int chunks = (K + 31) / 32;
  const int per_split = (chunks + splits - 1) / splits;
  const int used = (chunks + per_split - 1) / per_split;
  const dim3 grid((N + 31) / 32, used);
  gemv_wna16_kernel<T, BITS><<<grid, kGemvThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint32_t*>(qw), static_cast<const T*>(sc), static_cast<const T*>(zr),
      gi, static_cast<T*>(out), used > 1 ? ws : nullptr, M, K, N, chunks, per_split);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || used == 1) return static_cast<int>(err);
  return static_cast<int>(launch_reduce_splits(ws, static_cast<T*>(out), used, static_cast<size_t>(M) * N, stream));
}

template <typename T>
int dispatch_bits(int bits, const void* x, const void* qw, const void* sc, const void* zr, const int* gi, void* out,
                  float* ws, int M, int K, int N, int splits, cudaStream_t st) {
  switch (bits) {
    case 2: return launch_gemv<T, 2>(x, qw, sc, zr, gi, out, ws, M, K, N, splits, st);
    case 3: return launch_gemv<T, 3>(x, qw, sc, zr, gi, out, ws, M, K, N, splits, st);
    case 4: return launch_gemv<T, 4>(x, qw, sc, zr, gi, out, ws, M, K, N, splits, st);
    case 5: return launch_gemv<T, 5>(x, qw, sc, zr, gi, out, ws, M, K, N, splits, st);
    case 6: return launch_gemv<T, 6>(x, qw, sc, zr, gi, out, ws, M, K, N, splits, st);
    case 7: return launch_gemv<T, 7>(x, qw, sc, zr, gi, out, ws, M, K, N, splits, st);
    case 8: return launch_gemv<T, 8>(x, qw, sc, zr, gi, out, ws, M, K, N, splits, st);
    default: return QK_EBITS;
  }
}

}  // namespace
}  // namespace qk

extern "C" int qk_gemv_wna16(const void* x, const void* qweight, const void* scales, const void* zeros,
                             const int* g_idx, void* out, float* workspace, int M, int K, int N, int G, int bits,
                             int dtype, int splits, void* stream) {
  if (bits < 2 || bits > 8) return QK_EBITS;
  if (dtype != 0 && dtype != 1) return QK_EDTYPE;
  if (M < 1 || M > qk::kMaxM || K < 1 || N < 1 || G < 1) return QK_ESHAPE;
  if (splits < 1 || (splits > 1 && workspace == nullptr)) return QK_ESPLITS;
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return qk::dispatch_bits<half>(bits, x, qweight, scales, zeros, g_idx, out, workspace, M, K, N, splits, s);
  return qk::dispatch_bits<__nv_bfloat16>(bits, x, qweight, scales, zeros, g_idx, out, workspace, M, K, N, splits, s);
}

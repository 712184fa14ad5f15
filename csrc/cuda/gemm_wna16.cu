// Tensor-core weight-only GEMM: out[M, N] = x[M, K] @ dequant(W)[K, N], W in 4 or 8 bits.
//
// fp16 / bf16 activations, fp32 accumulation, sm_80+ (mma.sync m16n8k16, ldmatrix, cp.async).
// Asymmetric zeros are always applied (a symmetric scheme is the zero = 2^(bits-1) case), so one
// kernel covers sym / asym, group sizes that are multiples of 64 and per-channel (one group of Kp).
// Act-order runs here too: the host permutes K once at load so groups become contiguous, and permutes
// the activations' columns per call.
//
// TILES. A block of 128 threads (4 warps) computes a BM x 128 tile of out, BM = 16 * MT, MT in {1,2,4}
// chosen from M (grid.y covers M). Each warp owns 32 output columns: two 16-column "fragment tiles",
// i.e. four n8 mma tiles, for every m16 row tile. The K loop walks 64-deep k-tiles (four k16 mma steps).
// When the grid is small (decode-sized M), K is split over grid.z; each split writes fp32 partials to a
// workspace and a second kernel sums them in a fixed order (deterministic).
//
// (Marlin instead stripes k-tiles over a fixed grid and reduces in place; split-K with a workspace is
// simpler, deterministic, and costs only M x N x splits fp32 words of extra traffic at decode sizes.)
//
// WEIGHT LAYOUT (built once at load by quantkern/kernels/cuda/layout.py, tested there bit-exactly).
// W is padded to Kp x Np (multiples of 64 x 128) with zero codes, scales and zeros (finite values: x is
// zero-filled past K and padded columns are never stored) and cut into 64 x 128 tiles stored
// [n_tile][k_tile], each tile contiguous (256 * bits words), so that one pipeline stage of B is a
// single contiguous copy. Inside a tile, word index
//   ((j * 4 + warp) * 32 + lane) * (2 * WPF) + f * WPF + wi,   WPF = bits / 4 words per fragment tile,
// holds exactly the mma B-operand codes that `lane` needs for k16 step j, fragment tile f of `warp`:
// with g = lane / 4, t = lane % 4, the mma B fragment of an n8 tile is b0 = (k = 2t, 2t+1; n = g) and
// b1 = (k = 2t+8, 2t+9; n = g); a fragment tile is two n8 tiles (ti = 0: n = g, ti = 1: n = g + 8).
//   4-bit (1 word): nibble (half * 2 + ti) + 4 * e   <- code (k = 2t + e + 8 * half, n = g + 8 * ti)
//   8-bit (2 words, wi = half): byte ti + 2 * e     <- the same (k, n)
// so a shift and a mask put both codes of one b register at bits 0 and 16, ready for the exact magic-
// number conversion of qk_common.cuh (no prmt shuffles, no per-element int->float conversions except
// for bf16 with 8-bit codes, which goes through fp32 to stay exact). A lane reads its
// 2*WPF words with one 8- or 16-byte shared load; a warp's read is contiguous (no bank conflicts).
// Scales and zeros are [Gp, Np] in the activation dtype (zeros as values), one row per group.
//
// PIPELINE. STAGES = 4 shared-memory buffers, each holding the x tile (BM x 64), the weight tile and
// the group's 128 scales and zeros, filled with cp.async (16-byte, zero-fill for rows >= M and columns
// >= K). The loop keeps STAGES - 1 tiles in flight: wait for the oldest group, __syncthreads (which
// also proves every warp is done with the buffer about to be refilled), issue the copy of tile
// it + STAGES - 1, then compute tile `it`. x is stored row-major with 16-byte chunks XOR-swizzled by
// (row & 7), so the ldmatrix.x4 reads of eight rows hit eight different bank groups.
//
// A k-tile lies inside one group because group sizes are multiples of 64, so scales are loaded once per
// stage and broadcast as (s, s) pairs: both codes of a b register belong to the same output column.
//
// TESTING WITHOUT A GPU. quantkern/kernels/cuda/emulate.py transliterates this kernel's indexing
// (swizzle, ldmatrix / mma fragment ownership, epilogue, splits) into torch and is checked against the
// reference on CPU; any change to the indexing here must be mirrored there.
#include "qk_common.cuh"
#include "qk_launch.h"

namespace qk {
namespace {

constexpr int kThreads = 128;
constexpr int kBN = QK_GEMM_BN;
constexpr int kBK = QK_GEMM_BK;
constexpr int kStages = 4;

template <int MT, int BITS> struct GemmSmem {
  static constexpr int kA = MT * 16 * kBK * 2;         // bytes of the x tile
  static constexpr int kB = kBK * kBN * BITS / 8;      // bytes of the weight tile
  static constexpr int kS = kBN * 2;                   // bytes of one row of scales (and of zeros)
  static constexpr int kStage = kA + kB + 2 * kS;
  static constexpr int kTotal = kStages * kStage;
};

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads)
gemm_wna16_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const T* __restrict__ scales,
                  const T* __restrict__ zeros, T* __restrict__ out, float* __restrict__ workspace, int M, int K,
                  int N, int Np, int group_tiles, int k_tiles, int tiles_per_split) {
  using P = typename Pair<T>::type;
  using L = GemmSmem<MT, BITS>;
  constexpr int WPF = BITS / 4;                 // words per lane per fragment tile
  constexpr int kTileWords = kBK * kBN * BITS / 32;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n_tile = blockIdx.x, m0 = blockIdx.y * MT * 16, split = blockIdx.z;
  const int kt_begin = split * tiles_per_split;
  const int kt_end = min(kt_begin + tiles_per_split, k_tiles);
  const int iters = kt_end - kt_begin;
  const int n0 = n_tile * kBN;
  const uint32_t* w_base = qweight + static_cast<size_t>(n_tile) * k_tiles * kTileWords;

  // load_stage copies the next k-tile (kt_begin, kt_begin + 1, ... in order) into the next buffer. What a
  // thread copies is fixed: x chunk (row tid / 8 + 16 u, 16-byte column tid % 8) for u < MT, weight chunks
  // tid + 128 u, and (threads 0..31) one 16-byte chunk of the group's scales (0..15) or zeros (16..31);
  // so the trip counts are constants (fully unrolled), the addresses advance by constants per stage, and
  // the group row advances by counting k-tiles (no division per stage).
  static_assert(kThreads == 16 * (kBK / 8), "one pass of the threads copies 16 rows of the x tile");
  static_assert(L::kB % (16 * kThreads) == 0, "the weight tile splits evenly over the threads");
  static_assert(L::kS == 16 * 16, "threads 0..15 copy the scales row, 16..31 the zeros row");
  constexpr int kWChunks = L::kB / 16 / kThreads;
  const int xr = tid >> 3, xc = tid & 7;
  const int x_soff = xr * 128 + ((xc ^ (xr & 7)) << 4);  // row xr + 16 u has the same swizzle (16 u % 8 == 0)
  unsigned rows_ok = 0;
#pragma unroll
  for (int u = 0; u < MT; ++u) rows_ok |= static_cast<unsigned>(m0 + xr + 16 * u < M) << u;
  const size_t x_row16 = static_cast<size_t>(16) * K;
  const T* x_next = x + static_cast<size_t>(m0 + xr) * K + static_cast<size_t>(kt_begin) * kBK + xc * 8;
  int gk_next = kt_begin * kBK + xc * 8;
  const uint4* w_next = reinterpret_cast<const uint4*>(w_base + static_cast<size_t>(kt_begin) * kTileWords) + tid;
  const int g0 = kt_begin / group_tiles;  // once per CTA
  int g_rem = kt_begin - g0 * group_tiles;
  const T* sz_next = (tid < 16 ? scales + n0 + tid * 8 : zeros + n0 + ((tid - 16) & 15) * 8) +
                     static_cast<size_t>(g0) * Np;
  int ld_stage = 0;

  auto load_stage = [&]() {
    unsigned char* s = smem + ld_stage * L::kStage;
    const bool col_ok = gk_next < K;
#pragma unroll
    for (int u = 0; u < MT; ++u) {
      const bool valid = col_ok && ((rows_ok >> u) & 1u);
      cp_async16(s + x_soff + u * 16 * 128, valid ? x_next + u * x_row16 : x, valid);
    }
    uint4* wdst = reinterpret_cast<uint4*>(s + L::kA) + tid;
#pragma unroll
    for (int u = 0; u < kWChunks; ++u) cp_async16(wdst + u * kThreads, w_next + u * kThreads, true);
    if (tid < 32) cp_async16(s + L::kA + L::kB + tid * 16, sz_next, true);
    x_next += kBK;
    gk_next += kBK;
    w_next += kTileWords / 4;
    if (++g_rem == group_tiles) {
      g_rem = 0;
      sz_next += Np;
    }
    ld_stage = ld_stage == kStages - 1 ? 0 : ld_stage + 1;
  };

  float acc[MT][4][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  const int g = lane >> 2;
  auto compute_stage = [&](int stage) {
    const unsigned char* s = smem + stage * L::kStage;
    const T* s_scale = reinterpret_cast<const T*>(s + L::kA + L::kB);
    const T* s_zero = reinterpret_cast<const T*>(s + L::kA + L::kB + L::kS);
    P sc[2][2], zo[2][2];
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int ti = 0; ti < 2; ++ti) {
        const int n = warp * 32 + f * 16 + ti * 8 + g;
        T sv = s_scale[n];
        sc[f][ti] = P{sv, sv};
        zo[f][ti] = Dequant<T, BITS>::zero_offset(s_zero[n]);
      }
    const uint32_t* s_w = reinterpret_cast<const uint32_t*>(s + L::kA);
#pragma unroll
    for (int j = 0; j < kBK / 16; ++j) {
      uint32_t w[2 * WPF];
      const uint32_t* wp = s_w + ((j * 4 + warp) * 32 + lane) * (2 * WPF);
      if constexpr (WPF == 1) {
        const uint2 v = *reinterpret_cast<const uint2*>(wp);
        w[0] = v.x; w[1] = v.y;
      } else {
        const uint4 v = *reinterpret_cast<const uint4*>(wp);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
      }
      uint32_t bfrag[4][2];  // [n8 tile = f * 2 + ti][b0, b1]
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        if constexpr (BITS == 4) {
          bfrag[f * 2 + 0][0] = as_u32(Dequant<T, 4>::template pair<0>(w[f], zo[f][0], sc[f][0]));
          bfrag[f * 2 + 1][0] = as_u32(Dequant<T, 4>::template pair<1>(w[f], zo[f][1], sc[f][1]));
          bfrag[f * 2 + 0][1] = as_u32(Dequant<T, 4>::template pair<2>(w[f], zo[f][0], sc[f][0]));
          bfrag[f * 2 + 1][1] = as_u32(Dequant<T, 4>::template pair<3>(w[f], zo[f][1], sc[f][1]));
        } else {
          bfrag[f * 2 + 0][0] = as_u32(Dequant<T, 8>::template pair<0>(w[f * 2 + 0], zo[f][0], sc[f][0]));
          bfrag[f * 2 + 1][0] = as_u32(Dequant<T, 8>::template pair<1>(w[f * 2 + 0], zo[f][1], sc[f][1]));
          bfrag[f * 2 + 0][1] = as_u32(Dequant<T, 8>::template pair<0>(w[f * 2 + 1], zo[f][0], sc[f][0]));
          bfrag[f * 2 + 1][1] = as_u32(Dequant<T, 8>::template pair<1>(w[f * 2 + 1], zo[f][1], sc[f][1]));
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r = mt * 16 + (lane & 15), c = j * 2 + (lane >> 4);
        uint32_t a[4];
        ldmatrix_x4(a, s + r * 128 + ((c ^ (r & 7)) << 4));
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816(acc[mt][nt], a, bfrag[nt], static_cast<T*>(nullptr));
      }
    }
  };

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < iters) load_stage();  // k-tile kt_begin + st into buffer st
    cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
  }
  int cp_stage = 0;
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < iters) load_stage();  // k-tile kt_begin + it + 3 into buffer (it + 3) % 4
    cp_async_commit();
    compute_stage(cp_stage);  // buffer it % 4
    cp_stage = cp_stage == kStages - 1 ? 0 : cp_stage + 1;
  }
  cp_async_wait<0>();

  // Epilogue: c0, c1 at (row g, cols 2t, 2t+1) and c2, c3 at row g + 8 of each m16 x n8 tile.
  const int t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int col = n0 + warp * 32 + nt * 8 + 2 * t;
      if (col >= N) continue;  // N is even, so col + 1 < N as well
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + mt * 16 + g + 8 * h;
        if (row >= M) continue;
        const float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
        if (workspace == nullptr) {
          P* dst = reinterpret_cast<P*>(out + static_cast<size_t>(row) * N + col);
          *dst = pair_from_floats(v0, v1, static_cast<P*>(nullptr));
        } else {
          float2* dst = reinterpret_cast<float2*>(workspace + (static_cast<size_t>(split) * M + row) * N + col);
          *dst = make_float2(v0, v1);
        }
      }
    }
}

struct GemmArgs {
  const void *x, *qweight, *scales, *zeros;
  void* out;
  float* workspace;
  int M, K, N, Kp, Np, group_size, splits;
  cudaStream_t stream;
};

template <typename T, int BITS, int MT>
int launch_gemm(const GemmArgs& a) {
  const int k_tiles = a.Kp / kBK;
  const int per_split = (k_tiles + a.splits - 1) / a.splits;
  const int used = (k_tiles + per_split - 1) / per_split;  // every launched split has work
  auto kernel = gemm_wna16_kernel<T, BITS, MT>;
  constexpr int smem = GemmSmem<MT, BITS>::kTotal;
  cudaError_t err;
  if constexpr (smem > 48 * 1024) {  // above the default dynamic shared memory limit: opt in
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const dim3 grid(a.Np / kBN, (a.M + MT * 16 - 1) / (MT * 16), used);
  kernel<<<grid, kThreads, smem, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const uint32_t*>(a.qweight), static_cast<const T*>(a.scales),
      static_cast<const T*>(a.zeros), static_cast<T*>(a.out), used > 1 ? a.workspace : nullptr, a.M, a.K, a.N, a.Np,
      a.group_size / kBK, k_tiles, per_split);
  err = cudaGetLastError();
  if (err != cudaSuccess || used == 1) return static_cast<int>(err);
  const size_t count = static_cast<size_t>(a.M) * a.N;
  return static_cast<int>(launch_reduce_splits(a.workspace, static_cast<T*>(a.out), used, count, a.stream));
}

template <typename T, int BITS>
int dispatch_m(const GemmArgs& a) {
  if (a.M <= 16) return launch_gemm<T, BITS, 1>(a);
  if (a.M <= 32) return launch_gemm<T, BITS, 2>(a);
  return launch_gemm<T, BITS, 4>(a);
}

}  // namespace
}  // namespace qk

extern "C" int qk_gemm_wna16(const void* x, const void* qweight, const void* scales, const void* zeros, void* out,
                             float* workspace, int M, int K, int N, int Kp, int Np, int group_size, int bits,
                             int dtype, int splits, void* stream) {
  if (bits != 4 && bits != 8) return QK_EBITS;
  if (dtype != 0 && dtype != 1) return QK_EDTYPE;
  if (M < 1 || K < 1 || N < 1 || K % 8 || N % 2 || Kp % QK_GEMM_BK || Np % QK_GEMM_BN || Kp < K || Np < N ||
      Kp - K >= QK_GEMM_BK || Np - N >= QK_GEMM_BN)
    return QK_ESHAPE;
  if (group_size < QK_GEMM_BK || group_size % QK_GEMM_BK) return QK_EGROUP;
  if (splits < 1 || (splits > 1 && workspace == nullptr)) return QK_ESPLITS;
  for (const void* p : {x, qweight, scales, zeros})
    if (reinterpret_cast<uintptr_t>(p) % 16) return QK_EALIGN;
  if (reinterpret_cast<uintptr_t>(out) % 4) return QK_EALIGN;
  const qk::GemmArgs a{x, qweight, scales, zeros, out, workspace, M, K, N, Kp, Np, group_size, splits,
                       static_cast<cudaStream_t>(stream)};
  if (dtype == 0) return bits == 4 ? qk::dispatch_m<half, 4>(a) : qk::dispatch_m<half, 8>(a);
  return bits == 4 ? qk::dispatch_m<__nv_bfloat16, 4>(a) : qk::dispatch_m<__nv_bfloat16, 8>(a);
}

extern "C" const char* qk_error_string(int code) {
  switch (code) {
    case QK_OK: return "ok";
    case QK_EBITS: return "bits not supported by this kernel";
    case QK_ESHAPE: return "a size does not fit the kernel's layout";
    case QK_EGROUP: return "group size not supported by this kernel";
    case QK_EDTYPE: return "dtype code must be 0 (fp16) or 1 (bf16)";
    case QK_ESPLITS: return "splits must be >= 1, with a workspace when > 1";
    case QK_EALIGN: return "a tensor is not 16-byte aligned";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown quantkern error";
  }
}

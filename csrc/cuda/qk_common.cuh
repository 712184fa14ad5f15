// Device helpers shared by the quantkern CUDA kernels: PTX wrappers (cp.async, ldmatrix, mma.sync)
// and the exact dequantization of packed code pairs. sm_80+ only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace qk {

template <typename T> struct Pair;
template <> struct Pair<half> { using type = half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ half2 pair_from_floats(float a, float b, half2*) { return __floats2half2_rn(a, b); }
__device__ __forceinline__ __nv_bfloat162 pair_from_floats(float a, float b, __nv_bfloat162*) {
  return __floats2bfloat162_rn(a, b);
}

template <typename P> __device__ __forceinline__ uint32_t as_u32(P v) { return *reinterpret_cast<uint32_t*>(&v); }
template <typename P> __device__ __forceinline__ P from_u32(uint32_t v) { return *reinterpret_cast<P*>(&v); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; with valid == false the destination is zero-filled
// and nothing is read (src must still be a mapped address, callers pass the tensor base).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulation.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], half*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __nv_bfloat16*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// (a & mask) | magic in one LOP3 (nvcc emits two LOP3 for the C expression when both are immediates).
template <uint32_t MASK, uint32_t MAGIC> __device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "n"(MASK), "n"(MAGIC));
  return r;
}

// ---- exact dequantization of two codes held at bit offsets (POS*BITS, 16 + POS*BITS) of a word ----
//
// The result is (q - z) * s rounded once to T, which is what the reference computes ((q - z) * s in
// fp32, then a cast): q - z is an exact small integer, and its product with a 11- (fp16) or 8- (bf16)
// bit significand is exact in fp32, so one rounding either way gives the same bits.
//
// fp16: OR-ing a code into the mantissa of 1024.0 (0x6400) yields 1024 + q exactly for q < 1024, so
// subtracting zoff = 1024 + z gives q - z with one half2 op. bf16, 4-bit: the same with 128.0 (0x4300),
// exact for q < 128. bf16, 8-bit: 128 + q is not exact past 256, so that case goes through fp32.
template <typename T, int BITS> struct Dequant;

template <int BITS> struct Dequant<half, BITS> {
  static_assert(BITS == 4 || BITS == 8, "tensor-core path is 4- or 8-bit");
  static constexpr uint32_t kMask = BITS == 4 ? 0x000F000Fu : 0x00FF00FFu;
  __device__ __forceinline__ static half2 zero_offset(half z) {
    return __half2half2(__hadd(z, __float2half_rn(1024.f)));
  }
  template <int POS> __device__ __forceinline__ static half2 pair(uint32_t w, half2 zoff, half2 scale) {
    const uint32_t t = and_or<kMask, 0x64006400u>(w >> (POS * BITS));
    return __hmul2(__hsub2(from_u32<half2>(t), zoff), scale);
  }
};

template <> struct Dequant<__nv_bfloat16, 4> {
  __device__ __forceinline__ static __nv_bfloat162 zero_offset(__nv_bfloat16 z) {
    return __bfloat162bfloat162(__float2bfloat16_rn(__bfloat162float(z) + 128.f));
  }
  template <int POS>
  __device__ __forceinline__ static __nv_bfloat162 pair(uint32_t w, __nv_bfloat162 zoff, __nv_bfloat162 scale) {
    const uint32_t t = and_or<0x000F000Fu, 0x43004300u>(w >> (POS * 4));
    return __hmul2(__hsub2(from_u32<__nv_bfloat162>(t), zoff), scale);
  }
};

template <> struct Dequant<__nv_bfloat16, 8> {
  __device__ __forceinline__ static __nv_bfloat162 zero_offset(__nv_bfloat16 z) { return __bfloat162bfloat162(z); }
  template <int POS>
  __device__ __forceinline__ static __nv_bfloat162 pair(uint32_t w, __nv_bfloat162 zoff, __nv_bfloat162 scale) {
    const float z = __low2float(zoff), s = __low2float(scale);
    const float a = static_cast<float>((w >> (POS * 8)) & 0xFFu) - z;
    const float b = static_cast<float>((w >> (POS * 8 + 16)) & 0xFFu) - z;
    return __floats2bfloat162_rn(a * s, b * s);
  }
};

// out[i] = sum over splits of workspace[s][i], summed in split order (deterministic). Internal linkage:
// each .cu gets its own copy, so no kernel symbol is shared between translation units.
namespace {
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ workspace, T* __restrict__ out, int splits,
                                     size_t count) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += workspace[k * count + i];
    out[i] = from_float<T>(s);
  }
}

template <typename T>
cudaError_t launch_reduce_splits(const float* workspace, T* out, int splits, size_t count, cudaStream_t stream) {
  const size_t want = (count + 255) / 256;
  const int blocks = static_cast<int>(want < 4096 ? want : 4096);
  reduce_splits_kernel<T><<<blocks, 256, 0, stream>>>(workspace, out, splits, count);
  return cudaGetLastError();
}
}  // namespace

}  // namespace qk

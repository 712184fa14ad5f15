/* C interface of the quantkern CUDA kernels (csrc/cuda/gemm_wna16.cu, csrc/cuda/gemv_wna16.cu).
 *
 * Plain C on purpose: no CUDA and no torch types, so that the torch binding (qk_binding.cpp) compiles
 * against any torch build and the kernels compile with nvcc alone. Pointers are device pointers;
 * `stream` is a cudaStream_t passed as void*. Every launcher validates its arguments and returns 0 on
 * success, a negative QK_E* code for a bad argument, or a positive cudaError_t from the launch;
 * qk_error_string() turns either into text.
 *
 * dtype codes: 0 = fp16, 1 = bf16 (activations, scales, zeros and output share it).
 */
#ifndef QUANTKERN_QK_LAUNCH_H_
#define QUANTKERN_QK_LAUNCH_H_

#ifdef __cplusplus
extern "C" {
#endif

enum {
  QK_OK = 0,
  QK_EBITS = -1,      /* bits not supported by this kernel */
  QK_ESHAPE = -2,     /* a size is not a multiple of what the layout needs */
  QK_EGROUP = -3,     /* group size not supported */
  QK_EDTYPE = -4,     /* dtype code not 0 / 1 */
  QK_ESPLITS = -5,    /* splits < 1, or > 1 without a workspace */
  QK_EALIGN = -6      /* a pointer is not 16-byte aligned */
};

/* Tile sizes of the tensor-core GEMM; the repacked weight layout depends on them. */
#define QK_GEMM_BN 128
#define QK_GEMM_BK 64

/* Tensor-core W4A16 / W8A16 GEMM, out[M, N] = x[M, K] @ dequant(W)[K, N].
 *  x:       [M, K] row-major (K % 8 == 0, 16-byte aligned)
 *  qweight: the tiled layout of quantkern/kernels/cuda/layout.py, Np/128 * Kp/64 tiles of 256*bits words
 *  scales, zeros: [Gp, Np] (zeros hold the integer zero point as a float value)
 *  out:     [M, N]; workspace: fp32 [splits, M, N] when splits > 1, else may be NULL
 *  Kp = K rounded up to 64, Np = N rounded up to 128; group_size: a multiple of 64 (Kp for one group). */
int qk_gemm_wna16(const void* x, const void* qweight, const void* scales, const void* zeros, void* out,
                  float* workspace, int M, int K, int N, int Kp, int Np, int group_size, int bits, int dtype,
                  int splits, void* stream);

/* Batch-1..8 GEMV on the GPTQ row layout (codes packed along K, any bits 2..8, K padded to 32).
 *  x:       [M, K] row-major, M <= 8
 *  qweight: int32 [Kp/32 * bits, N], Kp = K rounded up to 32
 *  scales, zeros: [G, N]; g_idx: int32 [Kp], the group of every (possibly permuted) input column
 *  out:     [M, N]; workspace: fp32 [splits, M, N] when splits > 1 */
int qk_gemv_wna16(const void* x, const void* qweight, const void* scales, const void* zeros, const int* g_idx,
                  void* out, float* workspace, int M, int K, int N, int G, int bits, int dtype, int splits,
                  void* stream);

const char* qk_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* QUANTKERN_QK_LAUNCH_H_ */

// torch.library registration of the quantkern CUDA kernels (the only file here that sees torch).
//
// Defines, in the `quantkern` namespace (a fragment, so other quantkern extensions and the Python
// custom ops share it):
//   cuda_gemm_wna16(x, qweight, scales, zeros, bits, group_size, n, splits) -> out [M, n]
//   cuda_gemv_wna16(x, qweight, scales, zeros, g_idx, bits, splits)          -> out [M, N]
// with CUDA implementations; the fake (meta) implementations are registered from Python
// (quantkern/kernels/cuda/ops.py) once this library is loaded. Argument checks raise c10::Error
// (RuntimeError in Python) naming the offending tensor before any launch.
//
// It uses only device-generic c10 APIs (DeviceGuard, the CUDA stream through DeviceGuardImplInterface)
// so that it compiles against any torch build; the kernels live in the .cu files behind qk_launch.h.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "qk_launch.h"

namespace {

int dtype_code(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "quantkern CUDA kernels take fp16 or bf16 activations, got ", x.scalar_type());
  return x.scalar_type() == at::kHalf ? 0 : 1;
}

void check_same(const at::Tensor& x, const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void* current_stream(const at::Tensor& x) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(x.device()).native_handle();
}

void check_status(int code, const char* op) {
  TORCH_CHECK(code == QK_OK, "quantkern::", op, " failed: ", qk_error_string(code), " (code ", code, ")");
}

at::Tensor cuda_gemm_wna16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t n, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  const int dt = dtype_code(x);
  check_same(x, qweight, "qweight", at::kInt);
  check_same(x, scales, "scales", x.scalar_type());
  check_same(x, zeros, "zeros", x.scalar_type());
  TORCH_CHECK(bits == 4 || bits == 8, "cuda_gemm_wna16: bits must be 4 or 8, got ", bits);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t Kp = (K + QK_GEMM_BK - 1) / QK_GEMM_BK * QK_GEMM_BK;
  TORCH_CHECK(scales.dim() == 2 && zeros.sizes() == scales.sizes(), "scales / zeros must both be [Gp, Np]");
  const int64_t Np = scales.size(1);
  TORCH_CHECK(n >= 1 && Np == (n + QK_GEMM_BN - 1) / QK_GEMM_BN * QK_GEMM_BN, "scales have ", Np,
              " columns; n=", n, " needs them padded to a multiple of ", QK_GEMM_BN);
  TORCH_CHECK(group_size > 0 && group_size % QK_GEMM_BK == 0, "group_size must be a positive multiple of ",
              QK_GEMM_BK, ", got ", group_size);
  TORCH_CHECK(scales.size(0) >= (Kp + group_size - 1) / group_size, "scales have ", scales.size(0),
              " groups, K=", K, " with group_size ", group_size, " needs ", (Kp + group_size - 1) / group_size);
  TORCH_CHECK(qweight.numel() == Kp * Np * bits / 32, "qweight has ", qweight.numel(), " words, expected ",
              Kp * Np * bits / 32, " for K=", K, " N=", n, " bits=", bits, " (repacked layout)");
  TORCH_CHECK(K % 8 == 0, "cuda_gemm_wna16 needs K % 8 == 0, got K=", K);
  TORCH_CHECK(splits >= 1, "splits must be >= 1");
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, n}, x.options());
  if (M == 0) return out;  // an empty batch launches nothing
  at::Tensor ws;
  if (splits > 1) ws = at::empty({splits, M, n}, x.options().dtype(at::kFloat));
  check_status(qk_gemm_wna16(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(),
                             splits > 1 ? ws.data_ptr<float>() : nullptr, static_cast<int>(M), static_cast<int>(K),
                             static_cast<int>(n), static_cast<int>(Kp), static_cast<int>(Np),
                             static_cast<int>(group_size), static_cast<int>(bits), dt, static_cast<int>(splits),
                             current_stream(x)),
               "cuda_gemm_wna16");
  return out;
}

at::Tensor cuda_gemv_wna16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, const at::Tensor& g_idx, int64_t bits, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  const int dt = dtype_code(x);
  check_same(x, qweight, "qweight", at::kInt);
  check_same(x, scales, "scales", x.scalar_type());
  check_same(x, zeros, "zeros", x.scalar_type());
  check_same(x, g_idx, "g_idx", at::kInt);
  TORCH_CHECK(bits >= 2 && bits <= 8, "cuda_gemv_wna16: bits must be in 2..8, got ", bits);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= 8, "cuda_gemv_wna16 handles 1..8 rows, got M=", M);
  const int64_t Kp = (K + 31) / 32 * 32;
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) == Kp / 32 * bits, "qweight must be [", Kp / 32 * bits,
              ", N] for K=", K, " bits=", bits, ", got ", qweight.sizes());
  const int64_t N = qweight.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == N && zeros.sizes() == scales.sizes(),
              "scales / zeros must both be [G, ", N, "]");
  TORCH_CHECK(g_idx.dim() == 1 && g_idx.size(0) == Kp, "g_idx must have ", Kp, " entries (K padded to 32)");
  TORCH_CHECK(splits >= 1, "splits must be >= 1");
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  at::Tensor ws;
  if (splits > 1) ws = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  check_status(qk_gemv_wna16(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                             g_idx.data_ptr<int>(), out.data_ptr(), splits > 1 ? ws.data_ptr<float>() : nullptr,
                             static_cast<int>(M), static_cast<int>(K), static_cast<int>(N),
                             static_cast<int>(scales.size(0)), static_cast<int>(bits), dt, static_cast<int>(splits),
                             current_stream(x)),
               "cuda_gemv_wna16");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  m.def("cuda_gemm_wna16(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
        "int n, int splits) -> Tensor");
  m.def("cuda_gemv_wna16(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, int bits, "
        "int splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("cuda_gemm_wna16", &cuda_gemm_wna16);
  m.impl("cuda_gemv_wna16", &cuda_gemv_wna16);
}

// torch.library binding of the CPU kernels: namespace quantkern_cpu.
//
//   quantkern_cpu::gemm(Tensor x, Tensor w, Tensor scales, Tensor zs, Tensor gptr, Tensor? src,
//                       int cb, int n, Tensor? bias, int isa) -> Tensor
//       x      [M, K] fp32 / bf16 / fp16 (any float dtype; computed in fp32)
//       w, scales, zs, gptr: the packed layout of gemm_kernels.h (from quantkern/kernels/cpu/layout.py)
//       src    int64 [Kp]: source column of x for each padded k position (K = a zero column); None
//              when the padded order is the identity (Kp == K)
//       cb     container bits (2, 4, 8); n = out_features; bias [n] or None
//       isa    0 = best available, 1 = portable, 2 = AVX2, 3 = AVX-512, 4 = AVX-512 + BF16 dot products
//              for bf16 activations with 2- / 4-bit containers (other inputs: the AVX-512 kernel);
//              a level this CPU lacks raises
//     returns [M, n] in x's dtype; accumulation in fp32.
//   quantkern_cpu::best_isa() -> int   the ISA level `isa=0` resolves to on this CPU.
//
// Shapes and dtypes are validated here with TORCH_CHECK before any pointer is touched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "gemm_kernels.h"

namespace quantkern_cpu {
namespace {

int64_t best_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return 4;
  if (avx512) return 3;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
  return 1;
}

// The requested level resolved against this CPU (raises if it is not available).
int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  TORCH_CHECK(isa >= 0 && isa <= 4, "quantkern_cpu::gemm: isa must be 0 (auto), 1 (portable), 2 (avx2), 3 "
              "(avx512) or 4 (avx512bf16), got ", isa);
  TORCH_CHECK(isa <= best, "quantkern_cpu::gemm: isa ", isa, " requested but this CPU supports at most ", best);
  return isa == 0 ? best : isa;
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zs,
                const at::Tensor& gptr, const std::optional<at::Tensor>& src, int64_t cb, int64_t n,
                const std::optional<at::Tensor>& bias, int64_t isa) {
  isa = resolve_isa(isa);
  TORCH_CHECK(cb == 2 || cb == 4 || cb == 8, "quantkern_cpu::gemm: container bits must be 2, 4 or 8, got ", cb);
  // bf16 dot products only where they are exact: bf16 activations, codes < 128 (2- / 4-bit containers)
  const bool use_bf16 = isa == 4 && x.scalar_type() == at::kBFloat16 && cb != 8;
  const BlockFn fn = use_bf16 ? block_fn_avx512bf16(cb)
                     : isa >= 3 ? block_fn_avx512(cb) : isa == 2 ? block_fn_avx2(cb) : block_fn_scalar(cb);
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "quantkern_cpu::gemm: x must be a 2-D float tensor, got ",
              x.dim(), "-D ", x.scalar_type());
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 16 && w.scalar_type() == at::kInt && w.is_contiguous(),
              "quantkern_cpu::gemm: w must be contiguous int32 [NB, KW, 16], got ", w.sizes(), " ", w.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), NB = w.size(0), KW = w.size(1), Np = NB * 16;
  const int64_t G = gptr.numel() - 1, Kp = KW * (32 / cb);
  TORCH_CHECK(n > Np - 16 && n <= Np, "quantkern_cpu::gemm: n=", n, " does not match ", NB, " column blocks");
  TORCH_CHECK(gptr.scalar_type() == at::kInt && gptr.dim() == 1 && G >= 1 && gptr.is_contiguous(),
              "quantkern_cpu::gemm: gptr must be contiguous int32 [G+1]");
  for (const at::Tensor* t : {&scales, &zs})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == G &&
                    t->size(1) == Np,
                "quantkern_cpu::gemm: scales / zs must be contiguous fp32 [", G, ", ", Np, "], got ", t->sizes());
  const int32_t* gp = gptr.data_ptr<int32_t>();
  TORCH_CHECK(gp[0] == 0 && gp[G] == KW, "quantkern_cpu::gemm: gptr must run from 0 to KW=", KW);
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(gp[g] <= gp[g + 1], "quantkern_cpu::gemm: gptr is not monotonic");
  if (bias) TORCH_CHECK(bias->numel() == n, "quantkern_cpu::gemm: bias has ", bias->numel(), " elements, expected ", n);

  // activations in the padded k order: fp32 for the fp32 kernels, bf16 (as is) for the BF16 kernel
  at::Tensor xa = use_bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  if (src) {
    TORCH_CHECK(src->scalar_type() == at::kLong && src->numel() == Kp, "quantkern_cpu::gemm: src must be int64 [",
                Kp, "]");
    // column K of the extended activation is the zero that padded k positions read
    at::Tensor ext = at::zeros({M, K + 1}, xa.options());
    ext.narrow(1, 0, K).copy_(xa);
    xa = ext.index_select(1, *src).contiguous();
  } else {
    TORCH_CHECK(K == Kp, "quantkern_cpu::gemm: x has ", K, " features but the packed weight expects ", Kp);
  }
  const at::Tensor xf = use_bf16 ? xa.to(at::kFloat) : xa;
  at::Tensor xsum = at::empty({M, G}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* xs = xsum.data_ptr<float>();
  const int64_t vpw = 32 / cb;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = gp[g] * vpw; k < gp[g + 1] * vpw; ++k) s += xp[m * Kp + k];
      xs[m * G + g] = s;
    }

  at::Tensor y = at::zeros({M, Np}, xf.options());
  const uint16_t* xh = use_bf16 ? reinterpret_cast<const uint16_t*>(xa.data_ptr<at::BFloat16>()) : nullptr;
  const GemmArgs args{xp, xh, xs, w.data_ptr<int32_t>(), scales.data_ptr<float>(), zs.data_ptr<float>(), gp,
                      y.data_ptr<float>(), M, Kp, KW, G, Np};
  // Cache blocking. Rows are taken 8 at a time (one register tile); the column blocks are grouped
  // into "panels" whose packed weights (about kPanelBytes) stay in L2 while every 8-row chunk of x
  // passes over them, so for large M neither x nor w is re-read from memory per block. For M <= 8
  // this is simply one pass over each block. Panels are the parallel tasks: a thread streams its own
  // contiguous part of w. At least 4 panels per thread keep the split even for small N.
  constexpr int64_t kRowChunk = 8, kPanelBytes = 256 * 1024;
  const int64_t block_bytes = std::max<int64_t>(KW * 16 * 4, 1);
  const int64_t threads = at::get_num_threads();
  const int64_t panel = std::max<int64_t>(1, std::min(kPanelBytes / block_bytes, NB / (4 * threads)));
  const int64_t panels = (NB + panel - 1) / panel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b0 = p * panel, b1 = std::min(NB, b0 + panel);
      for (int64_t m0 = 0; m0 < M; m0 += kRowChunk)
        for (int64_t b = b0; b < b1; ++b) fn(args, b, m0, std::min(M, m0 + kRowChunk));
    }
  });
  at::Tensor out = Np == n ? y : y.narrow(1, 0, n);
  if (bias) out = out.add(bias->to(at::kFloat));
  return out.to(x.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY(quantkern_cpu, m) {
  m.def("gemm(Tensor x, Tensor w, Tensor scales, Tensor zs, Tensor gptr, Tensor? src, int cb, int n, "
        "Tensor? bias, int isa) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(quantkern_cpu, CPU, m) { m.impl("gemm", &gemm); }

}  // namespace quantkern_cpu

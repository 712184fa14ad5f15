// torch.library binding of the CPU kernels: namespace quantkern_cpu.
//
//   quantkern_cpu::gemm(Tensor x, Tensor w, Tensor scales, Tensor zs, Tensor gptr, Tensor? src,
//                       int cb, int n, Tensor? bias, int isa, bool int8_act=False) -> Tensor
//       x      [M, K] fp32 / bf16 / fp16 (any float dtype; computed in fp32)
//       w, scales, zs, gptr: the packed layout of gemm_kernels.h (from quantkern/kernels/cpu/layout.py)
//       src    int64 [Kp]: source column of x for each padded k position (K = a zero column); None
//              when the padded order is the identity (Kp == K)
//       cb     container bits (2, 4, 8); n = out_features; bias [n] or None
//       isa    0 = best available, 1 = portable, 2 = AVX2, 3 = AVX-512, 4 = AVX-512 + BF16 dot products
//              for bf16 activations with 2- / 4-bit containers (other inputs: the AVX-512 kernel);
//              a level this CPU lacks raises
//       int8_act  quantize each row of x to int8 per block of 32 k positions (llama.cpp's Q8_0 for its
//              Q4_0 / Q8_0 dot products) and run the integer dot-product kernels (gemm_q8.cpp: AVX2 for
//              isa >= 2, else portable): a different, documented result (gemm_kernels.h), not the same
//              product faster
//     returns [M, n] in x's dtype; accumulation in fp32.
//   quantkern_cpu::best_isa() -> int   the ISA level `isa=0` resolves to on this CPU.
//
// Shapes and dtypes are validated here with TORCH_CHECK before any pointer is touched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "gemm_kernels.h"
#include "op_common.h"

namespace quantkern_cpu {
namespace {

constexpr const char* kOp = "quantkern_cpu::gemm";

at::Tensor gemm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zs,
                const at::Tensor& gptr, const std::optional<at::Tensor>& src, int64_t cb, int64_t n,
                const std::optional<at::Tensor>& bias, int64_t isa, bool int8_act) {
  const int64_t level = resolve_isa(isa, kOp);
  const BlockKernel kern = choose_kernel(level, x_in.scalar_type(), cb, kOp, int8_act);
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_floating_point(), kOp, ": x must be a 2-D float tensor, got ", x_in.dim(),
              "-D ", x_in.scalar_type());
  const int64_t M = x_in.size(0), K = x_in.size(1), vpw = 32 / cb;
  const at::Tensor* src_t = src ? &*src : nullptr;
  const PackedWeight pw = check_packed(w, scales, zs, gptr, src_t, cb, n, K, kOp, "x");
  const int64_t NB = pw.NB, KW = pw.KW, Np = pw.Np, G = pw.G, Kp = pw.Kp;
  const int32_t* gp = pw.gptr;
  const int64_t* sp = pw.src;
  if (bias) TORCH_CHECK(bias->numel() == n, kOp, ": bias has ", bias->numel(), " elements, expected ", n);

  // activations in the padded k order (read in place when they already are), per-group sums
  const PaddedActivations act = padded_activations(x_in, kern.bf16, sp == nullptr, 0, M, Kp, G, vpw,
                                                   [&](int64_t i) { return RowSource{i, sp, gp}; });
  at::Tensor y = at::zeros({M, Np}, x_in.options().dtype(at::kFloat));
  GemmArgs args{act.x, act.xh, act.xs, pw.w, pw.scales, pw.zs, gp, y.data_ptr<float>(), M, Kp, KW, G, Np};
  at::Tensor xq, xd;
  if (int8_act) {  // act.xsum is overwritten with the sums of the quantized values
    xq = at::empty({M, Kp}, x_in.options().dtype(at::kChar));
    xd = at::empty({M, KW}, x_in.options().dtype(at::kFloat));
    quantize_rows_q8(act.x, M, Kp, KW, G, cb, gp, xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
                     act.xsum.data_ptr<float>());
    args.xq = xq.data_ptr<int8_t>();
    args.xd = xd.data_ptr<float>();
  }
  // panels of column blocks are the parallel tasks (op_common.h: panel_blocks)
  const int64_t panel = panel_blocks(KW, NB, at::get_num_threads());
  const int64_t panels = (NB + panel - 1) / panel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) run_panel(kern.fn, args, p * panel, std::min(NB, p * panel + panel));
  });
  at::Tensor out = Np == n ? y : y.narrow(1, 0, n);
  if (bias) out = out.add(bias->to(at::kFloat));
  return out.to(x_in.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY(quantkern_cpu, m) {
  m.def("gemm(Tensor x, Tensor w, Tensor scales, Tensor zs, Tensor gptr, Tensor? src, int cb, int n, "
        "Tensor? bias, int isa, bool int8_act=False) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(quantkern_cpu, CPU, m) { m.impl("gemm", &gemm); }

}  // namespace quantkern_cpu

// The grouped expert GEMM of the CPU kernels (issue #15): one call computes one projection of every
// routed expert of a QuantExperts (quantkern/kernels/moe.py: pairs sorted by expert).
//
//   quantkern_cpu::moe_gemm(Tensor x, Tensor? rows, Tensor offsets, Tensor w, Tensor scales, Tensor zs,
//                           Tensor gptr, Tensor? src, int cb, int n, Tensor? bias, int isa) -> Tensor
//       x        [T, K] float (fp32 / bf16 / fp16 / fp64; computed in fp32, like quantkern_cpu::gemm)
//       rows     int64 [P]: the token (row of x) of each pair; None: x has one row per pair (T == P)
//       offsets  int64 [E + 1], monotonic, offsets[E] <= P: expert e owns pairs offsets[e] .. offsets[e+1]-1;
//                the other pairs' output rows are zero
//       w        int32 [E, NB, KW, 16], scales / zs fp32 [E, NB, G, 16], gptr int32 [E, G + 1], src int64
//                [E, Kp] or None: the dense layout of gemm_kernels.h stacked over the experts
//                (quantkern/kernels/cpu/layout.py: pack_cpu_experts); every expert has the same NB,
//                KW and G, its own group boundaries and k order
//       cb, n, isa: as for quantkern_cpu::gemm; bias [E, n] (any float dtype) or None
//     returns [P, n] in x's dtype: row p = x[rows[p]] @ W[e] (+ bias[e]) for the expert e owning p.
//
// Each expert's rows are gathered once into its padded k order (with their per-group sums), then the
// (expert, column panel) tasks of the experts that have pairs run the dense block kernels: an expert
// without pairs is never read. Tasks are handed out dynamically (an atomic counter), largest experts
// first, so a decode step (a handful of one-row experts) and a skewed batch both spread over the
// threads. Everything is validated with TORCH_CHECK before a pointer is followed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

#include "gemm_kernels.h"
#include "op_common.h"

namespace quantkern_cpu {
namespace {

constexpr const char* kOp = "quantkern_cpu::moe_gemm";

struct Task {
  int64_t e, b0, b1;
};

at::Tensor moe_gemm(const at::Tensor& x_in, const std::optional<at::Tensor>& rows, const at::Tensor& offsets,
                    const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zs, const at::Tensor& gptr,
                    const std::optional<at::Tensor>& src, int64_t cb, int64_t n,
                    const std::optional<at::Tensor>& bias, int64_t isa) {
  const BlockKernel kern = choose_kernel(resolve_isa(isa, kOp), x_in.scalar_type(), cb, kOp);
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_floating_point(), kOp, ": x must be a 2-D float tensor, got ", x_in.dim(),
              "-D ", x_in.scalar_type());
  TORCH_CHECK(w.dim() == 4 && w.size(3) == 16 && w.size(0) >= 1 && w.scalar_type() == at::kInt && w.is_contiguous(),
              kOp, ": w must be contiguous int32 [E, NB, KW, 16] with E >= 1, got ", w.sizes(), " ", w.scalar_type());
  const int64_t T = x_in.size(0), K = x_in.size(1), E = w.size(0), NB = w.size(1), KW = w.size(2), Np = NB * 16;
  const int64_t vpw = 32 / cb, Kp = KW * vpw;
  TORCH_CHECK(n > Np - 16 && n <= Np, kOp, ": n=", n, " does not match ", NB, " column blocks");
  TORCH_CHECK(gptr.scalar_type() == at::kInt && gptr.dim() == 2 && gptr.size(0) == E && gptr.size(1) >= 2 &&
                  gptr.is_contiguous(),
              kOp, ": gptr must be contiguous int32 [E=", E, ", G+1], got ", gptr.sizes(), " ", gptr.scalar_type());
  const int64_t G = gptr.size(1) - 1;
  for (const at::Tensor* t : {&scales, &zs})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == E &&
                    t->size(1) == NB && t->size(2) == G && t->size(3) == 16,
                kOp, ": scales / zs must be contiguous fp32 [", E, ", ", NB, ", ", G, ", 16], got ", t->sizes(), " ",
                t->scalar_type());
  const int32_t* gp = gptr.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e) check_gptr(gp + e * (G + 1), G, KW, kOp, "every row of gptr");
  const int64_t* sp = nullptr;
  if (src) {
    TORCH_CHECK(src->scalar_type() == at::kLong && src->dim() == 2 && src->size(0) == E && src->size(1) == Kp &&
                    src->is_contiguous(),
                kOp, ": src must be contiguous int64 [", E, ", ", Kp, "], got ", src->sizes(), " ", src->scalar_type());
    sp = src->data_ptr<int64_t>();  // checked below, for the experts that are read
  } else {
    TORCH_CHECK(K == Kp, kOp, ": x has ", K, " features but the packed weights expect ", Kp);
  }
  at::Tensor bias_f;
  if (bias) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == n && bias->is_floating_point(), kOp,
                ": bias must be a float [", E, ", ", n, "] tensor, got ", bias->sizes(), " ", bias->scalar_type());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  // the pairs: P of them, expert e owning off[e] .. off[e+1]-1
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() == E + 1, kOp,
              ": offsets must be int64 [E+1=", E + 1, "], got ", offsets.sizes(), " ", offsets.scalar_type());
  const at::Tensor off_t = offsets.contiguous();
  const int64_t* off = off_t.data_ptr<int64_t>();
  int64_t P = T;
  const int64_t* rp = nullptr;
  at::Tensor rows_t;
  if (rows) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1, kOp, ": rows must be a 1-D int64 tensor, got ",
                rows->dim(), "-D ", rows->scalar_type());
    rows_t = rows->contiguous();
    rp = rows_t.data_ptr<int64_t>();
    P = rows_t.numel();
  }
  TORCH_CHECK(off[0] >= 0, kOp, ": offsets[0] = ", off[0], " is negative");
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(off[e] <= off[e + 1], kOp, ": offsets are not monotonic (offsets[", e, "] = ", off[e],
                " > offsets[", e + 1, "] = ", off[e + 1], ")");
  TORCH_CHECK(off[E] <= P, kOp, ": offsets[E] = ", off[E], " exceeds the ", P, " pairs",
              rows ? " (rows.numel())" : " (x has one row per pair)");
  const int64_t p0 = off[0], pv = off[E] - p0;  // the valid pairs
  if (rp)
    for (int64_t p = p0; p < off[E]; ++p)
      TORCH_CHECK(rp[p] >= 0 && rp[p] < T, kOp, ": rows[", p, "] = ", rp[p], " is not a row of x (", T, " rows)");
  // the experts that have pairs (only they are read), the most pairs first
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) active.push_back(e);
  std::stable_sort(active.begin(), active.end(),
                   [&](int64_t a, int64_t b) { return off[a + 1] - off[a] > off[b + 1] - off[b]; });
  if (sp)
    for (const int64_t e : active) check_src(sp + e * Kp, Kp, K, kOp);

  // each valid pair's activation row in its expert's padded k order, and its per-group sums
  const auto of = [&](int64_t i) {
    const int64_t p = p0 + i;
    const int64_t e = std::upper_bound(off + 1, off + E + 1, p) - (off + 1);  // the expert owning pair p
    return RowSource{rp ? rp[p] : p, sp ? sp + e * Kp : nullptr, gp + e * (G + 1)};
  };
  const PaddedActivations act = padded_activations(x_in, kern.bf16, rp == nullptr && sp == nullptr, p0, pv, Kp,
                                                   G, vpw, of);

  // tasks: the column panels of every active expert, in that order
  const int64_t threads = at::get_num_threads();
  const int64_t panel = panel_blocks(KW, static_cast<int64_t>(active.size()) * NB, threads);
  std::vector<Task> tasks;
  for (const int64_t e : active)
    for (int64_t b0 = 0; b0 < NB; b0 += panel) tasks.push_back({e, b0, std::min(NB, b0 + panel)});

  at::Tensor y = at::empty({P, Np}, x_in.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (p0 > 0) y.narrow(0, 0, p0).zero_();
  if (off[E] < P) y.narrow(0, off[E], P - off[E]).zero_();
  const float* bp = bias ? bias_f.data_ptr<float>() : nullptr;
  const int32_t* wp = w.data_ptr<int32_t>();
  const float* scp = scales.data_ptr<float>();
  const float* zsp = zs.data_ptr<float>();
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, ntasks), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < ntasks; i = next.fetch_add(1)) {
      const Task t = tasks[i];
      const int64_t a = off[t.e], m = off[t.e + 1] - a, c0 = t.b0 * 16, c1 = t.b1 * 16;
      // the kernels accumulate into y: start this tile from the bias (or zero; padded columns zero)
      for (int64_t r = a; r < a + m; ++r) {
        float* yr = yp + r * Np;
        for (int64_t c = c0; c < c1; ++c) yr[c] = bp != nullptr && c < n ? bp[t.e * n + c] : 0.f;
      }
      const int64_t i0 = a - p0;  // row of the gathered activations
      const GemmArgs args{act.x ? act.x + i0 * Kp : nullptr, act.xh ? act.xh + i0 * Kp : nullptr,
                          act.xs + i0 * G, wp + t.e * NB * KW * 16, scp + t.e * G * Np, zsp + t.e * G * Np,
                          gp + t.e * (G + 1), yp + a * Np, m, Kp, KW, G, Np};
      run_panel(kern.fn, args, t.b0, t.b1);
    }
  });
  at::Tensor out = Np == n ? y : y.narrow(1, 0, n);
  return out.to(x_in.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern_cpu, m) {
  m.def("moe_gemm(Tensor x, Tensor? rows, Tensor offsets, Tensor w, Tensor scales, Tensor zs, Tensor gptr, "
        "Tensor? src, int cb, int n, Tensor? bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkern_cpu, CPU, m) { m.impl("moe_gemm", &moe_gemm); }

}  // namespace quantkern_cpu

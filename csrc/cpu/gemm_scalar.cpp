// Portable fallback of the fused dequant-matmul (no intrinsics; the compiler may vectorise it for
// the baseline ISA). Layout and arithmetic: gemm_kernels.h.
#include "gemm_kernels.h"

namespace quantkern_cpu {
namespace {

template <int CB>
void block_scalar(const GemmArgs& a, int64_t b, int64_t m0, int64_t m1) {
  constexpr int VPW = 32 / CB;
  constexpr uint32_t MASK = (1u << CB) - 1u;
  const int32_t* wb = a.w + b * a.KW * 16;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xm = a.x + m * a.Kp;
    float* ym = a.y + m * a.Np + b * 16;
    for (int64_t g = 0; g < a.G; ++g) {
      float acc[16] = {0};
      for (int64_t r = a.gptr[g]; r < a.gptr[g + 1]; ++r) {
        const int32_t* wr = wb + r * 16;
        const float* xk = xm + r * VPW;
        for (int j = 0; j < VPW; ++j) {
          const float xv = xk[j];
          for (int c = 0; c < 16; ++c) {
            const uint32_t q = (static_cast<uint32_t>(wr[c]) >> code_shift(CB, j)) & MASK;
            acc[c] += static_cast<float>(q) * xv;
          }
        }
      }
      const float* s = a.scales + (b * a.G + g) * 16;
      const float* z = a.zs + (b * a.G + g) * 16;
      const float xs = a.xsum[m * a.G + g];
      for (int c = 0; c < 16; ++c) ym[c] += s[c] * acc[c] - z[c] * xs;
    }
  }
}

}  // namespace

BlockFn block_fn_scalar(int cb) {
  switch (cb) {
    case 2: return &block_scalar<2>;
    case 4: return &block_scalar<4>;
    case 8: return &block_scalar<8>;
    default: return nullptr;
  }
}

}  // namespace quantkern_cpu

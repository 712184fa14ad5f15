// quantkern_cpu::llama_decode: one decode step (one new token per row) through every block of a
// Llama-family model, in one call and one OpenMP parallel region.
//
//   llama_decode(Tensor x, Tensor[] params, int[] cbs, Tensor[] k_cache, Tensor[] v_cache, Tensor cos,
//                Tensor sin, Tensor pos, int slot, Tensor key_valid, Tensor final_norm, int n_heads,
//                int n_kv, int inter, float eps, float scaling, int isa, bool[] int8_act, Tensor[] head,
//                int head_cb, int head_n, bool head_int8) -> Tensor
//     x          [B, H] fp32: the embedded new tokens (row b: batch row b)
//     params     26 tensors per layer, in order: ln1 [H], ln2 [H], then for qkv (q, k, v fused; K = H,
//                n = (n_heads + 2 n_kv) D), o (K = n_heads D, n = H), gate_up (gate, up fused; K = H,
//                n = 2I) and down (K = I, n = H) six tensors each: the packed layout of gemm_kernels.h
//                (w, scales, zs, gptr), src (int64 [Kp], or an empty tensor for the identity order) and
//                bias (fp32 [n], or an empty tensor)
//     cbs        container bits of the 4 projections of every layer (4 L ints)
//     k_cache, v_cache  per layer fp32 [B, n_kv, S, D], written in place at `slot`
//     cos, sin   fp32 [P, D] RoPE tables; pos int64 [B] the RoPE position of each row's new token
//     key_valid  bool [B, S]: the cache positions a row may attend to (its own slot always)
//     final_norm fp32 [H]; n_heads / n_kv query / KV heads (D = the caches' last dim); inter: the MLP width I
//     eps: RMSNorm's epsilon; scaling: the attention score scale; isa: as quantkern_cpu::gemm; int8_act: per
//                projection (4 L flags, the order of cbs) whether it runs with int8 activations (quantkern_cpu::gemm)
//     head       the output layer: [] (none), [W] a dense fp32 [head_n, H] weight, or the six tensors of a
//                packed one (as a projection above; head_cb its container bits, head_int8 its mode)
//     returns fp32 [B, head_n] logits, or without a head [B, H]: the final RMSNorm of the last block's output
//
//   packed_columns(Tensor ids, Tensor w, Tensor scales, Tensor zs, Tensor gptr, Tensor? src, int cb, int n,
//                  int K) -> Tensor
//     columns ids [T] of a packed weight (the layout of gemm_kernels.h, K input features) dequantized as
//     fp32 rows [T, K]: the input embeddings of a tied quantized lm_head, one column each
//
// What a step computes is FastDecoder._forward (quantkern/generation.py) for one query position, in fp32:
// RMSNorm, the fused q/k/v GEMM, rotary embeddings, the new K / V written to the cache, attention of
// each query head over its KV head's cache positions <= slot that key_valid allows, the o GEMM plus the
// residual, RMSNorm, the gate/up GEMM, SiLU(gate) * up, the down GEMM plus the residual. Why one op:
// the GEMMs of a decode step are small (tens of microseconds), so a fork/join per GEMM and a dispatch
// per elementwise kernel cost as much as the work. Here the threads stay in one parallel region for
// the whole step: each thread computes the norms and activation gathers itself (a few thousand floats,
// no synchronisation), owns a contiguous range of every GEMM's column blocks and a share of the
// attention heads, and the threads meet at five barriers per layer.
//
// Every tensor is validated before the parallel region starts; nothing inside it can throw.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "decode_kernels.h"
#include "decode_vec.h"
#include "gemm_kernels.h"
#include "op_common.h"

namespace quantkern_cpu {
namespace {

constexpr const char* kOp = "quantkern_cpu::llama_decode";
constexpr int64_t kPerLinear = 6;
constexpr int64_t kPerLayer = 2 + 4 * kPerLinear;

struct Linear {
  const int32_t* w;
  const float* scales;
  const float* zs;
  const int32_t* gptr;
  const int64_t* src;  // nullptr: the padded order is the identity
  const float* bias;   // nullptr: none
  int64_t K, Kp, KW, G, NB, Np, n, cb;
  bool int8;  // int8 activations (the q8 kernels)
  BlockFn fn;
};

Linear check_linear(const std::vector<at::Tensor>& p, int64_t first, int64_t K, int64_t n, int64_t cb,
                    int64_t level, bool int8_act, int64_t layer, const char* what) {
  const std::string where = std::string(kOp) + ": " +
                            (layer >= 0 ? "layer " + std::to_string(layer) + " " + what : std::string(what));
  const PackedWeight pw = check_packed(p[first], p[first + 1], p[first + 2], p[first + 3], &p[first + 4], cb, n, K,
                                       where);
  const at::Tensor& bias = p[first + 5];
  Linear L{pw.w, pw.scales, pw.zs, pw.gptr, pw.src, nullptr, K, pw.Kp, pw.KW, pw.G, pw.NB, pw.Np, n, cb, int8_act,
           choose_kernel(level, at::kFloat, cb, kOp, int8_act).fn};
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == n && bias.is_contiguous(), where,
                ": bias must be contiguous fp32 [", n, "] or empty");
    L.bias = bias.data_ptr<float>();
  }
  return L;
}

void check_vector(const at::Tensor& t, int64_t n, const char* what, int64_t layer = -1) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == n && t.is_contiguous(), kOp, ": ",
              what, layer >= 0 ? " of layer " : "", layer >= 0 ? std::to_string(layer) : std::string(),
              " must be contiguous fp32 [", n, "], got ", t.sizes(), " ", t.scalar_type());
}

// [lo, hi) of n items for thread t of T: contiguous, sizes differing by at most one.
inline void share(int64_t n, int t, int T, int64_t& lo, int64_t& hi) {
  lo = n * t / T;
  hi = n * (t + 1) / T;
}

// One thread's scratch: a GEMM's input rows in the padded k order with their group sums (and their int8
// form), the normed hidden state / MLP activation rows, and attention's rotated q / k and scores.
struct Scratch {
  float *a, *xs, *xd, *h, *q, *k, *p;
  int8_t* xq;
};

// h [B, H] = RMSNorm(x) * w (FastDecoder._rms in fp32).
void rms_rows(const float* x, const float* w, int64_t B, int64_t H, float eps, float* h) {
  for (int64_t m = 0; m < B; ++m) {
    const float* xr = x + m * H;
    float ss = 0.f;
    for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i) h[m * H + i] = w[i] * (xr[i] * r);
  }
}

// This thread's GEMM over its column blocks [b0, b1): y[:, b0*16 : b1*16] of [B, Np] (bias added), from
// the B input rows `in` (row stride ld, K features) gathered into s.
void gemm_share(const Linear& L, const float* in, int64_t ld, int64_t B, const Scratch& s, float* y, int64_t b0,
                int64_t b1) {
  const int64_t vpw = 32 / L.cb;
  for (int64_t m = 0; m < B; ++m) {
    float* d = s.a + m * L.Kp;
    const float* xr = in + m * ld;
    if (L.src == nullptr) std::memcpy(d, xr, sizeof(float) * L.K);
    else
      for (int64_t k = 0; k < L.Kp; ++k) d[k] = L.src[k] < L.K ? xr[L.src[k]] : 0.f;
    if (L.int8) quantize_row_q8(d, L.G, L.cb, L.gptr, s.xq + m * L.Kp, s.xd + m * L.KW, s.xs + m * L.G);
    else row_group_sums(d, L.gptr, L.G, vpw, s.xs + m * L.G);
  }
  if (b0 >= b1) return;
  GemmArgs args{s.a, nullptr, s.xs, L.w, L.scales, L.zs, L.gptr, y, B, L.Kp, L.KW, L.G, L.Np};
  if (L.int8) {
    args.xq = s.xq;
    args.xd = s.xd;
  }
  for (int64_t m = 0; m < B; ++m) std::memset(y + m * L.Np + b0 * 16, 0, sizeof(float) * (b1 - b0) * 16);
  for (int64_t m0 = 0; m0 < B; m0 += kRowChunk)
    for (int64_t b = b0; b < b1; ++b) L.fn(args, b, m0, std::min(B, m0 + kRowChunk));
  if (L.bias != nullptr)
    for (int64_t m = 0; m < B; ++m)
      for (int64_t c = b0 * 16; c < std::min(b1 * 16, L.n); ++c) y[m * L.Np + c] += L.bias[c];
}

// out [D] = x rotated by RoPE (FastDecoder._rope): x * cos + cat(-x[half:], x[:half]) * sin.
inline void rope(const float* x, const float* cs, const float* sn, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cs[i] + (-x[i + half]) * sn[i];
  for (int64_t i = half; i < D; ++i) out[i] = x[i] * cs[i] + x[i - half] * sn[i];
}

struct Attn {
  const float* qkv;  // [B, ldq]
  int64_t ldq, q_dim, kv_dim, n_heads, n_kv, D, S, slot;
  const float *cos, *sin;
  const int64_t* pos;
  const bool* key_valid;  // [B, S]
  float scaling;
  float *kc, *vc;  // this layer's caches [B, n_kv, S, D]
  float* out;      // [B, q_dim]
};

// Query head h of row b: rotate q and the new k, write the new K / V (the group's first query head
// does), attend over positions 0 .. slot (the new token's own K / V taken from this thread's registers,
// not re-read from the cache another thread may be writing).
void attend_head(const Attn& a, AttendFn attend, int64_t b, int64_t h, const Scratch& s) {
  const int64_t D = a.D, r = a.n_heads / a.n_kv, g = h / r;
  const float* row = a.qkv + b * a.ldq;
  const float* cs = a.cos + a.pos[b] * D;
  const float* sn = a.sin + a.pos[b] * D;
  rope(row + h * D, cs, sn, D, s.q);
  rope(row + a.q_dim + g * D, cs, sn, D, s.k);
  const float* vn = row + a.q_dim + a.kv_dim + g * D;
  float* kc = a.kc + (b * a.n_kv + g) * a.S * D;
  float* vc = a.vc + (b * a.n_kv + g) * a.S * D;
  if (h % r == 0) {
    std::memcpy(kc + a.slot * D, s.k, sizeof(float) * D);
    std::memcpy(vc + a.slot * D, vn, sizeof(float) * D);
  }
  attend(HeadArgs{s.q, kc, s.k, vc, vn, a.key_valid + b * a.S, a.slot, D, a.scaling, s.p,
                  a.out + b * a.q_dim + h * D});
}

}  // namespace

// The portable versions: the vector code over one float at a time.
namespace {
struct V1 {
  using T = float;
  static constexpr int W = 1;
  static T zero() { return 0.f; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T set1(float v) { return v; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static float sum(T v) { return v; }
  static T exp(T x) { return std::exp(x); }
};
}  // namespace

void attend_portable(const HeadArgs& a) { attend_vec<V1>(a); }
void dense_rows_portable(const DenseArgs& a, int64_t r0, int64_t r1) { dense_rows_vec<V1>(a, r0, r1); }

namespace {

at::Tensor llama_decode(const at::Tensor& x, const std::vector<at::Tensor>& params, at::IntArrayRef cbs,
                        const std::vector<at::Tensor>& k_cache, const std::vector<at::Tensor>& v_cache,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos, int64_t slot,
                        const at::Tensor& key_valid, const at::Tensor& final_norm, int64_t n_heads, int64_t n_kv,
                        int64_t inter, double eps, double scaling, int64_t isa, const c10::List<bool>& int8_act,
                        const std::vector<at::Tensor>& head, int64_t head_cb, int64_t head_n, bool head_int8) {
  const int64_t level = resolve_isa(isa, kOp);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), kOp,
              ": x must be contiguous fp32 [B, H], got ", x.sizes(), " ", x.scalar_type());
  const int64_t B = x.size(0), H = x.size(1), I = inter;
  TORCH_CHECK(B >= 1 && H >= 1 && I >= 1, kOp, ": empty shapes: B=", B, " H=", H, " intermediate=", I);
  TORCH_CHECK(params.size() % kPerLayer == 0 && !params.empty(), kOp, ": params must hold ", kPerLayer,
              " tensors per layer, got ", params.size());
  const int64_t L = static_cast<int64_t>(params.size()) / kPerLayer;
  TORCH_CHECK(static_cast<int64_t>(cbs.size()) == 4 * L, kOp, ": cbs must hold 4 container widths per layer (",
              4 * L, "), got ", cbs.size());
  TORCH_CHECK(static_cast<int64_t>(int8_act.size()) == 4 * L, kOp, ": int8_act must hold 4 flags per layer (", 4 * L,
              "), got ", int8_act.size());
  TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == L && static_cast<int64_t>(v_cache.size()) == L, kOp,
              ": one K and one V cache per layer (", L, ") expected, got ", k_cache.size(), " and ", v_cache.size());
  TORCH_CHECK(n_heads >= 1 && n_kv >= 1 && n_heads % n_kv == 0, kOp, ": n_heads=", n_heads,
              " must be a multiple of n_kv=", n_kv);
  const at::Tensor& kc0 = k_cache[0];
  TORCH_CHECK(kc0.dim() == 4 && kc0.size(0) == B && kc0.size(1) == n_kv, kOp, ": k_cache[0] must be [", B, ", ",
              n_kv, ", S, D], got ", kc0.sizes());
  const int64_t S = kc0.size(2), D = kc0.size(3), q_dim = n_heads * D, kv_dim = n_kv * D;
  TORCH_CHECK(D >= 2 && D % 2 == 0, kOp, ": head_dim must be even, got ", D);
  for (int64_t l = 0; l < L; ++l)
    for (const at::Tensor* c : {&k_cache[l], &v_cache[l]})
      TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->sizes() == kc0.sizes(), kOp,
                  ": the caches of layer ", l, " must be contiguous fp32 ", kc0.sizes(), ", got ", c->sizes(), " ",
                  c->scalar_type());
  TORCH_CHECK(slot >= 0 && slot < S, kOp, ": slot ", slot, " is outside the cache [0, ", S, ")");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D && t->is_contiguous(), kOp,
                ": cos / sin must be contiguous fp32 [P, ", D, "], got ", t->sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes(), kOp, ": cos and sin differ in shape");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == B && pos.is_contiguous(), kOp,
              ": pos must be contiguous int64 [", B, "]");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < cos.size(0), kOp, ": pos[", b, "] = ", pp[b], " is outside the RoPE table [0, ",
                cos.size(0), ")");
  TORCH_CHECK(key_valid.scalar_type() == at::kBool && key_valid.dim() == 2 && key_valid.size(0) == B &&
                  key_valid.size(1) == S && key_valid.is_contiguous(),
              kOp, ": key_valid must be contiguous bool [", B, ", ", S, "]");
  check_vector(final_norm, H, "final_norm");
  // the output layer: none (return the normed hidden state), dense fp32 [V, H], or packed (6 tensors)
  TORCH_CHECK(head.empty() || head.size() == 1 || static_cast<int64_t>(head.size()) == kPerLinear, kOp,
              ": head must hold no tensor, one dense fp32 [V, H] weight or the ", kPerLinear,
              " tensors of a packed weight, got ", head.size());
  const float* head_dense = nullptr;
  Linear head_packed{};
  const int64_t V = head.empty() ? 0 : head_n;
  if (head.size() == 1) {
    const at::Tensor& hw = head[0];
    TORCH_CHECK(hw.scalar_type() == at::kFloat && hw.dim() == 2 && hw.size(0) == V && hw.size(1) == H &&
                    hw.is_contiguous(),
                kOp, ": a dense head must be contiguous fp32 [", V, ", ", H, "], got ", hw.sizes(), " ",
                hw.scalar_type());
    head_dense = hw.data_ptr<float>();
  } else if (!head.empty()) {
    head_packed = check_linear(head, 0, H, V, head_cb, level, head_int8, -1, "head");
  }

  // the projections, validated; scratch sizes
  const char* names[4] = {"qkv", "o", "gate_up", "down"};
  const int64_t Ks[4] = {H, q_dim, H, I}, ns[4] = {q_dim + 2 * kv_dim, H, 2 * I, H};
  std::vector<Linear> lin(4 * L);
  std::vector<const float*> ln(2 * L);
  int64_t maxKp = 0, maxG = 0, maxKW = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t base = l * kPerLayer;
    check_vector(params[base], H, "ln1", l);
    check_vector(params[base + 1], H, "ln2", l);
    ln[2 * l] = params[base].data_ptr<float>();
    ln[2 * l + 1] = params[base + 1].data_ptr<float>();
    for (int j = 0; j < 4; ++j) {
      const int64_t cb = cbs[4 * l + j];
      Linear& P = lin[4 * l + j] = check_linear(params, base + 2 + j * kPerLinear, Ks[j], ns[j], cb, level,
                                               int8_act[4 * l + j], l, names[j]);
      maxKp = std::max(maxKp, P.Kp);
      maxG = std::max(maxG, P.G);
      maxKW = std::max(maxKW, P.KW);
    }
  }

  if (head_packed.w != nullptr) {
    maxKp = std::max(maxKp, head_packed.Kp);
    maxG = std::max(maxG, head_packed.G);
    maxKW = std::max(maxKW, head_packed.KW);
  }

  // shared activations and one scratch area per thread
  int nt = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  const int64_t ldq = lin[0].Np, ldo = lin[1].Np, ldg = lin[2].Np, ldd = lin[3].Np;
  const int64_t hw = std::max(H, I);
  const int64_t per = B * maxKp + B * maxG + B * maxKW + B * hw + 2 * D + S;
  at::Tensor xw = x.clone();
  at::Tensor shared = at::empty({B * (ldq + q_dim + ldo + ldg + ldd)}, x.options());
  const int64_t ldout = head_packed.w != nullptr ? head_packed.Np : head_dense != nullptr ? V : H;
  at::Tensor result = at::empty({B, ldout}, x.options());
  at::Tensor fscratch = at::empty({nt * per}, x.options());
  at::Tensor qscratch = at::empty({nt * B * maxKp}, x.options().dtype(at::kChar));
  float* X = xw.data_ptr<float>();
  float* qkv = shared.data_ptr<float>();
  float* att = qkv + B * ldq;
  float* yo = att + B * q_dim;
  float* gu = yo + B * ldo;
  float* yd = gu + B * ldg;
  float* out = result.data_ptr<float>();
  const float* fn = final_norm.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  std::vector<float*> kcp(L), vcp(L);
  for (int64_t l = 0; l < L; ++l) {
    kcp[l] = k_cache[l].data_ptr<float>();
    vcp[l] = v_cache[l].data_ptr<float>();
  }
  const DenseFn dense = level >= 3 ? dense_rows_avx512 : level >= 2 ? dense_rows_avx2 : dense_rows_portable;
  const AttendFn attend = level >= 3 && D % 16 == 0 ? attend_avx512 : level >= 2 && D % 8 == 0 ? attend_avx2
                                                                                        : attend_portable;
  Attn at_args{qkv, ldq, q_dim, kv_dim, n_heads, n_kv, D, S, slot, cos.data_ptr<float>(), sin.data_ptr<float>(), pp,
               key_valid.data_ptr<bool>(), static_cast<float>(scaling), nullptr, nullptr, att};

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    float* base = fscratch.data_ptr<float>() + t * per;
    Scratch s{};
    s.a = base;
    s.xs = s.a + B * maxKp;
    s.xd = s.xs + B * maxG;
    s.h = s.xd + B * maxKW;
    s.q = s.h + B * hw;
    s.k = s.q + D;
    s.p = s.k + D;
    s.xq = qscratch.data_ptr<int8_t>() + t * B * maxKp;
    int64_t lo, hi;
    for (int64_t l = 0; l < L; ++l) {
      const Linear &Lq = lin[4 * l], &Lo = lin[4 * l + 1], &Lg = lin[4 * l + 2], &Ld = lin[4 * l + 3];
      // attention: norm, q/k/v, heads
      rms_rows(X, ln[2 * l], B, H, feps, s.h);
      share(Lq.NB, t, T, lo, hi);
      gemm_share(Lq, s.h, H, B, s, qkv, lo, hi);
#pragma omp barrier
      Attn a = at_args;
      a.kc = kcp[l];
      a.vc = vcp[l];
      share(B * n_heads, t, T, lo, hi);
      for (int64_t i = lo; i < hi; ++i) attend_head(a, attend, i / n_heads, i % n_heads, s);
#pragma omp barrier
      share(Lo.NB, t, T, lo, hi);
      gemm_share(Lo, att, q_dim, B, s, yo, lo, hi);
      for (int64_t m = 0; m < B; ++m)
        for (int64_t c = lo * 16; c < std::min(hi * 16, H); ++c) X[m * H + c] += yo[m * ldo + c];
#pragma omp barrier
      // MLP: norm, gate/up, SiLU(gate) * up, down
      rms_rows(X, ln[2 * l + 1], B, H, feps, s.h);
      share(Lg.NB, t, T, lo, hi);
      gemm_share(Lg, s.h, H, B, s, gu, lo, hi);
#pragma omp barrier
      for (int64_t m = 0; m < B; ++m)
        for (int64_t i = 0; i < I; ++i) {
          const float g = gu[m * ldg + i];
          s.h[m * I + i] = g / (1.f + std::exp(-g)) * gu[m * ldg + I + i];
        }
      share(Ld.NB, t, T, lo, hi);
      gemm_share(Ld, s.h, I, B, s, yd, lo, hi);
      for (int64_t m = 0; m < B; ++m)
        for (int64_t c = lo * 16; c < std::min(hi * 16, H); ++c) X[m * H + c] += yd[m * ldd + c];
#pragma omp barrier
    }
    // the final norm (every thread, for its share of the output layer), then the output layer
    rms_rows(X, fn, B, H, feps, s.h);
    if (head_packed.w != nullptr) {
      share(head_packed.NB, t, T, lo, hi);
      gemm_share(head_packed, s.h, H, B, s, out, lo, hi);
    } else if (head_dense != nullptr) {
      share(V, t, T, lo, hi);
      dense(DenseArgs{head_dense, s.h, out, B, H, V}, lo, hi);
    } else if (t == 0) {
      std::memcpy(out, s.h, sizeof(float) * B * H);
    }
  }
  return ldout == (head.empty() ? H : V) ? result : result.narrow(1, 0, V);
}

// Columns `ids` of a packed weight (gemm_kernels.h) as dense rows: out[t, k] = dequant(W)[ids[t], k], the
// input-embedding rows of a tied quantized lm_head. Per word row r of group g: q * s - zs (as the
// kernels and TiedQuantEmbedding compute it, two roundings), then scattered to source column src[k]
// (padding slots dropped).
at::Tensor packed_columns(const at::Tensor& ids, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zs,
                          const at::Tensor& gptr, const std::optional<at::Tensor>& src, int64_t cb, int64_t n,
                          int64_t K) {
  constexpr const char* op = "quantkern_cpu::packed_columns";
  const at::Tensor* src_t = src ? &*src : nullptr;
  const PackedWeight pw = check_packed(w, scales, zs, gptr, src_t, cb, n, K, op, "K");
  const int64_t KW = pw.KW, G = pw.G, vpw = 32 / cb;
  const int32_t* gp = pw.gptr;
  const int64_t* sp = pw.src;
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), op,
              ": ids must be contiguous int64 [T]");
  const int64_t T = ids.numel();
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, op, ": ids[", i, "] = ", ip[i], " is outside [0, ", n, ")");
  at::Tensor out = at::zeros({T, K}, scales.options());
  float* o = out.data_ptr<float>();
  const int32_t* wp = pw.w;
  const float *s = pw.scales, *z = pw.zs;
  const uint32_t mask = (1u << cb) - 1u;
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t c = ip[i], b = c / 16, lane = c % 16;
      const int32_t* wc = wp + b * KW * 16 + lane;
      float* orow = o + i * K;
      for (int64_t g = 0; g < G; ++g) {
        const float sg = s[(b * G + g) * 16 + lane], zg = z[(b * G + g) * 16 + lane];
        for (int64_t r = gp[g]; r < gp[g + 1]; ++r) {
          const uint32_t word = static_cast<uint32_t>(wc[r * 16]);
          for (int64_t j = 0; j < vpw; ++j) {
            const int64_t k = r * vpw + j, dst = sp ? sp[k] : k;
            if (dst >= K) continue;
            const float q = static_cast<float>((word >> code_shift(static_cast<int>(cb), static_cast<int>(j))) & mask);
            const volatile float prod = q * sg;  // no FMA contraction: the reference rounds the product
            orow[dst] = prod - zg;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern_cpu, m) {
  m.def("llama_decode(Tensor x, Tensor[] params, int[] cbs, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, "
        "Tensor cos, Tensor sin, Tensor pos, int slot, Tensor key_valid, Tensor final_norm, int n_heads, int n_kv, "
        "int inter, float eps, float scaling, int isa, bool[] int8_act, Tensor[] head, int head_cb, int head_n, "
        "bool head_int8) -> Tensor");
  m.def("packed_columns(Tensor ids, Tensor w, Tensor scales, Tensor zs, Tensor gptr, Tensor? src, int cb, int n, "
        "int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkern_cpu, CPU, m) {
  m.impl("llama_decode", &llama_decode);
  m.impl("packed_columns", &packed_columns);
}

}  // namespace quantkern_cpu

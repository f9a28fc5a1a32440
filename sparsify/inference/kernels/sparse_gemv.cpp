// Python binding of the sparse GEMM kernels: checks the tensors, encodes x the way the chosen
// kernel reads it (zero-padded rows; bf16 hi/lo split; per-token int8 codes), splits the rows of W
// among the threads, and dispatches to the generic, AVX2 or AVX-512 kernels.
//
// Threads: OpenMP, with torch's thread count (torch.set_num_threads). torch's wheel ships the
// libgomp this extension links against (same soname), so both share one thread pool.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace sparsellama {
namespace generic {
#include "generic.h"
constexpr int kLanes = 4;  // floats per vector, for attention.h
#include "attention.h"
}  // namespace generic

namespace {

enum Isa : int64_t { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// Padding (bytes) the packed values need after the last row: vector loads read up to 64 bytes.
constexpr int64_t kValuePadBytes = 64;

// Software prefetch distance (bytes) of the AVX-512 batch-1 kernels' value stream (the mask
// stream uses 1/4). 2048 measured best of 0/512/1024/2048/4096; set_prefetch exists for A/B runs.
int64_t g_prefetch = 2048;
void set_prefetch(int64_t bytes) { g_prefetch = bytes; }

// Benchmark-only override: on AVX2 and AVX-512, batches of at least this many rows take the
// outer-product kernel, in every format, and smaller ones the expanding kernel (0: the built-in
// choice). For measuring where one kernel overtakes the other.
int64_t g_outer_from = 0;
void set_outer_from(int64_t rows) { g_outer_from = rows; }

int64_t best_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();  // cpuid + the OS's xgetbv state: AVX-512 counts only if the OS saves zmm
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2") &&
      __builtin_cpu_supports("avx512vnni"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kGeneric;
}

// x [M, K] (fp32 or bf16) → [M, kp] in the kernel's element type, zero-padded. `split` (bf16
// kernels on fp32 input) writes two bf16 rows per input row — hi = bf16(x), lo = bf16(x − hi),
// rows [0, M) and [M, 2M) — so hi + lo carries ~16 mantissa bits and W·hi + W·lo is fp32-accurate
// while the kernel still multiplies with VDPBF16PS.
torch::Tensor encode_float_x(const torch::Tensor& x, int64_t kp, bool to_bf16, bool split, bool vector) {
  const int64_t M = x.size(0), K = x.size(1);
  if (to_bf16) {
    auto out = torch::zeros({split ? 2 * M : M, kp}, torch::kBFloat16);
    auto* o = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
    if (x.scalar_type() == torch::kFloat && vector) {
      avx512::encode_bf16(x.data_ptr<float>(), M, K, kp, reinterpret_cast<uint16_t*>(o), split);
    } else if (x.scalar_type() == torch::kBFloat16) {
      const auto* xs = reinterpret_cast<const c10::BFloat16*>(x.data_ptr());
      for (int64_t m = 0; m < M; ++m) std::memcpy(o + m * kp, xs + m * K, K * sizeof(c10::BFloat16));
    } else {
      const float* xs = x.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          const float f = xs[m * K + k];
          const c10::BFloat16 hi(f);  // round to nearest even
          o[m * kp + k] = hi;
          if (split) {
            const float h = float(hi);
            o[(M + m) * kp + k] = c10::BFloat16(std::isfinite(h) ? f - h : 0.f);
          }
        }
    }
    return out;
  }
  auto out = torch::zeros({M, kp}, torch::kFloat);
  float* o = out.data_ptr<float>();
  if (x.scalar_type() == torch::kFloat) {
    const float* xs = x.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) std::memcpy(o + m * kp, xs + m * K, K * sizeof(float));
  } else {
    const auto* xs = reinterpret_cast<const c10::BFloat16*>(x.data_ptr());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) o[m * kp + k] = float(xs[m * K + k]);
  }
  return out;
}

// Dynamic symmetric per-token int8 quantization on compressed-tensors' grid (the grid
// sparsify/quant/quantization.py fakes): scale = max|x_t| / 127.5, q = round(clamp(x / scale, −128, 127)),
// stored as q + 128 (uint8) for VPDPBUSD's unsigned operand. Computed in fp32.
std::pair<torch::Tensor, torch::Tensor> quantize_x(const torch::Tensor& x, int64_t kp, int64_t isa) {
  const int64_t M = x.size(0), K = x.size(1);
  auto xf = x.scalar_type() == torch::kFloat ? x : x.to(torch::kFloat);
  const float* xs = xf.data_ptr<float>();
  auto q = torch::full({M, kp}, 128, torch::kUInt8);  // padding: code 0
  auto sc = torch::empty({M}, torch::kFloat);
  uint8_t* qo = q.data_ptr<uint8_t>();
  float* so = sc.data_ptr<float>();
  if (isa == kAvx512 && avx512::quantize_u8(xs, M, K, kp, qo, so)) return {q, sc};
  if (isa == kAvx2 && avx2::quantize_u8(xs, M, K, kp, qo, so)) return {q, sc};
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xs + m * K;
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      finite &= std::isfinite(row[k]);
      amax = std::fmax(amax, std::fabs(row[k]));
    }
    if (!finite) {
      so[m] = std::nanf("");  // a non-finite input makes the whole output row nan, never a made-up number
      continue;
    }
    float scale = amax / 127.5f;
    if (!(scale > 0.f)) scale = 1.f;
    so[m] = scale;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::fmin(std::fmax(row[k] / scale, -128.f), 127.f);
      qo[m * kp + k] = uint8_t(int(std::nearbyint(v)) + 128);
    }
  }
  return {q, sc};
}

// uint8 codes q + 128 [M, kp] → [M, 2·kp] bytes: q as int8, then |q| as uint8 (XKind::S8Abs). One
// pass in C++: this runs once per linear layer per decoded token.
torch::Tensor codes_and_magnitudes(const torch::Tensor& u8) {
  const int64_t M = u8.size(0), kp = u8.size(1);
  auto out = torch::empty({M, 2 * kp}, torch::kUInt8);
  const uint8_t* in = u8.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < kp; ++k) {
      const int q = int(in[m * kp + k]) - 128;
      o[m * 2 * kp + k] = uint8_t(q);                   // two's complement int8
      o[m * 2 * kp + kp + k] = uint8_t(q < 0 ? -q : q);  // ≤ 128
    }
  return out;
}

// Row ranges per thread. Batches up to kDirectMax are bandwidth-bound: balance the bytes each
// thread streams (values + mask), so rows of uneven sparsity do not leave a thread idle. Larger
// batches are compute-bound on the expanded rows: balance row counts, in whole kPanelRows blocks.
// `direct`: the kernel expands in registers for this M (every M on AVX2: no scratch rows).
std::vector<int64_t> split_rows(const int64_t* offsets, int64_t N, int64_t words, int64_t elt,
                                bool direct, int nthreads) {
  std::vector<int64_t> b(nthreads + 1, N);
  b[0] = 0;
  auto cost = [&](int64_t r) { return direct ? (offsets[r] - offsets[0]) * elt + r * words * 8 : r; };
  const double total = double(cost(N));
  int64_t r = 0;
  for (int t = 1; t < nthreads; ++t) {
    const double target = total * t / nthreads;
    while (r < N && double(cost(r)) < target) ++r;
    int64_t cut = direct ? r : std::min<int64_t>(N, (r + kPanelRows - 1) / kPanelRows * kPanelRows);
    b[t] = std::max(cut, b[t - 1]);
  }
  return b;
}

// x [..., in] (contiguous) → y [..., out] in x's dtype.
torch::Tensor sparse_linear(const torch::Tensor& x_in, const torch::Tensor& bitmask, const torch::Tensor& offsets,
                            const torch::Tensor& values, const std::optional<torch::Tensor>& w_scale,
                            const std::optional<torch::Tensor>& row_sum, const std::optional<torch::Tensor>& bias,
                            bool act_int8, int64_t isa, int64_t group_size,
                            const std::optional<torch::Tensor>& columns) {
  TORCH_CHECK(x_in.device().is_cpu(), "sparse_linear: x must be on the CPU, got ", x_in.device());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.is_contiguous(), "sparse_linear: x must be a contiguous tensor [..., in]");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat || x_in.scalar_type() == torch::kBFloat16,
              "sparse_linear: x must be float32 or bfloat16, got ", x_in.scalar_type());
  const int64_t K = x_in.size(-1), words = (K + 63) / 64, kp = words * 64;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) M *= x_in.size(d);
  const torch::Tensor x = x_in.view({M, K});
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  TORCH_CHECK(bitmask.scalar_type() == torch::kUInt8 && bitmask.dim() == 2 && bitmask.is_contiguous() &&
                  bitmask.size(1) == words * 8,
              "sparse_linear: bitmask must be contiguous uint8 [out, ", words * 8, "] for in_features=", K);
  const int64_t N = bitmask.size(0);
  out_shape.back() = N;
  TORCH_CHECK(offsets.scalar_type() == torch::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) == N + 1,
              "sparse_linear: offsets must be contiguous int64 [out + 1]");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "sparse_linear: values must be contiguous 1-D");
  Fmt fmt;
  switch (values.scalar_type()) {
    case torch::kBFloat16: fmt = Fmt::BF16; break;
    case torch::kFloat: fmt = Fmt::F32; break;
    case torch::kChar: fmt = act_int8 ? Fmt::I8 : Fmt::I8F; break;
    case torch::kByte: fmt = act_int8 ? Fmt::I4 : Fmt::I4F; break;  // int4: two codes per byte
    default:
      TORCH_CHECK(false, "sparse_linear: values must be bfloat16, float32, int8 or uint8 (int4), got ",
                  values.scalar_type());
  }
  const bool int4 = is_int4(fmt);
  TORCH_CHECK(int4 || group_size == 0, "sparse_linear: group_size applies to int4 values only");
  TORCH_CHECK(group_size == 0 || (group_size > 0 && group_size % 64 == 0 && K % group_size == 0),
              "sparse_linear: int4 group_size must be a positive multiple of 64 dividing in_features=", K,
              " (0: one group per row), got ", group_size);
  const int64_t group_words = group_size ? group_size / 64 : words, groups = words / group_words;
  const int64_t elt = values.element_size();
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] >= 0 && off[N] >= off[0] && (off[N] * elt + kValuePadBytes) <= values.numel() * elt,
              "sparse_linear: values must hold offsets[-1] entries plus ", kValuePadBytes, " bytes of padding");
  const bool is_int8 = fmt == Fmt::I8 || fmt == Fmt::I8F;
  if (is_int8) {
    TORCH_CHECK(w_scale.has_value() && w_scale->scalar_type() == torch::kFloat && w_scale->dim() == 1 &&
                    w_scale->size(0) == N && w_scale->is_contiguous(),
                "sparse_linear: int8 values need contiguous float32 scales [out]");
  }
  if (int4) {
    TORCH_CHECK(w_scale.has_value() && w_scale->scalar_type() == torch::kFloat && w_scale->dim() == 2 &&
                    w_scale->size(0) == N && w_scale->size(1) == groups && w_scale->is_contiguous(),
                "sparse_linear: int4 values need contiguous float32 scales [out, ", groups, "]");
  }
  if (fmt == Fmt::I8) {
    TORCH_CHECK(row_sum.has_value() && row_sum->scalar_type() == torch::kInt && row_sum->dim() == 1 &&
                    row_sum->size(0) == N && row_sum->is_contiguous(),
                "sparse_linear: W8A8 needs contiguous int32 row sums [out]");
  }
  if (fmt == Fmt::I8 || int4) {
    // int32 accumulators: |Σ (q+128)·w| ≤ 255·128·K must stay below 2^31 (int4: group sums exact in fp32).
    TORCH_CHECK(K <= 65536, "sparse_linear: int8 and int4 weights support in_features <= 65536, got ", K);
  }
  if (columns.has_value()) {  // the gather index (format.py): a header byte per word + one per stored code
    TORCH_CHECK(fmt == Fmt::I8 || fmt == Fmt::I4,
                "sparse_linear: columns (the gather index) go with W8A8 and W4A8 weights only");
    // int4: off counts bytes of nibbles, and each word's index is padded to an even count: 2 · off.
    const int64_t index_bytes = (fmt == Fmt::I4 ? 2 * off[N] : off[N]) + N * words + kValuePadBytes;
    TORCH_CHECK(columns->scalar_type() == torch::kUInt8 && columns->dim() == 1 && columns->is_contiguous() &&
                    columns->numel() == index_bytes,
                "sparse_linear: columns must be contiguous uint8 [", index_bytes,
                "] (a count per mask word, a column per stored code, 64 bytes of padding)");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                    bias->is_contiguous(),
                "sparse_linear: bias must be contiguous float32 [out]");
  }
  TORCH_CHECK(isa >= kGeneric && isa <= best_isa(), "sparse_linear: isa ", isa, " is not supported by this CPU");
  if (M == 0 || N == 0) return torch::zeros(out_shape, x.options());

  // How this kernel reads x: W8A8 codes as uint8 (q + 128, VPDPBUSD's unsigned operand) for the
  // AVX-512 and generic kernels, as q and |q| bytes for AVX2's VPSIGNB/VPMADDUBSW (W4A8 too);
  // bf16 for AVX-512's bf16 dot product; fp32 otherwise.
  // The outer-product kernel (outer.h) reads fp32 x, or int32 codes for W8A8 and W4A8.
  const bool outer = g_outer_from > 0 ? isa != kGeneric && M >= g_outer_from
                                      : (isa == kAvx2 && avx2::outer(M)) || (isa == kAvx512 && avx512::outer(fmt, M));
  XKind xk;
  if (outer) xk = fmt == Fmt::I8 || fmt == Fmt::I4 ? XKind::I32 : XKind::F32;
  else if ((fmt == Fmt::I8 || fmt == Fmt::I4) && isa == kAvx2) xk = XKind::S8Abs;
  else if (fmt == Fmt::I8) xk = XKind::U8;
  else if (fmt == Fmt::I4) xk = isa == kAvx512 ? XKind::S8 : XKind::I32;
  // AVX-512 W8A16 batches multiply bf16 copies of the codes (FmtI8FBatched): bf16 x, like bf16 weights.
  else if (isa == kAvx512 && (fmt == Fmt::BF16 || (fmt == Fmt::I8F && M > kDirectMax))) xk = XKind::BF16;
  else xk = XKind::F32;
  const bool split = xk == XKind::BF16 && x.scalar_type() == torch::kFloat;
  torch::Tensor xe, xscale, xgroup;
  if (xk == XKind::U8 || xk == XKind::I32 || xk == XKind::S8 || xk == XKind::S8Abs) {
    std::tie(xe, xscale) = quantize_x(x, kp, isa);
    if (xk == XKind::I32) xe = (xe.to(torch::kInt) - 128).contiguous();
    if (xk == XKind::S8Abs) xe = codes_and_magnitudes(xe);
    if (xk == XKind::S8) {  // AVX-512 W4A8 multiplies signed q by the unsigned nibbles (see there)
      const auto q = xe.to(torch::kShort) - 128;
      xgroup = (q.view({M, groups, group_words, 16, 4}).sum({2, 4}, false, torch::kInt) * 8).contiguous();
      xe = q.to(torch::kChar).contiguous();
    }
  } else if (K == kp && (xk == XKind::BF16) == (x.scalar_type() == torch::kBFloat16)) {
    xe = x;  // already the kernel's layout: no copy
  } else {
    xe = encode_float_x(x, kp, xk == XKind::BF16, split, isa == kAvx512);
  }
  const int64_t Mk = split ? 2 * M : M;
  auto y = torch::empty({Mk, N}, torch::kFloat);

  // Tiny problems (tests, toy models) are not worth waking a second thread for.
  int nthreads = at::get_num_threads();
  if (Mk * N * kp < (int64_t(1) << 18)) nthreads = 1;
  const auto bounds = split_rows(off, N, words, elt, isa == kAvx2 || outer || Mk <= kDirectMax || int4, nthreads);

  Problem p;
  p.M = Mk;
  p.N = N;
  p.words = words;
  p.mask = reinterpret_cast<const uint64_t*>(bitmask.data_ptr<uint8_t>());
  p.offsets = off;
  p.values = values.data_ptr();
  p.x = xe.data_ptr();
  p.x_scale = fmt == Fmt::I8 || fmt == Fmt::I4 ? xscale.data_ptr<float>() : nullptr;
  p.w_scale = is_int8 || int4 ? w_scale->data_ptr<float>() : nullptr;
  p.row_sum = fmt == Fmt::I8 ? row_sum->data_ptr<int32_t>() : nullptr;
  p.bias = bias.has_value() && !split ? bias->data_ptr<float>() : nullptr;  // split: added once below
  p.y = y.data_ptr<float>();
  p.bounds = bounds.data();
  p.nthreads = nthreads;
  p.prefetch = g_prefetch;
  p.outer = outer;
  p.group_words = group_words;
  p.x_lane_sum = xgroup.defined() ? xgroup.data_ptr<int32_t>() : nullptr;
  // Only the AVX2 W8A8 and W4A8 kernels below kOuterMin rows of x read the gather index; the others
  // keep the bitmask.
  p.columns = columns.has_value() && isa == kAvx2 && !outer ? columns->data_ptr<uint8_t>() : nullptr;
  {
    pybind11::gil_scoped_release no_gil;
    if (isa == kAvx512) avx512::run(fmt, p);
    else if (isa == kAvx2) avx2::run(fmt, p);
    else generic::run(fmt, p);
  }
  if (split) {  // y = W·hi + W·lo (+ bias)
    float* yp = y.data_ptr<float>();
    const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] += yp[(M + m) * N + n] + (b ? b[n] : 0.f);
    y = y.narrow(0, 0, M);
  }
  return (x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type())).view(out_shape);
}

// q [heads, D] (fp32 or bf16), k and v [kv_heads, capacity, D] (bf16 or fp32, the same): the
// attention output [heads, D] in q's dtype over cache positions [0, length).
torch::Tensor decode_attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v,
                               int64_t length, double scale, int64_t isa) {
  TORCH_CHECK(q_in.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "decode_attention: tensors must be on the CPU");
  TORCH_CHECK(q_in.dim() == 2 && q_in.is_contiguous() &&
                  (q_in.scalar_type() == torch::kFloat || q_in.scalar_type() == torch::kBFloat16),
              "decode_attention: q must be a contiguous float32 or bfloat16 tensor [heads, head_dim]");
  TORCH_CHECK(k.dim() == 3 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                  k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == torch::kFloat || k.scalar_type() == torch::kBFloat16),
              "decode_attention: k and v must be contiguous float32 or bfloat16 tensors of one shape "
              "[kv_heads, capacity, head_dim]");
  const int64_t heads = q_in.size(0), D = q_in.size(1), kv_heads = k.size(0), capacity = k.size(1);
  TORCH_CHECK(k.size(2) == D, "decode_attention: head_dim of q (", D, ") and the cache (", k.size(2), ") differ");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0,
              "decode_attention: heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
  TORCH_CHECK(length >= 1 && length <= capacity, "decode_attention: length must be in [1, ", capacity, "], got ",
              length);
  TORCH_CHECK(isa >= kGeneric && isa <= best_isa(), "decode_attention: isa ", isa, " is not supported by this CPU");
  const torch::Tensor q = q_in.scalar_type() == torch::kFloat ? q_in : q_in.to(torch::kFloat);
  auto out = torch::empty({heads, D}, torch::kFloat);
  AttentionProblem a;
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.head_dim = D;
  a.length = length;
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.head_stride = capacity * D;
  a.bf16 = k.scalar_type() == torch::kBFloat16;
  a.scale = float(scale);
  a.out = out.data_ptr<float>();
  // A short cache is not worth waking a second thread for.
  a.nthreads = kv_heads * length * D < (int64_t(1) << 16) ? 1 : at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    if (isa == kAvx512) avx512::decode_attention(a);
    else if (isa == kAvx2) avx2::decode_attention(a);
    else generic::decode_attention(a);
  }
  return q_in.scalar_type() == torch::kFloat ? out : out.to(q_in.scalar_type());
}

// The gather index of a bitmask (format.py's module docstring): per row and 64-column word, the count p,
// then the in-word columns (0..63) of its p set bits in storage order; pad_odd (int4) adds a zero byte
// after an odd p, as the nibbles pad; kValuePadBytes of zeros at the end for vector over-reads. Built
// at load time for every AVX2 W8A8/W4A8 layer, so in C++: ~0.02 s per 11008x4096 layer at 70%, where
// numpy took ~0.5 s (over a 7B model's 224 layers: more than a minute).
torch::Tensor gather_index(const torch::Tensor& bitmask, bool pad_odd) {
  TORCH_CHECK(bitmask.scalar_type() == torch::kUInt8 && bitmask.dim() == 2 && bitmask.is_contiguous() &&
                  bitmask.size(1) % 8 == 0,
              "gather_index: bitmask must be contiguous uint8 [out, 8 · words]");
  const int64_t words = bitmask.numel() / 8;
  const auto* mask = bitmask.data_ptr<uint8_t>();
  auto word = [&](int64_t i) {  // little-endian, as format.py packs it; memcpy: no alignment assumed
    uint64_t m;
    std::memcpy(&m, mask + 8 * i, 8);
    return m;
  };
  int64_t total = 0;
  for (int64_t i = 0; i < words; ++i) {
    const int64_t p = __builtin_popcountll(word(i));
    total += 1 + p + (pad_odd ? p & 1 : 0);
  }
  auto out = torch::zeros({total + kValuePadBytes}, torch::kUInt8);
  uint8_t* o = out.data_ptr<uint8_t>();
  {
    pybind11::gil_scoped_release no_gil;
    for (int64_t i = 0; i < words; ++i) {
      uint64_t m = word(i);
      const int p = __builtin_popcountll(m);
      *o++ = uint8_t(p);
      for (; m; m &= m - 1) *o++ = uint8_t(__builtin_ctzll(m));
      if (pad_odd && (p & 1)) *o++ = 0;
    }
  }
  return out;
}

}  // namespace
}  // namespace sparsellama

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsellama sparse GEMM kernels: y = x · Wᵀ with W as per-row bitmask + packed values";
  m.def("sparse_linear", &sparsellama::sparse_linear, "y[M, out] = x[M, in] · Wᵀ (+ bias), float32 result "
        "in x's dtype", pybind11::arg("x"), pybind11::arg("bitmask"), pybind11::arg("offsets"),
        pybind11::arg("values"), pybind11::arg("w_scale"), pybind11::arg("row_sum"), pybind11::arg("bias"),
        pybind11::arg("act_int8"), pybind11::arg("isa"), pybind11::arg("group_size") = 0,
        pybind11::arg("columns") = pybind11::none());
  m.def("decode_attention", &sparsellama::decode_attention, "one token's attention [heads, D] over a KV cache "
        "[kv_heads, capacity, D], positions [0, length)", pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("length"), pybind11::arg("scale"), pybind11::arg("isa"));
  m.def("gather_index", &sparsellama::gather_index, "the AVX2 kernels' gather index of a bitmask [out, 8 · words] "
        "(format.py)", pybind11::arg("bitmask"), pybind11::arg("pad_odd"));
  m.def("set_prefetch", &sparsellama::set_prefetch, "AVX-512 batch-1 software prefetch distance in bytes (tuning)");
  m.def("set_outer_from", &sparsellama::set_outer_from, "AVX2, AVX-512: batches from this many rows take the "
        "outer-product kernel (0: built-in choice; benchmarking only)");
  m.def("best_isa", &sparsellama::best_isa, "0 = generic, 1 = AVX2+FMA, 2 = AVX-512 (BF16, VBMI2, VNNI)");
}

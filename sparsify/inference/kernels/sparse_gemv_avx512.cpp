// AVX-512 sparse GEMM kernels (needs AVX512F/BW/VL/DQ + BF16 + VBMI2 + VNNI, e.g. Zen 4, Sapphire Rapids).
//
// Why this design: batch-1 decode is a GEMV, memory-bound — the time is the bytes of W read
// (x and y are tiny and stay in L1). Storing a per-row bitmask (1/8 byte per weight) plus the
// packed nonzeros cuts those bytes: 70% sparse bf16 = 0.125 + 0.3 * 2 = 0.725 bytes per weight
// instead of 2 (dense bf16) or 4 (fp32); with int8 values 0.425. The values are never gathered:
// each 64-byte chunk of packed values is loaded contiguously and VPEXPAND (maskz_expand) spreads it
// in a register to the dense positions the chunk's mask bits name, zeros elsewhere. The expanded
// vector then meets x with one dense instruction: VDPBF16PS (bf16 pairs → fp32), VFMADD (fp32) or
// VPDPBUSD (u8 × s8 → int32, VNNI). The mask's popcount advances the value pointer. Up to
// kDirectMax (4) rows of x share each expanded vector.
//
// Measured on Zen 4: a register VPEXPAND costs ~4-5 cycles whatever the element width, so it
// bounds the compute rate (~27 G weight positions/s per core for bf16, ~40 G for int8 with 64
// columns per expand) — enough for 2 cores to stay memory-bound at 50-70% sparsity.
//
// For M > kDirectMax rows of x (batched decode, prefill chunks) each weight row is expanded once and
// reused for every row of x: W8A8 as transposed 16-row panels that VPDPBUSD meets with broadcast
// activations (no horizontal sums), the float formats through a scratch buffer and a register-blocked
// dot-product micro-kernel (see "expand once, reuse" below), W4A16 by outer products (outer.h).
//
// No torch headers here (see kernels.h); everything in this file is compiled for AVX-512 and only
// called after a runtime CPU check.
#if defined(__x86_64__) || defined(_M_X64)

#include <omp.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx512vnni,popcnt,bmi,bmi2")
#include <immintrin.h>

namespace sparsellama {
namespace avx512 {

namespace {

// Mask pieces are read through narrower integer types than the uint64 words they live in.
typedef uint16_t u16a __attribute__((may_alias));
typedef uint32_t u32a __attribute__((may_alias));
typedef uint64_t u64a __attribute__((may_alias));

inline int popcount(uint64_t m) { return __builtin_popcountll(m); }

// Keeps a loaded vector in a register. Without it GCC folds the load into VPEXPAND's memory
// form, which on Zen 4 measured ~30% slower than load + register expand (1.8 vs 1.4 ns).
template <class V>
inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

// ----------------------------------------------------------------- dot products (compute types)
// Each covers one 512-bit vector of expanded weights: `kCols` columns.

struct DotBF16 {  // bf16 weights × bf16 x, fp32 accumulators: 32 columns per VDPBF16PS
  using XE = uint16_t;
  using WE = uint16_t;
  using Acc = __m512;
  using Sum = float;
  static constexpr int kCols = 32;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512i load_x(const XE* x) { return _mm512_loadu_si512(x); }
  static Acc dot(Acc a, __m512i w, __m512i x) { return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x); }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
  static Sum sum(Acc a) { return _mm512_reduce_add_ps(a); }
};

struct DotF32 {  // fp32 weights × fp32 x: 16 columns per FMA
  using XE = float;
  using WE = float;
  using Acc = __m512;
  using Sum = float;
  static constexpr int kCols = 16;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512i load_x(const XE* x) { return _mm512_castps_si512(_mm512_loadu_ps(x)); }
  static Acc dot(Acc a, __m512i w, __m512i x) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_castsi512_ps(x), a);
  }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
  static Sum sum(Acc a) { return _mm512_reduce_add_ps(a); }
};

struct DotU8S8 {  // int8 weights × (int8 x + 128) as uint8, int32 accumulators: 64 columns per VPDPBUSD
  using XE = uint8_t;
  using WE = int8_t;
  using Acc = __m512i;
  using Sum = int32_t;
  static constexpr int kCols = 64;
  static Acc zero() { return _mm512_setzero_si512(); }
  static __m512i load_x(const XE* x) { return _mm512_loadu_si512(x); }
  static Acc dot(Acc a, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(a, x, w); }
  static Acc add(Acc a, Acc b) { return _mm512_add_epi32(a, b); }
  static Sum sum(Acc a) { return _mm512_reduce_add_epi32(a); }
};

// ----------------------------------------------------------------- storage formats
// A format knows its mask piece (kCols columns), how to expand one piece of stored values into a
// register (W), how the direct kernel multiplies that with x (Acc, dot), how to store it into the
// batched kernel's scratch (in the compute type D::WE), and the epilogue (finish).

template <class Dt>
struct OneVector {  // formats whose expanded piece is one vector of the compute type
  using D = Dt;
  using W = __m512i;
  using Acc = typename Dt::Acc;
  static Acc zero() { return Dt::zero(); }
  static Acc dot(Acc a, W w, const typename Dt::XE* x) { return Dt::dot(a, w, Dt::load_x(x)); }
  static Acc add(Acc a, Acc b) { return Dt::add(a, b); }
  static typename Dt::Sum sum(Acc a) { return Dt::sum(a); }
  static void store(typename Dt::WE* dst, W w) { _mm512_store_si512(dst, w); }
};

struct FmtBF16 : OneVector<DotBF16> {
  using V = uint16_t;
  using MaskT = u32a;
  static W expand(uint32_t m, const V* v) { return _mm512_maskz_expand_epi16(m, in_register(_mm512_loadu_si512(v))); }
  static float finish(float s, const Problem& p, int64_t, int64_t r) { return p.bias ? s + p.bias[r] : s; }
};

struct FmtF32 : OneVector<DotF32> {
  using V = float;
  using MaskT = u16a;
  static W expand(uint16_t m, const V* v) {
    return _mm512_castps_si512(_mm512_maskz_expand_ps(m, in_register(_mm512_loadu_ps(v))));
  }
  static float finish(float s, const Problem& p, int64_t, int64_t r) { return p.bias ? s + p.bias[r] : s; }
};

struct FmtI8 : OneVector<DotU8S8> {  // W8A8: s = Σ (q+128)·w, so Σ q·w = s − 128·Σw; then the two scales
  using V = int8_t;
  using MaskT = u64a;
  static W expand(uint64_t m, const V* v) { return _mm512_maskz_expand_epi8(m, in_register(_mm512_loadu_si512(v))); }
  static float finish(int32_t s, const Problem& p, int64_t t, int64_t r) {
    return finish_exact(s - 128 * p.row_sum[r], p, t, r);
  }
  static float finish_exact(int32_t s, const Problem& p, int64_t t, int64_t r) {  // s = Σ q·w
    float y = float(s) * (p.x_scale[t] * p.w_scale[r]);
    return p.bias ? y + p.bias[r] : y;
  }
};

// W8A16: one expand per 64 codes (VPEXPAND costs the same ~5 cycles at any element width, so
// wide pieces amortize it), then each 16-code lane is widened exactly to fp32 and meets fp32 x
// with an FMA, into 4 independent accumulators.
struct FmtI8F {
  using D = DotF32;
  using V = int8_t;
  using MaskT = u64a;
  using W = __m512i;
  struct Acc {
    __m512 a[4];
  };
  static W expand(uint64_t m, const V* v) { return _mm512_maskz_expand_epi8(m, in_register(_mm512_loadu_si512(v))); }
  static __m512 widen(__m128i codes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)); }
  static Acc zero() { return {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}}; }
  static Acc dot(Acc a, W w, const float* x) {
    a.a[0] = _mm512_fmadd_ps(widen(_mm512_castsi512_si128(w)), _mm512_loadu_ps(x), a.a[0]);
    a.a[1] = _mm512_fmadd_ps(widen(_mm512_extracti32x4_epi32(w, 1)), _mm512_loadu_ps(x + 16), a.a[1]);
    a.a[2] = _mm512_fmadd_ps(widen(_mm512_extracti32x4_epi32(w, 2)), _mm512_loadu_ps(x + 32), a.a[2]);
    a.a[3] = _mm512_fmadd_ps(widen(_mm512_extracti32x4_epi32(w, 3)), _mm512_loadu_ps(x + 48), a.a[3]);
    return a;
  }
  static Acc add(Acc a, Acc b) {
    for (int i = 0; i < 4; ++i) a.a[i] = _mm512_add_ps(a.a[i], b.a[i]);
    return a;
  }
  static float sum(Acc a) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a.a[0], a.a[1]), _mm512_add_ps(a.a[2], a.a[3])));
  }
  static float finish(float s, const Problem& p, int64_t, int64_t r) {
    float y = s * p.w_scale[r];
    return p.bias ? y + p.bias[r] : y;
  }
};

// W8A16 in batches (M > kDirectMax): the codes stored into the scratch rows as bf16 — exact, |code|
// ≤ 127 fits bf16's 8-bit significand — so the batched kernel multiplies them with bf16 x (fp32 x
// split into bf16 hi + lo, as for bf16 weights) by VDPBF16PS, 32 products per instruction, where the
// fp32 scratch rows it replaced took FMAs of 16. Measured at 11008x4096, 70%, Zen 4: 7.5 against 11.3
// ms at 16 tokens (dense bf16 7.5), 17.8 against 34.3 at 64. FmtI8F itself serves M <= kDirectMax.
struct FmtI8FBatched {
  using D = DotBF16;
  using V = int8_t;
  using MaskT = u64a;
  using W = __m512i;
  static W expand(uint64_t m, const V* v) { return FmtI8F::expand(m, v); }
  static void store(uint16_t* dst, W w) {
    for (int i = 0; i < 4; ++i) {
      const __m512 f = FmtI8F::widen(_mm512_extracti32x4_epi32(w, i));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 16 * i), (__m256i)_mm512_cvtneps_pbh(f));
    }
  }
  static float finish(float s, const Problem& p, int64_t t, int64_t r) { return FmtI8F::finish(s, p, t, r); }
};

// ----------------------------------------------------------------- M <= kDirectMax: expand in registers

// One weight row at a time, two mask pieces per iteration into two accumulator sets (two
// independent dependency chains hide the dot-product latency). Each expanded piece is used by all
// T rows of x. A long x (in = 11008: 22 KB of bf16) does not stay in L1 next to the streamed
// weights, which costs ~20% at that shape; both fixes tried measured slower — two weight rows per
// pass sharing each x load (~1.7x slower with 2 threads), and row groups swept one 8 KB column
// segment of x at a time (~1.5x slower: it breaks the sequential weight stream).
template <class F, int T>
void direct_rows(const Problem& p, int64_t r0, int64_t r1) {
  using D = typename F::D;
  constexpr int C = 8 * sizeof(typename F::MaskT);  // columns per mask piece
  const int64_t kp = p.words * 64, nch = kp / C;
  const auto* x = static_cast<const typename D::XE*>(p.x);
  const auto* vals = static_cast<const typename F::V*>(p.values);
  for (int64_t r = r0; r < r1; ++r) {
    const auto* mk = reinterpret_cast<const typename F::MaskT*>(p.mask + r * p.words);
    const typename F::V* v = vals + p.offsets[r];
    typename F::Acc a0[T], a1[T];
    for (int t = 0; t < T; ++t) a0[t] = a1[t] = F::zero();
    int64_t c = 0;
    for (; c + 2 <= nch; c += 2) {
      // Software prefetch of the two DRAM streams (values, mask) ~2 KB ahead: measured 10-35%
      // faster than the hardware prefetcher alone, most where x spills out of L1 (in = 11008:
      // 22 KB of bf16 x next to the streamed lines).
      _mm_prefetch(reinterpret_cast<const char*>(v) + p.prefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mk + c) + p.prefetch / 4, _MM_HINT_T0);
      const auto m0 = mk[c], m1 = mk[c + 1];
      const typename F::W w0 = F::expand(m0, v);
      v += popcount(m0);
      const typename F::W w1 = F::expand(m1, v);
      v += popcount(m1);
      for (int t = 0; t < T; ++t) {
        a0[t] = F::dot(a0[t], w0, x + t * kp + c * C);
        a1[t] = F::dot(a1[t], w1, x + t * kp + (c + 1) * C);
      }
    }
    if (c < nch) {  // odd piece count (64-column pieces: one per mask word)
      const typename F::W w0 = F::expand(mk[c], v);
      for (int t = 0; t < T; ++t) a0[t] = F::dot(a0[t], w0, x + t * kp + c * C);
    }
    for (int t = 0; t < T; ++t) p.y[t * p.N + r] = F::finish(F::sum(F::add(a0[t], a1[t])), p, t, r);
  }
}

// ----------------------------------------------------------------- M > kDirectMax: expand once, reuse

// Row r of W expanded into dst (64 · words columns of the compute type).
template <class F>
void expand_row(const Problem& p, int64_t r, typename F::D::WE* dst) {
  constexpr int C = 8 * sizeof(typename F::MaskT);
  const int64_t nch = p.words * 64 / C;
  const auto* mk = reinterpret_cast<const typename F::MaskT*>(p.mask + r * p.words);
  const typename F::V* v = static_cast<const typename F::V*>(p.values) + p.offsets[r];
  for (int64_t c = 0; c < nch; ++c) {
    const auto m = mk[c];
    F::store(dst + c * C, F::expand(m, v));
    v += popcount(m);
  }
}

// Float formats (bf16, fp32, W8A16): each weight row is expanded once into an L1/L2 scratch buffer,
// kRowBlock rows at a time, and a register-blocked micro-kernel (4 rows × up to 6 tokens of
// accumulators) multiplies it with every row of x: the expansion cost is amortized over M and the
// loop becomes an ordinary dense dot product over the scratch. (The W8A8 panels below measured
// slower for these formats: at 11008x4096, bf16 6.4 against 5.3 ms at 16 tokens, 4.6 against 3.0
// at 5; their dot products carry 2 or 1 products per lane, too few to pay for the transposes.)
// kRowBlock expanded rows × TB rows of x: 4·TB accumulators stay in registers; per chunk, 4 weight
// loads and TB x loads feed 4·TB dot products.
template <class D, int TB>
void micro(const typename D::WE* w, const typename D::XE* x, int64_t kp, typename D::Sum out[kRowBlock][6]) {
  constexpr int C = D::kCols;
  typename D::Acc acc[kRowBlock][TB];
  for (int i = 0; i < kRowBlock; ++i)
    for (int t = 0; t < TB; ++t) acc[i][t] = D::zero();
  for (int64_t k = 0; k < kp; k += C) {
    __m512i wv[kRowBlock];
    for (int i = 0; i < kRowBlock; ++i) wv[i] = _mm512_load_si512(w + i * kp + k);
    for (int t = 0; t < TB; ++t) {
      const __m512i xv = D::load_x(x + t * kp + k);
      for (int i = 0; i < kRowBlock; ++i) acc[i][t] = D::dot(acc[i][t], wv[i], xv);
    }
  }
  for (int i = 0; i < kRowBlock; ++i)
    for (int t = 0; t < TB; ++t) out[i][t] = D::sum(acc[i][t]);
}

template <class F>
void batched_rows(const Problem& p, int64_t r0, int64_t r1, void* scratch) {
  using D = typename F::D;
  const int64_t kp = p.words * 64;
  auto* w = static_cast<typename D::WE*>(scratch);
  const auto* x = static_cast<const typename D::XE*>(p.x);
  typename D::Sum out[kRowBlock][6];
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int nr = int(r1 - rb < kRowBlock ? r1 - rb : kRowBlock);
    for (int i = 0; i < nr; ++i) expand_row<F>(p, rb + i, w + i * kp);
    for (int i = nr; i < kRowBlock; ++i) std::memset(w + i * kp, 0, kp * sizeof(typename D::WE));
    for (int64_t t0 = 0; t0 < p.M; t0 += 6) {
      const int tb = int(p.M - t0 < 6 ? p.M - t0 : 6);
      const typename D::XE* xt = x + t0 * kp;
      switch (tb) {
        case 1: micro<D, 1>(w, xt, kp, out); break;
        case 2: micro<D, 2>(w, xt, kp, out); break;
        case 3: micro<D, 3>(w, xt, kp, out); break;
        case 4: micro<D, 4>(w, xt, kp, out); break;
        case 5: micro<D, 5>(w, xt, kp, out); break;
        default: micro<D, 6>(w, xt, kp, out); break;
      }
      for (int i = 0; i < nr; ++i)
        for (int t = 0; t < tb; ++t) p.y[(t0 + t) * p.N + rb + i] = F::finish(out[i][t], p, t0 + t, rb + i);
    }
  }
}


// W8A8: row panels. Each block of kPanelRows (16) weight rows becomes a dense "panel" once: every
// 64-column piece of expanded codes (16 dwords per row) is transposed 16×16, so one vector holds the
// same dword (4 columns) of 16 rows. A dot product then needs no horizontal sum: acc[t] (16 rows of
// outputs for token t) += VPDPBUSD(panel vector, x's 4 codes broadcast). Per panel vector and up to
// 16 tokens that is 16 register-resident accumulators, one panel load and one broadcast per dot —
// the shape of a dense VNNI GEMM's micro-kernel, with the expansion and the transpose (~6
// instructions per 16 dwords) amortized over the tokens. Measured at 11008x4096, 70%, on Zen 4:
// 2.4 ms at 16 tokens and 7.5 at 64 (torch's dense INT8: 2.4 and 7.4), against 4.6 and 16.0 for the
// expand-into-scratch kernel above (docs/results.md).
//
// The panel holds the codes as unsigned bytes (code + 128, pruned = 128) and x the signed codes q,
// the operand order VPDPBUSD wants: Σ (w + 128)·q = Σ w·q + 128·Σ q, and Σ q is one number per
// token (xsum), so the correction needs no per-row sums. The accumulators wrap modulo 2^32; the
// corrected total fits int32 (|Σ w·q| ≤ 127·128·65536), so it is exact.

constexpr int kPanelTokens = 16;  // rows of x per pass over a panel: one accumulator register each

// r[i] lane j ↔ r[j] lane i for a 16×16 matrix of dwords held in 16 registers.
inline void transpose16(__m512i r[16]) {
  __m512i u[16], v[16];
  for (int i = 0; i < 16; i += 2) {
    u[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    u[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // v[g + j], 128-bit lane L: rows g..g+3 at dword 4L + j
    v[g] = _mm512_unpacklo_epi64(u[g], u[g + 2]);
    v[g + 1] = _mm512_unpackhi_epi64(u[g], u[g + 2]);
    v[g + 2] = _mm512_unpacklo_epi64(u[g + 1], u[g + 3]);
    v[g + 3] = _mm512_unpackhi_epi64(u[g + 1], u[g + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // gather 128-bit lane L of v[j], v[4 + j], v[8 + j], v[12 + j]
    const __m512i w0 = _mm512_shuffle_i32x4(v[j], v[4 + j], 0x88), w1 = _mm512_shuffle_i32x4(v[j], v[4 + j], 0xDD);
    const __m512i w2 = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0x88);
    const __m512i w3 = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(w0, w2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(w1, w3, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(w0, w2, 0xDD);
    r[12 + j] = _mm512_shuffle_i32x4(w1, w3, 0xDD);
  }
}

// x as the panels read it: dword d (codes 4d..4d+3) of token t at xt[((t / 16) · kd + d) · 16 + t % 16],
// as signed codes (the kernel's uint8 x is q + 128); xsum[t] = Σ q. Tokens past M are zero.
void panel_x(const Problem& p, int32_t* xt, int32_t* xsum) {
  const int64_t kd = p.words * 16, passes = (p.M + kPanelTokens - 1) / kPanelTokens;
  std::memset(xt, 0, sizeof(int32_t) * passes * kd * kPanelTokens);
  const auto* xw = static_cast<const int32_t*>(p.x);
  for (int64_t t = 0; t < p.M; ++t) {
    int32_t* out = xt + (t / kPanelTokens) * kd * kPanelTokens + t % kPanelTokens;
    int32_t s = 0;
    for (int64_t d = 0; d < kd; ++d) {
      const int32_t v = xw[t * kd + d] ^ int32_t(0x80808080u);
      for (int b = 0; b < 4; ++b) s += int8_t(uint32_t(v) >> (8 * b));
      out[d * kPanelTokens] = v;
    }
    xsum[t] = s;
  }
}

// Weight rows [rb, rb + nr) (nr ≤ 16) as a panel of kd = 16 · words vectors: per mask word, the 16
// rows' codes expanded in registers (code + 128; rows past nr all 128, i.e. code 0), transposed and
// stored. The 16 rows are read a word at a time, 32 interleaved streams that the hardware
// prefetchers do not follow from DRAM; panel_micro has already fetched them into L2 (Prefetch).
// Measured against expanding each row whole into an L1/L2 buffer first (sequential streams, then
// the transposes from the buffer): 2.4 against 3.1 ms at 16 tokens, 1.4 against 1.9 at 5.
void build_panel(const Problem& p, int64_t rb, int nr, __m512i* panel) {
  const __m512i offset = _mm512_set1_epi8(char(0x80));  // code + 128
  const int8_t* v[kPanelRows];
  for (int i = 0; i < nr; ++i) v[i] = static_cast<const int8_t*>(p.values) + p.offsets[rb + i];
  for (int64_t c = 0; c < p.words; ++c) {
    __m512i r[kPanelRows];
    for (int i = 0; i < kPanelRows; ++i) {
      if (i < nr) {
        const uint64_t m = p.mask[(rb + i) * p.words + c];
        r[i] = _mm512_xor_si512(FmtI8::expand(m, v[i]), offset);
        v[i] += popcount(m);
      } else {
        r[i] = offset;
      }
    }
    transpose16(r);
    for (int d = 0; d < 16; ++d) _mm512_store_si512(panel + c * 16 + d, r[d]);
  }
}

// Two byte ranges fetched into L2 one cache line per step(), the first then the second.
struct Prefetch {
  const char *a, *a_end, *b, *b_end;
  void step() {
    if (a < a_end) {
      _mm_prefetch(a, _MM_HINT_T1);
      a += 64;
    } else if (b < b_end) {
      _mm_prefetch(b, _MM_HINT_T1);
      b += 64;
    }
  }
};

// T tokens (one pass) times a panel of kd dwords: out[t] lane i = Σ_d panel[d] lane i · x_t dword d.
// The accumulators are locals, stored once at the end: passed in as an array, GCC kept them in
// rotating registers with a copy per dot product. Meanwhile the next panel's rows (values, then
// mask) are prefetched into L2, a line per step, for build_panel.
template <int T>
void panel_micro(const __m512i* panel, const int32_t* xt, int64_t kd, int32_t out[kPanelTokens][16],
                 Prefetch& next) {
  __m512i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_si512();
  for (int64_t d = 0; d < kd; ++d) {
    next.step();
    const __m512i wv = _mm512_load_si512(panel + d);
    const int32_t* x = xt + d * kPanelTokens;
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t] = _mm512_dpbusd_epi32(acc[t], wv, _mm512_set1_epi32(x[t]));
  }
  for (int t = 0; t < T; ++t) _mm512_store_si512(out[t], acc[t]);
}

void panel_rows(const Problem& p, int64_t r0, int64_t r1, const int32_t* xt, const int32_t* xsum, void* scratch) {
  const int64_t kd = p.words * 16;
  auto* panel = static_cast<__m512i*>(scratch);
  alignas(64) int32_t out[kPanelTokens][16];
  for (int64_t rb = r0; rb < r1; rb += kPanelRows) {
    const int nr = int(r1 - rb < kPanelRows ? r1 - rb : kPanelRows);
    build_panel(p, rb, nr, panel);
    const int64_t ne = rb + 2 * kPanelRows < r1 ? rb + 2 * kPanelRows : r1;  // the next panel's rows
    const auto* values = static_cast<const char*>(p.values);
    Prefetch next{values + p.offsets[rb + nr], values + p.offsets[ne],
                  reinterpret_cast<const char*>(p.mask + (rb + nr) * p.words),
                  reinterpret_cast<const char*>(p.mask + ne * p.words)};
    for (int64_t t0 = 0; t0 < p.M; t0 += kPanelTokens) {
      const int tb = int(p.M - t0 < kPanelTokens ? p.M - t0 : kPanelTokens);
      const int32_t* x = xt + t0 / kPanelTokens * kd * kPanelTokens;
      switch (tb) {
#define SPARSELLAMA_PANEL_CASE(n) \
  case n: panel_micro<n>(panel, x, kd, out, next); break;
        SPARSELLAMA_PANEL_CASE(1) SPARSELLAMA_PANEL_CASE(2) SPARSELLAMA_PANEL_CASE(3) SPARSELLAMA_PANEL_CASE(4)
        SPARSELLAMA_PANEL_CASE(5) SPARSELLAMA_PANEL_CASE(6) SPARSELLAMA_PANEL_CASE(7) SPARSELLAMA_PANEL_CASE(8)
        SPARSELLAMA_PANEL_CASE(9) SPARSELLAMA_PANEL_CASE(10) SPARSELLAMA_PANEL_CASE(11) SPARSELLAMA_PANEL_CASE(12)
        SPARSELLAMA_PANEL_CASE(13) SPARSELLAMA_PANEL_CASE(14) SPARSELLAMA_PANEL_CASE(15)
        default: panel_micro<kPanelTokens>(panel, x, kd, out, next); break;
#undef SPARSELLAMA_PANEL_CASE
      }
      for (int t = 0; t < tb; ++t)
        for (int i = 0; i < nr; ++i) {
          const int32_t exact = int32_t(uint32_t(out[t][i]) - 128u * uint32_t(xsum[t0 + t]));  // modulo 2^32
          p.y[(t0 + t) * p.N + rb + i] = FmtI8::finish_exact(exact, p, t0 + t, rb + i);
        }
    }
  }
}

template <class F>
void direct(const Problem& p, int64_t r0, int64_t r1) {  // M <= kDirectMax
  switch (p.M) {
    case 1: direct_rows<F, 1>(p, r0, r1); break;
    case 2: direct_rows<F, 2>(p, r0, r1); break;
    case 3: direct_rows<F, 3>(p, r0, r1); break;
    default: direct_rows<F, 4>(p, r0, r1); break;
  }
}

// ----------------------------------------------------------------- int4 (W4A8, W4A16)
// Per mask word: the word's ceil(p/2) bytes of nibbles are unpacked in registers to one byte per
// code (VPMOVZXBW + shift + VPTERNLOG: the low nibble lands in byte 2i, the high one in 2i+1), and
// VPEXPANDB spreads the p codes to their columns, filling pruned columns with 8 — the nibble of
// code 0 — so every lane holds c + 8 in [0, 15].
//   W4A8: VPDPBUSD multiplies those unsigned bytes by the signed activation codes q, giving
//   Σ (c + 8)·q per 32-bit lane; Σ c·q = that − 8·Σ q, with each lane's Σ q per token and group
//   precomputed (x_lane_sum) and subtracted as an integer. The lanes' exact sums then meet the
//   group's scale in fp32.
//   W4A16: subtracting 8 gives the signed codes (0 where pruned), widened exactly to fp32 as in W8A16.
// Both fold each group into fp32 row totals every group_words words.

inline __m512i unpack_nibbles(const uint8_t* v) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  return _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F0F), 0xA8);  // (a | b) & c
}

inline __m512i expand_int4(uint64_t m, const uint8_t* v) {
  return _mm512_mask_expand_epi8(_mm512_set1_epi8(8), m, unpack_nibbles(v));
}

template <bool kA8, int T>
void int4_direct(const Problem& p, int64_t r0, int64_t r1, int64_t t0) {
  const int64_t kp = p.words * 64, gw = p.group_words, groups = p.words / gw;
  const auto* bytes = static_cast<const uint8_t*>(p.values);
  // W4A8: 2 int32 accumulators for token 0 (alternate words: two dependency chains); W4A16: 4 fp32
  // accumulators per token at batch 1 (one per 16 codes of a word), 2 when several tokens share them.
  constexpr int NA = kA8 ? 2 : (T == 1 ? 4 : 2);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* mk = p.mask + r * p.words;
    const uint8_t* v = bytes + p.offsets[r];
    const float* sc = p.w_scale + r * groups;
    __m512 total[T];
    for (int t = 0; t < T; ++t) total[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i ai[T][NA];
      __m512 af[T][NA];
      for (int t = 0; t < T; ++t)
        for (int a = 0; a < NA; ++a) ai[t][a] = _mm512_setzero_si512(), af[t][a] = _mm512_setzero_ps();
      // No software prefetch here (the bf16/int8 kernels have one): this kernel is compute-bound,
      // ~1.5x the instructions per word of the int8 one, and the prefetches measured no gain.
      for (int64_t w = g * gw; w < (g + 1) * gw; ++w) {
        const uint64_t m = mk[w];
        // W4A8 must not skip an empty word: its columns still count in the group's 8·Σq correction.
        if (!kA8 && m == 0) continue;
        const __m512i e = expand_int4(m, v);
        v += int4_bytes(m);
        if constexpr (kA8) {
          const int8_t* xq = static_cast<const int8_t*>(p.x) + t0 * kp + w * 64;
          for (int t = 0; t < T; ++t) ai[t][0] = _mm512_dpbusd_epi32(ai[t][0], e, _mm512_loadu_si512(xq + t * kp));
          std::swap(ai[0][0], ai[0][1]);  // two dependency chains for token 0 (registers, not a w & 1 index)
        } else {
          const __m512i c = _mm512_sub_epi8(e, _mm512_set1_epi8(8));
          const float* xf = static_cast<const float*>(p.x) + t0 * kp + w * 64;
          for (int i = 0; i < 4; ++i) {
            const __m512 cw = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(c, i)));
            for (int t = 0; t < T; ++t)
              af[t][i % NA] = _mm512_fmadd_ps(cw, _mm512_loadu_ps(xf + t * kp + 16 * i), af[t][i % NA]);
          }
        }
      }
      const __m512 s = _mm512_set1_ps(sc[g]);
      for (int t = 0; t < T; ++t) {
        if constexpr (kA8) {
          // Each lane's own 8·Σq (its 4 columns of every word of the group) comes off while the
          // sums are integer, so every lane holds its exact Σ c·q (|·| ≤ 1024 words · 4 · 7 · 128 <
          // 2^24: exact in fp32) — no large terms that would cancel after rounding.
          const __m512i corr = _mm512_loadu_si512(p.x_lane_sum + ((t0 + t) * groups + g) * 16);
          const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(ai[t][0], ai[t][1]), corr);
          total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, total[t]);
        } else {
          __m512 a = af[t][0];
          for (int i = 1; i < NA; ++i) a = _mm512_add_ps(a, af[t][i]);
          total[t] = _mm512_fmadd_ps(a, s, total[t]);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      float y = _mm512_reduce_add_ps(total[t]);
      if constexpr (kA8) y *= p.x_scale[t0 + t];
      p.y[(t0 + t) * p.N + r] = p.bias ? y + p.bias[r] : y;
    }
  }
}

// Batches of more than kDirectMax rows of x run kDirectMax at a time: the unpacking is repeated
// per pass (the weight row is in L1/L2 by then), which keeps one kernel for every M. W4A16 batches
// that would take three passes or more go to the outer-product kernel instead (avx512::outer).
template <bool kA8>
void int4_rows(const Problem& p, int64_t r0, int64_t r1) {
  constexpr int64_t kRows = 16;  // weight rows per block, reused from cache by every pass over x
  for (int64_t rb = r0; rb < r1; rb += kRows) {
    const int64_t re = rb + kRows < r1 ? rb + kRows : r1;
    for (int64_t t0 = 0; t0 < p.M; t0 += kDirectMax) {
      switch (p.M - t0 < kDirectMax ? p.M - t0 : kDirectMax) {
        case 1: int4_direct<kA8, 1>(p, rb, re, t0); break;
        case 2: int4_direct<kA8, 2>(p, rb, re, t0); break;
        case 3: int4_direct<kA8, 3>(p, rb, re, t0); break;
        default: int4_direct<kA8, 4>(p, rb, re, t0); break;
      }
    }
  }
}

// ----------------------------------------------------------------- outer products (outer.h)
// For W4A16 batches (see kernels.h, avx512::outer): each stored code broadcast against a column of
// 16 rows of x, one 16-lane FMA per stored weight, instead of expanding every word once per 4 rows
// of x and doing a dense matmul's FMAs.

struct Vec {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static I izero() { return _mm512_setzero_si512(); }
  static F set1(float a) { return _mm512_set1_ps(a); }
  static F load(const float* x) { return _mm512_loadu_ps(x); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static I settle(I total, F a) { return _mm512_add_epi32(total, _mm512_cvtps_epi32(a)); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  // 64 codes per 32 bytes; reads ≤ 31 bytes past the row (the values are padded by 64).
  static void unpack_int4(const uint8_t* v, int64_t n, int8_t* out) {
    for (int64_t i = 0; i < n; i += 32)
      _mm512_storeu_si512(out + 2 * i, _mm512_sub_epi8(unpack_nibbles(v + i), _mm512_set1_epi8(8)));
  }
  static void store(float* d, F a) { _mm512_store_ps(d, a); }
  static void store(int32_t* d, I a) { _mm512_store_si512(d, a); }
};

#include "outer.h"

// ----------------------------------------------------------------- activation encoders
// Vector versions of the scalar encoders in sparse_gemv.cpp, bit for bit the same results
// (IEEE division, round-half-even), 16 floats at a time; the tail is handled with a lane mask.

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : __mmask16((1u << left) - 1); }

// fp32 → bf16 bits, round to nearest even, NaN → 0x7FC0 (c10::BFloat16's rounding).
inline __m256i bf16_rne(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace

void encode_bf16(const float* x, int64_t M, int64_t K, int64_t kp, uint16_t* out, bool split) {
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = tail_mask(K - k);
      const __m512 v = _mm512_maskz_loadu_ps(lanes, x + m * K + k);
      const __m256i hi = bf16_rne(v);
      _mm256_mask_storeu_epi16(out + m * kp + k, lanes, hi);
      if (split) {  // lo = bf16(x − hi); 0 where hi is not finite
        const __m512 h = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(h), inf, _CMP_LT_OQ);
        _mm256_mask_storeu_epi16(out + (M + m) * kp + k, lanes, bf16_rne(_mm512_maskz_sub_ps(finite, v, h)));
      }
    }
}

bool quantize_u8(const float* x, int64_t M, int64_t K, int64_t kp, uint8_t* q, float* scale) {
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(K - k), row + k));
      bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);  // inf or nan
      amax = _mm512_max_ps(amax, a);
    }
    if (bad) {
      scale[m] = __builtin_nanf("");  // the caller's buffer already holds code 0 (128)
      continue;
    }
    float s = _mm512_reduce_max_ps(amax) / 127.5f;
    if (!(s > 0.f)) s = 1.f;
    scale[m] = s;
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = tail_mask(K - k);
      __m512 t = _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, row + k), vs);
      t = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(t, lo), hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(t), _mm512_set1_epi32(128));
      _mm_mask_storeu_epi8(q + m * kp + k, lanes, _mm512_cvtepi32_epi8(c));
    }
  }
  return true;
}

void run(Fmt fmt, const Problem& p) {
  if (p.outer) return run_outer(fmt, p);
  const int64_t kp = p.words * 64;
  const bool batched = p.M > kDirectMax && !is_int4(fmt), panels = batched && fmt == Fmt::I8;
  // W8A8 panels: x transposed once, shared by the threads. malloc, not std::vector: a template
  // instantiated here would be compiled for AVX-512, and the linker may keep that one copy for the
  // other translation units too (see kernels.h).
  int32_t *xt = nullptr, *xsum = nullptr;
  if (panels) {
    const int64_t passes = (p.M + kPanelTokens - 1) / kPanelTokens;
    xt = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * passes * kp / 4 * kPanelTokens));
    xsum = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * p.M));
    panel_x(p, xt, xsum);
  }
#pragma omp parallel num_threads(p.nthreads)
  {
    // Scratch, 64-byte aligned: W8A8, a panel (16 · kp bytes); float formats, kRowBlock expanded
    // rows (4-byte elements at most).
    void* scratch = batched ? std::aligned_alloc(64, panels ? kPanelRows * kp : kRowBlock * kp * 4) : nullptr;
    const int nth = omp_get_num_threads();
    // The row ranges are precomputed per part; a smaller team than asked still covers them all.
    for (int part = omp_get_thread_num(); part < p.nthreads; part += nth) {
      const int64_t r0 = p.bounds[part], r1 = p.bounds[part + 1];
      if (r0 >= r1) continue;
      switch (fmt) {
        case Fmt::BF16: batched ? batched_rows<FmtBF16>(p, r0, r1, scratch) : direct<FmtBF16>(p, r0, r1); break;
        case Fmt::F32: batched ? batched_rows<FmtF32>(p, r0, r1, scratch) : direct<FmtF32>(p, r0, r1); break;
        case Fmt::I8: panels ? panel_rows(p, r0, r1, xt, xsum, scratch) : direct<FmtI8>(p, r0, r1); break;
        case Fmt::I8F: batched ? batched_rows<FmtI8FBatched>(p, r0, r1, scratch) : direct<FmtI8F>(p, r0, r1); break;
        case Fmt::I4: int4_rows<true>(p, r0, r1); break;
        case Fmt::I4F: int4_rows<false>(p, r0, r1); break;
      }
    }
    std::free(scratch);
  }
  std::free(xt);
  std::free(xsum);
}

constexpr int kLanes = 16;  // floats per vector, for attention.h
#include "attention.h"

}  // namespace avx512
}  // namespace sparsellama

#pragma GCC pop_options

#else  // not x86-64: never dispatched (best_isa() is 0), but the symbol must exist.

#include "kernels.h"
namespace sparsellama {
namespace avx512 {
void run(Fmt, const Problem&) {}
void decode_attention(const AttentionProblem&) {}
void encode_bf16(const float*, int64_t, int64_t, int64_t, uint16_t*, bool) {}
bool quantize_u8(const float*, int64_t, int64_t, int64_t, uint8_t*, float*) { return false; }
}  // namespace avx512
}  // namespace sparsellama

#endif

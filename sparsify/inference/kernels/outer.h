// Batched sparse GEMM by outer products, for the AVX2 kernels' larger batches (kOuterMin) and
// AVX-512 W4A16 batches (avx512::outer). Written over a vector type `Vec` (8 or 16 fp32 lanes), so
// each ISA includes it inside its own namespace. Everywhere else AVX-512's expanding kernels
// measured faster at every batch up to 16 (kernels.h).
//
// Why: the expanding kernels turn each piece of a weight row into a dense vector and multiply it
// with every row of x. That costs the same per weight position whatever the sparsity, so past a few
// rows of x they do as much arithmetic as a dense matmul. Here each STORED weight is broadcast and
// meets a whole column of x at once (x transposed, kOuterTokens rows per pass: xt[k][16] is column k),
// so the work is proportional to the stored weights, one 16-lane FMA each (two on AVX2). The column
// comes from the mask bits (TZCNT, BLSR); the values are read in order, never gathered.
// Measured on Zen 4 (AVX2 path, 11008x4096, 70%): ~8 ms at any M from 2 to 16, so the per-weight
// loop (bit scan, scalar conversion, a mispredicted exit per word), not the FMAs, bounds it. A
// branch-free variant (each segment's columns listed through a byte → positions table first, then
// one flat loop) measured 10-25% slower. Re-measured on Zen 5 (2026-12-01, docs/results.md): a
// whole row listed by vector code, values widened to fp32 first, then one flat loop with 8 FMA
// chains was only 2-4% faster. Its columns of x come from L2 (a probe that kept them in L1, with
// wrong results, ran 1.36x faster), but tiling x to keep them in L1 made it slower. The rest of the
// loop is its ~4 loads per stored weight (value, column, two 32-byte halves of the column of x).
//
// W8A8 stays exact: the products q·code are integers below 2^14, and fp32 sums of them are exact
// while below 2^24, so the fp32 accumulators are moved into int32 totals every kOuterSettleWords
// mask words (at most 16 · 64 · 128 · 127 < 2^24 in between); x holds the codes q as fp32.
//
// `Vec` provides: F (an fp32 vector of Vec::kLanes lanes), I (int32 vector of as many lanes),
// zero(), izero(), set1(float), load(const float*), fmadd(a, b, c) = a·b + c, add(F, F),
// settle(I, F) = I + int32(F) (exact: F holds integers), to_float(I), store(float*, F),
// store(int32_t*, I), and unpack_int4(bytes, n, int8_t* codes) (INT4 nibbles → signed codes).
// Not a standalone header: include it after "kernels.h", <cstring>, <cstdlib>, <type_traits>.

namespace {

constexpr int kOuterTokens = 16;       // rows of x per pass
constexpr int kOuterSettleWords = 16;  // W8A8: mask words between moves into the int32 totals

// Per format: the stored value as one fp32 number (exact for every format), and the epilogue on
// the finished sum of row r of W with row t of x.
template <Fmt F>
struct Outer;

template <>
struct Outer<Fmt::BF16> {
  using V = uint16_t;
  static float value(const V* v) {
    const uint32_t u = uint32_t(*v) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static float finish(float s, const Problem& p, int64_t, int64_t r) { return p.bias ? s + p.bias[r] : s; }
};

template <>
struct Outer<Fmt::F32> {
  using V = float;
  static float value(const V* v) { return *v; }
  static float finish(float s, const Problem& p, int64_t, int64_t r) { return p.bias ? s + p.bias[r] : s; }
};

template <>
struct Outer<Fmt::I8F> {  // W8A16: Σ x·code, then the row's scale
  using V = int8_t;
  static float value(const V* v) { return float(*v); }
  static float finish(float s, const Problem& p, int64_t, int64_t r) {
    const float y = s * p.w_scale[r];
    return p.bias ? y + p.bias[r] : y;
  }
};

template <>
struct Outer<Fmt::I8> {  // W8A8: s is the exact Σ q·code, rounded to fp32 once (as the reference does)
  using V = int8_t;
  static float value(const V* v) { return float(*v); }
  static float finish(float s, const Problem& p, int64_t t, int64_t r) {
    const float y = s * (p.x_scale[t] * p.w_scale[r]);
    return p.bias ? y + p.bias[r] : y;
  }
};

// INT4: the stored values are the row's codes after Vec::unpack_int4 (int8, with each odd word's
// padding code), and every group of group_words words is folded into the row totals with its scale.
template <>
struct Outer<Fmt::I4> {  // W4A8: Σ_g scale_g · (exact Σ q·c over the group), then the token's scale
  using V = int8_t;
  static float value(const V* v) { return float(*v); }
  static float finish(float s, const Problem& p, int64_t t, int64_t r) {
    const float y = s * p.x_scale[t];
    return p.bias ? y + p.bias[r] : y;
  }
};

template <>
struct Outer<Fmt::I4F> {  // W4A16: Σ_g scale_g · Σ x·c
  using V = int8_t;
  static float value(const V* v) { return float(*v); }
  static float finish(float s, const Problem& p, int64_t, int64_t r) { return p.bias ? s + p.bias[r] : s; }
};

// xt[k * 16 + t] = x[t0 + t][k] as fp32 (W8A8: x holds int32 codes, converted exactly), rows past M zero.
inline void transpose_x(const Problem& p, bool codes, int64_t t0, float* xt) {
  const int64_t kp = p.words * 64;
  const int64_t n = p.M - t0 < kOuterTokens ? p.M - t0 : kOuterTokens;
  std::memset(xt, 0, sizeof(float) * kp * kOuterTokens);
  for (int64_t t = 0; t < n; ++t) {
    if (codes) {
      const int32_t* xs = static_cast<const int32_t*>(p.x) + (t0 + t) * kp;
      for (int64_t k = 0; k < kp; ++k) xt[k * kOuterTokens + t] = float(xs[k]);
    } else {
      const float* xs = static_cast<const float*>(p.x) + (t0 + t) * kp;
      for (int64_t k = 0; k < kp; ++k) xt[k * kOuterTokens + t] = xs[k];
    }
  }
}

// Weight rows [r0, r1) times rows [t0, t0 + 16) of x, given those rows transposed in xt.
template <Fmt Fm>
void outer_rows(const Problem& p, int64_t r0, int64_t r1, int64_t t0, const float* xt, int8_t* codes) {
  using O = Outer<Fm>;
  constexpr bool kInt = Fm == Fmt::I8 || Fm == Fmt::I4;  // exact integer sums, moved into int32 totals
  constexpr bool kI4 = is_int4(Fm);
  constexpr int NV = kOuterTokens / Vec::kLanes;  // vectors per column of x
  constexpr int S = 4 / NV;                       // stored weights per step: 4 independent FMA chains
  const int64_t gw = kI4 ? p.group_words : p.words, groups = p.words / gw;
  const int64_t n = p.M - t0 < kOuterTokens ? p.M - t0 : kOuterTokens;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* mk = p.mask + r * p.words;
    const typename O::V* v;
    if constexpr (kI4) {
      const auto* bytes = static_cast<const uint8_t*>(p.values);
      Vec::unpack_int4(bytes + p.offsets[r], p.offsets[r + 1] - p.offsets[r], codes);
      v = codes;
    } else {
      v = static_cast<const typename O::V*>(p.values) + p.offsets[r];
    }
    typename Vec::F acc[S][NV], rowf[NV];
    typename Vec::I total[NV];
    for (int i = 0; i < NV; ++i) {
      total[i] = Vec::izero();
      rowf[i] = Vec::zero();
      for (int s = 0; s < S; ++s) acc[s][i] = Vec::zero();
    }
    for (int64_t w = 0; w < p.words; ++w) {
      uint64_t m = mk[w];
      const float* xw = xt + w * 64 * kOuterTokens;
      while (m) {
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
          if (!m) break;
          const float* xc = xw + __builtin_ctzll(m) * kOuterTokens;
          m &= m - 1;
          const typename Vec::F wv = Vec::set1(O::value(v++));
          for (int i = 0; i < NV; ++i) acc[s][i] = Vec::fmadd(wv, Vec::load(xc + i * Vec::kLanes), acc[s][i]);
        }
      }
      if constexpr (kI4) v += __builtin_popcountll(mk[w]) & 1;  // the word's padding code
      const bool group_end = (w + 1) % gw == 0;
      if (kInt && ((w + 1) % kOuterSettleWords == 0 || w + 1 == p.words || (kI4 && group_end))) {
        for (int i = 0; i < NV; ++i) {
          typename Vec::F sum = acc[0][i];
          for (int s = 1; s < S; ++s) sum = Vec::add(sum, acc[s][i]);
          total[i] = Vec::settle(total[i], sum);
          for (int s = 0; s < S; ++s) acc[s][i] = Vec::zero();
        }
      }
      if (kI4 && group_end) {  // the group's sums (exact integers for W4A8) meet its scale
        const typename Vec::F scale = Vec::set1(p.w_scale[r * groups + w / gw]);
        for (int i = 0; i < NV; ++i) {
          typename Vec::F sum;
          if constexpr (kInt) {
            sum = Vec::to_float(total[i]);
            total[i] = Vec::izero();
          } else {
            sum = acc[0][i];
            for (int s = 1; s < S; ++s) sum = Vec::add(sum, acc[s][i]);
            for (int s = 0; s < S; ++s) acc[s][i] = Vec::zero();
          }
          rowf[i] = Vec::fmadd(sum, scale, rowf[i]);
        }
      }
    }
    alignas(64) float sf[kOuterTokens];
    alignas(64) int32_t si[kOuterTokens];
    for (int i = 0; i < NV; ++i) {
      typename Vec::F sum = acc[0][i];
      for (int s = 1; s < S; ++s) sum = Vec::add(sum, acc[s][i]);
      Vec::store(sf + i * Vec::kLanes, kI4 ? rowf[i] : sum);
      Vec::store(si + i * Vec::kLanes, total[i]);
    }
    for (int64_t t = 0; t < n; ++t)
      p.y[(t0 + t) * p.N + r] = O::finish(kInt && !kI4 ? float(si[t]) : sf[t], p, t0 + t, r);
  }
}

// Runs every pass of 16 rows of x: transposes them once (the threads share xt), then splits the rows
// of W among the threads as `bounds` says.
inline void run_outer(Fmt fmt, const Problem& p) {
  const int64_t kp = p.words * 64;
  float* xt = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kp * kOuterTokens));
  for (int64_t t0 = 0; t0 < p.M; t0 += kOuterTokens) {
    transpose_x(p, fmt == Fmt::I8 || fmt == Fmt::I4, t0, xt);
#pragma omp parallel num_threads(p.nthreads)
    {
      // int4: one row's unpacked codes (≤ in_features + a padding code per word, + vector over-read).
      int8_t* codes = is_int4(fmt) ? static_cast<int8_t*>(std::aligned_alloc(64, (p.words * 65 + 127) / 64 * 64 + 64))
                                   : nullptr;
      const int nth = omp_get_num_threads();
      for (int part = omp_get_thread_num(); part < p.nthreads; part += nth) {
        const int64_t r0 = p.bounds[part], r1 = p.bounds[part + 1];
        switch (fmt) {
          case Fmt::BF16: outer_rows<Fmt::BF16>(p, r0, r1, t0, xt, codes); break;
          case Fmt::F32: outer_rows<Fmt::F32>(p, r0, r1, t0, xt, codes); break;
          case Fmt::I8: outer_rows<Fmt::I8>(p, r0, r1, t0, xt, codes); break;
          case Fmt::I8F: outer_rows<Fmt::I8F>(p, r0, r1, t0, xt, codes); break;
          case Fmt::I4: outer_rows<Fmt::I4>(p, r0, r1, t0, xt, codes); break;
          case Fmt::I4F: outer_rows<Fmt::I4F>(p, r0, r1, t0, xt, codes); break;
        }
      }
      std::free(codes);
    }
  }
  std::free(xt);
}

}  // namespace

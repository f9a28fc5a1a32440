// AVX2 + FMA sparse GEMM kernels (Haswell and later, Zen 1-3): no AVX-512 instruction anywhere in
// this file (the target pragma allows avx2, fma, bmi, bmi2, popcnt only), so it runs on CPUs
// without AVX-512; dispatched only after a runtime CPU check.
//
// Why this design: AVX2 has no VPEXPAND, and the portable kernel's workaround (scatter a row into
// a zeroed dense scratch row, then a dense dot) does more work than the dense matmul. Here every
// mask byte (8 columns) is expanded in a register by ONE in-lane byte shuffle: the byte's stored
// values (at most 8, contiguous in `values`) are broadcast into both 128-bit lanes, and VPSHUFB
// with a 32-byte control from a 256-entry table (indexed by the mask byte) moves the k-th value's
// bytes into the 32-bit lane of the k-th set bit and zeroes the other lanes (control byte 0x80).
// Where in the 32-bit lane the value's bytes land makes the conversion free:
//   bf16  → bytes 2-3: the lane IS the fp32 value (bf16 is the top half of an fp32; exact);
//   int8  → byte 3 (W8A16): code·2^24, an arithmetic shift right by 24 gives the int32 code.
// fp32 values are 32 bytes per 8 columns, more than a lane holds: VPERMPS with an index table and
// a lane mask instead. The popcount of the mask byte advances the value pointer.
//
// The expanded 8-lane vector meets x (fp32) with one FMA per row of x: up to kTokens rows of x
// share each expanded vector in registers (batched decode); more rows are done kTokens at a time
// while the weight row is still in L1. From kOuterMin rows of x on, the outer-product kernel of
// outer.h takes over (see kernels.h).
//
// W8A8 and W4A8 (int8 activation codes q) keep the codes as bytes and expand 32 columns per
// step, one mask byte pair per 128-bit lane: both bytes' codes (at most 16, contiguous) are one
// 16-byte load, and the control is two 8-byte table rows, the second offset by the first byte's
// popcount (kPairs). One VPSHUFB per 32 columns instead of one per 8 and, per row of x, the AVX2
// int8 dot product: VPSIGNB moves q's sign onto the codes, VPMADDUBSW multiplies by |q| (uint8),
// VPMADDWD by ones widens to int32. Exact: |q| ≤ 128 and |code| ≤ 127, so a VPMADDUBSW pair sum is
// at most 2·128·127 = 32512 < 2^15 (no saturation), and an int32 lane gains at most 4·128·127 per
// step, K / 32 ≤ 2048 steps (K ≤ 65536, checked by the binding): < 2^31. Against the per-byte
// VPMADDWD kernel it replaced (benchmarks/kernel_ab.py, Zen 4, AVX2 path, 11008x4096, 0-70%
// sparsity): 1.11-1.24x at batch 1, 1.35-1.64x at batches 2-4 (docs/results.md). It is still
// bound by issuing instructions, half of them the scalar work of finding each pair's table rows.
// So where a W8A8 or W4A8 weight has a gather index (format.py; ops.for_isa builds it from 60%
// sparsity on), gather_rows does the opposite below kOuterMin rows of x: it leaves the codes packed
// and gathers x at their columns (see there): at batch 1 W8A8 1.36-1.69x, W4A8 1.25-1.48x faster at
// 60-80% sparsity.
#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#include <immintrin.h>

namespace sparsellama {
namespace avx2 {
namespace {

// Rows of x that share one expanded weight vector (accumulators in registers: 16 ymm in all).
constexpr int kTokens = 8;

// ----------------------------------------------------------------- expansion tables

struct alignas(64) ShuffleTable {
  uint8_t ctrl[256][32];
};

// VPSHUFB controls: the k-th set bit's 32-bit lane gets the k-th stored value's `elt` bytes at byte
// `at` of the lane; every other byte 0x80 (zero). The source is the same 16 bytes in both 128-bit
// lanes, so lanes 4-7 (the high half) index it like lanes 0-3.
constexpr ShuffleTable make_shuffles(int elt, int at) {
  ShuffleTable t{};
  for (int b = 0; b < 256; ++b) {
    int rank = 0;
    for (int k = 0; k < 8; ++k) {
      for (int i = 0; i < 4; ++i) t.ctrl[b][4 * k + i] = 0x80;
      if (b >> k & 1) {
        for (int i = 0; i < elt; ++i) t.ctrl[b][4 * k + at + i] = uint8_t(rank * elt + i);
        ++rank;
      }
    }
  }
  return t;
}

struct alignas(64) PermuteTable {
  int32_t idx[256][8];
};

// VPERMPS indices for fp32 values: the k-th set bit's lane takes value k; other lanes get −1,
// which VPERMPS reads as 7 (it uses the low 3 bits) and the sign marks for zeroing.
constexpr PermuteTable make_permutes() {
  PermuteTable t{};
  for (int b = 0; b < 256; ++b) {
    int rank = 0;
    for (int k = 0; k < 8; ++k) t.idx[b][k] = (b >> k & 1) ? rank++ : -1;
  }
  return t;
}

struct alignas(64) PairTable {
  uint64_t ctrl[9][256];
};

// Byte controls for the int8 kernels' 32-column steps: ctrl[c][b] has, in byte k, c + the rank of
// bit k among b's set bits when bit k is set, else 0x80 (zero). Row 0 places the first byte of a
// pair; row c = popcount(first byte) places the second byte's codes after the first's.
constexpr PairTable make_pairs() {
  PairTable t{};
  for (int c = 0; c < 9; ++c)
    for (int b = 0; b < 256; ++b) {
      uint64_t e = 0;
      int rank = 0;
      for (int k = 0; k < 8; ++k) e |= uint64_t((b >> k & 1) ? c + rank++ : 0x80) << (8 * k);
      t.ctrl[c][b] = e;
    }
  return t;
}

// Constant-initialized (computed by the compiler): no code runs at load time on CPUs without AVX2.
constexpr ShuffleTable kBF16Shuffle = make_shuffles(2, 2);
constexpr ShuffleTable kI8FShuffle = make_shuffles(1, 3);
constexpr PermuteTable kF32Permute = make_permutes();
constexpr PairTable kPairs = make_pairs();

// The kernels pass a mask byte as `row` = byte · 32, the byte offset of its 32-byte table row:
// (m >> (8j − 5)) & 0x1FE0 gets it from the mask word in two instructions, with no separate
// scaling (addressing modes scale by 8 at most), and its popcount is the byte's.
template <class Table>
inline __m256i table_row(const Table& t, unsigned row) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(&t) + row));
}

inline __m256i shuffle16(const void* v, const ShuffleTable& t, unsigned row) {
  const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(v)));
  return _mm256_shuffle_epi8(src, table_row(t, row));
}

inline __m256i shuffle8(const void* v, const ShuffleTable& t, unsigned row) {
  int64_t eight;  // 8 bytes suffice (at most 8 values of 1 byte); VPBROADCASTQ fills both lanes
  std::memcpy(&eight, v, 8);
  return _mm256_shuffle_epi8(_mm256_set1_epi64x(eight), table_row(t, row));
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hsum_max(__m256 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline int32_t hsum(__m256i a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// ----------------------------------------------------------------- batches (M >= kOuterMin)

// INT4: a row's nibbles (code + 8, low nibble first) → signed int8 codes, 32 per 16 bytes.
inline void unpack_row_int4(const uint8_t* v, int64_t n, int8_t* out) {
  const __m128i low = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  for (int64_t i = 0; i < n; i += 16) {  // reads ≤ 15 bytes past the row: the values are padded
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i));
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(b, low), eight);
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low), eight);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
  }
}

struct Vec {  // 8 fp32 lanes: outer.h's batched kernel runs two of these per column of 16 rows of x
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static I izero() { return _mm256_setzero_si256(); }
  static F set1(float a) { return _mm256_set1_ps(a); }
  static F load(const float* x) { return _mm256_loadu_ps(x); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static I settle(I total, F a) { return _mm256_add_epi32(total, _mm256_cvtps_epi32(a)); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static void unpack_int4(const uint8_t* v, int64_t n, int8_t* out) { unpack_row_int4(v, n, out); }
  static void store(float* d, F a) { _mm256_store_ps(d, a); }
  static void store(int32_t* d, I a) { _mm256_store_si256(reinterpret_cast<__m256i*>(d), a); }
};

#include "outer.h"

// ----------------------------------------------------------------- formats (M < kOuterMin)
// A format: the stored value type V and epilogue (finish) from outer.h, the x element type XE, how
// one mask byte's values expand to an 8-lane vector W, and the accumulator and its dot product
// with 8 elements of x. The int8-activation formats (W8A8, W4A8) follow further down.

struct FloatAcc {  // fp32 accumulators, FMA with 8 fp32 x
  using XE = float;
  using W = __m256;
  using Acc = __m256;
  static Acc zero() { return _mm256_setzero_ps(); }
  static Acc dot(Acc a, W w, const float* x) { return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), a); }
  static Acc add(Acc a, Acc b) { return _mm256_add_ps(a, b); }
};

struct FmtBF16 : FloatAcc, Outer<Fmt::BF16> {
  static W expand(unsigned row, const V* v) { return _mm256_castsi256_ps(shuffle16(v, kBF16Shuffle, row)); }
};

struct FmtF32 : FloatAcc, Outer<Fmt::F32> {
  static W expand(unsigned row, const V* v) {
    const __m256i idx = table_row(kF32Permute, row);
    const __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), idx);
    return _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_srai_epi32(idx, 31)), w);  // zero the −1 lanes
  }
};

struct FmtI8F : FloatAcc, Outer<Fmt::I8F> {  // W8A16 (W4A16 after unpacking): Σ x·code in fp32, then the scale
  static W expand(unsigned row, const V* v) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(shuffle8(v, kI8FShuffle, row), 24));
  }
};

// ----------------------------------------------------------------- the kernel

// Independent accumulator sets per row of x: the FMA latency (4 cycles) needs about 4
// dependency chains in flight; with T rows of x there are T chains per set already.
constexpr int sets_for(int T) { return T >= 4 ? 1 : (T >= 2 ? 2 : 4); }

// Weight rows [r0, r1) times the T rows of x starting at t0.
template <class F, int T>
void rows_block(const Problem& p, int64_t r0, int64_t r1, int64_t t0) {
  constexpr int S = sets_for(T);
  const int64_t kp = p.words * 64;
  const auto* x = static_cast<const typename F::XE*>(p.x) + t0 * kp;
  const auto* vals = static_cast<const typename F::V*>(p.values);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* mk = p.mask + r * p.words;
    const typename F::V* v = vals + p.offsets[r];
    typename F::Acc acc[S][T];
    for (int t = 0; t < T; ++t)
      for (int s = 0; s < S; ++s) acc[s][t] = F::zero();
    for (int64_t w = 0; w < p.words; ++w) {
      // Software prefetch of the value and mask streams (as in the AVX-512 kernels): the hardware
      // prefetcher alone leaves the two interleaved streams short of DRAM bandwidth.
      _mm_prefetch(reinterpret_cast<const char*>(v) + p.prefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mk + w) + p.prefetch / 4, _MM_HINT_T0);
      const uint64_t m = mk[w];
      if (m == 0) continue;  // 64 pruned columns: nothing stored, nothing to add
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const unsigned row = unsigned(j == 0 ? m << 5 : m >> (8 * j - 5)) & 0x1FE0;  // mask byte j · 32
        const typename F::W wv = F::expand(row, v);
        v += __builtin_popcount(row);
        const typename F::XE* xc = x + w * 64 + j * 8;
        for (int t = 0; t < T; ++t) acc[j % S][t] = F::dot(acc[j % S][t], wv, xc + t * kp);
      }
    }
    for (int t = 0; t < T; ++t) {
      typename F::Acc a = acc[0][t];
      for (int s = 1; s < S; ++s) a = F::add(a, acc[s][t]);
      p.y[(t0 + t) * p.N + r] = F::finish(hsum(a), p, t0 + t, r);
    }
  }
}

// Weight rows [r0, r1) in blocks small enough that a block's weights stay in L1/L2 while every group
// of up to kTokens rows of x passes over them (W is read from memory once, whatever M):
// block(rb, re, t0, std::integral_constant<int, T>) for rows [t0, t0 + T) of x.
template <class Block>
void token_blocks(const Problem& p, int64_t r0, int64_t r1, Block&& block) {
  constexpr int64_t kRows = 8;
  static_assert(kTokens == 8, "the switch below has one case per token count");
  for (int64_t rb = r0; rb < r1; rb += kRows) {
    const int64_t re = rb + kRows < r1 ? rb + kRows : r1;
    for (int64_t t0 = 0; t0 < p.M; t0 += kTokens) {
      switch (p.M - t0 < kTokens ? p.M - t0 : kTokens) {
        case 1: block(rb, re, t0, std::integral_constant<int, 1>{}); break;
        case 2: block(rb, re, t0, std::integral_constant<int, 2>{}); break;
        case 3: block(rb, re, t0, std::integral_constant<int, 3>{}); break;
        case 4: block(rb, re, t0, std::integral_constant<int, 4>{}); break;
        case 5: block(rb, re, t0, std::integral_constant<int, 5>{}); break;
        case 6: block(rb, re, t0, std::integral_constant<int, 6>{}); break;
        case 7: block(rb, re, t0, std::integral_constant<int, 7>{}); break;
        default: block(rb, re, t0, std::integral_constant<int, 8>{}); break;
      }
    }
  }
}

// ----------------------------------------------------------------- int4 with float x (W4A16)
// Each weight row's nibbles are first unpacked, 32 codes per 16 bytes, into a per-thread buffer of
// signed int8 codes (a word with an odd count keeps its padding nibble, skipped below); from there
// the W8A16 byte-wise expansion runs unchanged. Every group_words words the group's sum meets the
// group's scale in fp32 row totals.

// fn(integral_constant<int, J>) for each J, in order: an unrolled loop whose index is a constant.
template <int... J, class Fn>
inline void unroll(std::integer_sequence<int, J...>, Fn&& fn) {
  (fn(std::integral_constant<int, J>{}), ...);
}

template <int T>
void int4_block(const Problem& p, int64_t r0, int64_t r1, int64_t t0, int8_t* codes) {
  using F = FmtI8F;
  constexpr int S = sets_for(T);
  const int64_t kp = p.words * 64, gw = p.group_words, groups = p.words / gw;
  const auto* x = static_cast<const typename F::XE*>(p.x) + t0 * kp;
  const auto* bytes = static_cast<const uint8_t*>(p.values);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* mk = p.mask + r * p.words;
    unpack_row_int4(bytes + p.offsets[r], p.offsets[r + 1] - p.offsets[r], codes);
    const int8_t* v = codes;
    const float* sc = p.w_scale + r * groups;
    __m256 row[T];
    for (int t = 0; t < T; ++t) row[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      typename F::Acc acc[S][T];
      for (int t = 0; t < T; ++t)
        for (int s = 0; s < S; ++s) acc[s][t] = F::zero();
      for (int64_t w = g * gw; w < (g + 1) * gw; ++w) {
        const uint64_t m = mk[w];
        if (m == 0) continue;
        // The eight mask bytes, unrolled at compile time so that acc[j % S] stays in registers
        // (a loop here was left rolled by GCC and the accumulators went to the stack).
        const typename F::XE* xw = x + w * 64;
        unroll(std::make_integer_sequence<int, 8>{}, [&](auto j) {
          constexpr int J = decltype(j)::value;
          const unsigned sel = unsigned(J == 0 ? m << 5 : m >> (8 * J - 5)) & 0x1FE0;
          const typename F::W wv = F::expand(sel, v);
          v += __builtin_popcount(sel);
          for (int t = 0; t < T; ++t) acc[J % S][t] = F::dot(acc[J % S][t], wv, xw + J * 8 + t * kp);
        });
        v += __builtin_popcountll(m) & 1;  // the word's padding nibble
      }
      const __m256 scale = _mm256_set1_ps(sc[g]);
      for (int t = 0; t < T; ++t) {
        typename F::Acc a = acc[0][t];
        for (int s = 1; s < S; ++s) a = F::add(a, acc[s][t]);
        row[t] = _mm256_fmadd_ps(a, scale, row[t]);
      }
    }
    for (int t = 0; t < T; ++t) p.y[(t0 + t) * p.N + r] = p.bias ? hsum(row[t]) + p.bias[r] : hsum(row[t]);
  }
}

// ----------------------------------------------------------------- int8 x: W8A8, W4A8 (M < kOuterMin)

// The codes of 32 columns (mask bytes mb[0..3]) at their columns, zeros elsewhere: lane 0 holds
// mask bytes 0-1, whose codes start at v; lane 1 bytes 2-3, whose codes start after those. The
// bytes are read from memory one by one (no shifts to extract them from a word).
inline __m256i expand32(const uint8_t* mb, const int8_t* v) {
  const unsigned b0 = mb[0], b1 = mb[1], b2 = mb[2], b3 = mb[3];
  const unsigned c0 = __builtin_popcount(b0), c2 = __builtin_popcount(b2), c01 = c0 + __builtin_popcount(b1);
  __m128i lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kPairs.ctrl[0][b0]));
  lo = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lo), reinterpret_cast<const double*>(&kPairs.ctrl[c0][b1])));
  __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kPairs.ctrl[0][b2]));
  hi = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(hi), reinterpret_cast<const double*>(&kPairs.ctrl[c2][b3])));
  const __m256i ctrl = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  const __m256i src = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(v + c01), reinterpret_cast<const __m128i*>(v));
  return _mm256_shuffle_epi8(src, ctrl);
}

// Weight rows [r0, r1) times the T rows of x starting at t0; x row t is kp codes q (int8) followed
// by kp magnitudes |q| (uint8), see XKind::S8Abs. W8A8 (kInt4 false): one group per row, the exact
// Σ q·code meets both scales once. W4A8: each row is first unpacked into `codes` (as for W4A16) and
// each group's exact integer sum is scaled into fp32 row totals (converted exactly while below
// 2^24, i.e. for groups up to 2^24 / (8·128) = 16384 columns; a longer group is rounded once).
// Not inlined into token_blocks: alone, each instance keeps its pointers in registers (inlined, the
// batch-1 loop reloaded spilled ones every word).
template <int T, bool kInt4>
__attribute__((noinline)) void int8_block(const Problem& p, int64_t r0, int64_t r1, int64_t t0, int8_t* codes) {
  const int64_t kp = p.words * 64, gw = kInt4 ? p.group_words : p.words, groups = p.words / gw;
  const int64_t pf = p.prefetch, pf_mask = p.prefetch / 4;  // locals: kept in registers
  const int8_t* xq = static_cast<const int8_t*>(p.x) + t0 * 2 * kp;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* mk = p.mask + r * p.words;
    const int8_t* v;
    if constexpr (kInt4) {
      const auto* bytes = static_cast<const uint8_t*>(p.values);
      unpack_row_int4(bytes + p.offsets[r], p.offsets[r + 1] - p.offsets[r], codes);
      v = codes;
    } else {
      v = static_cast<const int8_t*>(p.values) + p.offsets[r];
    }
    __m256 row[T];
    __m256i acc[T];
    for (int t = 0; t < T; ++t) row[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
      for (int64_t w = g * gw; w < (g + 1) * gw; ++w) {
        if constexpr (!kInt4) {  // the unpacked int4 row is already in L1
          _mm_prefetch(reinterpret_cast<const char*>(v) + pf, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(mk + w) + pf_mask, _MM_HINT_T0);
        }
        const uint64_t m = mk[w];
        if (m == 0) continue;
        const auto* mb = reinterpret_cast<const uint8_t*>(mk + w);
        const bool full = m == ~uint64_t(0);  // a dense word (an INT8 lm_head is all of them): no expansion
        for (int h = 0; h < 2; ++h) {
          const __m256i wv = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)) : expand32(mb + 4 * h, v);
          v += __builtin_popcount(uint32_t(m >> (32 * h)));
          const int64_t col = w * 64 + h * 32;
          for (int t = 0; t < T; ++t) {
            const int8_t* xt = xq + t * 2 * kp + col;
            const __m256i sw = _mm256_sign_epi8(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt)));
            const __m256i pr = _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + kp)), sw);
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(pr, ones));
          }
        }
        if constexpr (kInt4) v += __builtin_popcountll(m) & 1;  // the word's padding nibble
      }
      if constexpr (kInt4) {
        const __m256 scale = _mm256_set1_ps(p.w_scale[r * groups + g]);
        for (int t = 0; t < T; ++t) row[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), scale, row[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      float y;
      if constexpr (kInt4) {
        y = hsum(row[t]) * p.x_scale[t0 + t];
        if (p.bias) y += p.bias[r];
      } else {
        y = Outer<Fmt::I8>::finish(float(hsum(acc[t])), p, t0 + t, r);
      }
      p.y[(t0 + t) * p.N + r] = y;
    }
  }
}

// ----------------------------------------------------------------- W8A8, W4A8 (M < kOuterMin): gather x
// With the gather index (Problem::columns, format.py) the stored codes are not expanded to their
// columns; instead x is gathered at the codes' columns, 32 codes per step. A word's 64 codes q of x
// are four 16-byte blocks, each broadcast to both 128-bit lanes; VPSHUFB looks each code's column
// (0..63) up in all four by its low 4 bits, and two VPBLENDVBs pick the block by bits 4 and 5 (moved
// to bit 7 by shifts). Lanes past the word's count p take the next word's codes: their weights are
// zeroed by a compare against p. Then the same exact int8 dot product as int8_block, with |q| from
// VPABSB. Per 64 columns at 70% sparsity (p ≈ 19, one step) ~28 instructions against ~56 for two
// expand32 steps; in exchange the index costs a byte per stored code (0.616 against 0.425 bytes per
// weight at 70%, more than dense INT8 at 50%: see ops.GATHER_MIN_SPARSITY).
//
// Each further row of x repeats the gather (~16 instructions per step and row, against ~12 for
// expand32's dot products, whose expansion all rows share), so the gain shrinks with M: measured at
// 11008x4096, 70%, against int8_block (benchmarks/kernel_ab.py, docs/results.md): W8A8 1.47-1.69x at
// M = 1, 1.21x at 2, 1.02-1.10x at 3-5, 1.34x at 7 (where expand32's 7 rows of codes and
// magnitudes no longer fit L1); W4A8 1.07-1.42x.
//
// W4A8 (kInt4) the same way: 32 codes are 16 bytes of nibbles, unpacked in registers (VPMOVZXBW puts
// byte i in 16-bit lane i; OR with itself shifted by 4 and a mask leave its low nibble in byte 2i and
// its high one in 2i + 1, the storage order) and offset by −8; each group's exact sum meets its scale.
template <int T, bool kInt4>
void gather_block(const Problem& p, int64_t r0, int64_t r1, int64_t t0) {
  const int64_t kp = p.words * 64, pf = p.prefetch, gw = kInt4 ? p.group_words : p.words, groups = p.words / gw;
  const int8_t* xq = static_cast<const int8_t*>(p.x) + t0 * 2 * kp;  // row t: kp codes q, then kp |q| (unused)
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i iota = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                        21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* ix = p.columns + (kInt4 ? 2 : 1) * p.offsets[r] + r * p.words;
    const int8_t* v = static_cast<const int8_t*>(p.values) + p.offsets[r];  // int4: bytes of nibbles
    __m256 row[T];   // int4: Σ over groups of scale · exact group sum, per lane
    __m256i acc[T];  // exact integer sums (int4: of the current group)
    __m256i alt = _mm256_setzero_si256();  // batch 1: a second dependency chain, swapped with acc[0]
    for (int t = 0; t < T; ++t) row[t] = _mm256_setzero_ps(), acc[t] = _mm256_setzero_si256();
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t w = g * gw; w < (g + 1) * gw; ++w) {
        _mm_prefetch(reinterpret_cast<const char*>(v) + pf, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ix) + pf, _MM_HINT_T0);
        int n = *ix++;
        if (n == 0) continue;
        const int pad = kInt4 ? n & 1 : 0;  // int4: the index, like the nibbles, pads an odd count
        do {  // reads ≤ 31 bytes past the row's index and codes: both streams are padded
          const __m256i col = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ix));
          const __m256i bit4 = _mm256_slli_epi16(col, 3), bit5 = _mm256_slli_epi16(col, 2);
          const int c = n < 32 ? n : 32;
          __m256i code;
          if constexpr (kInt4) {
            const __m256i e = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
            const __m256i nib = _mm256_and_si256(_mm256_or_si256(e, _mm256_slli_epi16(e, 4)), _mm256_set1_epi16(0x0F0F));
            code = _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
            v += (c + 1) >> 1;  // a word's odd count leaves a padding nibble; the next word starts on a byte
          } else {
            code = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
            v += c;
          }
          code = _mm256_and_si256(code, _mm256_cmpgt_epi8(_mm256_set1_epi8(char(c)), iota));
          for (int t = 0; t < T; ++t) {  // each row of x: its word's four blocks, the gather, the dot product
            const __m128i* xw = reinterpret_cast<const __m128i*>(xq + t * 2 * kp + w * 64);
            const __m256i x0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(xw));
            const __m256i x1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(xw + 1));
            const __m256i x2 = _mm256_broadcastsi128_si256(_mm_loadu_si128(xw + 2));
            const __m256i x3 = _mm256_broadcastsi128_si256(_mm_loadu_si128(xw + 3));
            const __m256i q01 = _mm256_blendv_epi8(_mm256_shuffle_epi8(x0, col), _mm256_shuffle_epi8(x1, col), bit4);
            const __m256i q23 = _mm256_blendv_epi8(_mm256_shuffle_epi8(x2, col), _mm256_shuffle_epi8(x3, col), bit4);
            const __m256i q = _mm256_blendv_epi8(q01, q23, bit5);
            const __m256i pr = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(code, q));
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(pr, ones));
          }
          if constexpr (T == 1) std::swap(acc[0], alt);
          ix += c;
          n -= c;
        } while (n > 0);
        ix += pad;
      }
      if constexpr (kInt4) {  // the group's exact sums (below 2^24: exact in fp32) meet its scale
        const __m256 scale = _mm256_set1_ps(p.w_scale[r * groups + g]);
        acc[0] = _mm256_add_epi32(acc[0], alt);
        alt = _mm256_setzero_si256();
        for (int t = 0; t < T; ++t) {
          row[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), scale, row[t]);
          acc[t] = _mm256_setzero_si256();
        }
      }
    }
    acc[0] = _mm256_add_epi32(acc[0], alt);
    for (int t = 0; t < T; ++t) {
      if constexpr (kInt4) {
        const float y = hsum(row[t]) * p.x_scale[t0 + t];
        p.y[(t0 + t) * p.N + r] = p.bias ? y + p.bias[r] : y;
      } else {
        p.y[(t0 + t) * p.N + r] = Outer<Fmt::I8>::finish(float(hsum(acc[t])), p, t0 + t, r);
      }
    }
  }
}

template <bool kInt4>
void gather_rows(const Problem& p, int64_t r0, int64_t r1) {
  token_blocks(p, r0, r1, [&](int64_t rb, int64_t re, int64_t t0, auto T) {
    gather_block<decltype(T)::value, kInt4>(p, rb, re, t0);
  });
}

// Rows of int4 nibbles, unpacked one row at a time into a per-thread buffer: with int8 x (kIntX:
// W4A8, int8_block) or float x (W4A16, int4_block).
template <bool kIntX>
void int4_rows(const Problem& p, int64_t r0, int64_t r1) {
  // Unpacked codes of one row: ≤ in_features + one padding nibble per word, + 64 bytes of over-read.
  int8_t* codes = static_cast<int8_t*>(std::aligned_alloc(64, (p.words * 65 + 127) / 64 * 64 + 64));
  token_blocks(p, r0, r1, [&](int64_t rb, int64_t re, int64_t t0, auto T) {
    if constexpr (kIntX) int8_block<decltype(T)::value, true>(p, rb, re, t0, codes);
    else int4_block<decltype(T)::value>(p, rb, re, t0, codes);
  });
  std::free(codes);
}

void int8_rows(const Problem& p, int64_t r0, int64_t r1) {
  token_blocks(p, r0, r1, [&](int64_t rb, int64_t re, int64_t t0, auto T) {
    int8_block<decltype(T)::value, false>(p, rb, re, t0, nullptr);
  });
}

template <class F>
void rows(const Problem& p, int64_t r0, int64_t r1) {
  token_blocks(p, r0, r1, [&](int64_t rb, int64_t re, int64_t t0, auto T) {
    rows_block<F, decltype(T)::value>(p, rb, re, t0);
  });
}

}  // namespace

void run(Fmt fmt, const Problem& p) {
  if (p.outer) return run_outer(fmt, p);
#pragma omp parallel num_threads(p.nthreads)
  {
    const int nth = omp_get_num_threads();
    for (int part = omp_get_thread_num(); part < p.nthreads; part += nth) {
      const int64_t r0 = p.bounds[part], r1 = p.bounds[part + 1];
      switch (fmt) {
        case Fmt::BF16: rows<FmtBF16>(p, r0, r1); break;
        case Fmt::F32: rows<FmtF32>(p, r0, r1); break;
        case Fmt::I8: p.columns ? gather_rows<false>(p, r0, r1) : int8_rows(p, r0, r1); break;
        case Fmt::I8F: rows<FmtI8F>(p, r0, r1); break;
        case Fmt::I4: p.columns ? gather_rows<true>(p, r0, r1) : int4_rows<true>(p, r0, r1); break;
        case Fmt::I4F: int4_rows<false>(p, r0, r1); break;
      }
    }
  }
}

// Dynamic per-token int8 quantization, the contract of avx512::quantize_u8 (and of the scalar loop in
// sparse_gemv.cpp, whose results it reproduces bit for bit: the same fp32 division, clamp and
// round-half-to-even). Vectorized because it runs once per W8A8/W4A8 linear per decoded token: the
// scalar loop's libm nearbyint took ~27 us per 4096 columns, ~6 ms per token over a 7B model's 224
// linears. Rows with inf or nan get a nan scale and keep the caller's code 0 (128).
bool quantize_u8(const float* x, int64_t M, int64_t K, int64_t kp, uint8_t* q, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(__builtin_inff());
  const int64_t K8 = K / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or nan
      amax = _mm256_max_ps(amax, a);
    }
    float top = hsum_max(amax);
    bool finite = _mm256_movemask_ps(bad) == 0;
    for (int64_t k = K8; k < K; ++k) {
      finite &= std::isfinite(row[k]);
      top = std::fmax(top, std::fabs(row[k]));
    }
    if (!finite) {
      scale[m] = __builtin_nanf("");
      continue;
    }
    float s = top / 127.5f;
    if (!(s > 0.f)) s = 1.f;
    scale[m] = s;
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
    const __m128i bias = _mm_set1_epi8(char(128));
    uint8_t* out = q + m * kp;
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 t = _mm256_div_ps(_mm256_loadu_ps(row + k), vs);
      t = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(t, lo), hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i c = _mm256_cvtps_epi32(t);  // −128..127: the saturating packs keep every value
      const __m256i h = _mm256_packs_epi32(c, c);
      const __m256i w = _mm256_packs_epi16(h, h);  // 128-bit lane j starts with codes 4j..4j+3
      const __m128i b = _mm_unpacklo_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_xor_si128(b, bias));  // q + 128
    }
    for (int64_t k = K8; k < K; ++k) {
      const float v = std::fmin(std::fmax(row[k] / s, -128.f), 127.f);
      out[k] = uint8_t(int(std::nearbyint(v)) + 128);
    }
  }
  return true;
}

constexpr int kLanes = 8;  // floats per vector, for attention.h
#include "attention.h"

}  // namespace avx2
}  // namespace sparsellama
#pragma GCC pop_options

#else  // not x86-64: never dispatched (best_isa() is 0), but the symbol must exist.
namespace sparsellama {
namespace avx2 {
void run(Fmt, const Problem&) {}
void decode_attention(const AttentionProblem&) {}
bool quantize_u8(const float*, int64_t, int64_t, int64_t, uint8_t*, float*) { return false; }
}  // namespace avx2
}  // namespace sparsellama
#endif

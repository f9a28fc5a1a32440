// Shared declarations of the sparse GEMM kernels: y[M, N] = x[M, K] · W[N, K]ᵀ with W stored as
// per-row bitmask + packed nonzero values (see sparsify/inference/kernels/format.py for the layout).
//
// The ISA-specific translation units (generic, AVX2, AVX-512) see only this header and raw
// pointers: no torch headers, so nothing compiled there for a wider ISA can be merged by the
// linker into code that runs on a narrower CPU (inline functions of shared headers are ODR-merged).
#pragma once

#include <cstdint>

namespace sparsellama {

// How the weight's nonzero values are stored.
enum class Fmt : int {
  BF16 = 0,  // bf16 values, float activations
  F32 = 1,   // fp32 values, float activations
  I8 = 2,    // int8 codes + fp32 scale per output row, int8 activations (W8A8, VNNI)
  I8F = 3,   // int8 codes + fp32 scale per output row, float activations (W8A16: dequantize in registers)
  I4 = 4,    // int4 codes (nibble = code + 8) + fp32 scale per row and group, int8 activations (W4A8)
  I4F = 5,   // int4 codes + fp32 scale per row and group, float activations (W4A16)
};

constexpr bool is_int4(Fmt f) { return f == Fmt::I4 || f == Fmt::I4F; }

// Rows of W handed to the inner loops at once by the batched (M > kDirectMax) kernels: kRowBlock by
// the float ones, kPanelRows (one per 32-bit lane of a 512-bit vector) by AVX-512 W8A8.
constexpr int kRowBlock = 4;
constexpr int kPanelRows = 16;
// Up to this many rows of x, the AVX-512 kernels expand W in registers and use it for every row
// of x at once (no scratch): bandwidth-bound decode and tiny batches.
constexpr int kDirectMax = 4;
// From this many rows of x on, the AVX2 kernels multiply by outer products (outer.h), one FMA
// per stored weight, instead of expanding W 8 columns at a time for every 8 rows of x (which
// does a dense matmul's arithmetic). Measured at 11008x4096, 70%, on Zen 4 with the AVX2 path:
// the outer kernel costs ~8 ms whatever M (its per-weight loop, not the FMAs, bounds it), the
// expanding one ~1.06 ms per row of x (bf16: 5.2 ms at M = 5, 8.5 at 8, 16.8 at 16). The int8-x
// kernels (32 columns per expansion) hold out longer but still lose at 8 rows, whose codes and
// magnitudes (8 · 2 · K bytes) no longer fit L1: W8A8 5.6 ms expanding against 8.1 outer at M = 6,
// 10.3 against 7.6 at M = 8 (2026-12-01, Zen 4, AVX2 path).
// On AVX-512 the expanding kernels win at every M up to 16 (VPEXPAND does 16-64 columns at once),
// except W4A16's (avx512::outer).
constexpr int kOuterMin = 8;

// One call, described with raw pointers. All x rows are zero-padded to 64 * words columns, so
// vector loads never read past a row; pruned positions expand to exact zeros.
struct Problem {
  int64_t M;      // rows of x as the kernel sees them
  int64_t N;      // output features (rows of W)
  int64_t words;  // 64-bit mask words per row of W
  const uint64_t* mask;     // [N, words], bit j of word w = column 64w + j is stored
  const int64_t* offsets;   // [N + 1] start of each row in `values`
  const void* values;       // packed nonzeros (padded at the end for 64-byte over-reads)
  const void* x;            // [M, 64 * words]: uint16 (bf16 bits), float, uint8 (int8 code + 128), int32 (code),
                            // int8 (code); or [M, 2 · 64 · words]: int8 codes then uint8 |code| (XKind::S8Abs)
  const float* x_scale;     // [M] per-token activation scale (Fmt::I8 only)
  const float* w_scale;     // [N] per-row weight scale (Fmt::I8 / I8F); [N, words / group_words] (Fmt::I4 / I4F)
  const int32_t* row_sum;   // [N] sum of each row's int8 codes (Fmt::I8 with uint8 x: undoes the +128)
  const float* bias;        // [N] or nullptr
  float* y;                 // [M, N]
  const int64_t* bounds;    // [nthreads + 1] the row range of each thread
  int nthreads;
  int64_t prefetch;         // software prefetch distance (bytes) of the value stream (AVX-512 M <= 4)
  bool outer;               // take the outer-product kernel (outer.h, AVX2); set by the binding from avx2::outer
  int64_t group_words;      // int4: mask words per scale group (words: one group per row)
  // [M, groups, 16] 8·Σ q over the columns that meet 32-bit lane i of a 64-byte vector (bytes 4i..4i+3
  // of every word) in each group (Fmt::I4 on AVX-512, int8 x)
  const int32_t* x_lane_sum;
  // W8A8 / W4A8 gather index (format.py: per row and mask word, a count then the in-word column of
  // each stored code, int4 padded to an even count; row r at offsets[r] + r · words, int4
  // 2 · offsets[r] + r · words), or nullptr. Read by the AVX2 kernels below kOuterMin rows of x.
  const uint8_t* columns;
};

// Decode attention (attention.h): one token's queries against a KV cache of `length` positions.
struct AttentionProblem {
  int64_t heads, kv_heads, head_dim, length;
  const float* q;       // [heads, head_dim]; query head i reads kv head i / (heads / kv_heads)
  const void* k;        // [kv_heads, ·, head_dim] bf16 bits or fp32; kv head h starts at h · head_stride
  const void* v;        // same layout as k
  int64_t head_stride;  // elements between kv heads (the cache's capacity · head_dim)
  bool bf16;            // k and v hold bf16 (else fp32)
  float scale;          // applied to q · k before the softmax
  float* out;           // [heads, head_dim]
  int nthreads;
};

// int4: each 64-column mask word with p set bits owns ceil(p / 2) bytes of nibbles.
inline int64_t int4_bytes(uint64_t m) { return (__builtin_popcountll(m) + 1) >> 1; }

namespace generic {
void run(Fmt fmt, const Problem& p);
void decode_attention(const AttentionProblem& a);
}  // namespace generic
namespace avx2 {
void run(Fmt fmt, const Problem& p);
void decode_attention(const AttentionProblem& a);
// Whether a call with M rows of x takes the outer-product kernel (x as fp32, or int32 codes for W8A8).
constexpr bool outer(int64_t M) { return M >= kOuterMin; }
// The activation encoder, vectorized (same contract and results as avx512::quantize_u8).
bool quantize_u8(const float* x, int64_t M, int64_t K, int64_t kp, uint8_t* q, float* scale);
}  // namespace avx2
namespace avx512 {
void run(Fmt fmt, const Problem& p);
void decode_attention(const AttentionProblem& a);
// Vectorized activation encoders (same results as the scalar ones in sparse_gemv.cpp).
// Whether a call with M rows of x in format f takes the outer-product kernel (outer.h): only W4A16,
// whose expanding kernel unpacks and expands every word again for each kDirectMax rows of x, from
// three such passes on. Measured on Zen 4, 11008x4096, 70%, in three runs (benchmarks/kernel_ab.py,
// docs/results.md), outer against expanding: 0.73x at M = 8, 0.96-1.03x at 9, 1.13x at 10,
// 1.05-1.22x at 12, 1.25x at 13, 1.38-1.49x at 16, 1.54x at 32. The other formats expand each row
// once for every M (or use W8A8's panels) and stay ahead: outer 0.20-0.34x (W8A8), 0.30-0.69x
// (W4A8), 0.43-0.89x (bf16), 0.62-1.12x (W8A16) at M = 5-16.
constexpr bool outer(Fmt f, int64_t M) { return f == Fmt::I4F && M >= 3 * kDirectMax; }
void encode_bf16(const float* x, int64_t M, int64_t K, int64_t kp, uint16_t* out, bool split);
bool quantize_u8(const float* x, int64_t M, int64_t K, int64_t kp, uint8_t* q, float* scale);
}  // namespace avx512

// Which x encoding each (ISA, format) pair expects, decided in one place (sparse_gemv.cpp).
// S8Abs (AVX2 W8A8 and W4A8): each row of x is its int8 codes q followed by their magnitudes |q|
// as uint8 (VPSIGNB takes the sign from q, VPMADDUBSW multiplies by |q|).
enum class XKind : int { F32 = 0, BF16 = 1, U8 = 2, I32 = 3, S8 = 4, S8Abs = 5 };

}  // namespace sparsellama

// Decode attention: one new token's queries against a sequence's KV cache, per kv head.
//
// Why a kernel of our own: at decode the query is one token, so attention reads each cached key
// and value once and does ~2 flops per byte — memory-bound, like the sparse GEMVs. torch's CPU
// SDPA (flash, q_len = 1) reads a bf16 cache at 1-3 GB/s on these machines (Zen 4, AVX-512 and
// AVX2 dispatch alike; docs/results.md), so at a 2k context attention cost more per token than the
// 70% INT8 decoder Linears. Here each cached row is read once, for every query head of its group
// (grouped-query attention shares the row, no copy), in three passes per kv head:
//   scores s[g][j] = scale · q_g · k_j    (kKeyBlock keys at a time: independent dot-product chains)
//   p[g][j] = exp(s − max_j s) / Σ_j exp  (fp32, a vectorizable exp)
//   out_g = Σ_j p[g][j] · v_j             (summed in out, kKeyBlock value rows per update)
// bf16 rows are widened exactly (bf16 is the top half of an fp32); everything accumulates in fp32.
// One source serves every ISA: loops written for the auto-vectorizer, and GCC vector types of kLanes
// floats for the dot products. This header is included inside namespaces generic, avx2 and avx512,
// each compiled for its ISA with its own kLanes (4, 8, 16).
//
// Not a standalone header: include it inside a namespace after "kernels.h", <omp.h>, <cstdlib>,
// <cstring>, and a `constexpr int kLanes`.

namespace {

constexpr int kKeyBlock = 4;  // keys per step of both passes (written out as 0 .. 3 below)

// Software prefetch of the cache rows kPrefetchBytes past `p`: a block's worth of lines (`bytes`), so
// the stream runs ahead by a constant distance. Measured 1.11-1.21x at 2k positions (Zen 4, AVX2 and
// AVX-512 paths, 32/32 and 32/8 heads); one or two lines per block measured slower than none.
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_ahead(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// e^x for x ≤ 0 (a score minus the row's max): 2^n · e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2,
// e^r by its degree-6 Taylor polynomial (truncation < 1.2e-7 relative). Branch-free, so the softmax
// loop vectorizes (libm's scalar expf took 3-18% of the kernel's time). x below -87 is taken as
// -87 (e^-87 ≈ 1.6e-38, still a normal float; against the max's e^0 = 1 it is nothing). nan stays nan
// (a non-finite score makes its head's output nan, as with SDPA, never a made-up number).
inline float exp_nonpositive(float x_in) {
  const bool nan = x_in != x_in;
  const float x = nan ? 0.f : (x_in < -87.f ? -87.f : x_in);
  const int32_t n = int32_t(x * 1.44269504f - 0.5f);  // x ≤ 0: truncation toward 0 rounds to nearest
  const float r = (x - float(n) * 0.693145752f) - float(n) * 1.42860677e-6f;  // ln 2 split hi + lo
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const int32_t bits = (n + 127) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return nan ? x_in : p * two_n;
}

// Row `src` (D elements) as fp32: the row itself for an fp32 cache, widened into `buf` for bf16.
inline const float* attention_row(const float* src, float*, int64_t) { return src; }
inline const float* attention_row(const uint16_t* src, float* buf, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const uint32_t u = uint32_t(src[d]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    buf[d] = f;
  }
  return buf;
}

// Four dot products q · k_b over D, in vectors of kLanes floats (the includer's ISA: 4 SSE2, 8 AVX2,
// 16 AVX-512), then one transposing reduction: the four sums come out of vector adds of lane
// shuffles, not of a scalar chain per sum (GCC's `omp simd` reduction epilogue was 15 dependent
// scalar adds per sum on AVX-512).
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
typedef int32_t LaneIdx __attribute__((vector_size(4 * kLanes)));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Shuffle mask of fold<kStep> over (a, b) as one vector of 2·kLanes: result lanes come in groups of
// 2·kStep, the first kStep from a, the next kStep from b; lane k of a group takes the first (odd = 0)
// or second (odd = 1) of two source lanes kStep apart, which fold adds.
template <int kStep>
constexpr LaneIdx pair_mask(int odd) {
  LaneIdx m = {};
  for (int i = 0; i < kLanes; ++i) {
    const int group = i / (2 * kStep), k = i % (2 * kStep);  // within a group: kStep from a, then kStep from b
    m[i] = (k < kStep ? 0 : kLanes) + group * 2 * kStep + odd * kStep + k % kStep;
  }
  return m;
}

// Pairwise sums of lanes kStep apart, a's and b's interleaved in groups of kStep lanes.
template <int kStep>
inline Lanes fold(Lanes a, Lanes b) {
  return __builtin_shuffle(a, b, pair_mask<kStep>(0)) + __builtin_shuffle(a, b, pair_mask<kStep>(1));
}

inline void dot4(const float* q, const float* const* k, int64_t D, float out[4]) {
  Lanes a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const Lanes qv = load_lanes(q + d);
    a0 += qv * load_lanes(k[0] + d);
    a1 += qv * load_lanes(k[1] + d);
    a2 += qv * load_lanes(k[2] + d);
    a3 += qv * load_lanes(k[3] + d);
  }
  // After the two folds lane i holds key (i mod 4)'s sum over lane group ⌊i/4⌋; the groups add up.
  const Lanes f = fold<2>(fold<1>(a0, a1), fold<1>(a2, a3));
  for (int b = 0; b < 4; ++b) {
    float t = 0.f;
    for (int i = b; i < kLanes; i += 4) t += f[i];
    for (int64_t e = d; e < D; ++e) t += q[e] * k[b][e];  // head_dim off the vector width
    out[b] = t;
  }
}

// Kv head h: the G = heads / kv_heads query heads h·G .. h·G + G − 1. Scratch: s (G · L floats),
// rows (kKeyBlock · D).
template <class E>
void attend_kv_head(const AttentionProblem& a, int64_t h, float* s, float* rows) {
  const int64_t D = a.head_dim, L = a.length, G = a.heads / a.kv_heads;
  const E* K = static_cast<const E*>(a.k) + h * a.head_stride;
  const E* V = static_cast<const E*>(a.v) + h * a.head_stride;
  const float* q = a.q + h * G * D;
  for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
    const float* kr[kKeyBlock];
    for (int b = 0; b < kKeyBlock; ++b) {  // past the end: repeat the last key, its scores unused
      const int64_t j = j0 + b < L ? j0 + b : L - 1;
      kr[b] = attention_row(K + j * D, rows + b * D, D);
    }
    prefetch_ahead(K + j0 * D, kKeyBlock * D * int64_t(sizeof(E)));
    for (int64_t g = 0; g < G; ++g) {
      float dots[kKeyBlock];
      dot4(q + g * D, kr, D, dots);
      for (int b = 0; b < kKeyBlock && j0 + b < L; ++b) s[g * L + j0 + b] = dots[b] * a.scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * L;
    float m = sg[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 1; j < L; ++j) m = sg[j] > m ? sg[j] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < L; ++j) {
      sg[j] = exp_nonpositive(sg[j] - m);
      sum += sg[j];
    }
    const float inv = 1.f / sum;  // normalized here, so the value pass sums straight into out
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) sg[j] *= inv;
  }
  // kKeyBlock value rows per update of the accumulators: one load and store of acc per block, not
  // per key (per key, the store-to-load chain through acc measured ~40% of the kernel's time).
  float* acc = a.out + h * G * D;  // the group's G output rows
  std::memset(acc, 0, sizeof(float) * G * D);
  for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
    const float* vr[kKeyBlock];
    for (int b = 0; b < kKeyBlock; ++b) {
      const int64_t j = j0 + b < L ? j0 + b : L - 1;
      vr[b] = attention_row(V + j * D, rows + b * D, D);
    }
    prefetch_ahead(V + j0 * D, kKeyBlock * D * int64_t(sizeof(E)));
    for (int64_t g = 0; g < G; ++g) {
      float p[kKeyBlock];
      for (int b = 0; b < kKeyBlock; ++b) p[b] = j0 + b < L ? s[g * L + j0 + b] : 0.f;
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p[0] * vr[0][d] + p[1] * vr[1][d] + p[2] * vr[2][d] + p[3] * vr[3][d];
    }
  }
}

}  // namespace

// Kv heads are split among the threads; each has its own scratch.
void decode_attention(const AttentionProblem& a) {
  const int64_t G = a.heads / a.kv_heads;
#pragma omp parallel num_threads(a.nthreads)
  {
    float* scratch = static_cast<float*>(std::malloc(sizeof(float) * (G * a.length + kKeyBlock * a.head_dim)));
    float* rows = scratch + G * a.length;
#pragma omp for schedule(static)
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      if (a.bf16) attend_kv_head<uint16_t>(a, h, scratch, rows);
      else attend_kv_head<float>(a, h, scratch, rows);
    }
    std::free(scratch);
  }
}

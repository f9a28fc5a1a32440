// Decode attention: one new token's queries against a sequence's KV cache, per kv head.
//
// Why a kernel of our own: at decode the query is one token, so attention reads each cached key
// and value once and does ~2 flops per byte — memory-bound, like the sparse GEMVs. torch's CPU
// SDPA (flash, q_len = 1) reads a bf16 cache at 1-3 GB/s on these machines (Zen 4, AVX-512 and
// AVX2 dispatch alike; docs/results.md), so at a 2k context attention cost more per token than the
// 70% INT8 decoder Linears. Here each cached row is read once, for every query head of its group
// (grouped-query attention shares the row, no copy), in three passes per kv head:
//   scores s[g][j] = scale · q_g · k_j    (kKeyBlock keys at a time: independent dot-product chains)
//   p[g][j] = exp(s − max_j s), Σ_j p     (fp32, libm's exp: the pass is a small part of the time)
//   out_g = Σ_j p[g][j] · v_j / Σ_j p     (fp32 accumulators, kKeyBlock value rows per update)
// bf16 rows are widened exactly (bf16 is the top half of an fp32); everything accumulates in fp32.
// The loops are plain C++ written for the auto-vectorizer, so one source serves every ISA: this
// header is included inside namespaces generic, avx2 and avx512, each compiled for its ISA.
//
// Not a standalone header: include it inside a namespace after "kernels.h", <omp.h>, <cmath>,
// <cstdlib>, <cstring>.

namespace {

constexpr int kKeyBlock = 4;  // keys per step of both passes (written out as 0 .. 3 below)

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

// Kv head h: the G = heads / kv_heads query heads h·G .. h·G + G − 1. Scratch: s (G · L floats),
// rows (kKeyBlock · D), acc (G · D).
template <class E>
void attend_kv_head(const AttentionProblem& a, int64_t h, float* s, float* rows, float* acc) {
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
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t d = 0; d < D; ++d) {
        d0 += qg[d] * kr[0][d];
        d1 += qg[d] * kr[1][d];
        d2 += qg[d] * kr[2][d];
        d3 += qg[d] * kr[3][d];
      }
      const float dots[kKeyBlock] = {d0, d1, d2, d3};
      for (int b = 0; b < kKeyBlock && j0 + b < L; ++b) s[g * L + j0 + b] = dots[b] * a.scale;
    }
  }
  float inv[64];  // 1 / Σ p per query head of the group (G ≤ 64, checked by the binding)
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * L;
    float m = sg[0];
    for (int64_t j = 1; j < L; ++j) m = sg[j] > m ? sg[j] : m;
    float sum = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      sg[j] = std::exp(sg[j] - m);
      sum += sg[j];
    }
    inv[g] = 1.f / sum;
  }
  // kKeyBlock value rows per update of the accumulators: one load and store of acc per block, not
  // per key (per key, the store-to-load chain through acc measured ~40% of the kernel's time).
  std::memset(acc, 0, sizeof(float) * G * D);
  for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
    const float* vr[kKeyBlock];
    for (int b = 0; b < kKeyBlock; ++b) {
      const int64_t j = j0 + b < L ? j0 + b : L - 1;
      vr[b] = attention_row(V + j * D, rows + b * D, D);
    }
    for (int64_t g = 0; g < G; ++g) {
      float p[kKeyBlock];
      for (int b = 0; b < kKeyBlock; ++b) p[b] = j0 + b < L ? s[g * L + j0 + b] : 0.f;
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p[0] * vr[0][d] + p[1] * vr[1][d] + p[2] * vr[2][d] + p[3] * vr[3][d];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* o = a.out + (h * G + g) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv[g];
  }
}

}  // namespace

// Kv heads are split among the threads; each has its own scratch.
void decode_attention(const AttentionProblem& a) {
  const int64_t G = a.heads / a.kv_heads;
#pragma omp parallel num_threads(a.nthreads)
  {
    float* scratch = static_cast<float*>(std::malloc(sizeof(float) * (G * a.length + (kKeyBlock + G) * a.head_dim)));
    float* rows = scratch + G * a.length;
#pragma omp for schedule(static)
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      if (a.bf16) attend_kv_head<uint16_t>(a, h, scratch, rows, rows + kKeyBlock * a.head_dim);
      else attend_kv_head<float>(a, h, scratch, rows, rows + kKeyBlock * a.head_dim);
    }
    std::free(scratch);
  }
}

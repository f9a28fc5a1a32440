// Portable sparse GEMM kernels: plain C++ loops the compiler vectorizes for the baseline ISA (any
// CPU); sparse_gemv.cpp includes this inside namespace `generic`.
//
// Each weight row is expanded into a zeroed dense scratch row by visiting its set mask bits
// (there is no portable register expand), then dotted with every row of x. x is fp32 for the float formats and
// uint8 (int8 code + 128) for W8A8, exactly as the AVX-512 path sees it, so every path computes
// the same integers for int8 and the same fp32 products for float formats.
//
// Not a standalone header: include it inside a namespace after "kernels.h", <omp.h>, <cstdlib>.

namespace {

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;  // bf16 is the top half of an fp32: exact
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Scratch element: float for the float formats and W8A16, int16 for W8A8 codes.
template <Fmt F>
using Dense = typename std::conditional<F == Fmt::I8, int16_t, float>::type;

template <Fmt F>
inline Dense<F> stored(const void* values, int64_t i) {
  if constexpr (F == Fmt::BF16) return bf16_bits_to_float(static_cast<const uint16_t*>(values)[i]);
  else if constexpr (F == Fmt::F32) return static_cast<const float*>(values)[i];
  else if constexpr (F == Fmt::I8) return static_cast<const int8_t*>(values)[i];
  else return float(static_cast<const int8_t*>(values)[i]);
}

template <Fmt F>
void rows(const Problem& p, int64_t r0, int64_t r1, Dense<F>* dense) {
  const int64_t kp = p.words * 64;
  for (int64_t r = r0; r < r1; ++r) {
    // Expand the row: zero it, then visit only the set bits (cost ∝ stored values, not columns).
    std::memset(dense, 0, kp * sizeof(Dense<F>));
    int64_t next = p.offsets[r];
    for (int64_t w = 0; w < p.words; ++w) {
      for (uint64_t m = p.mask[r * p.words + w]; m; m &= m - 1)
        dense[w * 64 + __builtin_ctzll(m)] = stored<F>(p.values, next++);
    }
    for (int64_t t = 0; t < p.M; ++t) {
      float y;
      if constexpr (F == Fmt::I8) {
        const uint8_t* xt = static_cast<const uint8_t*>(p.x) + t * kp;
        int32_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < kp; ++k) s += int32_t(xt[k]) * int32_t(dense[k]);
        y = float(s - 128 * p.row_sum[r]) * (p.x_scale[t] * p.w_scale[r]);
      } else {
        const float* xt = static_cast<const float*>(p.x) + t * kp;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < kp; ++k) s += xt[k] * dense[k];
        y = F == Fmt::I8F ? s * p.w_scale[r] : s;
      }
      p.y[t * p.N + r] = p.bias ? y + p.bias[r] : y;
    }
  }
}

// int4 (I4: x as int32 codes q; I4F: x as fp32): the row's codes are expanded into the dense
// scratch once, then each group's exact dot product is scaled by the group's scale and summed.
template <Fmt F>
void int4_rows(const Problem& p, int64_t r0, int64_t r1, float* dense) {
  const int64_t kp = p.words * 64, gk = p.group_words * 64, groups = p.words / p.group_words;
  const auto* bytes = static_cast<const uint8_t*>(p.values);
  for (int64_t r = r0; r < r1; ++r) {
    std::memset(dense, 0, kp * sizeof(float));
    const uint8_t* v = bytes + p.offsets[r];
    for (int64_t w = 0; w < p.words; ++w) {
      const uint64_t word = p.mask[r * p.words + w];
      int k = 0;
      for (uint64_t m = word; m; m &= m - 1, ++k)
        dense[w * 64 + __builtin_ctzll(m)] = float(int(v[k >> 1] >> (4 * (k & 1)) & 0xF) - 8);
      v += int4_bytes(word);
    }
    const float* sc = p.w_scale + r * groups;
    for (int64_t t = 0; t < p.M; ++t) {
      float y = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float* d = dense + g * gk;
        if constexpr (F == Fmt::I4) {  // codes ≤ 7 · 128 per term: an exact int32 sum per group
          const int32_t* xq = static_cast<const int32_t*>(p.x) + t * kp + g * gk;
          int32_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < gk; ++k) s += xq[k] * int32_t(d[k]);
          y += float(s) * sc[g];
        } else {
          const float* xf = static_cast<const float*>(p.x) + t * kp + g * gk;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < gk; ++k) s += xf[k] * d[k];
          y += s * sc[g];
        }
      }
      if constexpr (F == Fmt::I4) y *= p.x_scale[t];
      p.y[t * p.N + r] = p.bias ? y + p.bias[r] : y;
    }
  }
}

template <Fmt F>
void run_int4(const Problem& p) {
#pragma omp parallel num_threads(p.nthreads)
  {
    auto* dense = static_cast<float*>(std::malloc(p.words * 64 * sizeof(float)));
    const int nth = omp_get_num_threads();
    for (int part = omp_get_thread_num(); part < p.nthreads; part += nth)
      int4_rows<F>(p, p.bounds[part], p.bounds[part + 1], dense);
    std::free(dense);
  }
}

template <Fmt F>
void run_fmt(const Problem& p) {
  const int64_t kp = p.words * 64;
#pragma omp parallel num_threads(p.nthreads)
  {
    auto* dense = static_cast<Dense<F>*>(std::malloc(kp * sizeof(Dense<F>)));
    const int nth = omp_get_num_threads();
    for (int part = omp_get_thread_num(); part < p.nthreads; part += nth)
      rows<F>(p, p.bounds[part], p.bounds[part + 1], dense);
    std::free(dense);
  }
}

}  // namespace

void run(Fmt fmt, const Problem& p) {
  switch (fmt) {
    case Fmt::BF16: run_fmt<Fmt::BF16>(p); break;
    case Fmt::F32: run_fmt<Fmt::F32>(p); break;
    case Fmt::I8: run_fmt<Fmt::I8>(p); break;
    case Fmt::I8F: run_fmt<Fmt::I8F>(p); break;
    case Fmt::I4: run_int4<Fmt::I4>(p); break;
    case Fmt::I4F: run_int4<Fmt::I4F>(p); break;
  }
}

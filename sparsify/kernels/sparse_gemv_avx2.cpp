// The portable kernels of generic.h compiled for AVX2 + FMA (auto-vectorized, 8 fp32 lanes);
// dispatched only after a runtime check. No torch headers here (see kernels.h).
#include <omp.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
namespace sparsellama {
namespace avx2 {
#include "generic.h"
}  // namespace avx2
}  // namespace sparsellama
#pragma GCC pop_options
#else
namespace sparsellama {
namespace avx2 {
void run(Fmt, const Problem&) {}
}  // namespace avx2
}  // namespace sparsellama
#endif

// gauss-layer's CUDA kernels compiled as C++ and run on the CPU, one thread at a time.
//
// This is exact for kernels whose threads never communicate (no shared memory, no barriers,
// no warp intrinsics, no atomics): each (block, thread) pair runs to completion with
// blockIdx/threadIdx/blockDim/gridDim set as the GPU would set them. gauss-layer keeps its
// kernels in that style so the tests check their arithmetic and indexing on machines without
// a GPU, at any block size.
#include <cstddef>

namespace emulation {
struct Dim3 {
  unsigned x, y, z;
};
}  // namespace emulation

// thread_local: the test harness runs tests on several threads at once, and each launch must
// see only its own indices (a plain static let one test's launch move another's threadIdx).
static thread_local emulation::Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline

#include "tril_inverse.cu"
#include "adamw.cu"

template <typename Kernel>
static void launch(unsigned long long threads, unsigned block, Kernel kernel) {
  unsigned grid = (unsigned)((threads + block - 1) / block);
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    for (unsigned t = 0; t < block; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      kernel();
    }
  }
}

extern "C" void emulate_tril_inverse_f32(const float* lower, float* inverse, int neurons, int d,
                                         unsigned block) {
  launch((unsigned long long)neurons * d, block,
         [&] { tril_inverse_f32(lower, inverse, neurons, d); });
}

extern "C" void emulate_tril_inverse_f64(const double* lower, double* inverse, int neurons, int d,
                                         unsigned block) {
  launch((unsigned long long)neurons * d, block,
         [&] { tril_inverse_f64(lower, inverse, neurons, d); });
}

extern "C" void emulate_adamw_f32(float* theta, float* m, float* v, const float* grad, long long n,
                                  const float* scalars, unsigned block) {
  const float* s = scalars;
  launch((unsigned long long)n, block, [&] {
    adamw_f32(theta, m, v, grad, n, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]);
  });
}

extern "C" void emulate_adamw_f64(double* theta, double* m, double* v, const double* grad,
                                  long long n, const double* scalars, unsigned block) {
  const double* s = scalars;
  launch((unsigned long long)n, block, [&] {
    adamw_f64(theta, m, v, grad, n, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]);
  });
}

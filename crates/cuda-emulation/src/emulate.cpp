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

static emulation::Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline

#include "tril_inverse.cu"

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

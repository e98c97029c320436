// Inverse of a batch of lower-triangular matrices, M = L⁻¹ (row-major (Z, d, d) in and out;
// the strict upper triangle of L is ignored and that of M is written 0).
//
// One thread per (neuron z, column j) solves L m = e_j by forward substitution. Every thread
// of a warp runs the same (i, k) loop (rows above j give 0, exactly), so the reads of L are
// broadcasts and those of M are coalesced across the columns a warp holds. No shared memory
// and no barriers: the kernel also runs, unchanged, in the CPU emulation the tests use
// (crates/cuda-emulation).
//
// Launch: blocks of 128 threads over Z·d threads (see src/cuda/mod.rs).
#include "common.cuh"

template <typename T>
__device__ void tril_inverse_column(const T* __restrict__ lower, T* __restrict__ inverse,
                                    int d, int j) {
  for (int i = 0; i < d; ++i) {
    T value;
    if (i < j) {
      value = T(0);
    } else if (i == j) {
      value = T(1) / lower[i * d + i];
    } else {
      T acc = T(0);
      for (int k = 0; k < i; ++k) {
        acc += lower[i * d + k] * inverse[k * d + j];
      }
      value = -acc / lower[i * d + i];
    }
    inverse[i * d + j] = value;
  }
}

template <typename T>
__device__ void tril_inverse(const T* __restrict__ lower, T* __restrict__ inverse, int neurons,
                             int d) {
  long long thread = global_thread();
  if (thread >= (long long)neurons * d) {
    return;
  }
  long long neuron = thread / d;
  int column = (int)(thread % d);
  long long offset = neuron * d * d;
  tril_inverse_column(lower + offset, inverse + offset, d, column);
}

extern "C" __global__ void tril_inverse_f32(const float* __restrict__ lower,
                                            float* __restrict__ inverse, int neurons, int d) {
  tril_inverse<float>(lower, inverse, neurons, d);
}

extern "C" __global__ void tril_inverse_f64(const double* __restrict__ lower,
                                            double* __restrict__ inverse, int neurons, int d) {
  tril_inverse<double>(lower, inverse, neurons, d);
}

// Inverse of a batch of lower-triangular matrices, M = L⁻¹ (row-major (Z, d, d) in and out;
// the strict upper triangle of L is ignored and that of M is written 0).
//
// One thread per (neuron z, column j) solves L m = e_j by forward substitution over rows
// k ≥ j only (the rows above j are 0): half the multiply-adds of a loop from k = 0, the same
// bits. A warp's threads hold consecutive columns and run the same (i, k) steps, each idle
// until k reaches its column, so the reads of L are broadcasts and those of M are coalesced.
// Offsets within a block are 64-bit (i·d overflows int once d > 46340). No shared memory and
// no barriers: the kernel also runs, unchanged, in the CPU emulation the tests use
// (crates/cuda-emulation).
//
// Launch: blocks of 128 threads over Z·d threads (see src/cuda/mod.rs).
#include "common.cuh"

template <typename T>
__device__ void tril_inverse_column(const T* __restrict__ lower, T* __restrict__ inverse,
                                    int d, int j) {
  for (int i = 0; i < d; ++i) {
    const T* row = lower + (long long)i * d;
    T value;
    if (i < j) {
      value = T(0);
    } else if (i == j) {
      value = T(1) / row[i];
    } else {
      // Rows k < j of this column are 0: starting at k = j skips products that only add ±0
      // to the +0 start (finite results keep every bit) but would turn an ∞ in L[i, k < j],
      // which column j does not depend on, into NaN (faer's inverse on the CPU leaves it out).
      T acc = T(0);
      for (int k = j; k < i; ++k) {
        acc += row[k] * inverse[(long long)k * d + j];
      }
      value = -acc / row[i];
    }
    inverse[(long long)i * d + j] = value;
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

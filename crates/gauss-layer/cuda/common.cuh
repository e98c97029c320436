// Shared by the project's kernels.
//
// Arithmetic with exactly one rounding per operation and no contraction into fused
// multiply-adds, for kernels that must reproduce a chain of Candle tensor ops bit for bit
// (adamw.cu). nvcc contracts `a * b + c` by default; the _rn intrinsics never are. In the CPU
// emulation (crates/cuda-emulation, no __CUDACC__) the plain C++ operators do the same: its
// build passes -ffp-contract=off (GCC and Clang contract by default where the target has FMA,
// ISO mode or not), and x86-64 (SSE2) and aarch64 round each float operation to its type.
#pragma once

#ifdef __CUDACC__
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
#else
#include <cmath>
template <typename T>
inline T mul_rn(T a, T b) { return a * b; }
template <typename T>
inline T add_rn(T a, T b) { return a + b; }
template <typename T>
inline T div_rn(T a, T b) { return a / b; }
inline float sqrt_rn(float a) { return std::sqrt(a); }
inline double sqrt_rn(double a) { return std::sqrt(a); }
#endif

template <typename T>
__device__ __forceinline__ T sub_rn(T a, T b) {
  return add_rn(a, -b);
}

// The global index of this thread in a one-dimensional launch.
__device__ __forceinline__ long long global_thread() {
  return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

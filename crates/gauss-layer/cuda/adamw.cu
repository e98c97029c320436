// One AdamW step over a parameter, its gradient and its two moments, in place: what
// gauss_layer::FusedAdamW runs on CUDA instead of candle-nn's dozen tensor ops (each a kernel
// and a fresh buffer) per parameter.
//
// Per element, with the operation order and roundings of candle-nn 0.11's AdamW (each tensor
// op rounds once; `tensor * s` is affine(s, 0) and `tensor + s` is affine(1, s)), so the
// result equals candle-nn's bit for bit:
//   m ← β₁·m + (1 − β₁)·g        v ← β₂·v + (1 − β₂)·g²
//   θ ← θ·decay − lr · (m·scale_m) / (√(v·scale_v) + ε)
// One thread per element; launch: blocks of 256 over n threads.
#include "common.cuh"

template <typename T>
struct AdamScalars {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, scale_m, scale_v, decay, eps, lr;
};

template <typename T>
__device__ void adamw_step(T* __restrict__ theta, T* __restrict__ m, T* __restrict__ v,
                           const T* __restrict__ grad, long long n, AdamScalars<T> s) {
  long long i = global_thread();
  if (i >= n) {
    return;
  }
  const T zero = T(0);
  const T one = T(1);
  T g = grad[i];
  T next_m = add_rn(add_rn(mul_rn(m[i], s.beta1), zero), add_rn(mul_rn(g, s.one_minus_beta1), zero));
  T next_v = add_rn(add_rn(mul_rn(v[i], s.beta2), zero),
                    add_rn(mul_rn(mul_rn(g, g), s.one_minus_beta2), zero));
  T m_hat = add_rn(mul_rn(next_m, s.scale_m), zero);
  T v_hat = add_rn(mul_rn(next_v, s.scale_v), zero);
  T decayed = add_rn(mul_rn(theta[i], s.decay), zero);
  T adjusted = div_rn(m_hat, add_rn(mul_rn(sqrt_rn(v_hat), one), s.eps));
  theta[i] = sub_rn(decayed, add_rn(mul_rn(adjusted, s.lr), zero));
  m[i] = next_m;
  v[i] = next_v;
}

#define ADAMW_KERNEL(NAME, T)                                                                   \
  extern "C" __global__ void NAME(T* __restrict__ theta, T* __restrict__ m, T* __restrict__ v, \
                                  const T* __restrict__ grad, long long n, T beta1,             \
                                  T one_minus_beta1, T beta2, T one_minus_beta2, T scale_m,     \
                                  T scale_v, T decay, T eps, T lr) {                            \
    AdamScalars<T> s = {beta1, one_minus_beta1, beta2, one_minus_beta2, scale_m,                \
                        scale_v, decay, eps, lr};                                               \
    adamw_step<T>(theta, m, v, grad, n, s);                                                     \
  }

ADAMW_KERNEL(adamw_f32, float)
ADAMW_KERNEL(adamw_f64, double)

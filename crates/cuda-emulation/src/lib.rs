//! gauss-layer's CUDA kernel sources (`crates/gauss-layer/cuda/*.cu`) compiled as C++ and run
//! on the CPU one (block, thread) pair at a time, so the workspace tests check the kernels'
//! arithmetic and indexing on machines without a GPU (CI has none). Exact for kernels whose
//! threads never communicate, the style gauss-layer keeps its kernels in.
//!
//! Each function launches the kernel over the grid the launcher in `gauss_layer`'s `cuda`
//! module would use, for a given block size (the kernels must not depend on it).

use std::os::raw::c_int;

extern "C" {
    fn emulate_adamw_f32(
        theta: *mut f32,
        m: *mut f32,
        v: *mut f32,
        grad: *const f32,
        n: i64,
        scalars: *const f32,
        block: u32,
    );
    fn emulate_adamw_f64(
        theta: *mut f64,
        m: *mut f64,
        v: *mut f64,
        grad: *const f64,
        n: i64,
        scalars: *const f64,
        block: u32,
    );
    fn emulate_tril_inverse_f32(
        lower: *const f32,
        inverse: *mut f32,
        neurons: c_int,
        d: c_int,
        block: u32,
    );
    fn emulate_tril_inverse_f64(
        lower: *const f64,
        inverse: *mut f64,
        neurons: c_int,
        d: c_int,
        block: u32,
    );
}

/// A float type the kernels are instantiated for.
pub trait KernelFloat: Copy + Default {
    /// Runs `tril_inverse_<dtype>` (see `cuda/tril_inverse.cu`).
    ///
    /// # Safety
    /// `lower` and `inverse` hold `neurons · d · d` values; `block` > 0.
    unsafe fn tril_inverse(
        lower: &[Self],
        inverse: &mut [Self],
        neurons: c_int,
        d: c_int,
        block: u32,
    );
    /// Runs `adamw_<dtype>` (see `cuda/adamw.cu`).
    ///
    /// # Safety
    /// `theta`, `m`, `v` and `grad` hold the same number of values; `block` > 0.
    unsafe fn adamw(state: AdamState<'_, Self>, grad: &[Self], scalars: &[Self; 9], block: u32);
}

/// A parameter and its two moments, updated in place by [`adamw`].
pub struct AdamState<'a, T> {
    /// The parameter θ.
    pub theta: &'a mut [T],
    /// The first moment.
    pub m: &'a mut [T],
    /// The second moment.
    pub v: &'a mut [T],
}

impl KernelFloat for f32 {
    unsafe fn adamw(state: AdamState<'_, f32>, grad: &[f32], scalars: &[f32; 9], block: u32) {
        let n = grad.len() as i64;
        emulate_adamw_f32(
            state.theta.as_mut_ptr(),
            state.m.as_mut_ptr(),
            state.v.as_mut_ptr(),
            grad.as_ptr(),
            n,
            scalars.as_ptr(),
            block,
        )
    }
    unsafe fn tril_inverse(
        lower: &[f32],
        inverse: &mut [f32],
        neurons: c_int,
        d: c_int,
        block: u32,
    ) {
        emulate_tril_inverse_f32(lower.as_ptr(), inverse.as_mut_ptr(), neurons, d, block)
    }
}

impl KernelFloat for f64 {
    unsafe fn adamw(state: AdamState<'_, f64>, grad: &[f64], scalars: &[f64; 9], block: u32) {
        let n = grad.len() as i64;
        emulate_adamw_f64(
            state.theta.as_mut_ptr(),
            state.m.as_mut_ptr(),
            state.v.as_mut_ptr(),
            grad.as_ptr(),
            n,
            scalars.as_ptr(),
            block,
        )
    }
    unsafe fn tril_inverse(
        lower: &[f64],
        inverse: &mut [f64],
        neurons: c_int,
        d: c_int,
        block: u32,
    ) {
        emulate_tril_inverse_f64(lower.as_ptr(), inverse.as_mut_ptr(), neurons, d, block)
    }
}

/// `tril_inverse` kernel: `L⁻¹` of each row-major (d, d) block of `lower` (Z blocks).
///
/// # Panics
/// If `lower.len() != neurons · d · d`, a size exceeds `i32`, or `block` is 0 (test support:
/// a wrong call is a bug in the test).
pub fn tril_inverse<T: KernelFloat>(lower: &[T], neurons: usize, d: usize, block: u32) -> Vec<T> {
    assert_eq!(
        lower.len(),
        neurons * d * d,
        "lower must hold neurons·d·d values"
    );
    assert!(block > 0, "block size must be positive");
    let mut inverse = vec![T::default(); lower.len()];
    let neurons = c_int::try_from(neurons).expect("neurons fits i32");
    let d = c_int::try_from(d).expect("d fits i32");
    // SAFETY: sizes checked above.
    unsafe { T::tril_inverse(lower, &mut inverse, neurons, d, block) };
    inverse
}

/// `adamw` kernel: one AdamW step in place. `scalars` in the kernel's order: β₁, 1 − β₁, β₂,
/// 1 − β₂, scale_m, scale_v, decay, ε, lr (each rounded to `T`).
///
/// # Panics
/// If the slices differ in length or `block` is 0 (test support).
pub fn adamw<T: KernelFloat>(state: AdamState<'_, T>, grad: &[T], scalars: &[T; 9], block: u32) {
    let n = grad.len();
    assert!(
        state.theta.len() == n && state.m.len() == n && state.v.len() == n,
        "equal lengths"
    );
    assert!(block > 0, "block size must be positive");
    // SAFETY: lengths checked above.
    unsafe { T::adamw(state, grad, scalars, block) }
}

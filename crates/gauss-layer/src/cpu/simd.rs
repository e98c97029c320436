//! Vector width: the kernel macro that compiles a hot loop for AVX2 beside the baseline, the
//! float types the kernels run on, and the small loops written to vectorize.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::WithDType;

/// The vector width a [`simd_kernel!`] instance runs at.
// Only the x86-64 instances of `simd_kernel!` ask for the width (elsewhere there is one).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Width {
    /// The build's baseline (SSE2 for plain x86-64; every non-x86 target).
    Baseline = 0,
    /// AVX2: 8 f32 or 4 f64 per instruction.
    Avx2 = 1,
}

/// A narrower width than the CPU's for every kernel (`with_width`, the tests' switch), as
/// `Width as u8`. Process-wide: the kernels run on rayon's workers.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static WIDTH_LIMIT: AtomicU8 = AtomicU8::new(Width::Avx2 as u8);

/// The widest of the CPU's widths (checked at run time, cached by std), at most the limit.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn width() -> Width {
    #[cfg(target_arch = "x86_64")]
    let detected = if std::arch::is_x86_feature_detected!("avx2") {
        Width::Avx2
    } else {
        Width::Baseline
    };
    #[cfg(not(target_arch = "x86_64"))]
    let detected = Width::Baseline;
    let limit = match WIDTH_LIMIT.load(Ordering::Relaxed) {
        0 => Width::Baseline,
        _ => Width::Avx2,
    };
    detected.min(limit)
}

/// Runs `f` with every kernel limited to `limit` (a wider width than the CPU has is never
/// used), so tests can check that every width gives the same bits. Calls are serialized;
/// kernels of other tests running meanwhile are limited too, which changes none of their bits
/// (the property the width tests check).
#[cfg(test)]
pub(crate) fn with_width<R>(limit: Width, f: impl FnOnce() -> R) -> R {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    WIDTH_LIMIT.store(limit as u8, Ordering::Relaxed);
    let out = f();
    WIDTH_LIMIT.store(Width::Avx2 as u8, Ordering::Relaxed);
    out
}

/// Defines a kernel function whose body is compiled twice: for AVX2 (used when the CPU has it,
/// see [`width`]) and for the build's baseline target (x86-64 without flags means SSE2: 4
/// floats per instruction instead of 8). The arithmetic is the same in both (Rust never
/// contracts `a·b + c` into an FMA and no feature changes an operation's order), so the
/// results are bit-identical; only the vector width differs (tests run the kernels at both
/// widths and compare the bits). Use it for the hand-written inner loops; GEMMs already
/// dispatch at run time inside `gemm`. (An AVX-512 instance was tried on 2026-12-06 and made
/// no measurable difference to training: not kept.)
macro_rules! simd_kernel {
    (
        $(#[$meta:meta])*
        fn $name:ident<$t:ident: $bound:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        fn $name<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<$t: $bound>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                    body::<$t>($($arg),*)
                }
                if $crate::cpu::width() == $crate::cpu::Width::Avx2 {
                    // SAFETY: `width` reports AVX2 only where the CPU has it.
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            body::<$t>($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// The float types the fused kernels run on (the ones `gemm` supports and the layer uses).
pub(crate) trait Real: WithDType {
    /// `e^self`.
    fn exp(self) -> Self;
    /// `e^self` in arithmetic that vectorizes inside a [`simd_kernel!`]: f32 within 2 ulp of
    /// libm (`cpu::exp`), f64 libm's.
    fn exp_vectorizable(self) -> Self;
    /// `tanh(self)` in arithmetic that vectorizes inside a [`simd_kernel!`]: f32 within 4 ulp
    /// of libm (`cpu::exp`), f64 libm's.
    fn tanh_vectorizable(self) -> Self;
    /// `tanh(self)`.
    fn tanh(self) -> Self;
    /// Not NaN and not infinite.
    fn is_finite(self) -> bool;
}
impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn exp_vectorizable(self) -> Self {
        super::exp::exp_f32(self)
    }
    #[inline(always)]
    fn tanh_vectorizable(self) -> Self {
        super::exp::tanh_f32(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}
impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp_vectorizable(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn tanh_vectorizable(self) -> Self {
        f64::tanh(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// The same elementwise shift of every row: `out_row = row − shift`.
pub(crate) fn shift_rows<T: Real>(x: &[T], shift: &[T], out: &mut [T]) {
    let dim = shift.len().max(1);
    for (row_out, row_in) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        for ((o, &v), &m) in row_out.iter_mut().zip(row_in).zip(shift) {
            *o = v - m;
        }
    }
}

/// Sets row `b` of `m2` (B, Z) to NaN wherever input row `b` holds a NaN or infinite value,
/// so that every kernel gives the same documented result for such rows (the algorithms
/// would otherwise return NaN, 0 or ∞ depending on the form).
pub(crate) fn poison_non_finite_rows<T: Real>(m2: &mut [T], x: &[T], dim: usize, neurons: usize) {
    let nan = T::from_f64(f64::NAN);
    for (row, out) in x
        .chunks_exact(dim.max(1))
        .zip(m2.chunks_exact_mut(neurons.max(1)))
    {
        if !row.iter().all(|v| v.is_finite()) {
            out.fill(nan);
        }
    }
}

/// `Σ_j (a_j - b_j)²` with eight independent accumulators, so it vectorizes.
#[inline]
pub(crate) fn squared_distance<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let mut a_chunks = a.chunks_exact(8);
    let mut b_chunks = b.chunks_exact(8);
    for (ac, bc) in (&mut a_chunks).zip(&mut b_chunks) {
        for l in 0..8 {
            let diff = ac[l] - bc[l];
            lanes[l] += diff * diff;
        }
    }
    let mut total = T::zero();
    for (x, y) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        let diff = *x - *y;
        total += diff * diff;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// Mean of the rows of a row-major (rows, dim) matrix: the shift that centers the inputs
/// before projecting, so `F(x - c)` loses fewer digits when the centers sit far from 0.
pub(crate) fn row_mean<T: Real>(data: &[T], rows: usize, dim: usize) -> Vec<f64> {
    let mut mean = vec![0f64; dim];
    for row in data.chunks_exact(dim.max(1)).take(rows) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v.to_f64();
        }
    }
    let scale = 1.0 / rows.max(1) as f64;
    mean.iter_mut().for_each(|m| *m *= scale);
    mean
}

//! Shared plumbing of the fused CPU kernels, written once, one concern a file: the sizes of a
//! call, built where the public boundary checks `x` and passed inward, and the ops' guard
//! that Candle hands them what they were built for (`sizes`), typed views of Candle's CPU
//! storage and the f32/f64 dispatch of `cpu_fwd` and `bwd` (`storage`), vectorized `e^x` ops
//! (`exp`), parallel loops (`parallel`), a bounds-checked GEMM call and tile sizes (`gemm`),
//! and the AVX2 kernel macro with the small vectorizable loops (`simd`).

mod exp;
mod gemm;
mod parallel;
mod simd;
mod sizes;
mod storage;

pub(crate) use exp::{exp, sum_exp_negated};
pub(crate) use gemm::{matmul, neurons_per_block, MatRef, TILE_ROWS};
pub(crate) use parallel::{
    for_each_chunk_mut, for_each_chunk_pair_mut, for_each_chunk_pair_mut_sized,
    for_each_with_state, rows_per_chunk,
};
#[cfg(test)]
pub(crate) use simd::with_width;
pub(crate) use simd::{
    poison_non_finite_rows, row_mean, shift_rows, simd_kernel, squared_distance, Real,
};
// `width` and `Width` serve the x86-64 instances of `simd_kernel!` (and the tests) only.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use simd::{width, Width};
pub(crate) use sizes::{check_built_for, OperandShape, Sizes};
#[cfg(test)]
pub(crate) use storage::fused_storage_reads;
pub(crate) use storage::{
    dispatch_backward3, dispatch_float3, host_backward3, needs_input_gradient, row_major,
    with_row_major, Gradients3,
};

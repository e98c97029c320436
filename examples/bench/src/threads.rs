//! Pins the thread count once at start-up (see the README, "Performance").

/// Candle reads `RAYON_NUM_THREADS` on every CPU matmul and, when it is unset, counts the
/// cores from `/proc` and sysfs each time. Setting it once here (to Candle's own default when
/// the user has not chosen) makes that a cheap read, and the global rayon pool (the fused
/// kernels' and the optimizer's) gets the same count. Call first in `main`, before any other
/// thread exists (setting the environment is only sound then).
pub fn pin() {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // Fails only if the pool already exists, which then keeps its size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

//! Any bytes given to the checkpoint loader give `Ok` or `Err`: no panic, abort, hang or
//! allocation beyond the input's size (libFuzzer's -malloc_limit_mb / -rss_limit_mb catch
//! those). A network that loads with finite parameters also runs a forward pass.
#![no_main]

use candle_core::{DType, Device, Tensor};
use gauss_layer::checkpoint::{self, LoadOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let device = Device::Cpu;
    if let Ok(loaded) = checkpoint::load_from_bytes(data, "fuzz", &device, None) {
        let config = loaded.net.config();
        if config.in_features <= 4096 {
            if let Ok(x) = Tensor::zeros((2, config.in_features), loaded.stored_dtype, &device) {
                let _ = loaded.net.forward(&x, false);
            }
        }
    }
    let options = LoadOptions {
        dtype: Some(DType::F64),
        allow_non_finite: true,
    };
    let _ = checkpoint::load_from_bytes_with_options(data, "fuzz", &device, &options);
});

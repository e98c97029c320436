//! Any bytes given to the PyTorch FGN importer (as a safetensors state dict, read by
//! `import::state_dict_from_bytes`, the reader of `import::load_state_dict`) give `Ok` or `Err`, never a panic. The first
//! byte picks the import options, so every covariance type and flag is exercised.
#![no_main]

use candle_core::{DType, Device};
use gauss_layer::import::{self, FgnCovarType, FgnImportOptions, FgnNetLayout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    // The importer's own reader (pickle detection, dtype checks, conversion to f32).
    let Ok(state) =
        import::state_dict_from_bytes(bytes, "fuzz.safetensors", &Device::Cpu, DType::F32)
    else {
        return;
    };
    let covar_type = match selector % 5 {
        0 => None,
        1 => Some(FgnCovarType::Sphere),
        2 => Some(FgnCovarType::Diag),
        3 => Some(FgnCovarType::Full),
        _ => Some(FgnCovarType::Chol),
    };
    let options = FgnImportOptions {
        covar_type,
        non_lin: selector & 0x08 != 0,
        free_biases: selector & 0x10 == 0,
        gate: selector & 0x20 != 0,
        ..Default::default()
    };
    let _ = import::fgn_net_from_tensors(&state, &FgnNetLayout::default(), &options);
    let _ = import::fgn_layer_from_tensors(&state, "", &options);
    let _ = import::fgn_layer_from_tensors(&state, "fl", &options);
});

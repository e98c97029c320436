//! Any bytes given to the command lines' data-file reader (`gauss_layer::files::DataFile`:
//! `eval --data`, `predict --input`, `fit-gaussian --data`) give `Ok` or `Err`, never a
//! panic: the tensors `x`, `images` and `labels` are read as a matrix and as integers, then
//! scaled (the first byte picks the divisor) and converted to f32 and f64, where a value that
//! overflows must be an error.
#![no_main]

use candle_core::{DType, Device};
use gauss_layer::files::DataFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let Ok(file) = DataFile::parse(bytes, "fuzz.safetensors") else {
        return;
    };
    let _ = file.names();
    let divisor = [1.0, 255.0, 1e-300, 1e-40, 16.0, 1e300][selector as usize % 6];
    for name in ["x", "images", "labels"] {
        let _ = file.shape(name);
        let _ = file.is_float(name);
        let _ = file.integers(name);
        if let Ok(mut matrix) = file.matrix(name) {
            assert!(matrix.values.iter().all(|v| v.is_finite()));
            assert_eq!(matrix.values.len(), matrix.rows * matrix.cols);
            matrix.divide(divisor);
            for dtype in [DType::F32, DType::F64] {
                if let Ok(t) = matrix.to_tensor(dtype, &Device::Cpu) {
                    let values = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    let values = values.to_vec1::<f64>().unwrap();
                    assert!(
                        values.iter().all(|v| v.is_finite()),
                        "a non-finite value passed"
                    );
                }
            }
        }
    }
});

//! Data files of the command lines: a safetensors file holding samples, images or labels,
//! read on the host with every element checked (no memory map, no panic on any bytes).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{GaussError, Result};

/// A parsed safetensors data file; the bytes stay with the caller.
pub struct DataFile<'a> {
    origin: String,
    file: SafeTensors<'a>,
}

/// A numeric (N, D) tensor of a data file as f64 values on the host, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMatrix {
    /// Where it came from (`file: tensor `name``), for errors.
    pub origin: String,
    /// N ≥ 1.
    pub rows: usize,
    /// D.
    pub cols: usize,
    /// N·D values, row-major, every one finite.
    pub values: Vec<f64>,
}

impl<'a> DataFile<'a> {
    /// Parses `bytes` as safetensors; `origin` names the file in errors.
    ///
    /// # Errors
    /// [`GaussError::Data`] when the bytes are not a readable safetensors file.
    pub fn parse(bytes: &'a [u8], origin: impl AsRef<Path>) -> Result<Self> {
        let origin = origin.as_ref().display().to_string();
        let file = SafeTensors::deserialize(bytes).map_err(|e| {
            GaussError::data(&origin, format!("not a readable safetensors file ({e})"))
        })?;
        Ok(Self { origin, file })
    }

    /// The file's name in errors.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.file.names().into_iter().map(str::to_string).collect();
        names.sort();
        names
    }

    fn view(&self, name: &str) -> Result<TensorView<'a>> {
        self.file.tensor(name).map_err(|_| {
            GaussError::data(
                &self.origin,
                format!("no tensor `{name}` (found {:?})", self.names()),
            )
        })
    }

    /// The shape of tensor `name`.
    ///
    /// # Errors
    /// [`GaussError::Data`] when there is no such tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }

    /// Whether tensor `name` holds floats (f16, bf16, f32, f64) rather than integers.
    ///
    /// # Errors
    /// [`GaussError::Data`] when there is no such tensor.
    pub fn is_float(&self, name: &str) -> Result<bool> {
        Ok(matches!(
            self.view(name)?.dtype(),
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
        ))
    }

    /// Tensor `name` as a matrix (N, D) with N ≥ 1 of finite numbers (floats, or integers
    /// converted exactly to f64 where they fit 2⁵³).
    ///
    /// # Errors
    /// [`GaussError::Data`] naming the tensor: missing, not rank 2, no rows, a dtype that is
    /// not a number (bool, f8), a non-finite value (naming its row and column).
    pub fn matrix(&self, name: &str) -> Result<HostMatrix> {
        let view = self.view(name)?;
        let origin = format!("{}: tensor `{name}`", self.origin);
        let &[rows, cols] = view.shape() else {
            return Err(GaussError::data(
                origin,
                format!("expected shape (N, D), got {:?}", view.shape()),
            ));
        };
        if rows == 0 {
            return Err(GaussError::data(origin, "has no rows (N = 0)"));
        }
        let values = float_values(&view).map_err(|reason| GaussError::data(&origin, reason))?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(GaussError::data(
                origin,
                format!(
                    "holds {} at row {}, column {}; every value must be finite",
                    values[i],
                    i / cols.max(1),
                    i % cols.max(1)
                ),
            ));
        }
        Ok(HostMatrix {
            origin,
            rows,
            cols,
            values,
        })
    }

    /// Tensor `name` as integers, exactly (every integer dtype fits in i128), with its shape.
    ///
    /// # Errors
    /// [`GaussError::Data`] naming the tensor when it is missing or not of an integer dtype.
    pub fn integers(&self, name: &str) -> Result<(Vec<usize>, Vec<i128>)> {
        let view = self.view(name)?;
        let values = integer_values(&view).map_err(|reason| {
            GaussError::data(format!("{}: tensor `{name}`", self.origin), reason)
        })?;
        Ok((view.shape().to_vec(), values))
    }
}

impl HostMatrix {
    /// Divides every value by `divisor` (a finite number > 0); the results are checked by
    /// [`HostMatrix::to_tensor`].
    pub fn divide(&mut self, divisor: f64) {
        if divisor != 1.0 {
            for v in &mut self.values {
                *v /= divisor;
            }
        }
    }

    /// The matrix as a tensor of `dtype` on `device`, converted on the host (no f64 is ever
    /// created on an accelerator). Every value must be finite *in `dtype`*: one that overflows
    /// it (1e300 into f32, a pixel divided by a tiny scale) is refused, naming its row and
    /// column, instead of turning into ±∞ and then NaN.
    ///
    /// # Shapes
    /// → (rows, cols)
    ///
    /// # Errors
    /// [`GaussError::Data`] for a value that is not finite in `dtype`; [`GaussError::DType`]
    /// for a dtype that is not a float.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        crate::error::check_float_dtype("data matrix", dtype)?;
        let limit = crate::linalg::max_finite(dtype);
        if let Some(i) = self
            .values
            .iter()
            .position(|v| !v.is_finite() || v.abs() > limit)
        {
            let v = self.values[i];
            let what = if v.is_finite() {
                format!("{v:e}, which overflows {dtype:?}")
            } else {
                format!("{v}")
            };
            return Err(GaussError::data(
                &self.origin,
                format!(
                    "holds {what} at row {}, column {} (after scaling); every value must be finite in {dtype:?}",
                    i / self.cols.max(1),
                    i % self.cols.max(1)
                ),
            ));
        }
        let shape = (self.rows, self.cols);
        let host = match dtype {
            DType::F64 => Tensor::from_slice(&self.values, shape, &Device::Cpu)?,
            _ => {
                let values: Vec<f32> = self.values.iter().map(|&v| v as f32).collect();
                Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?
            }
        };
        Ok(host.to_device(device)?)
    }
}

/// Little-endian chunks of `N` bytes.
fn le<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// The values of an integer tensor, exactly.
fn integer_values(view: &TensorView) -> std::result::Result<Vec<i128>, String> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::U8 => data.iter().map(|&v| v as i128).collect(),
        Dtype::I8 => data.iter().map(|&v| v as i8 as i128).collect(),
        Dtype::U16 => le::<2>(data)
            .map(|b| u16::from_le_bytes(b) as i128)
            .collect(),
        Dtype::I16 => le::<2>(data)
            .map(|b| i16::from_le_bytes(b) as i128)
            .collect(),
        Dtype::U32 => le::<4>(data)
            .map(|b| u32::from_le_bytes(b) as i128)
            .collect(),
        Dtype::I32 => le::<4>(data)
            .map(|b| i32::from_le_bytes(b) as i128)
            .collect(),
        Dtype::U64 => le::<8>(data)
            .map(|b| u64::from_le_bytes(b) as i128)
            .collect(),
        Dtype::I64 => le::<8>(data)
            .map(|b| i64::from_le_bytes(b) as i128)
            .collect(),
        other => return Err(format!("has dtype {other:?}; expected integers")),
    })
}

/// The values of a numeric tensor as f64 (integers beyond 2⁵³ round to the nearest f64).
fn float_values(view: &TensorView) -> std::result::Result<Vec<f64>, String> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F64 => le::<8>(data).map(f64::from_le_bytes).collect(),
        Dtype::F32 => le::<4>(data)
            .map(|b| f32::from_le_bytes(b) as f64)
            .collect(),
        Dtype::F16 => le::<2>(data)
            .map(|b| half::f16::from_le_bytes(b).to_f64())
            .collect(),
        Dtype::BF16 => le::<2>(data)
            .map(|b| half::bf16::from_le_bytes(b).to_f64())
            .collect(),
        Dtype::U8
        | Dtype::I8
        | Dtype::U16
        | Dtype::I16
        | Dtype::U32
        | Dtype::I32
        | Dtype::U64
        | Dtype::I64 => integer_values(view)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        other => {
            return Err(format!(
                "has dtype {other:?}; expected numbers (an integer type or f16, bf16, f32, f64)"
            ))
        }
    })
}

//! Self-describing checkpoints: safetensors files whose `__metadata__` carries the format name,
//! its version, the network config as JSON and the tensors' dtype, so a [`GaussNet`] loads
//! without the user restating its architecture.
//!
//! # Saving
//! [`save()`] is atomic: the bytes go to a temporary file with a name unique to the call
//! (`.{name}.gauss-tmp.{pid}.{counter}.{nanos}`, so threads and processes saving to one path
//! never collide) in the target's directory, which is synced and renamed over the target,
//! and the directory is synced. An interrupted save leaves the previous file intact; every
//! error path removes the temporary file. Saving to a symbolic link writes its target (the
//! link stays), and an existing target keeps its permissions. After each save,
//! [`clean_stale_temp_files`] removes what crashed saves left in that directory.
//!
//! # Loading
//! [`load`] never panics, aborts or hangs, and allocates nothing that the file's own bytes do
//! not back. In order, before any tensor is read:
//! 1. The path must be a regular file (a FIFO or device would block or never end).
//! 2. The safetensors header: its length is checked against the file's size (and 100 MB),
//!    then it is parsed strictly: duplicate keys (tensor names or metadata keys) are errors,
//!    each tensor's byte range must match its shape and dtype (checked arithmetic) and lie in
//!    the file, and the ranges must tile the data section exactly.
//! 3. The metadata: `format` must be [`FORMAT_NAME`] and `format_version` one this build reads
//!    (1 to [`FORMAT_VERSION`]); `config` is parsed **strictly** (an unknown or missing field is
//!    an error naming the field's path; older configs are first upgraded by filling the
//!    fields added since and moving the fields moved since, see the table in the `schema`
//!    module) and validated; `dtype` must name a float dtype.
//! 4. The tensors the config implies (names, shapes) are computed with checked arithmetic,
//!    without building a network, and compared with the header: a missing, unexpected,
//!    misshapen or wrongly typed tensor is an error naming it.
//!
//! Only then are the tensors read, one at a time with positioned reads (no memory map: a file
//! truncated meanwhile gives an error, not a bus error), each into a buffer of exactly its
//! declared size. A non-finite value (NaN, ±∞), or one that overflows the requested dtype,
//! is an error naming the tensor and the element; [`LoadOptions::allow_non_finite`] turns
//! that check off for inspection tools (except in the precision tensors, whose range every
//! layer checks when it is built). A negative batch-norm running variance is refused always
//! (no setting makes it a variance).
//!
//! Memory: the header is read once (at most the file's size) and its parse takes a small
//! multiple of it; the tensors take their own bytes in the loaded dtype (while one tensor is
//! converted to another dtype, that tensor also exists in the stored one). No allocation is
//! sized from a declared number that the file's bytes do not back.
//!
//! Every failure is [`GaussError::Checkpoint`] naming the file and the tensor or field (or
//! [`GaussError::Io`] for a file that cannot be opened).
//!
//! # Dtypes and metadata
//! With `dtype = None` every tensor must have the dtype recorded in the metadata (a mismatch
//! is an error); with `Some(dtype)` (a float dtype) every tensor is converted to `dtype`.
//! Users may store their own string metadata (test accuracy, input normalization, ...); it
//! comes back in [`LoadedCheckpoint::user_metadata`].
//!
//! ```
//! use std::collections::BTreeMap;
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use gauss_layer::{GaussNet, GaussNetConfig};
//! use gauss_layer::checkpoint;
//!
//! let config = GaussNetConfig { in_features: 4, hidden: vec![8], out_features: 3, ..Default::default() };
//! let varmap = VarMap::new();
//! let net = GaussNet::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
//! let mut extra = BTreeMap::new();
//! extra.insert("test_accuracy".to_string(), "0.97".to_string());
//! let path = std::env::temp_dir().join(format!("doc-net-{}.safetensors", std::process::id()));
//! checkpoint::save_with_metadata(&net, &path, &extra)?;
//! let loaded = checkpoint::load(&path, &Device::Cpu, None)?;
//! assert_eq!(loaded.user_metadata["test_accuracy"], "0.97");
//! let again = GaussNet::load(&path, &Device::Cpu, Some(DType::F64))?;
//! assert_eq!(again.layers()[0].center().dtype(), DType::F64);
//!
//! // Damage: a non-finite parameter is refused, unless an inspection tool asks for it.
//! let mut bytes = std::fs::read(&path).unwrap();
//! let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
//! bytes[8 + n..8 + n + 4].copy_from_slice(&f32::NAN.to_le_bytes());
//! assert!(checkpoint::load_from_bytes(&bytes, "damaged", &Device::Cpu, None).is_err());
//! let options = checkpoint::LoadOptions { allow_non_finite: true, ..Default::default() };
//! assert!(checkpoint::load_from_bytes_with_options(&bytes, "damaged", &Device::Cpu, &options).is_ok());
//! std::fs::remove_file(&path).unwrap();
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

mod header;
pub(crate) mod save;
pub(crate) mod schema;
mod source;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{GaussError, Result};
use crate::net::GaussNet;

use header::TensorEntry;
use source::{BytesSource, FileSource, Source};

pub use save::{clean_stale_temp_files, STALE_TEMP_AGE};

/// Value of the `format` metadata field.
pub const FORMAT_NAME: &str = "gauss-layer.gauss-net";
/// Version of the checkpoint layout this crate writes. It reads this one and every older one:
/// version 1 is the same layout with a config that older builds parsed leniently (its
/// missing fields are filled from the upgrade table); version 2 has each layer's precision
/// fields beside `tanh` instead of in its `precision` (moved on load).
pub const FORMAT_VERSION: u32 = schema::CURRENT_VERSION;

const KEY_FORMAT: &str = "format";
const KEY_VERSION: &str = "format_version";
const KEY_CONFIG: &str = "config";
const KEY_DTYPE: &str = "dtype";
const USER_PREFIX: &str = "user.";

/// How [`load_with_options`] reads a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `None` (default) keeps the stored dtype and requires every tensor to have it (an f64
    /// checkpoint on Metal, which has no f64, loads as f32: see [`default_load_dtype`]);
    /// `Some(dtype)` (a float dtype) converts every tensor.
    pub dtype: Option<DType>,
    /// Accept non-finite parameters (NaN, ±∞, or values that overflow `dtype`) in the
    /// weights, biases, centers and batch norms. Off by default: such a network only produces
    /// NaN. For inspection tools that must open a damaged checkpoint. A layer's precision
    /// tensor is still refused when a value is non-finite or outside its parameterization's
    /// range ([`crate::Precision::from_raw`]: no layer holds such a precision), with an error
    /// naming the tensor and the element.
    pub allow_non_finite: bool,
}

/// A loaded checkpoint: the network, the `VarMap` holding its tensors (to resume training with
/// an optimizer over `varmap.all_vars()`), and the user's metadata.
pub struct LoadedCheckpoint {
    /// The network, reading its tensors from `varmap`.
    pub net: GaussNet,
    /// The variables of the network.
    pub varmap: VarMap,
    /// The metadata the user stored with [`save_with_metadata`].
    pub user_metadata: BTreeMap<String, String>,
    /// The dtype the tensors were stored in.
    pub stored_dtype: DType,
    /// The format version of the file (older versions are upgraded on load).
    pub format_version: u32,
}

impl std::fmt::Debug for LoadedCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCheckpoint")
            .field("net", &self.net)
            .field("user_metadata", &self.user_metadata)
            .field("stored_dtype", &self.stored_dtype)
            .field("format_version", &self.format_version)
            .finish_non_exhaustive()
    }
}

fn checkpoint_error(path: &Path, reason: impl Into<String>) -> GaussError {
    GaussError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io_error(path: &Path, source: std::io::Error) -> GaussError {
    GaussError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Saves `net` atomically to `path` (see the module docs).
///
/// # Errors
/// [`GaussError::Io`] when the file cannot be written (the previous file is then intact and
/// no temporary file is left, except when only the final directory sync fails: the message
/// says the new file is in place); [`GaussError::Checkpoint`] when the network cannot be
/// serialized (mixed dtypes).
pub fn save(net: &GaussNet, path: impl AsRef<Path>) -> Result<()> {
    save_with_metadata(net, path, &BTreeMap::new())
}

/// Saves `net` with extra string metadata that [`load`] hands back.
///
/// # Errors
/// As [`save()`].
pub fn save_with_metadata(
    net: &GaussNet,
    path: impl AsRef<Path>,
    user_metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let tensors = net.named_tensors();
    let dtype = tensors
        .first()
        .map(|(_, t)| t.dtype())
        .ok_or_else(|| checkpoint_error(path, "network has no tensors"))?;
    // Tensors on an accelerator are copied to the host; safetensors needs contiguous data.
    let mut host = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if tensor.dtype() != dtype {
            return Err(checkpoint_error(
                path,
                format!(
                    "tensor `{name}` has dtype {:?} but the network's is {dtype:?}; a checkpoint holds one dtype",
                    tensor.dtype()
                ),
            ));
        }
        host.push((name, tensor.to_device(&Device::Cpu)?.contiguous()?));
    }
    let config = serde_json::to_string(net.config())
        .map_err(|e| checkpoint_error(path, format!("cannot serialize the config: {e}")))?;
    let mut metadata = HashMap::new();
    metadata.insert(KEY_FORMAT.to_string(), FORMAT_NAME.to_string());
    metadata.insert(KEY_VERSION.to_string(), FORMAT_VERSION.to_string());
    metadata.insert(KEY_CONFIG.to_string(), config);
    metadata.insert(KEY_DTYPE.to_string(), dtype.as_str().to_string());
    for (key, value) in user_metadata {
        metadata.insert(format!("{USER_PREFIX}{key}"), value.clone());
    }
    let bytes =
        safetensors::tensor::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| checkpoint_error(path, format!("cannot serialize: {e}")))?;
    drop(host);
    save::write_atomically(path, &bytes).map_err(|e| io_error(path, e))
}

/// Loads a checkpoint; `dtype = None` keeps the stored dtype (and requires every tensor to have
/// it), `Some(dtype)` converts. Non-finite parameters are refused (see [`load_with_options`]).
///
/// Never panics, aborts or hangs on any file, and allocates nothing the file's own bytes do
/// not back (see the module docs for the order of the checks and the memory bound).
///
/// # Errors
/// [`GaussError::Io`] when the file cannot be opened or read; [`GaussError::Checkpoint`]
/// naming the file and the field or tensor at fault for everything else: not a regular file,
/// not a safetensors file, truncated, duplicate keys, a wrong format name or an unknown
/// version, a config that does not parse strictly or does not validate, a missing,
/// unexpected, misshapen or wrongly typed tensor, a non-finite value, a negative running
/// variance.
pub fn load(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: Option<DType>,
) -> Result<LoadedCheckpoint> {
    load_with_options(
        path,
        device,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )
}

/// Loads a checkpoint as [`load`] does, with [`LoadOptions`].
///
/// # Errors
/// As [`load`].
pub fn load_with_options(
    path: impl AsRef<Path>,
    device: &Device,
    options: &LoadOptions,
) -> Result<LoadedCheckpoint> {
    let path = path.as_ref();
    // The one opener of every input file: a directory, FIFO or device is refused unopened.
    let file = crate::files::open_regular(path).map_err(|e| match e {
        GaussError::Data { reason, .. } => checkpoint_error(path, reason),
        other => other,
    })?;
    // The length of the open file, not of the path (which may have been replaced meanwhile).
    let len = file.metadata().map_err(|e| io_error(path, e))?.len();
    let mut source = FileSource::new(file, len);
    load_from_source(&mut source, path, device, options)
}

/// Like [`load`], from bytes in memory; `origin` names the source in errors.
///
/// # Errors
/// As [`load`].
pub fn load_from_bytes(
    bytes: &[u8],
    origin: impl AsRef<Path>,
    device: &Device,
    dtype: Option<DType>,
) -> Result<LoadedCheckpoint> {
    load_from_bytes_with_options(
        bytes,
        origin,
        device,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )
}

/// Like [`load_with_options`], from bytes in memory; `origin` names the source in errors.
///
/// # Errors
/// As [`load`].
pub fn load_from_bytes_with_options(
    bytes: &[u8],
    origin: impl AsRef<Path>,
    device: &Device,
    options: &LoadOptions,
) -> Result<LoadedCheckpoint> {
    load_from_source(&mut BytesSource(bytes), origin.as_ref(), device, options)
}

/// The dtype a checkpoint loads into when the caller names none: the stored one, except f64
/// on a device without f64 (Metal), which loads as f32 (converted on the CPU;
/// [`LoadedCheckpoint::stored_dtype`] still says f64, so a caller can tell the user).
pub fn default_load_dtype(stored: DType, device: &Device) -> DType {
    if stored == DType::F64 && device.is_metal() {
        DType::F32
    } else {
        stored
    }
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

fn load_from_source(
    source: &mut dyn Source,
    path: &Path,
    device: &Device,
    options: &LoadOptions,
) -> Result<LoadedCheckpoint> {
    let fail = |reason: String| checkpoint_error(path, reason);
    let header = header::read_header(source).map_err(fail)?;
    let metadata = header.metadata.as_ref();
    let field = |key: &str| -> Result<&String> {
        metadata.and_then(|m| m.get(key)).ok_or_else(|| {
            checkpoint_error(
                path,
                format!("metadata field `{key}` is missing (not a gauss-layer checkpoint?)"),
            )
        })
    };
    let format = field(KEY_FORMAT)?;
    if format != FORMAT_NAME {
        return Err(fail(format!(
            "metadata field `format` is {format:?}, expected {FORMAT_NAME:?}"
        )));
    }
    let version_text = field(KEY_VERSION)?;
    // The writer spells the version in canonical decimal: "03" or "+3" were written by
    // something else, so they are refused rather than read as 3.
    let canonical = version_text
        .parse::<u32>()
        .ok()
        .filter(|v| v.to_string() == *version_text);
    let version = match canonical.ok_or(()) {
        Ok(v) if (1..=FORMAT_VERSION).contains(&v) => v,
        Ok(other) => {
            return Err(fail(format!(
                "metadata field `format_version` is {other}, this build reads versions 1 to {FORMAT_VERSION}"
            )))
        }
        // Digits beyond u32 are a version too, just not one this build reads.
        Err(())
            if !version_text.is_empty()
                && !version_text.starts_with('0')
                && version_text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            return Err(fail(format!(
                "metadata field `format_version` is {version_text}, this build reads versions 1 to {FORMAT_VERSION}"
            )))
        }
        Err(()) => {
            return Err(fail(format!(
                "metadata field `format_version` is {version_text:?}, not an integer in canonical decimal (as \"3\")"
            )))
        }
    };
    let config = schema::parse_config(field(KEY_CONFIG)?, version)
        .map_err(|e| fail(format!("metadata field `config` does not parse: {e}")))?;
    config
        .validate()
        .map_err(|e| fail(format!("metadata field `config` is invalid: {e}")))?;
    let stored_name = field(KEY_DTYPE)?;
    let stored_dtype = stored_name
        .parse::<DType>()
        .ok()
        .filter(|d| is_float(*d))
        .ok_or_else(|| {
            fail(format!(
                "metadata field `dtype` is {stored_name:?}, expected f16, bf16, f32 or f64"
            ))
        })?;
    let target_dtype = options
        .dtype
        .unwrap_or_else(|| default_load_dtype(stored_dtype, device));
    if target_dtype == DType::F64 && device.is_metal() {
        return Err(fail(
            "cannot load into f64 on Metal (it has no f64): load with dtype F32".to_string(),
        ));
    }
    if !is_float(target_dtype) {
        return Err(fail(format!(
            "cannot load into dtype {target_dtype:?}: a network needs a float dtype"
        )));
    }

    // Every tensor the config implies, checked against the header before any is read.
    let mut plan: Vec<(String, Vec<usize>, &TensorEntry)> = Vec::new();
    schema::visit_expected(&config, &mut |expected| {
        let entry = header
            .tensors
            .get(&expected.name)
            .ok_or_else(|| format!("tensor `{}` is missing", expected.name))?;
        if entry.shape != expected.shape {
            return Err(format!(
                "tensor `{}` has shape {:?}, expected {:?}",
                expected.name, entry.shape, expected.shape
            ));
        }
        let dtype = entry.dtype.ok_or_else(|| {
            format!(
                "tensor `{}` has dtype {}, expected a float dtype ({stored_dtype:?})",
                expected.name, entry.dtype_name
            )
        })?;
        if options.dtype.is_none() && dtype != stored_dtype {
            return Err(format!(
                "tensor `{}` has dtype {dtype:?}, expected {stored_dtype:?} (pass a dtype to convert)",
                expected.name
            ));
        }
        debug_assert_eq!(entry.numel, expected.numel);
        plan.push((expected.name, expected.shape, entry));
        Ok(())
    })
    .map_err(&fail)?;
    if header.tensors.len() != plan.len() {
        let expected: std::collections::HashSet<&str> =
            plan.iter().map(|(n, _, _)| n.as_str()).collect();
        let extra = header
            .tensors
            .keys()
            .find(|n| !expected.contains(n.as_str()))
            .map(String::as_str)
            .unwrap_or("?");
        return Err(fail(format!(
            "unexpected tensor `{extra}` (not part of the network in `config`)"
        )));
    }

    // Read in file order: sequential I/O.
    plan.sort_by_key(|(_, _, entry)| entry.offset);
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| fail("internal: VarMap lock poisoned".to_string()))?;
        for (name, shape, entry) in plan {
            let var = read_tensor(source, &name, &shape, entry, target_dtype, device, options)
                .map_err(|e| match e {
                    ReadError::Io(e) => fail(format!("tensor `{name}` cannot be read: {e}")),
                    ReadError::Invalid(reason) => fail(reason),
                    ReadError::Candle(e) => fail(format!("tensor `{name}` cannot be loaded: {e}")),
                })?;
            data.insert(name, var);
        }
    }
    let net = GaussNet::new(
        config,
        VarBuilder::from_varmap(&varmap, target_dtype, device),
    )
    .map_err(|e| fail(format!("cannot build the network: {e}")))?;
    let user_metadata = metadata
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            k.strip_prefix(USER_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    Ok(LoadedCheckpoint {
        net,
        varmap,
        user_metadata,
        stored_dtype,
        format_version: version,
    })
}

enum ReadError {
    Io(std::io::Error),
    Invalid(String),
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for ReadError {
    fn from(e: candle_core::Error) -> Self {
        ReadError::Candle(e)
    }
}

/// A float element as stored (little endian).
trait Element: candle_core::WithDType {
    const SIZE: usize;
    fn from_le(bytes: &[u8]) -> Self;
    fn as_f64(self) -> f64;
}

impl Element for f32 {
    const SIZE: usize = 4;
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Element for f64 {
    const SIZE: usize = 8;
    fn from_le(b: &[u8]) -> Self {
        f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    fn as_f64(self) -> f64 {
        self
    }
}

impl Element for half::f16 {
    const SIZE: usize = 2;
    fn from_le(b: &[u8]) -> Self {
        half::f16::from_le_bytes([b[0], b[1]])
    }
    fn as_f64(self) -> f64 {
        self.to_f64()
    }
}

impl Element for half::bf16 {
    const SIZE: usize = 2;
    fn from_le(b: &[u8]) -> Self {
        half::bf16::from_le_bytes([b[0], b[1]])
    }
    fn as_f64(self) -> f64 {
        self.to_f64()
    }
}

/// Whether `name` (`layers.{i}.<name>`) is a layer's raw precision tensor, whose values
/// [`crate::Precision::from_raw`] checks whatever the [`LoadOptions`].
fn is_precision_tensor(name: &str) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    name.starts_with("layers.")
        && crate::config::Parameterization::ALL
            .iter()
            .any(|&p| crate::precision::Precision::tensor_name(p) == leaf)
}

/// Bytes read per call: bounds the staging buffer whatever the tensor's size.
const CHUNK_BYTES: usize = 1 << 16;

fn read_tensor(
    source: &mut dyn Source,
    name: &str,
    shape: &[usize],
    entry: &TensorEntry,
    target: DType,
    device: &Device,
    options: &LoadOptions,
) -> std::result::Result<Var, ReadError> {
    match entry.dtype {
        Some(DType::F32) => read_typed::<f32>(source, name, shape, entry, target, device, options),
        Some(DType::F64) => read_typed::<f64>(source, name, shape, entry, target, device, options),
        Some(DType::F16) => {
            read_typed::<half::f16>(source, name, shape, entry, target, device, options)
        }
        Some(DType::BF16) => {
            read_typed::<half::bf16>(source, name, shape, entry, target, device, options)
        }
        _ => Err(ReadError::Invalid(format!(
            "tensor `{name}` has dtype {}, expected a float dtype",
            entry.dtype_name
        ))),
    }
}

fn read_typed<T: Element>(
    source: &mut dyn Source,
    name: &str,
    shape: &[usize],
    entry: &TensorEntry,
    target: DType,
    device: &Device,
    options: &LoadOptions,
) -> std::result::Result<Var, ReadError> {
    // `entry.len == numel · SIZE` and lies within the file (checked with the header), so
    // this allocation is backed by the file's bytes.
    let mut values: Vec<T> = Vec::with_capacity(entry.numel);
    let limit = crate::linalg::max_finite(target);
    let mut buffer = vec![0u8; CHUNK_BYTES.min(entry.len as usize)];
    let per_chunk = buffer.len() / T::SIZE;
    let mut offset = entry.offset;
    // A batch norm divides by √(var + eps): a negative running variance makes every output
    // NaN, so it is refused as the importer refuses it (0 is a variance, and eps > 0).
    let is_variance = name.ends_with(".running_var");
    while values.len() < entry.numel {
        let count = per_chunk.min(entry.numel - values.len());
        let bytes = &mut buffer[..count * T::SIZE];
        source.read_at(offset, bytes).map_err(ReadError::Io)?;
        offset += bytes.len() as u64;
        for chunk in bytes.chunks_exact(T::SIZE) {
            let value = T::from_le(chunk);
            if !options.allow_non_finite {
                let v = value.as_f64();
                if !v.is_finite() || v.abs() > limit {
                    let what = if v.is_finite() {
                        format!("{v:e}, which overflows {target:?}")
                    } else {
                        format!("{v}")
                    };
                    let opt_out = if is_precision_tensor(name) {
                        "a precision tensor is refused even with LoadOptions::allow_non_finite: its layer accepts only finite raw values within its parameterization's range"
                    } else {
                        "LoadOptions::allow_non_finite opens it for inspection"
                    };
                    return Err(ReadError::Invalid(format!(
                        "tensor `{name}` holds a non-finite value ({what}) at flat index {}; refusing a network that can only produce NaN ({opt_out})",
                        values.len()
                    )));
                }
            }
            if is_variance && value.as_f64() < 0.0 {
                return Err(ReadError::Invalid(format!(
                    "tensor `{name}` is {:e} at flat index {}: a variance must be >= 0 (a batch norm of it gives only NaN)",
                    value.as_f64(),
                    values.len()
                )));
            }
            values.push(value);
        }
    }
    drop(buffer);
    if target == entry.dtype.unwrap_or(target) {
        return Ok(Var::from_vec(values, shape, device)?);
    }
    let converted = candle_core::Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(target)?;
    Ok(Var::from_tensor(&converted.to_device(device)?)?)
}

impl GaussNet {
    /// Saves the network atomically to a self-describing checkpoint (see [`crate::checkpoint`]).
    ///
    /// # Errors
    /// As [`save()`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save(self, path)
    }

    /// Loads a network saved with [`GaussNet::save`]; `dtype = None` keeps the stored dtype.
    ///
    /// # Errors
    /// As [`load`].
    pub fn load(path: impl AsRef<Path>, device: &Device, dtype: Option<DType>) -> Result<Self> {
        Ok(load(path, device, dtype)?.net)
    }
}

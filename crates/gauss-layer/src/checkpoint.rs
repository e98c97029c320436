//! Self-describing checkpoints: safetensors files whose `__metadata__` carries the format name,
//! its version, the network config as JSON and the tensors' dtype, so a [`GaussNet`] loads
//! without the user restating its architecture.
//!
//! - Saving is atomic: the bytes go to a temporary file in the same directory, which is synced
//!   and then renamed over the target; an interrupted save leaves the previous file intact.
//! - Loading validates everything and never panics: a truncated or non-safetensors file, a
//!   missing format field, an unknown format version, a config that does not parse or does not
//!   validate, a missing, unexpected, misshapen or wrongly typed tensor all give
//!   [`GaussError::Checkpoint`] naming the file and the tensor or field.
//! - Dtypes: with `dtype = None` every tensor must have the dtype recorded in the metadata
//!   (a mismatch is an error); with `Some(dtype)` every tensor is converted to `dtype`.
//! - Users may store their own string metadata (test accuracy, input normalization, ...); it
//!   comes back in [`LoadedCheckpoint::user_metadata`].
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
//! std::fs::remove_file(&path).unwrap();
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{GaussError, Result};
use crate::net::{GaussNet, GaussNetConfig};

/// Value of the `format` metadata field.
pub const FORMAT_NAME: &str = "gauss-layer.gauss-net";
/// Version of the checkpoint layout this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const KEY_FORMAT: &str = "format";
const KEY_VERSION: &str = "format_version";
const KEY_CONFIG: &str = "config";
const KEY_DTYPE: &str = "dtype";
const USER_PREFIX: &str = "user.";

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
}

impl std::fmt::Debug for LoadedCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCheckpoint")
            .field("net", &self.net)
            .field("user_metadata", &self.user_metadata)
            .field("stored_dtype", &self.stored_dtype)
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
pub fn save(net: &GaussNet, path: impl AsRef<Path>) -> Result<()> {
    save_with_metadata(net, path, &BTreeMap::new())
}

/// Saves `net` with extra string metadata that [`load`] hands back.
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
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| checkpoint_error(path, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable where the platform allows syncing a directory.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(path, e));
    }
    Ok(())
}

/// Loads a checkpoint; `dtype = None` keeps the stored dtype (and requires every tensor to have
/// it), `Some(dtype)` converts.
pub fn load(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: Option<DType>,
) -> Result<LoadedCheckpoint> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    load_from_bytes(&bytes, path, device, dtype)
}

/// Like [`load`], from bytes in memory; `origin` names the source in errors.
pub fn load_from_bytes(
    bytes: &[u8],
    origin: impl AsRef<Path>,
    device: &Device,
    dtype: Option<DType>,
) -> Result<LoadedCheckpoint> {
    let path = origin.as_ref();
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        checkpoint_error(
            path,
            format!("not a readable safetensors file (truncated or another format): {e}"),
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| checkpoint_error(path, format!("unreadable safetensors header: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| -> Result<&String> {
        metadata.get(key).ok_or_else(|| {
            checkpoint_error(
                path,
                format!("metadata field `{key}` is missing (not a gauss-layer checkpoint?)"),
            )
        })
    };
    let format = field(KEY_FORMAT)?;
    if format != FORMAT_NAME {
        return Err(checkpoint_error(
            path,
            format!("metadata field `format` is {format:?}, expected {FORMAT_NAME:?}"),
        ));
    }
    let version = field(KEY_VERSION)?;
    match version.parse::<u32>() {
        Ok(FORMAT_VERSION) => {}
        Ok(other) => {
            return Err(checkpoint_error(
                path,
                format!(
                    "metadata field `format_version` is {other}, this build reads version {FORMAT_VERSION}"
                ),
            ))
        }
        Err(_) => {
            return Err(checkpoint_error(
                path,
                format!("metadata field `format_version` is {version:?}, not an integer"),
            ))
        }
    }
    let config: GaussNetConfig = serde_json::from_str(field(KEY_CONFIG)?).map_err(|e| {
        checkpoint_error(path, format!("metadata field `config` does not parse: {e}"))
    })?;
    config
        .validate()
        .map_err(|e| checkpoint_error(path, format!("metadata field `config` is invalid: {e}")))?;
    let stored_name = field(KEY_DTYPE)?;
    let stored_dtype: DType = stored_name.parse().map_err(|_| {
        checkpoint_error(
            path,
            format!("metadata field `dtype` is {stored_name:?}, not a dtype name"),
        )
    })?;
    let target_dtype = dtype.unwrap_or(stored_dtype);

    // The expected names and shapes come from a network built from the config itself, so the
    // check can never drift from what `GaussNet::new` reads.
    let reference = GaussNet::new(
        config.clone(),
        VarBuilder::from_varmap(&VarMap::new(), target_dtype, &Device::Cpu),
    )
    .map_err(|e| checkpoint_error(path, format!("cannot build the network of `config`: {e}")))?;
    let expected = reference.named_tensors();

    let mut loaded = HashMap::with_capacity(expected.len());
    for (name, reference_tensor) in &expected {
        let view = file
            .tensor(name)
            .map_err(|_| checkpoint_error(path, format!("tensor `{name}` is missing")))?;
        if view.shape() != reference_tensor.dims() {
            return Err(checkpoint_error(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    view.shape(),
                    reference_tensor.dims()
                ),
            ));
        }
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|e| checkpoint_error(path, format!("tensor `{name}` cannot be read: {e}")))?;
        if dtype.is_none() && tensor.dtype() != stored_dtype {
            return Err(checkpoint_error(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}, expected {stored_dtype:?} (pass a dtype to convert)",
                    tensor.dtype()
                ),
            ));
        }
        let tensor = tensor.to_dtype(target_dtype)?.to_device(device)?;
        loaded.insert(name.clone(), tensor);
    }
    if let Some(extra) = file.names().into_iter().find(|n| !loaded.contains_key(*n)) {
        return Err(checkpoint_error(
            path,
            format!("unexpected tensor `{extra}` (not part of the network in `config`)"),
        ));
    }

    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| checkpoint_error(path, "internal: VarMap lock poisoned"))?;
        for (name, tensor) in loaded {
            data.insert(name, candle_core::Var::from_tensor(&tensor)?);
        }
    }
    let net = GaussNet::new(
        config,
        VarBuilder::from_varmap(&varmap, target_dtype, device),
    )
    .map_err(|e| checkpoint_error(path, format!("cannot build the network: {e}")))?;
    let user_metadata = metadata
        .iter()
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
    })
}

impl GaussNet {
    /// Saves the network atomically to a self-describing checkpoint (see [`crate::checkpoint`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save(self, path)
    }

    /// Loads a network saved with [`GaussNet::save`]; `dtype = None` keeps the stored dtype.
    pub fn load(path: impl AsRef<Path>, device: &Device, dtype: Option<DType>) -> Result<Self> {
        Ok(load(path, device, dtype)?.net)
    }
}

//! Reading a PyTorch state dict saved as safetensors, and a checked view of its tensors.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::error::{GaussError, Result};

/// The prefix `nn.DataParallel` puts on every key.
const DATA_PARALLEL_PREFIX: &str = "module.";

/// How to write a state dict this module reads, quoted in errors.
pub(crate) const SAVE_HINT: &str = "save the state dict with safetensors: `from safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in model.state_dict().items()}, \"model.safetensors\")`";

/// An error about a state dict that is not (yet) tied to a file.
pub(crate) fn state_error(reason: impl Into<String>) -> GaussError {
    GaussError::Checkpoint {
        path: "state dict".into(),
        reason: reason.into(),
    }
}

/// Ties an error to the file it came from, so every message names the file.
pub(crate) fn in_file(path: &Path, err: GaussError) -> GaussError {
    let path = path.display().to_string();
    match err {
        GaussError::Checkpoint { reason, .. } => GaussError::Checkpoint { path, reason },
        GaussError::Io { source, .. } => GaussError::Io { path, source },
        GaussError::Data { reason, .. } => GaussError::Data {
            origin: path,
            reason,
        },
        other => GaussError::Checkpoint {
            path,
            reason: other.to_string(),
        },
    }
}

/// Whether `bytes` start like a file written by `torch.save`: a zip archive (PyTorch ≥ 1.6)
/// or a bare pickle (protocol 2 to 5, older PyTorch).
fn is_torch_pickle(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || matches!(bytes, [0x80, 2..=5, ..])
}

fn is_parameter_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// Reads a safetensors state dict (e.g. written by `safetensors.torch.save_file`), converting
/// every floating-point tensor to `dtype` and keeping integer buffers (`num_batches_tracked`)
/// as they are. Keys are returned as stored (a `module.` prefix is handled by the importers).
///
/// # Errors
/// [`GaussError::Io`] when the file cannot be read; [`GaussError::Checkpoint`] naming the file
/// when it is a `torch.save` pickle (the message says how to save it as safetensors), is not
/// safetensors, or holds a tensor of a dtype other than f16, bf16, f32, f64 or an integer type.
pub fn load_state_dict(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    // A FIFO, device or directory is refused before it is opened.
    let bytes = crate::files::read_regular(path)?;
    state_dict_from_bytes(&bytes, path, device, dtype)
}

/// Like [`load_state_dict`], from bytes in memory; `origin` names the source in errors.
///
/// # Errors
/// As [`load_state_dict`], without the I/O error.
pub fn state_dict_from_bytes(
    bytes: &[u8],
    origin: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let origin = origin.as_ref();
    let fail = |reason: String| in_file(origin, state_error(reason));
    // A pickle is diagnosed only where the bytes are not safetensors: a valid safetensors
    // file whose header length is 0x280..=0x580 also starts with `80 02`..`80 05`.
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        if is_torch_pickle(bytes) {
            fail(format!(
                "this is a PyTorch pickle written by `torch.save` (a .pth/.pt file), not safetensors; {SAVE_HINT}"
            ))
        } else {
            fail(format!("not a readable safetensors file ({e}); {SAVE_HINT}"))
        }
    })?;
    let mut out = HashMap::with_capacity(file.len());
    for (name, view) in file.tensors() {
        use safetensors::Dtype as S;
        match view.dtype() {
            S::F16 | S::BF16 | S::F32 | S::F64 | S::U8 | S::U16 | S::U32 | S::I16 | S::I32
            | S::I64 => {}
            other => {
                return Err(fail(format!(
                    "tensor `{name}` has dtype {other:?}; parameters must be f16, bf16, f32 or f64 (buffers may be integers)"
                )))
            }
        }
        let tensor = view
            .load(device)
            .map_err(|e| fail(format!("tensor `{name}` cannot be read: {e}")))?;
        let tensor = if is_parameter_dtype(tensor.dtype()) {
            tensor.to_dtype(dtype)?
        } else {
            tensor
        };
        out.insert(name, tensor);
    }
    Ok(out)
}

/// A tensor copied to the host in f64.
#[derive(Clone, Debug)]
pub(crate) struct Host {
    pub dims: Vec<usize>,
    pub data: Vec<f64>,
}

impl Host {
    /// As an f64 tensor on the CPU.
    pub fn tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data.clone(),
            self.dims.as_slice(),
            &Device::Cpu,
        )?)
    }
}

/// A state dict seen without its `module.` prefix, with checked access to its parameters.
pub(crate) struct StateDict<'a> {
    tensors: &'a HashMap<String, Tensor>,
    root: &'static str,
}

impl<'a> StateDict<'a> {
    /// The view; drops a `module.` prefix carried by every key.
    pub fn new(tensors: &'a HashMap<String, Tensor>) -> Self {
        let wrapped =
            !tensors.is_empty() && tensors.keys().all(|k| k.starts_with(DATA_PARALLEL_PREFIX));
        Self {
            tensors,
            root: if wrapped { DATA_PARALLEL_PREFIX } else { "" },
        }
    }

    /// The prefix ignored on every key, if any.
    pub fn stripped_prefix(&self) -> Option<&'static str> {
        (!self.root.is_empty()).then_some(self.root)
    }

    /// The key as stored (for messages).
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.root)
    }

    pub fn get(&self, name: &str) -> Option<&'a Tensor> {
        self.tensors.get(&self.key(name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The keys without the ignored prefix.
    pub fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        let root = self.root;
        self.tensors
            .keys()
            .filter_map(move |k| k.strip_prefix(root))
    }

    /// The distinct module prefixes (`a.b` of `a.b.name`; `""` for top-level keys).
    pub fn module_prefixes(&self) -> BTreeSet<String> {
        self.names().map(|k| parent(k).to_string()).collect()
    }

    /// The module prefixes holding a tensor called `leaf`.
    pub fn prefixes_holding(&self, leaf: &str) -> BTreeSet<String> {
        self.names()
            .filter(|k| k.rsplit('.').next() == Some(leaf))
            .map(|k| parent(k).to_string())
            .collect()
    }

    /// A required floating-point parameter, finite, on the host in f64.
    pub fn host(&self, name: &str) -> Result<Host> {
        let key = self.key(name);
        let tensor = self
            .tensors
            .get(&key)
            .ok_or_else(|| state_error(format!("tensor `{key}` is missing")))?;
        if !is_parameter_dtype(tensor.dtype()) {
            return Err(state_error(format!(
                "tensor `{key}` has dtype {:?}; FGN parameters are floating point (f16, bf16, f32 or f64; the original stores f32)",
                tensor.dtype()
            )));
        }
        let data = tensor
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(state_error(format!(
                "tensor `{key}` holds a non-finite value ({}) at flat index {i}",
                data[i]
            )));
        }
        Ok(Host {
            dims: tensor.dims().to_vec(),
            data,
        })
    }

    /// Like [`StateDict::host`], checking the shape; `expected` describes it in errors.
    pub fn host_shaped(&self, name: &str, shape: &[usize]) -> Result<Host> {
        let host = self.host(name)?;
        if host.dims != shape {
            return Err(GaussError::shape(
                format!("tensor `{}`", self.key(name)),
                format!("{shape:?}"),
                &host.dims,
            ));
        }
        Ok(host)
    }
}

/// `a.b` of `a.b.name`, `""` for `name`.
fn parent(key: &str) -> &str {
    key.rsplit_once('.').map_or("", |(p, _)| p)
}

/// `prefix.name`, or `name` for an empty prefix.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A list of prefixes for messages: `` `a`, `b` `` with the empty one as `(top level)`.
pub(crate) fn list_prefixes<'p>(prefixes: impl IntoIterator<Item = &'p String>) -> String {
    let shown: Vec<String> = prefixes
        .into_iter()
        .map(|p| {
            if p.is_empty() {
                "(top level)".to_string()
            } else {
                format!("`{p}`")
            }
        })
        .collect();
    if shown.is_empty() {
        "none".to_string()
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_pickles_are_recognized_and_the_message_says_how_to_save() {
        for start in [&b"PK\x03\x04rest"[..], &[0x80, 0x02, 0x8a][..]] {
            let err = state_dict_from_bytes(start, "m.pth", &Device::Cpu, DType::F32)
                .expect_err("a pickle is not safetensors");
            let text = err.to_string();
            assert!(
                text.contains("m.pth") && text.contains("save_file"),
                "{text}"
            );
        }
        // A valid safetensors file whose header is 0x280..=0x580 bytes long starts like a
        // pickle (`80 02`..`80 05`): it is read, not refused.
        for header_len in [0x280usize, 0x380, 0x480, 0x580] {
            let mut header =
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_string();
            header.push_str(&" ".repeat(header_len - header.len()));
            let mut bytes = (header_len as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&1.5f32.to_le_bytes());
            assert_eq!(bytes[0], 0x80);
            let dict = state_dict_from_bytes(&bytes, "ok.safetensors", &Device::Cpu, DType::F32)
                .expect("a valid safetensors file");
            assert_eq!(dict["w"].to_vec1::<f32>().unwrap(), vec![1.5]);
        }
        let err = state_dict_from_bytes(b"garbage!", "x.bin", &Device::Cpu, DType::F32)
            .expect_err("garbage");
        assert!(err.to_string().contains("safetensors.torch"), "{err}");
    }
}

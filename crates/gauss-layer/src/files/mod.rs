//! The files a program reads and writes, handled one way everywhere: inputs must be regular
//! files, outputs never replace anything but a regular file (nor one of the inputs), and every
//! write is atomic and cleans its own debris.
//!
//! - [`read_regular`] / [`open_regular`]: refuse a FIFO, device, socket or directory *before*
//!   opening it (opening a FIFO without a writer blocks forever; a device never ends).
//! - [`check_output`]: before any work, refuse an output path that exists and is not a regular
//!   file (or a symbolic link to one), whose directory is missing, or that is one of the
//!   inputs (same canonical path, or the same file through a hard link).
//! - [`write_atomically`] / [`save_tensors`]: the atomic write of [`crate::checkpoint::save()`]
//!   (temporary file, sync, rename, directory sync; the temporary file removed on every error;
//!   debris of dead writers cleaned by [`crate::checkpoint::clean_stale_temp_files`]).
//! - [`DataFile`]: a safetensors data file (samples, images, labels) read on the host with
//!   every value checked, and [`HostMatrix::to_tensor`], which refuses a value that is not
//!   finite *after* scaling and conversion to the working dtype.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gauss_layer::files::{self, DataFile};
//!
//! let dir = std::env::temp_dir().join(format!("files-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("x.safetensors");
//! let x = Tensor::new(&[[1.0f64, 2.0], [3.0, 1e300]], &Device::Cpu)?;
//! files::check_output(&path, &[])?;
//! files::save_tensors(&path, &[("x", &x)])?;
//!
//! let bytes = files::read_regular(&path)?;
//! let matrix = DataFile::parse(&bytes, &path)?.matrix("x")?;
//! assert_eq!((matrix.rows, matrix.cols), (2, 2));
//! // 1e300 is finite in f64 but not in f32: refused, naming the element.
//! assert!(matrix.to_tensor(DType::F64, &Device::Cpu).is_ok());
//! let err = matrix.to_tensor(DType::F32, &Device::Cpu).unwrap_err().to_string();
//! assert!(err.contains("row 1, column 1"), "{err}");
//! // A directory is never an input, and an output never replaces its input.
//! assert!(files::read_regular(&dir).is_err());
//! assert!(files::check_output(&path, &[path.as_path()]).is_err());
//! std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), gauss_layer::GaussError>(())
//! ```

mod data_file;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::checkpoint::save::{parent_dir, resolve_target};
use crate::error::{GaussError, Result};

pub use data_file::{DataFile, HostMatrix};

fn io_error(path: &Path, source: std::io::Error) -> GaussError {
    GaussError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a path that is not a regular file is, in words.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// Opens `path` for reading after checking (through symbolic links) that it is a regular
/// file: a FIFO without a writer would block the open forever, a device never ends.
///
/// # Errors
/// [`GaussError::Io`] when the path does not exist or cannot be opened;
/// [`GaussError::Data`] when it is a directory, FIFO, device or socket.
pub fn open_regular(path: impl AsRef<Path>) -> Result<File> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !meta.is_file() {
        return Err(GaussError::data(
            path.display().to_string(),
            format!(
                "is {}, not a regular file (FIFOs, devices and directories are never read)",
                kind_of(&meta)
            ),
        ));
    }
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    // The open file itself, in case the path was replaced between the check and the open.
    let opened = file.metadata().map_err(|e| io_error(path, e))?;
    if !opened.is_file() {
        return Err(GaussError::data(
            path.display().to_string(),
            "is not a regular file",
        ));
    }
    Ok(file)
}

/// Reads all of `path`, which must be a regular file (see [`open_regular`]).
///
/// # Errors
/// As [`open_regular`]; [`GaussError::Io`] when reading fails.
pub fn read_regular(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let mut file = open_regular(path)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    // The length is a hint only (the file may change while it is read).
    bytes
        .try_reserve(usize::try_from(len).unwrap_or(0))
        .map_err(|_| {
            GaussError::data(
                path.display().to_string(),
                format!("is {len} bytes, more than this process can hold"),
            )
        })?;
    file.read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    Ok(bytes)
}

/// The identity of an existing file: its canonical path and, on Unix, its device and inode
/// (the same file through a hard link).
fn identity(path: &Path) -> Option<(std::path::PathBuf, Option<(u64, u64)>)> {
    let canonical = std::fs::canonicalize(path).ok()?;
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&canonical)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    #[cfg(not(unix))]
    let inode = None;
    Some((canonical, inode))
}

/// Whether the last component of `path`, as written, is a file name: not empty (the path
/// ends in a separator), `.` or `..`. `Path::file_name` cannot tell: it reads `out/new/` and
/// `out/new/.` as `new`, so a save to them would be attempted, and fail, after all the work.
fn names_a_file(path: &Path) -> bool {
    // Separators are ASCII, so splitting the encoded bytes on them is exact.
    let bytes = path.as_os_str().as_encoded_bytes();
    let last = bytes
        .rsplit(|&b| b.is_ascii() && std::path::is_separator(b as char))
        .next()
        .unwrap_or_default();
    !matches!(last, b"" | b"." | b"..")
}

/// Checks, before any work, that `output` may be written: it names a file (it does not end
/// in a path separator, `.` or `..`); it does not exist or is a regular file (or a symbolic
/// link to one): a directory, FIFO, device or socket is never replaced; the directory it goes
/// to exists; and it is none of `inputs` (compared by canonical path and, on Unix, by device
/// and inode, so a hard link or a `./` prefix is caught too).
///
/// # Errors
/// [`GaussError::Data`] naming the output and what is wrong; [`GaussError::Io`] when its
/// symbolic links cannot be resolved.
pub fn check_output(output: impl AsRef<Path>, inputs: &[&Path]) -> Result<()> {
    let output = output.as_ref();
    let origin = || output.display().to_string();
    match std::fs::metadata(output) {
        Ok(meta) if !meta.is_file() => {
            return Err(GaussError::data(
                origin(),
                format!(
                    "exists and is {}; an output replaces only a regular file (give a file path)",
                    kind_of(&meta)
                ),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(output, e)),
    }
    if !names_a_file(output) {
        return Err(GaussError::data(
            origin(),
            "does not name a file (it ends in a path separator, `.` or `..`); give a file path such as DIR/net.safetensors",
        ));
    }
    let target = resolve_target(output).map_err(|e| io_error(output, e))?;
    let dir = parent_dir(&target);
    if !dir.is_dir() {
        return Err(GaussError::data(
            origin(),
            format!(
                "the directory {} does not exist (create it first)",
                dir.display()
            ),
        ));
    }
    if let Some((canonical, inode)) = identity(&target) {
        for input in inputs {
            let Some((input_canonical, input_inode)) = identity(input) else {
                continue;
            };
            if input_canonical == canonical || (inode.is_some() && input_inode == inode) {
                return Err(GaussError::data(
                    origin(),
                    format!(
                        "is the input {} itself; refusing to overwrite an input (give another output path)",
                        input.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically, as [`crate::checkpoint::save()`] does: a uniquely named
/// temporary file beside the target, synced and renamed over it, the directory synced. The
/// temporary file is removed on every error; afterwards, debris of dead writers in that
/// directory is cleaned ([`crate::checkpoint::clean_stale_temp_files`]). Through a symbolic
/// link the link's target is written; an existing target keeps its permissions; an existing
/// target that is not a regular file (directory, FIFO, device) is refused, never replaced.
///
/// # Errors
/// [`GaussError::Io`] naming `path`; the previous file is then intact, except when only the
/// final sync of the directory fails (the message says the new file is in place).
pub fn write_atomically(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    crate::checkpoint::save::write_atomically(path, bytes).map_err(|e| io_error(path, e))
}

/// Saves named tensors as a safetensors file through [`write_atomically`] (tensors on an
/// accelerator are copied to the host first).
///
/// # Errors
/// [`GaussError::Data`] when the tensors cannot be serialized (e.g. a name given twice);
/// as [`write_atomically`].
pub fn save_tensors(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    // safetensors' `serialize` panics on a name given twice (it indexes a vector of the
    // distinct names by position).
    let mut names = std::collections::HashSet::with_capacity(tensors.len());
    if let Some((name, _)) = tensors.iter().find(|(name, _)| !names.insert(*name)) {
        return Err(GaussError::data(
            path.display().to_string(),
            format!("cannot serialize: tensor `{name}` is given twice; every name must be unique"),
        ));
    }
    let mut host = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        host.push((*name, tensor.to_device(&Device::Cpu)?.contiguous()?));
    }
    let bytes = safetensors::tensor::serialize(
        host.iter().map(|(n, t)| (*n, t)),
        None::<HashMap<String, String>>,
    )
    .map_err(|e| GaussError::data(path.display().to_string(), format!("cannot serialize: {e}")))?;
    drop(host);
    write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output path whose last component is not a file name is refused before any work,
    /// naming it; the same directory with a file name is accepted.
    #[test]
    fn an_output_that_names_no_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("gauss-files-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.display().to_string();
        let sep = std::path::MAIN_SEPARATOR;
        for output in [
            format!("{base}{sep}newdir{sep}"),
            format!("{base}{sep}newdir{sep}{sep}"),
            format!("{base}{sep}newdir{sep}."),
            format!("{base}{sep}newdir{sep}.."),
            String::new(),
        ] {
            let err = check_output(&output, &[]).expect_err(&output);
            let text = err.to_string();
            assert!(matches!(err, GaussError::Data { .. }), "{output}: {text}");
            assert!(
                text.contains(&output) && text.contains("does not name a file"),
                "{output}: {text}"
            );
        }
        assert!(check_output(dir.join("net.safetensors"), &[]).is_ok());
        assert!(names_a_file(Path::new("net.safetensors")));
        assert!(names_a_file(Path::new(".hidden")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The docs promise `Data` for a name given twice, but safetensors' `serialize` does not
    /// check it: its header keeps one index per name and then writes `names[index]` into a
    /// vector of the distinct names' length, so ("x", "y", "x") panicked (index out of
    /// bounds: the len is 2 but the index is 2). Refused before anything is written now,
    /// naming the tensor.
    #[test]
    fn a_tensor_name_given_twice_is_refused_before_writing() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gauss-files-twice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.safetensors");
        let a = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?;
        let b = Tensor::new(&[3.0f32], &Device::Cpu)?;
        let err = save_tensors(&path, &[("x", &a), ("y", &b), ("x", &b)]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, GaussError::Data { .. }), "{text}");
        assert!(text.contains("`x`") && text.contains("twice"), "{text}");
        assert!(!path.exists(), "nothing is written");
        // Distinct names save and read back.
        save_tensors(&path, &[("x", &a), ("y", &b)])?;
        let bytes = read_regular(&path)?;
        let file = DataFile::parse(&bytes, &path)?;
        assert_eq!(file.names(), ["x", "y"]);
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(())
    }
}

//! Atomic saves: a uniquely named temporary file next to the target, synced, renamed over
//! it, the directory synced; debris of crashed saves cleaned.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Marker in every temporary file name this crate writes: `.{target name}.gauss-tmp.{pid}.{counter}.{nanos}`
/// (the target name cut short where it is long, see [`temp_name`]).
const TEMP_MARKER: &str = "gauss-tmp";

/// A temporary file is removed only once it has not been modified for this long (see
/// [`clean_stale_temp_files`]).
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(60 * 60);

/// A temporary name is never longer than the target's name or than this many bytes: within
/// every common file-name limit (255 bytes on most file systems, 143 on eCryptfs).
const TEMP_NAME_BUDGET: usize = 96;

/// Symbolic links followed at most when resolving the target (as the kernel's ELOOP limit).
const MAX_SYMLINKS: usize = 40;

/// The final target of `path`, following symbolic links (also dangling ones: a save through a
/// link to a missing file creates the link's target).
pub(crate) fn resolve_target(path: &Path) -> std::io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = std::fs::read_link(&current)?;
                current = if link.is_absolute() {
                    link
                } else {
                    parent_dir(&current).join(link)
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "more than {MAX_SYMLINKS} levels of symbolic links"
    )))
}

/// The directory of `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A name no other call, thread or process uses: pid, a process-wide counter and the clock.
///
/// The target's name is only there for a person reading the directory, so it is cut (at a
/// character boundary) to keep the whole name within `max(target name, TEMP_NAME_BUDGET)`
/// bytes: with the ~45-byte suffix a 240-byte target would otherwise need a temporary name
/// over the file system's limit and could never be saved. A name that is not UTF-8 is
/// written lossily, which keeps the temporary name one that [`temp_file_pid`] can read.
fn temp_name(file_name: &std::ffi::OsStr) -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let suffix = format!(".{TEMP_MARKER}.{}.{count}.{nanos}", std::process::id());
    let target = file_name.to_string_lossy();
    let budget = file_name.len().max(TEMP_NAME_BUDGET);
    let mut keep = budget.saturating_sub(1 + suffix.len()).min(target.len());
    while !target.is_char_boundary(keep) {
        keep -= 1;
    }
    OsString::from(format!(".{}{suffix}", &target[..keep]))
}

/// Removes the temporary file when dropped unless disarmed (every error path, and unwinding).
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` atomically to `path` (through symbolic links to their target, keeping the
/// target's permissions), then cleans stale temporary files in the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = resolve_target(path)?;
    let dir = parent_dir(&target);
    let file_name = target.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let permissions = match std::fs::metadata(&target) {
        Ok(meta) if meta.is_dir() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is a directory",
            ))
        }
        // A FIFO, device or socket is never replaced by a regular file.
        Ok(meta) if !meta.is_file() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "exists and is not a regular file (a FIFO, device or socket is never replaced)",
            ))
        }
        Ok(meta) => Some(meta.permissions()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let tmp = dir.join(temp_name(file_name));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => "it does not exist".to_string(),
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied: the save writes a temporary file there, then renames it over the target"
                        .to_string()
                }
                _ => e.to_string(),
            };
            std::io::Error::new(
                e.kind(),
                format!("cannot create a file in the directory {}: {why}", dir.display()),
            )
        })?;
    let mut guard = TempGuard {
        path: tmp,
        armed: true,
    };
    if let Some(permissions) = permissions {
        file.set_permissions(permissions)?;
    }
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&guard.path, &target)?;
    guard.armed = false;
    // After the rename the new file is in place: a failed sync must not read as a failed
    // save that left the previous file (the callers' errors say it is intact).
    sync_dir(&dir).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("the new file is in place, but syncing its directory failed ({e}): a crash before the system writes it back may restore the previous file"),
        )
    })?;
    // Debris of crashed saves; a failure to clean does not fail this save.
    let _ = clean_stale_temp_files(&dir);
    Ok(())
}

/// Makes a rename in `dir` durable. Platforms that cannot sync a directory (Windows, some
/// file systems) report it as unsupported or invalid; that is not an error.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let result = File::open(dir).and_then(|d| d.sync_all());
    match result {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput
                    | std::io::ErrorKind::Unsupported
                    | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The writer's pid of a temporary file name this crate writes (current and pre-version-2
/// pattern), or `None` for any other file.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    // Current: `.{target}.gauss-tmp.{pid}.{counter}.{nanos}`.
    if let Some(at) = rest.rfind(&format!(".{TEMP_MARKER}.")) {
        let fields: Vec<&str> = rest[at + TEMP_MARKER.len() + 2..].split('.').collect();
        if let [pid, counter, nanos] = fields[..] {
            if counter.parse::<u64>().is_ok() && nanos.parse::<u128>().is_ok() {
                return pid.parse().ok();
            }
        }
        return None;
    }
    // Before version 2: `.{target}.{pid}.tmp` (only for safetensors targets, to stay clear
    // of other programs' temporary files).
    let stem = rest.strip_suffix(".tmp")?;
    let (target, pid) = stem.rsplit_once('.')?;
    if !target.ends_with(".safetensors") || target.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Whether `pid` is a running process other than this one, as far as this machine can tell
/// (`/proc` on Linux; elsewhere nothing is known and the answer is `false`).
fn another_process_runs(pid: u32) -> bool {
    pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes temporary files that crashed saves left in `dir` and returns how many.
///
/// A file is removed when its name has the pattern this crate writes
/// (`.{name}.gauss-tmp.{pid}.{counter}.{nanos}`, or `.{name}.safetensors.{pid}.tmp` from
/// before format version 2), it is a regular file, it was last modified more than
/// [`STALE_TEMP_AGE`] ago, and its pid is not another process running on this machine
/// (checked through `/proc` on Linux; elsewhere age alone decides). [`save`] calls this after
/// every successful save.
///
/// Age is required because a pid missing from this machine's `/proc` does not mean its
/// writer is dead: a writer in another PID namespace (a container) or on another host
/// sharing the directory (NFS) has a pid this machine cannot see, and removing its file
/// mid-save would fail its rename. A save writes and renames within moments, so an hour
/// without a write means the writer died. A running process with that pid (a writer stalled
/// here, or the pid reused) keeps the file: leaving debris is harmless, deleting a live save
/// is not. This process's own pid counts as dead: its saves never sit an hour unrenamed, and
/// a container's restarted program often has the pid of the run that crashed.
///
/// [`save`]: super::save()
///
/// # Errors
/// [`crate::GaussError::Io`] when `dir` cannot be listed; files that cannot be removed are
/// skipped.
pub fn clean_stale_temp_files(dir: impl AsRef<Path>) -> crate::Result<usize> {
    let dir = dir.as_ref();
    let entries = std::fs::read_dir(dir).map_err(|source| crate::GaussError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_file_pid) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.file_type().is_file() {
            continue;
        }
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if old && !another_process_runs(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A save into a directory that does not exist says that the directory is missing (the
    /// system's error named only the file: "No such file or directory").
    #[test]
    fn a_missing_directory_is_named() {
        let dir = std::env::temp_dir().join(format!("gauss-save-missing-{}", std::process::id()));
        let target = dir.join("net.safetensors");
        let error = write_atomically(&target, b"x").unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        let message = error.to_string();
        assert!(
            message.contains(&format!("the directory {}", dir.display()))
                && message.contains("does not exist"),
            "{message}"
        );
    }

    #[test]
    fn temp_names_are_recognized_and_unique() {
        let a = temp_name(std::ffi::OsStr::new("net.safetensors"));
        let b = temp_name(std::ffi::OsStr::new("net.safetensors"));
        assert_ne!(a, b);
        let a = a.to_str().unwrap();
        assert_eq!(temp_file_pid(a), Some(std::process::id()));
        assert_eq!(temp_file_pid(".net.safetensors.4242.tmp"), Some(4242));
        // Other programs' files are left alone.
        for other in [
            "net.safetensors",
            ".net.safetensors",
            ".foo.4242.tmp",
            ".net.safetensors.x.tmp",
            ".net.gauss-tmp.1.2",
            ".net.gauss-tmp.a.2.3",
        ] {
            assert_eq!(temp_file_pid(other), None, "{other}");
        }
    }

    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gauss-save-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_aged(path: &Path, age: Duration) {
        std::fs::write(path, b"partial").unwrap();
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }

    /// A pid missing from this machine's process list may be a writer in another PID
    /// namespace or on another host: its fresh file is kept, only an old one is removed. A
    /// running process's file is kept whatever its age; this process's own old file is not.
    #[test]
    fn only_old_temp_files_of_writers_not_running_here_are_removed() {
        let dir = test_dir("stale");
        // Above Linux's largest pid_max (2^22): never a running process here.
        let absent = 4_000_000_000u32;
        let old = STALE_TEMP_AGE + Duration::from_secs(60);
        let fresh_absent = dir.join(format!(".a.safetensors.{TEMP_MARKER}.{absent}.0.1"));
        let old_absent = dir.join(format!(".b.safetensors.{TEMP_MARKER}.{absent}.0.2"));
        let old_mine = dir.join(format!(
            ".c.safetensors.{TEMP_MARKER}.{}.0.3",
            std::process::id()
        ));
        write_aged(&fresh_absent, Duration::ZERO);
        write_aged(&old_absent, old);
        write_aged(&old_mine, old);
        #[cfg(unix)]
        let parent = {
            let ppid = std::os::unix::process::parent_id();
            let path = dir.join(format!(".d.safetensors.{TEMP_MARKER}.{ppid}.0.4"));
            write_aged(&path, old);
            Path::new(&format!("/proc/{ppid}")).exists().then_some(path)
        };
        clean_stale_temp_files(&dir).unwrap();
        assert!(
            fresh_absent.exists(),
            "a fresh file may be a live save elsewhere"
        );
        assert!(
            !old_absent.exists(),
            "an hour without a write: its writer died"
        );
        assert!(!old_mine.exists(), "this process's saves never sit an hour");
        #[cfg(unix)]
        if let Some(parent) = parent {
            assert!(parent.exists(), "a running process's file is kept");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A 240-byte target name (the usual limit is 255 bytes) saves, ASCII or multi-byte: the
    /// temporary name is no longer than the target's and is still recognized for cleaning.
    #[test]
    fn a_long_target_name_saves_and_its_temp_name_fits() {
        let dir = test_dir("long");
        for target in ["a".repeat(240), "é".repeat(120)] {
            assert_eq!(target.len(), 240);
            let name = temp_name(std::ffi::OsStr::new(&target));
            assert!(name.len() <= 240, "{} bytes", name.len());
            let name = name.to_str().expect("UTF-8");
            assert_eq!(temp_file_pid(name), Some(std::process::id()));
            assert!(name.starts_with(&format!(".{}", &target[..100])), "{name}");
            let path = dir.join(&target);
            write_atomically(&path, b"saved").unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"saved");
        }
        // A short name keeps all of it.
        let short = temp_name(std::ffi::OsStr::new("net.safetensors"));
        assert!(short
            .to_str()
            .unwrap()
            .starts_with(".net.safetensors.gauss-tmp."));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

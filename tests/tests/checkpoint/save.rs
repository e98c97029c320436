//! Saves: unique temporary names (threads saving one path never collide), no temporary file
//! left on success or error, permissions kept, symbolic links written through, debris of
//! crashed saves cleaned.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};
use gauss_layer::checkpoint::{self, STALE_TEMP_AGE};
use gauss_layer::{GaussError, GaussNet};

use gauss_tests::{new_net, small_diag_net_config, temp_dir};

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    Ok(names)
}

#[test]
fn threads_saving_one_path_never_collide() -> Result<()> {
    let dir = temp_dir("ckpt-threads")?;
    let path = dir.join("net.safetensors");
    let (net_a, _a) = new_net(small_diag_net_config(), DType::F32)?;
    let (net_b, _b) = new_net(small_diag_net_config(), DType::F64)?;
    for round in 0..25 {
        std::thread::scope(|s| -> Result<()> {
            let a = s.spawn(|| net_a.save(&path));
            let b = s.spawn(|| net_b.save(&path));
            a.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            b.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            Ok(())
        })?;
        // One of the two whole files won.
        let loaded = GaussNet::load(&path, &Device::Cpu, None)?;
        let dtype = loaded.layers()[0].center().dtype();
        assert!(dtype == DType::F32 || dtype == DType::F64, "round {round}");
        assert_eq!(entries(&dir)?, vec!["net.safetensors"], "round {round}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn failed_saves_leave_nothing_behind() -> Result<()> {
    let dir = temp_dir("ckpt-fail")?;
    let (net, _vars) = new_net(small_diag_net_config(), DType::F32)?;
    // The target is a directory: an error, and the directory is as it was.
    let target = dir.join("taken");
    std::fs::create_dir(&target)?;
    match net.save(&target) {
        Err(GaussError::Io { path, .. }) => assert!(path.contains("taken")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(entries(&dir)?, vec!["taken"]);
    // A missing directory.
    assert!(net.save(dir.join("missing/net.safetensors")).is_err());
    assert_eq!(entries(&dir)?, vec!["taken"]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[cfg(unix)]
#[test]
fn saves_keep_permissions_and_write_through_symlinks() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("ckpt-perm")?;
    let (net, _vars) = new_net(small_diag_net_config(), DType::F32)?;
    let path = dir.join("net.safetensors");
    net.save(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    net.save(&path)?;
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode after an overwrite: {mode:o}");

    // A link to the checkpoint, in another directory: the link stays, its target is replaced.
    let links = dir.join("links");
    std::fs::create_dir(&links)?;
    let link = links.join("current.safetensors");
    std::os::unix::fs::symlink("../net.safetensors", &link)?;
    let before = std::fs::metadata(&path)?.modified()?;
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (other, _o) = new_net(small_diag_net_config(), DType::F64)?;
    other.save(&link)?;
    assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
    assert_eq!(std::fs::read_link(&link)?, Path::new("../net.safetensors"));
    assert!(std::fs::metadata(&path)?.modified()? >= before);
    let loaded = GaussNet::load(&path, &Device::Cpu, None)?;
    assert_eq!(loaded.layers()[0].center().dtype(), DType::F64);
    assert_eq!(
        std::fs::metadata(&path)?.permissions().mode() & 0o777,
        0o600
    );
    // The temporary file went next to the target, and is gone.
    assert_eq!(entries(&links)?, vec!["current.safetensors"]);
    assert_eq!(entries(&dir)?, vec!["links", "net.safetensors"]);
    // A dangling link: the save creates its target.
    std::os::unix::fs::symlink("fresh.safetensors", dir.join("dangling"))?;
    net.save(dir.join("dangling"))?;
    assert!(GaussNet::load(dir.join("fresh.safetensors"), &Device::Cpu, None).is_ok());
    // A link loop is an error, not a hang.
    std::os::unix::fs::symlink("loop-b", dir.join("loop-a"))?;
    std::os::unix::fs::symlink("loop-a", dir.join("loop-b"))?;
    assert!(net.save(dir.join("loop-a")).is_err());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A pid that no running process has (Linux: not listed in /proc).
#[cfg(target_os = "linux")]
fn dead_pid() -> u32 {
    (1..1000)
        .map(|i| 4_194_304 - i)
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .unwrap_or(4_194_303)
}

#[test]
fn stale_temporary_files_are_cleaned_and_live_ones_kept() -> Result<()> {
    let dir = temp_dir("ckpt-stale")?;
    let me = std::process::id();
    let write = |name: &str| std::fs::write(dir.join(name), b"partial checkpoint");
    // This process's, recent: may be a save in progress in another thread. Kept.
    write(&format!(".net.safetensors.gauss-tmp.{me}.0.123"))?;
    // This process's, but older than the staleness age: its save died. Removed.
    let old = format!(".old.safetensors.gauss-tmp.{me}.1.456");
    write(&old)?;
    let age = STALE_TEMP_AGE + std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(dir.join(&old))?
        .set_modified(std::time::SystemTime::now() - age)?;
    // Not ours: never touched, whatever their age.
    write(".net.safetensors.swp")?;
    write("notes.tmp")?;
    let mut expected_left = vec![
        format!(".net.safetensors.gauss-tmp.{me}.0.123"),
        ".net.safetensors.swp".to_string(),
        "notes.tmp".to_string(),
    ];
    #[cfg(target_os = "linux")]
    {
        // A writer not running here, in the current and the pre-version-2 pattern: old, so
        // removed; recent, kept (it may be a save in progress in another PID namespace or on
        // another host sharing the directory, whose pid this machine cannot see).
        let pid = dead_pid();
        for name in [
            format!(".net.safetensors.gauss-tmp.{pid}.3.789"),
            format!(".net.safetensors.{pid}.tmp"),
        ] {
            write(&name)?;
            std::fs::File::options()
                .write(true)
                .open(dir.join(&name))?
                .set_modified(std::time::SystemTime::now() - age)?;
        }
        let fresh = format!(".fresh.safetensors.gauss-tmp.{pid}.4.790");
        write(&fresh)?;
        expected_left.push(fresh);
        // The pre-version-2 pattern of another extension is not ours.
        write(&format!(".notes.txt.{pid}.tmp"))?;
        expected_left.push(format!(".notes.txt.{pid}.tmp"));
    }
    // `save` cleans the directory it writes to.
    let (net, _vars) = new_net(small_diag_net_config(), DType::F32)?;
    net.save(dir.join("net.safetensors"))?;
    expected_left.push("net.safetensors".to_string());
    expected_left.sort();
    assert_eq!(entries(&dir)?, expected_left);
    // Nothing more to clean.
    assert_eq!(checkpoint::clean_stale_temp_files(&dir)?, 0);
    assert!(checkpoint::clean_stale_temp_files(dir.join("missing")).is_err());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

//! Input files, output paths and atomic writes (issue 17, items 1, 5, 6, 11).

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gauss_layer::{checkpoint, files, import, GaussError};
use gauss_tests::{new_net, small_diag_net_config, temp_dir};

/// A FIFO at `dir/name` (none where `mkfifo` is missing: the FIFO cases are then skipped).
fn fifo(dir: &Path, name: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success());
    made.then_some(path)
}

#[cfg(unix)]
fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

#[test]
fn every_reader_refuses_a_fifo_or_directory_without_opening_it() -> Result<()> {
    let dir = temp_dir("hard-fifo-in")?;
    // A directory: refused by the one opener.
    match files::read_regular(&dir) {
        Err(GaussError::Data { reason, .. }) => assert!(reason.contains("a directory"), "{reason}"),
        other => panic!("expected a data error, got {other:?}"),
    }
    let Some(pipe) = fifo(&dir, "pipe") else {
        return Ok(());
    };
    // No writer: opening it would block forever, so each of these returning is the test.
    let e = files::read_regular(&pipe).unwrap_err().to_string();
    assert!(e.contains("a FIFO") && e.contains("pipe"), "{e}");
    let e = import::load_state_dict(&pipe, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a FIFO"), "{e}");
    let e = checkpoint::load(&pipe, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = gauss_layer::convert::convert_classic_net(
        &pipe,
        &Device::Cpu,
        DType::F32,
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("a FIFO"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn outputs_never_replace_a_fifo_device_directory_or_input() -> Result<()> {
    let dir = temp_dir("hard-out")?;
    let (net, _vars) = new_net(small_diag_net_config(), DType::F32)?;
    let input = dir.join("net.safetensors");
    checkpoint::save(&net, &input)?;
    let before = std::fs::read(&input)?;

    // The output is the input: by the same path, through `./`, a symbolic link, a hard link.
    let dotted = dir.join(".").join("net.safetensors");
    let link = dir.join("link.safetensors");
    let hard = dir.join("hard.safetensors");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&input, &link)?;
    std::fs::hard_link(&input, &hard)?;
    for output in [&input, &dotted, &link, &hard] {
        if !output.exists() {
            continue;
        }
        let e = files::check_output(output, &[input.as_path()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing to overwrite an input"), "{e}");
    }
    // Another regular file, or a new one, is fine.
    files::check_output(dir.join("other.safetensors"), &[input.as_path()])?;
    // A directory, and a missing directory.
    let e = files::check_output(&dir, &[]).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
    let e = files::check_output(dir.join("no-such-dir").join("x"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    // A character device (always present on Unix): checked, and never replaced by a save.
    #[cfg(unix)]
    {
        let e = files::check_output("/dev/null", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("a device"), "{e}");
        // Through a symbolic link to it, the save itself refuses too (/dev/null stays a
        // device even when this test runs as root).
        let to_null = dir.join("to-null");
        std::os::unix::fs::symlink("/dev/null", &to_null)?;
        assert!(checkpoint::save(&net, &to_null).is_err());
        assert!(files::write_atomically(&to_null, b"x").is_err());
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata("/dev/null")?.file_type().is_char_device());
    }
    // A FIFO as the output: refused by the check and by the write; it stays a FIFO.
    #[cfg(unix)]
    if let Some(pipe) = fifo(&dir, "out-pipe") {
        let e = files::check_output(&pipe, &[]).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        assert!(checkpoint::save(&net, &pipe).is_err());
        assert!(files::write_atomically(&pipe, b"x").is_err());
        assert!(is_fifo(&pipe));
    }
    assert_eq!(std::fs::read(&input)?, before, "the input is untouched");
    // No temporary file was left by the refused writes.
    let debris: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("gauss-tmp"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn tensor_writes_are_atomic_and_clean_the_debris_of_killed_writers() -> Result<()> {
    let dir = temp_dir("hard-atomic")?;
    let out = dir.join("y.safetensors");
    // Debris of a writer that was killed: the pattern of the atomic write, a pid that is not
    // running (pid_max on Linux is at most 2^22, so this one never is), untouched for longer
    // than the staleness age.
    let dead = dir.join(".y.safetensors.gauss-tmp.4294967290.0.1");
    std::fs::write(&dead, vec![0u8; 1024])?;
    std::fs::File::options()
        .write(true)
        .open(&dead)?
        .set_modified(
            std::time::SystemTime::now()
                - checkpoint::STALE_TEMP_AGE
                - std::time::Duration::from_secs(60),
        )?;
    let t = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu)?;
    files::save_tensors(&out, &[("output", &t), ("g0", &t)])?;
    assert!(
        !dead.exists(),
        "the next write removes the dead writer's file"
    );
    let back = candle_core::safetensors::load(&out, &Device::Cpu)?;
    assert_eq!(back["output"].to_vec2::<f32>()?, vec![vec![1.0, 2.0]]);
    // A failed write (the target is a directory) leaves no temporary file.
    let sub = dir.join("sub");
    std::fs::create_dir(&sub)?;
    assert!(files::save_tensors(&sub, &[("output", &t)]).is_err());
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains("gauss-tmp")), "{names:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

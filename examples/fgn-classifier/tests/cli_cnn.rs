//! `train --arch cnn` with the trunk's options through the built binary: batch norm in the
//! conv blocks and augmented training images train a working network, the checkpoint
//! carries the batch norms' running statistics (`eval` reproduces `train`'s report), and
//! the MLP refuses `--augment`; a network trained with `--test-time-mirror` records it and
//! `eval` applies it.

use anyhow::Result;
use gauss_tests::temp_dir;

mod common;
use common::{run, run_ok, write_two_class_idx};

#[test]
fn a_batch_normed_cnn_trained_on_augmented_images_saves_and_reloads() -> Result<()> {
    let dir = temp_dir("cnn-trunk-options")?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    // Two classes told apart by the bright half (top or bottom): mirrored left–right and
    // shifted by 2 pixels, an image keeps its class.
    write_two_class_idx(&data, 200)?;
    let data = data.display().to_string();
    let ckpt = dir.join("cnn.safetensors").display().to_string();
    let trained = run_ok(&[
        "train",
        "--arch",
        "cnn",
        "--data-dir",
        &data,
        "--fgn-only",
        "--channels",
        "4",
        "--channels",
        "4",
        "--trunk-batch-norm",
        "--augment",
        "shift-flip",
        "--features",
        "8",
        "--hidden",
        "8",
        "--epochs",
        "10",
        "--batch-size",
        "32",
        "--out",
        &ckpt,
    ])?;
    assert_eq!(trained["augment"], "shift-flip", "{trained}");
    assert_eq!(trained["trunk"]["batch_norm"], true, "{trained}");
    let accuracy = trained["fgn"]["accuracy"].as_f64().unwrap_or(0.0);
    assert!(
        accuracy >= 0.9,
        "accuracy {accuracy} on an easy task: {trained}"
    );
    // eval rebuilds the trunk from the checkpoint, batch norms included.
    let evaluated = run_ok(&["eval", &ckpt, "--data-dir", &data])?;
    for field in ["accuracy", "nll", "ece_15"] {
        assert_eq!(
            evaluated["fgn"][field], trained["fgn"][field],
            "{field}: {evaluated} vs {trained}"
        );
    }

    let (ok, _, stderr) = run(&["train", "--fgn-only", "--augment", "flip"])?;
    assert!(!ok);
    assert!(stderr.contains("--augment transforms the CNN"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn test_time_mirroring_is_recorded_and_applied_by_eval() -> Result<()> {
    let dir = temp_dir("cnn-mirror")?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    write_two_class_idx(&data, 200)?;
    let data = data.display().to_string();
    let ckpt = dir.join("cnn.safetensors").display().to_string();
    let args = |extra: &[&'static str]| {
        let mut all = vec![
            "train",
            "--arch",
            "cnn",
            "--data-dir",
            data.as_str(),
            "--fgn-only",
            "--channels",
            "4",
            "--features",
            "8",
            "--hidden",
            "8",
            "--batch-size",
            "32",
            "--out",
            ckpt.as_str(),
        ];
        all.extend_from_slice(extra);
        all
    };
    let trained = run_ok(&args(&[
        "--epochs",
        "6",
        "--calibration-split",
        "0.1",
        "--test-time-mirror",
    ]))?;
    assert_eq!(trained["test_time_mirror"], true, "{trained}");
    let accuracy = trained["fgn"]["accuracy"].as_f64().unwrap_or(0.0);
    assert!(accuracy >= 0.9, "accuracy {accuracy}: {trained}");
    // eval reads the record: the same (mirrored) numbers as train's report.
    let evaluated = run_ok(&["eval", &ckpt, "--data-dir", &data])?;
    assert_eq!(evaluated["test_time_mirror"], true, "{evaluated}");
    for field in ["accuracy", "nll", "ece_15"] {
        assert_eq!(
            evaluated["fgn"][field], trained["fgn"][field],
            "{field}: {evaluated} vs {trained}"
        );
    }

    // Trained without it (one epoch, so the softmax is not saturated), the network scores
    // differently with eval's flag.
    let single = run_ok(&args(&["--epochs", "1"]))?;
    assert_eq!(single["test_time_mirror"], false, "{single}");
    let forced = run_ok(&["eval", &ckpt, "--data-dir", &data, "--test-time-mirror"])?;
    assert_eq!(forced["test_time_mirror"], true, "{forced}");
    assert_ne!(
        forced["fgn"]["nll"], single["fgn"]["nll"],
        "{forced} vs {single}"
    );

    let (ok, _, stderr) = run(&["train", "--fgn-only", "--test-time-mirror"])?;
    assert!(!ok);
    assert!(stderr.contains("add --arch cnn"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

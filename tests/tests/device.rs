//! Device-clean numerics (docs/design.md §4): nothing on the training path is created in or
//! cast to f64 unless the working dtype is f64 (Metal has no f64), proven on the CPU through
//! the portable path that CUDA and Metal run.
//!
//! Two checks that complement each other:
//! - a full training step of every parameterization through the portable path in f32: every
//!   node of the loss's autograd graph and every gradient must be f32 (a cast to f64 of
//!   anything the parameters flow through would show up as an f64 node);
//! - the library sources: every tensor cast to f64 or created in f64 must happen on the host
//!   (after `to_device(&Device::Cpu)` or on `Device::Cpu`) or in a branch where the working
//!   dtype is f64 already, which catches constants that never enter the graph.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use gauss_layer::{
    gauss_layer, GaussLayerConfig, GaussNet, GaussNetConfig, InitConfig, Parameterization,
};
use gauss_losses::{fgn_objective, layer_nll, FgnObjectiveConfig, LambdaLoss, Reduction};

fn portable_config(parameterization: Parameterization) -> GaussLayerConfig {
    GaussLayerConfig {
        parameterization,
        portable: true,
        init: InitConfig {
            seed: Some(5),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Every f64 node of `loss`'s autograd graph, described.
fn f64_nodes(loss: &Tensor) -> Vec<String> {
    loss.sorted_nodes()
        .into_iter()
        .filter(|node| node.dtype() == DType::F64)
        .map(|node| format!("{:?} {:?}", node.dims(), node.dtype()))
        .collect()
}

#[test]
fn portable_training_step_creates_no_f64_tensors() -> Result<()> {
    let device = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (16, 6), &device)?;
    let targets = Tensor::new(
        &[0u32, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0],
        &device,
    )?;
    for parameterization in Parameterization::ALL {
        for lambda_loss in LambdaLoss::ALL {
            let config = GaussNetConfig {
                in_features: 6,
                hidden: vec![5],
                out_features: 3,
                layer: GaussLayerConfig {
                    tanh: true,
                    ..portable_config(parameterization)
                },
                output_layer: Some(portable_config(parameterization)),
                ..Default::default()
            };
            let varmap = VarMap::new();
            let net = GaussNet::new(
                config,
                VarBuilder::from_varmap(&varmap, DType::F32, &device),
            )?;
            let logits = net.forward(&x, true)?;
            let objective = FgnObjectiveConfig {
                lambda_loss,
                ..Default::default()
            };
            let loss = fgn_objective(&logits, &targets, net.layers(), &objective)?;
            let what = format!("{parameterization} {lambda_loss}");
            assert_eq!(loss.total.dtype(), DType::F32, "{what}");
            let bad = f64_nodes(&loss.total);
            assert!(bad.is_empty(), "{what}: f64 nodes in the graph: {bad:?}");
            let grads = loss.total.backward()?;
            for var in varmap.all_vars() {
                let grad = grads
                    .get(&var)
                    .ok_or_else(|| anyhow::anyhow!("{what}: no gradient"))?;
                assert_eq!(grad.dtype(), DType::F32, "{what}: gradient dtype");
            }
            let mut optimizer = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-3)?;
            optimizer.step(&grads)?;
            let values = loss.values()?;
            assert!(values.total.is_finite(), "{what}: {values:?}");
        }
        // The NLL of a Gaussian-only layer (the density path).
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let layer = gauss_layer(
            6,
            2,
            GaussLayerConfig {
                gaussian_only: true,
                ..portable_config(parameterization)
            },
            vb,
        )?;
        let nll = layer_nll(&layer, &x, Reduction::Mean)?.mean_all()?;
        let bad = f64_nodes(&nll);
        assert!(bad.is_empty(), "{parameterization} nll: {bad:?}");
    }
    Ok(())
}

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[test]
fn library_sources_cast_to_f64_only_on_the_host() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in ["crates/gauss-layer/src", "crates/losses/src"] {
        rust_files(&root.join(krate), &mut files)?;
    }
    let creates_f64 = |line: &str| {
        let code = line.split("//").next().unwrap_or("");
        code.contains("DType::F64")
            && [
                "to_dtype(",
                "zeros(",
                "ones(",
                "eye(",
                "full(",
                "from_vec(",
                "randn(",
                "rand(",
            ]
            .iter()
            .any(|call| code.contains(call))
    };
    let mut offenders = Vec::new();
    let mut checked = 0;
    for file in &files {
        let name = file.strip_prefix(&root)?.display().to_string();
        // Test modules and the test helpers may use f64 freely.
        if name.ends_with("testing.rs") || name.contains("/tests/") || name.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file)?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            if line.trim_start().starts_with("//") || !creates_f64(line) {
                continue;
            }
            checked += 1;
            let window = &lines[i.saturating_sub(3)..=i];
            // On the host, or in a branch where the working dtype is f64 already.
            let on_host = window
                .iter()
                .any(|l| l.contains("Device::Cpu") || l.contains("DType::F64 =>"));
            if !on_host {
                offenders.push(format!("{name}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        checked > 0,
        "the scan found no f64 use at all: is it reading the sources?"
    );
    assert!(
        offenders.is_empty(),
        "f64 tensors created or cast off the host:\n{}",
        offenders.join("\n")
    );
    Ok(())
}

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
    gauss_layer, GaussError, GaussLayer, GaussLayerConfig, GaussNet, GaussNetConfig, InitConfig,
    Parameterization, PrecisionConfig,
};
use gauss_losses::{fgn_objective, layer_nll, FgnObjectiveConfig, LambdaLoss, Reduction};

fn portable_config(parameterization: Parameterization) -> GaussLayerConfig {
    GaussLayerConfig {
        precision: PrecisionConfig {
            parameterization,
            portable: true,
            ..Default::default()
        },
        init: InitConfig {
            seed: Some(5),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A 6 → 5 (tanh) → 3 f32 network of `parameterization` on the portable path, on the CPU.
fn portable_net(parameterization: Parameterization) -> Result<(GaussNet, VarMap)> {
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
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    Ok((net, varmap))
}

/// 16 random inputs of width 6 and their classes (0, 1, 2 in turn), on the CPU.
fn batch() -> Result<(Tensor, Tensor)> {
    let x = Tensor::randn(0f32, 1.0, (16, 6), &Device::Cpu)?;
    let classes: Vec<u32> = (0..16).map(|i| i % 3).collect();
    Ok((x, Tensor::new(classes.as_slice(), &Device::Cpu)?))
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
    let (x, targets) = batch()?;
    for parameterization in Parameterization::ALL {
        for lambda_loss in LambdaLoss::ALL {
            let (net, varmap) = portable_net(parameterization)?;
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

/// What a training step costs a GPU in host synchronizations, measured on the portable path
/// (what CUDA and Metal run) with the library's host-read log: every read is in the working
/// dtype (f32), and only the forms that must look at their data read at all. A new read on
/// the training path (a sync per step on a GPU) fails this test.
#[test]
fn portable_training_step_reads_back_only_what_it_must() -> Result<()> {
    use gauss_layer::HostReadLog;
    let (x, targets) = batch()?;
    for parameterization in Parameterization::ALL {
        let (net, varmap) = portable_net(parameterization)?;
        let mut optimizer = gauss_layer::FusedAdamW::new(
            varmap.all_vars(),
            candle_nn::ParamsAdamW {
                lr: 1e-3,
                ..Default::default()
            },
        )?;
        let log = HostReadLog::start();
        for _ in 0..2 {
            let logits = net.forward(&x, true)?;
            let loss = fgn_objective(
                &logits,
                &targets,
                net.layers(),
                &FgnObjectiveConfig::default(),
            )?;
            optimizer.backward_step(&loss.total)?;
        }
        let reads = log.reads();
        drop(log);
        let what = parameterization.to_string();
        assert!(
            reads
                .iter()
                .all(|r| r.dtype == DType::F32 && r.elements == 1),
            "{what}: reads of more than one f32 scalar: {reads:?}"
        );
        // Two steps, two layers. direct checks positive-definiteness before its λ-loss (one
        // scalar per layer); expm reads its squaring count and eigenvalue bound per matrix
        // exponential (2 scalars, twice per layer: the forward's P and the λ-loss's tr Σ).
        let expected = match parameterization {
            Parameterization::Direct => 2 * 2,
            Parameterization::Expm => 2 * 2 * 2 * 2,
            _ => 0,
        };
        assert_eq!(reads.len(), expected, "{what}: {reads:?}");
    }
    Ok(())
}

/// A tensor on another device than the layer's gets the layer's named error
/// ([`GaussError::DeviceMismatch`], checked at the public boundary), not candle's generic
/// "device mismatch" from deep inside an op: a CPU `x` or weight with a layer on `device`.
/// On the CPU alone (nothing to mismatch) it checks what the error says.
fn tensors_on_another_device_get_the_named_error(device: &Device) -> Result<()> {
    let message = GaussError::device("input x", &Device::Cpu, "the device of center", device);
    let expected = format!(
        "input x: expected device Cpu (the device of center), got {:?}",
        device.location()
    );
    assert_eq!(message.to_string(), expected);
    if device.is_cpu() {
        return Ok(());
    }
    let varmap = VarMap::new();
    let layer = gauss_layer(
        6,
        3,
        portable_config(Parameterization::Cholesky),
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    let x = Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?;
    for result in [
        layer.forward_with_gaussian(&x, None).map(|_| ()),
        layer.mahalanobis_sq(&x).map(|_| ()),
        layer.log_prob(&x).map(|_| ()),
    ] {
        match result {
            Err(GaussError::DeviceMismatch { what, got, .. }) => {
                assert_eq!((what.as_str(), got), ("input x", Device::Cpu.location()));
            }
            other => panic!("expected DeviceMismatch for input x, got {other:?}"),
        }
    }
    // The functional core checks its arguments' devices too (naming the one that is not
    // on x's device).
    let matrix = layer.precision().precision_matrix()?;
    for result in [
        gauss_layer::ops::mahalanobis_sq(&x, layer.center(), layer.precision(), Default::default()),
        gauss_layer::ops::mahalanobis_sq_portable(
            &x,
            layer.center(),
            layer.precision(),
            Default::default(),
        ),
        gauss_layer::ops::mahalanobis_sq_naive(&x, layer.center(), &matrix),
    ] {
        match result {
            Err(GaussError::DeviceMismatch { what, .. }) => assert_eq!(what, "center"),
            other => panic!("expected DeviceMismatch for center, got {other:?}"),
        }
    }
    let weight = Tensor::zeros((3, 6), DType::F32, &Device::Cpu)?;
    let built = GaussLayer::new(
        Some(weight),
        None,
        layer.center().clone(),
        layer.precision().clone(),
        layer.config().clone(),
    );
    assert!(
        matches!(&built, Err(GaussError::DeviceMismatch { what, .. }) if what == "weight"),
        "{built:?}"
    );
    Ok(())
}
gauss_layer::test_device!(tensors_on_another_device_get_the_named_error);

/// The `.rs` files under `dir`, recursively (build outputs left out).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Calls that create a tensor or cast one: with an f64 dtype among their arguments they make
/// f64 data on whatever device they run on.
const CREATES_OR_CASTS: [&str; 13] = [
    "to_dtype(",
    "zeros(",
    "ones(",
    "eye(",
    "full(",
    "from_vec(",
    "from_slice(",
    "randn(",
    "rand(",
    "arange(",
    "from_varmap(",
    "zeros_like(",
    "ones_like(",
];

/// One statement of a source file: the code from the previous `;` (or item start) to the
/// next, comments removed, with its first line and enclosing function.
struct Statement {
    first_line: usize,
    last_line: usize,
    function: String,
    code: String,
}

/// Splits a file into statements (`;`-terminated, or ended by a line holding only a brace),
/// cutting at every `fn` and attribute line so a statement never spans two items.
fn statements(text: &str) -> Vec<Statement> {
    let mut out = Vec::new();
    let mut function = String::new();
    let mut current: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let code = if trimmed.starts_with("//") {
            ""
        } else {
            // A `//` inside a string literal keeps the line whole.
            match line.find("//") {
                Some(k) if !line[..k].contains('"') => &line[..k],
                _ => line,
            }
        };
        let starts_item = trimmed.starts_with("#[")
            || [
                "fn ",
                "pub fn ",
                "pub(crate) fn ",
                "pub(super) fn ",
                "async fn ",
            ]
            .iter()
            .any(|p| trimmed.starts_with(p));
        if starts_item {
            current.clear();
        }
        if let Some(k) = code.find("fn ") {
            let name: String = code[k + 3..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && current.is_empty() {
                function = name;
            }
        }
        current.push((i, code.to_string()));
        let ends = code.contains(';') || matches!(code.trim(), "{" | "}" | "};" | "},");
        if ends {
            out.push(Statement {
                first_line: current[0].0,
                last_line: i,
                function: function.clone(),
                code: current
                    .iter()
                    .map(|(_, c)| c.trim())
                    .collect::<Vec<_>>()
                    .join(" "),
            });
            current.clear();
        }
    }
    out
}

/// Names a file binds to the CPU device: `let dev = Device::Cpu;` or
/// `fn dev() -> Device { Device::Cpu }`.
fn cpu_device_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for (prefix, suffix) in [
        ("let ", " = Device::Cpu"),
        ("fn ", "() -> Device { Device::Cpu"),
    ] {
        for (k, _) in flat.match_indices(suffix) {
            if let Some(start) = flat[..k].rfind(prefix) {
                let name = flat[start + prefix.len()..k].trim();
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

/// Every source file of the workspace (libraries, examples, tests, fuzz targets, test modules
/// included): a tensor created in or cast to f64 must be on the host (`Device::Cpu` in the
/// statement, or a device name the file binds to it), in a branch where the working dtype is
/// f64 already (`DType::F64 =>` or `== DType::F64` just above, or a function whose name says
/// f64, which `test_device!` skips on Metal), or carry a `// f64:` comment saying why it is
/// safe. This catches the casts that never enter an autograd graph (constants, side reads,
/// test comparisons), which the graph walk above cannot see.
#[test]
fn sources_cast_to_f64_only_on_the_host() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["crates", "examples", "tests", "fuzz"] {
        if root.join(dir).is_dir() {
            rust_files(&root.join(dir), &mut files)?;
        }
    }
    let mut offenders = Vec::new();
    let mut checked = 0;
    for file in &files {
        let name = file.strip_prefix(&root)?.display().to_string();
        let text = std::fs::read_to_string(file)?;
        let lines: Vec<&str> = text.lines().collect();
        let cpu_names = cpu_device_names(&text);
        for statement in statements(&text) {
            let code = &statement.code;
            let f64_word = code
                .match_indices("F64")
                .any(|(k, _)| !code[k + 3..].starts_with(|c: char| c.is_alphanumeric()));
            if !f64_word || !CREATES_OR_CASTS.iter().any(|call| code.contains(call)) {
                continue;
            }
            checked += 1;
            let above =
                lines[statement.first_line.saturating_sub(3)..statement.first_line].join(" ");
            let waived = lines[statement.first_line.saturating_sub(1)..=statement.last_line]
                .iter()
                .any(|l| l.contains("// f64:"));
            let on_named_cpu = cpu_names.iter().any(|n| {
                code.contains(&format!("&{n})"))
                    || code.contains(&format!("&{n}()"))
                    || code.contains(&format!(", {n})"))
            });
            let allowed = code.contains("Device::Cpu")
                || on_named_cpu
                || above.contains("DType::F64 =>")
                || above.contains("== DType::F64")
                || code.contains("DType::F64 =>")
                || statement.function.contains("f64")
                || waived;
            if !allowed {
                offenders.push(format!(
                    "{name}:{} (in fn {}): {}",
                    statement.first_line + 1,
                    statement.function,
                    code.chars().take(160).collect::<String>()
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "the scan found only {checked} f64 creations or casts: is it reading the sources?"
    );
    assert!(
        offenders.is_empty(),
        "{} f64 tensors created or cast off the host (move to the CPU first, or say why with `// f64:`):\n{}",
        offenders.len(),
        offenders.join("\n")
    );
    Ok(())
}

/// The scanner itself: it must flag the shapes of the bugs it exists for (issue 21's list) and
/// accept their host-side fixes.
#[test]
fn f64_scan_flags_device_casts_and_accepts_host_ones() {
    let flagged = |src: &str| -> usize {
        let cpu = cpu_device_names(src);
        statements(src)
            .iter()
            .filter(|s| {
                s.code.contains("F64") && CREATES_OR_CASTS.iter().any(|c| s.code.contains(c))
            })
            .filter(|s| {
                !(s.code.contains("Device::Cpu")
                    || cpu.iter().any(|n| s.code.contains(&format!("&{n})"))))
            })
            .count()
    };
    // The training loop's per-step loss read, a multi-line chain (train.rs before the fix).
    assert_eq!(flagged("fn step() {\n    total += loss\n        .cross_entropy\n        .to_dtype(DType::F64)?\n        .to_scalar::<f64>()?;\n}\n"), 1);
    // A test comparison after `#[cfg(test)]`.
    assert_eq!(flagged("#[cfg(test)]\nmod tests {\n    fn cmp(a: &Tensor) {\n        let a = a.to_dtype(DType::F64)?;\n    }\n}\n"), 1);
    // The fixes: move to the host first, or a device bound to the CPU.
    assert_eq!(flagged("fn f() {\n    let v = t\n        .to_device(&Device::Cpu)?\n        .to_dtype(DType::F64)?;\n}\n"), 0);
    assert_eq!(flagged("fn f() {\n    let dev = Device::Cpu;\n    let z = Tensor::zeros(3, DType::F64, &dev)?;\n}\n"), 0);
}

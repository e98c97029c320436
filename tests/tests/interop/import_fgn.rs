//! PyTorch FGN import: state dicts built in the test, expected outputs computed from the PyTorch
//! `FGN_layer.forward` formulas (Finite_Gaussian_Network_lib/FGN_layer.py) with Candle ops:
//! `l = x Wᵀ + b` (tanh if `non_lin`), `g = exp(-q)` with
//! sphere `q = |x-c|² σ²`, diag `q = Σ (x-c)² σ²` (`σ = clamp(inv_covars, max = 1e8)`),
//! full `q = δᵀ A δ`, chol `q = δᵀ tril(A) tril(A)ᵀ δ`; `g ← g · max_k prev_g[k]` when gated;
//! `y = l · g`. The network forward is `Feedforward_FGN_net.forward` at HEAD: gated, no tanh
//! on `fl`.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use gauss_layer::import::{
    fgn_layer_from_tensors, fgn_model_from_tensors, fgn_net_from_tensors, import_fgn_layer,
    import_fgn_net, FgnCovarType, FgnImportOptions, FgnModelKind, FgnNetLayout,
};
use gauss_layer::testing::relative_error;
use gauss_layer::GaussError;

use gauss_tests::{randn, temp_dir};

const Z: usize = 4;
const DIM: usize = 3;

/// The PyTorch `q` (its exponent, without the 1/2) for each covar type.
fn torch_q(
    x: &Tensor,
    centers: &Tensor,
    inv_covars: &Tensor,
    kind: FgnCovarType,
) -> Result<Tensor> {
    let delta = x.unsqueeze(1)?.broadcast_sub(&centers.unsqueeze(0)?)?; // (B, Z, d)
    Ok(match kind {
        FgnCovarType::Sphere => {
            let s = inv_covars.flatten_all()?.clamp(f64::MIN, 1e8)?.sqr()?;
            delta
                .sqr()?
                .sum(D::Minus1)?
                .broadcast_mul(&s.unsqueeze(0)?)?
        }
        FgnCovarType::Diag => {
            let s = inv_covars.clamp(f64::MIN, 1e8)?.sqr()?;
            delta
                .sqr()?
                .broadcast_mul(&s.unsqueeze(0)?)?
                .sum(D::Minus1)?
        }
        FgnCovarType::Full => {
            // δᵀ A δ per (b, z): (Z, B, d) @ (Z, d, d) → (Z, B, d), then · δ.
            let dz = delta.transpose(0, 1)?.contiguous()?;
            let ad = dz.matmul(&inv_covars.transpose(1, 2)?.contiguous()?)?; // rows (A δ)ᵀ
            (ad * &dz)?.sum(D::Minus1)?.transpose(0, 1)?
        }
        FgnCovarType::Chol => {
            let mask = Tensor::tril2(DIM, DType::F64, &Device::Cpu)?;
            let l = inv_covars.broadcast_mul(&mask.unsqueeze(0)?)?;
            let dz = delta.transpose(0, 1)?.contiguous()?;
            let proj = dz.matmul(&l.contiguous()?)?; // δᵀ L
            proj.sqr()?.sum(D::Minus1)?.transpose(0, 1)?
        }
    })
}

fn torch_layer(
    x: &Tensor,
    t: &HashMap<String, Tensor>,
    prefix: &str,
    kind: FgnCovarType,
    non_lin: bool,
    free_biases: bool,
) -> Result<(Tensor, Tensor)> {
    torch_layer_gated(x, t, prefix, kind, non_lin, free_biases, None)
}

fn torch_layer_gated(
    x: &Tensor,
    t: &HashMap<String, Tensor>,
    prefix: &str,
    kind: FgnCovarType,
    non_lin: bool,
    free_biases: bool,
    prev_g: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let w = &t[&format!("{prefix}weights")];
    let c = &t[&format!("{prefix}centers")];
    let b = if free_biases {
        t[&format!("{prefix}biases")].clone()
    } else {
        (w * c)?.sum(D::Minus1)?.neg()?
    };
    let mut l = x.matmul(&w.t()?)?.broadcast_add(&b)?;
    if non_lin {
        l = l.tanh()?;
    }
    let mut g = torch_q(x, c, &t[&format!("{prefix}inv_covars")], kind)?
        .neg()?
        .exp()?;
    if let Some(prev) = prev_g {
        g = g.broadcast_mul(&prev.max_keepdim(D::Minus1)?)?;
    }
    Ok(((l * &g)?, g))
}

fn layer_tensors(prefix: &str, d: usize, kind: FgnCovarType) -> Result<HashMap<String, Tensor>> {
    let inv_covars = match kind {
        // Negative entries on purpose: the PyTorch code squares (sphere, diag) or has no sign
        // constraint (chol).
        FgnCovarType::Sphere => (randn(&[Z], 0.3)? + 0.5)?,
        FgnCovarType::Diag => (randn(&[Z, d], 0.3)? + 0.5)?,
        FgnCovarType::Full => {
            let a = randn(&[Z, d, d], 0.1)?;
            let eye = Tensor::eye(d, DType::F64, &Device::Cpu)?.unsqueeze(0)?;
            (a.matmul(&a.transpose(1, 2)?)?
                .broadcast_add(&(eye * 0.3)?)?
                + randn(&[Z, d, d], 0.02)?)?
        }
        FgnCovarType::Chol => {
            let eye = Tensor::eye(d, DType::F64, &Device::Cpu)?.unsqueeze(0)?;
            let signs = Tensor::new(&[1f64, -1.0, 1.0, -1.0], &Device::Cpu)?.reshape((Z, 1, 1))?;
            (randn(&[Z, d, d], 0.2)? + eye.broadcast_mul(&signs)?.affine(0.6, 0.0)?)?
        }
    };
    let mut t = HashMap::new();
    t.insert(format!("{prefix}weights"), randn(&[Z, d], 0.5)?);
    t.insert(format!("{prefix}biases"), randn(&[Z], 0.5)?);
    t.insert(format!("{prefix}centers"), randn(&[Z, d], 0.5)?);
    t.insert(format!("{prefix}inv_covars"), inv_covars);
    Ok(t)
}

#[test]
fn every_covar_type_matches_the_pytorch_formula() -> Result<()> {
    let x = randn(&[7, DIM], 0.7)?;
    for kind in [
        FgnCovarType::Sphere,
        FgnCovarType::Diag,
        FgnCovarType::Full,
        FgnCovarType::Chol,
    ] {
        for (non_lin, free_biases) in [(false, true), (true, false)] {
            let t = layer_tensors("", DIM, kind)?;
            let options = FgnImportOptions {
                covar_type: Some(kind),
                non_lin,
                free_biases,
                ..Default::default()
            };
            let layer = fgn_layer_from_tensors(&t, "", &options)?;
            let (y, g) = layer.forward_with_gaussian(&x, None)?;
            let (y_ref, g_ref) = torch_layer(&x, &t, "", kind, non_lin, free_biases)?;
            // f64 tolerance (design notes: ~1e-9 relative).
            assert!(relative_error(&g, &g_ref)? < 1e-9, "{kind:?} g");
            assert!(relative_error(&y, &y_ref)? < 1e-9, "{kind:?} y");
        }
    }
    Ok(())
}

#[test]
fn sphere_and_diag_are_inferred_from_shape() -> Result<()> {
    let x = randn(&[5, DIM], 0.7)?;
    for kind in [FgnCovarType::Sphere, FgnCovarType::Diag] {
        let t = layer_tensors("", DIM, kind)?;
        let layer = fgn_layer_from_tensors(&t, "", &FgnImportOptions::default())?;
        let (y, _) = layer.forward_with_gaussian(&x, None)?;
        let (y_ref, _) = torch_layer(&x, &t, "", kind, false, true)?;
        assert!(relative_error(&y, &y_ref)? < 1e-9, "{kind:?}");
    }
    // A (Z, d, d) inv_covars is ambiguous (full or chol) and must be named.
    let t = layer_tensors("", DIM, FgnCovarType::Chol)?;
    match fgn_layer_from_tensors(&t, "", &FgnImportOptions::default()) {
        Err(GaussError::Checkpoint { reason, .. }) => assert!(reason.contains("chol"), "{reason}"),
        other => panic!("expected an ambiguity error, got {other:?}"),
    }
    // A missing tensor is named.
    let mut t = layer_tensors("", DIM, FgnCovarType::Diag)?;
    t.remove("inv_covars");
    match fgn_layer_from_tensors(&t, "", &FgnImportOptions::default()) {
        Err(GaussError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("inv_covars"), "{reason}")
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    Ok(())
}

/// PyTorch `BatchNorm1d` in eval mode.
fn torch_batch_norm(x: &Tensor, t: &HashMap<String, Tensor>, prefix: &str) -> Result<Tensor> {
    let get = |n: &str| t[&format!("{prefix}{n}")].unsqueeze(0);
    let normalized = x
        .broadcast_sub(&get("running_mean")?)?
        .broadcast_div(&(get("running_var")? + 1e-5)?.sqrt()?)?;
    Ok(normalized
        .broadcast_mul(&get("weight")?)?
        .broadcast_add(&get("bias")?)?)
}

fn batch_norm_tensors(prefix: &str, n: usize) -> Result<HashMap<String, Tensor>> {
    let mut t = HashMap::new();
    t.insert(format!("{prefix}running_mean"), randn(&[n], 0.3)?);
    t.insert(
        format!("{prefix}running_var"),
        (randn(&[n], 0.1)?.abs()? + 0.5)?,
    );
    t.insert(format!("{prefix}weight"), (randn(&[n], 0.1)? + 1.0)?);
    t.insert(format!("{prefix}bias"), randn(&[n], 0.1)?);
    t.insert(
        format!("{prefix}num_batches_tracked"),
        Tensor::new(&[3i64], &Device::Cpu)?.reshape(())?,
    );
    Ok(t)
}

/// `Feedforward_FGN_net(DIM, 2, [Z])` with diag layers: `ib`, `hidden_layers.{layer}` (FGN),
/// `hidden_layers.{layer + 1}` (BatchNorm1d, unless `norm` is false), `fl` (FGN, Z → 2).
fn net_tensors(layer: usize, norm: bool) -> Result<HashMap<String, Tensor>> {
    let mut t = batch_norm_tensors("ib.", DIM)?;
    t.extend(layer_tensors(
        &format!("hidden_layers.{layer}."),
        DIM,
        FgnCovarType::Diag,
    )?);
    if norm {
        t.extend(batch_norm_tensors(
            &format!("hidden_layers.{}.", layer + 1),
            Z,
        )?);
    }
    for (k, v) in layer_tensors("fl.", Z, FgnCovarType::Diag)? {
        // The final layer maps Z → 2: narrow its neuron axis.
        t.insert(k, v.narrow(0, 0, 2)?);
    }
    Ok(t)
}

/// The original's forward of [`net_tensors`] at HEAD: gated by the hidden layer's g, no tanh on
/// `fl`.
fn torch_net(
    x: &Tensor,
    t: &HashMap<String, Tensor>,
    layer: usize,
    norm: bool,
    non_lin: bool,
) -> Result<Tensor> {
    let h = torch_batch_norm(x, t, "ib.")?;
    let prefix = format!("hidden_layers.{layer}.");
    let (h, g) = torch_layer(&h, t, &prefix, FgnCovarType::Diag, non_lin, true)?;
    let h = if norm {
        torch_batch_norm(&h, t, &format!("hidden_layers.{}.", layer + 1))?
    } else {
        h
    };
    let (y, _) = torch_layer_gated(&h, t, "fl.", FgnCovarType::Diag, false, true, Some(&g))?;
    Ok(y)
}

fn reason(result: Result<impl std::fmt::Debug, GaussError>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn feedforward_fgn_net_matches_the_original_forward_and_loads_from_a_file() -> Result<()> {
    let t = net_tensors(0, true)?;
    let options = FgnImportOptions {
        non_lin: true,
        ..Default::default()
    };
    let x = randn(&[6, DIM], 0.8)?;
    let expected = torch_net(&x, &t, 0, true, true)?;

    let net = fgn_net_from_tensors(&t, &FgnNetLayout::default(), &options)?;
    assert_eq!(net.config().hidden, vec![Z]);
    assert!(net.config().gate, "the original gates since 2020");
    assert!(
        !net.layers()[1].config().tanh,
        "the original's fl has no non_lin"
    );
    let y = net.forward(&x, false)?;
    assert!(relative_error(&y, &expected)? < 1e-9);

    // Through a file, as a user exports it with safetensors.torch.save_file.
    let dir = temp_dir("fgn-import")?;
    let path = dir.join("net.safetensors");
    candle_core::safetensors::save(&t, &path)?;
    let from_file = import_fgn_net(&path, &Device::Cpu, DType::F64, &options)?;
    let y_file = from_file.forward(&x, false)?;
    assert!(relative_error(&y_file, &expected)? < 1e-9);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn dropout_layout_identity_norms_and_data_parallel_prefix_import_alike() -> Result<()> {
    let x = randn(&[5, DIM], 0.8)?;
    let options = FgnImportOptions::default();
    // drop_p > 0: Dropout at 0, FGN at 1, BatchNorm at 2, Dropout at 3 (no tensors).
    let t = net_tensors(1, true)?;
    let (net, report) = fgn_model_from_tensors(&t, &FgnNetLayout::default(), &options)?;
    assert!(report.dropout && report.batch_norm && report.input_batch_norm);
    assert_eq!(report.kind, FgnModelKind::Net);
    let expected = torch_net(&x, &t, 1, true, false)?;
    assert!(relative_error(&net.forward(&x, false)?, &expected)? < 1e-9);
    // Stating the other layout is refused with the layout in words.
    let wrong = FgnNetLayout {
        dropout: Some(false),
        ..Default::default()
    };
    let text = reason(fgn_net_from_tensors(&t, &wrong, &options));
    assert!(
        text.contains("hidden_layers.1") && text.contains("drop_p"),
        "{text}"
    );

    // Batch norms replaced by identities (no tensors): no hidden batch norm.
    let t = net_tensors(0, false)?;
    let (net, report) = fgn_model_from_tensors(&t, &FgnNetLayout::default(), &options)?;
    assert!(!report.batch_norm && !report.dropout);
    let expected = torch_net(&x, &t, 0, false, false)?;
    assert!(relative_error(&net.forward(&x, false)?, &expected)? < 1e-9);

    // nn.DataParallel saves every key under `module.`.
    let t = net_tensors(0, true)?;
    let wrapped: HashMap<String, Tensor> = t
        .iter()
        .map(|(k, v)| (format!("module.{k}"), v.clone()))
        .collect();
    let (net, report) = fgn_model_from_tensors(&wrapped, &FgnNetLayout::default(), &options)?;
    assert_eq!(report.stripped_prefix.as_deref(), Some("module."));
    let expected = torch_net(&x, &t, 0, true, false)?;
    assert!(relative_error(&net.forward(&x, false)?, &expected)? < 1e-9);

    // A layer where the layout has a batch norm slot.
    let mut t = net_tensors(0, true)?;
    t.extend(layer_tensors("hidden_layers.3.", Z, FgnCovarType::Diag)?);
    let text = reason(fgn_net_from_tensors(&t, &FgnNetLayout::default(), &options));
    assert!(text.contains("hidden_layers.3"), "{text}");
    Ok(())
}

#[test]
fn a_lone_layer_imports_as_a_model_and_the_net_importer_lists_its_prefixes() -> Result<()> {
    let t = layer_tensors("", DIM, FgnCovarType::Diag)?;
    let options = FgnImportOptions {
        non_lin: true,
        ..Default::default()
    };
    let (net, report) = fgn_model_from_tensors(&t, &FgnNetLayout::default(), &options)?;
    assert_eq!(report.kind, FgnModelKind::Layer);
    assert!(net.config().hidden.is_empty());
    let x = randn(&[4, DIM], 0.7)?;
    let (expected, _) = torch_layer(&x, &t, "", FgnCovarType::Diag, true, true)?;
    assert!(relative_error(&net.forward(&x, false)?, &expected)? < 1e-9);

    let dir = temp_dir("fgn-import-layer")?;
    let path = dir.join("layer.safetensors");
    candle_core::safetensors::save(&t, &path)?;
    let text = reason(import_fgn_net(&path, &Device::Cpu, DType::F64, &options));
    assert!(
        text.contains("layer.safetensors") && text.contains("(top level)") && text.contains("fl"),
        "{text}"
    );
    let text = reason(import_fgn_layer(
        &path,
        "hidden_layers.0",
        &Device::Cpu,
        DType::F64,
        &options,
    ));
    assert!(text.contains("(top level)"), "{text}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bad_state_dicts_give_errors_that_name_the_file_and_the_tensor() -> Result<()> {
    let dir = temp_dir("fgn-import-bad")?;
    let options = FgnImportOptions::default();
    let write = |name: &str, t: &HashMap<String, Tensor>| -> Result<std::path::PathBuf> {
        let path = dir.join(name);
        candle_core::safetensors::save(t, &path)?;
        Ok(path)
    };
    let import = |path: &std::path::Path, options: &FgnImportOptions| {
        gauss_layer::import::import_fgn_model(path, &Device::Cpu, DType::F32, options)
    };

    // An integer inv_covars (issue 9 item 7: it used to reach an unimplemented Candle op).
    for dtype in [DType::U8, DType::I64, DType::U32] {
        let mut t = layer_tensors("", DIM, FgnCovarType::Diag)?;
        let ints = (t["inv_covars"].abs()? * 10.0)?.to_dtype(dtype)?;
        t.insert("inv_covars".into(), ints);
        let path = write("int.safetensors", &t)?;
        let text = reason(import(&path, &options));
        assert!(
            text.contains("int.safetensors")
                && text.contains("inv_covars")
                && text.contains("floating point"),
            "{text}"
        );
    }

    // A NaN parameter.
    let mut t = layer_tensors("", DIM, FgnCovarType::Diag)?;
    let mut w = t["weights"].flatten_all()?.to_vec1::<f64>()?;
    w[4] = f64::NAN;
    t.insert(
        "weights".into(),
        Tensor::from_vec(w, (Z, DIM), &Device::Cpu)?,
    );
    let text = reason(import(&write("nan.safetensors", &t)?, &options));
    assert!(
        text.contains("weights") && text.contains("non-finite"),
        "{text}"
    );

    // A misshapen tensor: the error names the file and the tensor.
    let mut t = layer_tensors("", DIM, FgnCovarType::Diag)?;
    t.insert("biases".into(), randn(&[Z + 1], 1.0)?);
    let text = reason(import(&write("shape.safetensors", &t)?, &options));
    assert!(
        text.contains("shape.safetensors") && text.contains("biases"),
        "{text}"
    );

    // A zero sphere/diag scale is an infinitely wide neuron.
    let mut t = layer_tensors("", DIM, FgnCovarType::Sphere)?;
    t.insert(
        "inv_covars".into(),
        Tensor::zeros(Z, DType::F64, &Device::Cpu)?,
    );
    let text = reason(import(&write("zero.safetensors", &t)?, &options));
    assert!(text.contains("infinitely wide"), "{text}");

    // ordinal ≠ 2 is refused before anything is read.
    let t = layer_tensors("", DIM, FgnCovarType::Sphere)?;
    let l1 = FgnImportOptions {
        ordinal: 1.0,
        ..Default::default()
    };
    let text = reason(import(&write("l1.safetensors", &t)?, &l1));
    assert!(text.contains("ordinal"), "{text}");

    // A torch.save zip archive (PyTorch >= 1.6 writes zip files starting with PK).
    let path = dir.join("model.pth");
    std::fs::write(&path, b"PK\x03\x04\x00\x00not really a zip")?;
    let text = reason(import(&path, &options));
    assert!(
        text.contains("torch.save") && text.contains("save_file"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn full_and_chol_files_are_not_mistaken_for_each_other() -> Result<()> {
    let full = |t: FgnCovarType| FgnImportOptions {
        covar_type: Some(t),
        ..Default::default()
    };
    // A chol factor as the original initializes it (lower triangular) read as `full`.
    let mut t = layer_tensors("", DIM, FgnCovarType::Chol)?;
    let mask = Tensor::tril2(DIM, DType::F64, &Device::Cpu)?.unsqueeze(0)?;
    t.insert("inv_covars".into(), t["inv_covars"].broadcast_mul(&mask)?);
    let text = reason(fgn_layer_from_tensors(&t, "", &full(FgnCovarType::Full)));
    assert!(
        text.contains("lower triangular") && text.contains("chol"),
        "{text}"
    );
    // A chol factor with negative diagonal entries and junk above: A + Aᵀ is not PD.
    let mut t = layer_tensors("", DIM, FgnCovarType::Chol)?;
    let signs = Tensor::new(&[-1f64, 1.0, 1.0], &Device::Cpu)?.reshape((1, 1, DIM))?;
    let eye = Tensor::eye(DIM, DType::F64, &Device::Cpu)?.unsqueeze(0)?;
    let a = randn(&[Z, DIM, DIM], 0.05)?.broadcast_add(&eye.broadcast_mul(&signs)?)?;
    t.insert("inv_covars".into(), a);
    let text = reason(fgn_layer_from_tensors(&t, "", &full(FgnCovarType::Full)));
    assert!(
        text.contains("not positive definite") && text.contains("chol"),
        "{text}"
    );
    // A symmetric full matrix read as `chol`.
    let t = layer_tensors("", DIM, FgnCovarType::Full)?;
    let a = &t["inv_covars"];
    let mut t2 = t.clone();
    t2.insert("inv_covars".into(), ((a + a.transpose(1, 2)?)? * 0.5)?);
    let text = reason(fgn_layer_from_tensors(&t2, "", &full(FgnCovarType::Chol)));
    assert!(
        text.contains("symmetric") && text.contains("full"),
        "{text}"
    );
    Ok(())
}

#[test]
fn tied_biases_follow_the_centers_and_stale_free_biases_are_noted() -> Result<()> {
    // A free_biases=False layer saves the biases of its last forward, b = −W·c.
    let mut t = layer_tensors("", DIM, FgnCovarType::Diag)?;
    let tied = (&t["weights"] * &t["centers"])?.sum(D::Minus1)?.neg()?;
    t.insert("biases".into(), tied);
    let (_, report) =
        fgn_model_from_tensors(&t, &FgnNetLayout::default(), &FgnImportOptions::default())?;
    assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
    assert!(report.notes[0].contains("free_biases=False"));
    let options = FgnImportOptions {
        free_biases: false,
        ..Default::default()
    };
    let (net, report) = fgn_model_from_tensors(&t, &FgnNetLayout::default(), &options)?;
    assert!(report.notes.is_empty());
    assert!(net.layers()[0].config().tied_bias && net.layers()[0].bias().is_none());
    // Free biases that differ from −W·c give no note.
    let t = layer_tensors("", DIM, FgnCovarType::Diag)?;
    let (_, report) =
        fgn_model_from_tensors(&t, &FgnNetLayout::default(), &FgnImportOptions::default())?;
    assert!(report.notes.is_empty());
    Ok(())
}

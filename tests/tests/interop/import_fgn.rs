//! PyTorch FGN import: state dicts built in the test, expected outputs computed from the PyTorch
//! `FGN_layer.forward` formulas (Finite_Gaussian_Network_lib/FGN_layer.py) with Candle ops:
//! `l = x Wᵀ + b` (tanh if `non_lin`), `g = exp(-q)` with
//! sphere `q = |x-c|² σ²`, diag `q = Σ (x-c)² σ²` (`σ = clamp(inv_covars, max = 1e8)`),
//! full `q = δᵀ A δ`, chol `q = δᵀ tril(A) tril(A)ᵀ δ`; `y = l · g`.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use gauss_layer::import::{
    fgn_layer_from_tensors, fgn_net_from_tensors, import_fgn_net, FgnCovarType, FgnImportOptions,
    FgnNetLayout,
};
use gauss_layer::testing::relative_error;
use gauss_layer::GaussError;

use gauss_tests::randn;

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
    let g = torch_q(x, c, &t[&format!("{prefix}inv_covars")], kind)?
        .neg()?
        .exp()?;
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

#[test]
fn feedforward_fgn_net_matches_and_loads_from_a_file() -> Result<()> {
    // Feedforward_FGN_net(3, 2, [4]): ib, hidden_layers.0 (FGN), hidden_layers.1 (BatchNorm1d),
    // fl (FGN). Its forward does not gate by prev_g.
    let mut t = batch_norm_tensors("ib.", DIM)?;
    t.extend(layer_tensors("hidden_layers.0.", DIM, FgnCovarType::Diag)?);
    t.extend(batch_norm_tensors("hidden_layers.1.", Z)?);
    let fl = layer_tensors("fl.", Z, FgnCovarType::Diag)?;
    // The final layer maps Z → 2: narrow its neuron axis.
    for (k, v) in fl {
        let v = if k.ends_with("weights")
            || k.ends_with("centers")
            || k.ends_with("inv_covars")
            || k.ends_with("biases")
        {
            v.narrow(0, 0, 2)?
        } else {
            v
        };
        t.insert(k, v);
    }
    let options = FgnImportOptions {
        non_lin: true,
        ..Default::default()
    };
    let x = randn(&[6, DIM], 0.8)?;
    let h = torch_batch_norm(&x, &t, "ib.")?;
    let (h, _) = torch_layer(&h, &t, "hidden_layers.0.", FgnCovarType::Diag, true, true)?;
    let h = torch_batch_norm(&h, &t, "hidden_layers.1.")?;
    let (expected, _) = torch_layer(&h, &t, "fl.", FgnCovarType::Diag, true, true)?;

    let net = fgn_net_from_tensors(&t, &FgnNetLayout::default(), &options)?;
    assert_eq!(net.config().hidden, vec![Z]);
    let y = net.forward(&x, false)?;
    assert!(relative_error(&y, &expected)? < 1e-9);

    // Through a file, as a user exports it with safetensors.torch.save_file.
    let path = std::env::temp_dir().join(format!("fgn-import-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&t, &path)?;
    let from_file = import_fgn_net(&path, &Device::Cpu, DType::F64, &options)?;
    let y_file = from_file.forward(&x, false)?;
    assert!(relative_error(&y_file, &expected)? < 1e-9);
    std::fs::remove_file(&path)?;
    Ok(())
}

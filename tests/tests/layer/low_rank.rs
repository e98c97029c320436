//! lowrank (`P = diag(e^θ) + U Uᵀ`) against `direct` holding the very same `P`, in f64, on the
//! default and the portable path: distances, Gaussians, outputs, `log det P`, `tr Σ`, `tr P`,
//! every λ-loss variant, the NLL, and the gradients. lowrank's raw gradient is checked against
//! direct's through the chain rule of its map: with `G = ∂L/∂P` (direct's raw gradient, which
//! is symmetric), `∂L/∂θ_i = G_ii e^{θ_i}` and `∂L/∂U = 2 G U`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gauss_layer::testing::relative_error;
use gauss_layer::{GaussLayer, GaussLayerConfig, Parameterization, Precision, PrecisionConfig};
use gauss_losses::{layer_nll, LambdaLoss, Reduction};

/// A lowrank layer and a direct layer with the same P, centers and weights.
struct Pair {
    x: Var,
    low_rank_raw: Var,
    direct_raw: Var,
    center: Var,
    weight: Tensor,
    dim: usize,
    rank: usize,
}

impl Pair {
    fn new(neurons: usize, dim: usize, rank: usize) -> Result<Self> {
        let device = Device::Cpu;
        let theta = Tensor::randn(0f64, 0.5, (neurons, dim, 1), &device)?;
        let u = Tensor::randn(0f64, 0.4, (neurons, dim, rank), &device)?;
        let low_rank_raw = Tensor::cat(&[&theta, &u], 2)?;
        let p = theta
            .squeeze(2)?
            .exp()?
            .unsqueeze(2)?
            .broadcast_mul(&Tensor::eye(dim, DType::F64, &device)?)?
            .add(&u.matmul(&u.transpose(1, 2)?)?)?;
        Ok(Self {
            x: Var::from_tensor(&Tensor::randn(0f64, 1.0, (17, dim), &device)?)?,
            low_rank_raw: Var::from_tensor(&low_rank_raw)?,
            direct_raw: Var::from_tensor(&p)?,
            center: Var::from_tensor(&Tensor::randn(0f64, 0.5, (neurons, dim), &device)?)?,
            weight: Tensor::randn(0f64, 1.0, (neurons, dim), &device)?,
            dim,
            rank,
        })
    }

    fn layer(&self, low_rank: bool, portable: bool) -> Result<GaussLayer> {
        let parameterization = if low_rank {
            Parameterization::LowRank { rank: self.rank }
        } else {
            Parameterization::Direct
        };
        let config = GaussLayerConfig {
            precision: PrecisionConfig {
                parameterization,
                portable,
                ..Default::default()
            },
            ..Default::default()
        };
        let raw = if low_rank {
            &self.low_rank_raw
        } else {
            &self.direct_raw
        };
        let precision = Precision::from_raw(raw.as_tensor().clone(), self.dim, &config)?;
        Ok(GaussLayer::new(
            Some(self.weight.clone()),
            None,
            self.center.as_tensor().clone(),
            precision,
            config,
        )?)
    }
}

fn check(what: &str, actual: &Tensor, expected: &Tensor) -> Result<()> {
    let err = relative_error(actual, expected)?;
    anyhow::ensure!(err < 1e-9, "{what}: relative error {err:e}");
    Ok(())
}

#[test]
fn low_rank_matches_direct_with_the_same_precision_f64() -> Result<()> {
    for (neurons, dim, rank) in [(3, 5, 2), (4, 12, 3), (2, 4, 6)] {
        let pair = Pair::new(neurons, dim, rank)?;
        for portable in [false, true] {
            let case = format!("Z={neurons} d={dim} r={rank} portable {portable}");
            let low = pair.layer(true, portable)?;
            let direct = pair.layer(false, portable)?;
            let (lp, dp) = (low.precision(), direct.precision());
            check(
                &format!("{case}: P"),
                &lp.precision_matrix()?,
                &dp.precision_matrix()?,
            )?;
            check(
                &format!("{case}: Σ"),
                &lp.covariance_matrix()?,
                &dp.covariance_matrix()?,
            )?;
            check(
                &format!("{case}: log det"),
                &lp.log_det_precision()?,
                &dp.log_det_precision()?,
            )?;
            check(
                &format!("{case}: tr Σ"),
                &lp.trace_covariance()?,
                &dp.trace_covariance()?,
            )?;
            check(
                &format!("{case}: tr P"),
                &lp.trace_precision()?,
                &dp.trace_precision()?,
            )?;
            let x = pair.x.as_tensor();
            check(
                &format!("{case}: m2"),
                &low.mahalanobis_sq(x)?,
                &direct.mahalanobis_sq(x)?,
            )?;
            let (y_low, g_low) = low.forward_with_gaussian(x, None)?;
            let (y_direct, g_direct) = direct.forward_with_gaussian(x, None)?;
            check(&format!("{case}: g"), &g_low, &g_direct)?;
            check(&format!("{case}: y"), &y_low, &y_direct)?;
            for variant in LambdaLoss::ALL {
                check(
                    &format!("{case}: λ-loss {variant}"),
                    &variant.per_neuron(lp)?,
                    &variant.per_neuron(dp)?,
                )?;
            }

            // The NLL plus a λ-loss, through both layers, and its gradients.
            let loss = |layer: &GaussLayer| -> Result<Tensor> {
                let nll = layer_nll(layer, x, Reduction::Mean)?.sum_all()?;
                let lambda = LambdaLoss::TraceCovariance
                    .per_neuron(layer.precision())?
                    .sum_all()?;
                Ok((nll + lambda)?)
            };
            let (loss_low, loss_direct) = (loss(&low)?, loss(&direct)?);
            check(&format!("{case}: nll"), &loss_low, &loss_direct)?;
            let grads_low = loss_low.backward()?;
            let grads_direct = loss_direct.backward()?;
            for (name, var) in [("x", &pair.x), ("center", &pair.center)] {
                let a = grads_low
                    .get(var.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("∂{name}"))?;
                let b = grads_direct
                    .get(var.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("∂{name}"))?;
                check(&format!("{case}: ∂{name}"), a, b)?;
            }
            // ∂θ_i = G_ii e^{θ_i}, ∂U = 2 G U with G = direct's (symmetric) raw gradient.
            let g = grads_direct
                .get(pair.direct_raw.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("∂P"))?;
            let g = ((g + g.transpose(1, 2)?)? * 0.5)?;
            let raw = pair.low_rank_raw.as_tensor();
            let theta = raw.narrow(2, 0, 1)?.squeeze(2)?;
            let u = raw.narrow(2, 1, rank)?;
            let eye = Tensor::eye(dim, DType::F64, &Device::Cpu)?;
            let g_diagonal = g.broadcast_mul(&eye)?.sum(2)?;
            let expected_theta = (g_diagonal * theta.exp()?)?.unsqueeze(2)?;
            let expected_u = (g.matmul(&u)? * 2.0)?;
            let expected = Tensor::cat(&[&expected_theta, &expected_u], 2)?;
            let actual = grads_low.get(raw).ok_or_else(|| anyhow::anyhow!("∂raw"))?;
            check(&format!("{case}: ∂raw (chain rule)"), actual, &expected)?;
        }
    }
    Ok(())
}

#[test]
fn low_rank_inverse_map_is_exact_where_documented() -> Result<()> {
    let config = |rank| GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank });
    let device = Device::Cpu;
    // rank ≥ d: any positive-definite P is represented exactly.
    let a = Tensor::randn(0f64, 1.0, (2, 4, 4), &device)?;
    let p = a
        .matmul(&a.transpose(1, 2)?)?
        .broadcast_add(&(Tensor::eye(4, DType::F64, &device)? * 0.1)?)?;
    let back = Precision::from_precision_matrix(&p, &config(4))?.precision_matrix()?;
    check("rank 4 of d = 4", &back, &p)?;
    // δ I plus rank 2 with rank 2: exact; a generic P with rank 2: an error naming the spread.
    let u = Tensor::randn(0f64, 1.0, (2, 6, 2), &device)?;
    let p = u
        .matmul(&u.transpose(1, 2)?)?
        .broadcast_add(&(Tensor::eye(6, DType::F64, &device)? * 0.3)?)?;
    let back = Precision::from_precision_matrix(&p, &config(2))?.precision_matrix()?;
    check("δI + rank 2", &back, &p)?;
    let generic = Tensor::randn(0f64, 1.0, (1, 6, 6), &device)?;
    let generic = generic
        .matmul(&generic.transpose(1, 2)?)?
        .broadcast_add(&(Tensor::eye(6, DType::F64, &device)? * 0.1)?)?;
    let err = Precision::from_precision_matrix(&generic, &config(2)).unwrap_err();
    assert!(
        err.to_string().contains("smallest eigenvalues spread"),
        "{err}"
    );
    Ok(())
}

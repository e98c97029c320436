//! Criterion benches: the λ-loss's per-neuron statistic `tr Σ` of a cholesky precision
//! (`Precision::trace_covariance`), forward and forward + backward, at the neuron counts and
//! widths of the digits and MNIST networks, f32, CPU. Up to d = 64 it runs the lane kernels
//! (`linalg/lanes.rs`), above that faer's blocked triangular routines.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gauss_layer::{Parameterization, Precision, PrecisionConfig};

const SHAPES: [(usize, usize); 3] = [(64, 32), (64, 64), (64, 128)];

fn trace_covariance_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("trace_covariance_cholesky_f32");
    group.sample_size(20);
    for (neurons, dim) in SHAPES {
        let id = format!("Z{neurons}_d{dim}");
        let device = Device::Cpu;
        // I/√d plus a little noise below the diagonal: the layer's initial precision, moved.
        let raw = (Tensor::eye(dim, DType::F32, &device)
            .and_then(|eye| eye.unsqueeze(0)?.repeat((neurons, 1, 1)))
            .expect("identity")
            * (1.0 / (dim as f64).sqrt()))
        .expect("scaled identity");
        let noise = Tensor::randn(0f32, 0.01, (neurons, dim, dim), &device).expect("noise");
        let raw = Var::from_tensor(&(raw + noise).expect("raw")).expect("variable");
        let config = PrecisionConfig {
            parameterization: Parameterization::Cholesky,
            ..Default::default()
        };
        let precision =
            Precision::from_raw(raw.as_tensor().clone(), dim, config).expect("precision");
        group.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter(|| black_box(precision.trace_covariance().expect("tr Σ")))
        });
        group.bench_function(BenchmarkId::new("forward_backward", &id), |b| {
            b.iter(|| {
                let total = precision.trace_covariance().and_then(|t| Ok(t.sum_all()?));
                black_box(total.and_then(|t| Ok(t.backward()?)).expect("backward"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, trace_covariance_benches);
criterion_main!(benches);

//! Criterion benches: the layer's forward and forward + backward (of `sum(y)` to every
//! parameter), the same through the one-op fused layer forward, and the fused projected and
//! expanded kernels alone, at a couple of (B, d, Z) shapes, f32, CPU.
//! `examples/bench` prints the same figures as one JSON line beside a matmul of equal FLOPs.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gauss_layer::kernels::expanded_fused::mahalanobis_sq_expanded_fused_factor;
use gauss_layer::kernels::fused_layer::gauss_layer_forward_fused;
use gauss_layer::kernels::projected::mahalanobis_sq_projected_fused;
use gauss_layer::{gauss_layer, GaussLayerConfig};

const SHAPES: [(usize, usize, usize); 2] = [(256, 32, 64), (512, 64, 128)];

fn layer_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("gauss_layer_cholesky_f32");
    group.sample_size(20);
    for (batch, dim, neurons) in SHAPES {
        let id = format!("B{batch}_d{dim}_Z{neurons}");
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let layer = gauss_layer(dim, neurons, GaussLayerConfig::default(), vb).expect("layer");
        let x = Tensor::randn(0f32, 1f32, (batch, dim), &Device::Cpu).expect("input");
        group.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter(|| black_box(layer.forward(&x).expect("forward")))
        });
        group.bench_function(BenchmarkId::new("forward_backward", &id), |b| {
            b.iter(|| {
                let y = layer.forward(&x).expect("forward");
                black_box(y.sum_all().and_then(|s| s.backward()).expect("backward"))
            })
        });
        let fused = || {
            let weight = layer.weight().expect("weight");
            gauss_layer_forward_fused(
                &x,
                layer.center(),
                weight,
                layer.bias(),
                layer.precision(),
                layer.config().kernel,
            )
            .expect("fused forward")
            .expect("fused path")
            .0
        };
        group.bench_function(BenchmarkId::new("fused_forward", &id), |b| {
            b.iter(|| black_box(fused()))
        });
        group.bench_function(BenchmarkId::new("fused_forward_backward", &id), |b| {
            b.iter(|| {
                black_box(
                    fused()
                        .sum_all()
                        .and_then(|s| s.backward())
                        .expect("backward"),
                )
            })
        });
    }
    group.finish();
}

type FusedKernel = fn(&Tensor, &Tensor, &Tensor) -> gauss_layer::Result<Tensor>;

fn kernel_benches(c: &mut Criterion) {
    let kernels: [(&str, FusedKernel); 2] = [
        ("projected_fused_f32", mahalanobis_sq_projected_fused),
        ("expanded_fused_f32", mahalanobis_sq_expanded_fused_factor),
    ];
    for (name, kernel) in kernels {
        kernel_group(c, name, kernel);
    }
}

fn kernel_group(c: &mut Criterion, name: &str, kernel: FusedKernel) {
    let mut group = c.benchmark_group(name);
    group.sample_size(20);
    for (batch, dim, neurons) in SHAPES {
        let id = format!("B{batch}_d{dim}_Z{neurons}");
        let x = Tensor::randn(0f32, 1f32, (batch, dim), &Device::Cpu).expect("input");
        let center = Tensor::randn(0f32, 1f32, (neurons, dim), &Device::Cpu).expect("center");
        let factor = Tensor::randn(0f32, 1f32, (neurons, dim, dim), &Device::Cpu).expect("factor");
        group.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter(|| black_box(kernel(&x, &center, &factor).expect("m2")))
        });
        let factor_var = candle_core::Var::from_tensor(&factor).expect("var");
        group.bench_function(BenchmarkId::new("forward_backward", &id), |b| {
            b.iter(|| {
                let m2 = kernel(&x, &center, factor_var.as_tensor()).expect("m2");
                black_box(m2.sum_all().and_then(|s| s.backward()).expect("backward"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, kernel_benches, layer_benches);
criterion_main!(benches);

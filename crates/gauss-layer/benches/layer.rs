//! Criterion benches: the layer's forward and forward + backward (of `sum(y)` to every
//! parameter) through each distance kernel the resolver can run (automatic, forced
//! projected, forced expanded, and the portable tensor-op path), at a couple of (B, d, Z)
//! shapes, f32, CPU. `examples/bench` prints the same figures as one JSON line beside a
//! matmul of equal FLOPs.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gauss_layer::{gauss_layer, DistanceKernel, GaussLayerConfig, PrecisionConfig};

const SHAPES: [(usize, usize, usize); 2] = [(256, 32, 64), (512, 64, 128)];

fn layer_benches(c: &mut Criterion) {
    let variants = [
        ("auto", DistanceKernel::Auto, false),
        ("projected", DistanceKernel::Projected, false),
        ("expanded", DistanceKernel::Expanded, false),
        ("portable", DistanceKernel::Auto, true),
    ];
    for (name, kernel, portable) in variants {
        let mut group = c.benchmark_group(format!("gauss_layer_cholesky_f32_{name}"));
        group.sample_size(20);
        for (batch, dim, neurons) in SHAPES {
            let id = format!("B{batch}_d{dim}_Z{neurons}");
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let config = GaussLayerConfig {
                precision: PrecisionConfig {
                    portable,
                    ..Default::default()
                },
                kernel,
                ..Default::default()
            };
            let layer = gauss_layer(dim, neurons, config, vb).expect("layer");
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
        }
        group.finish();
    }
}

criterion_group!(benches, layer_benches);
criterion_main!(benches);

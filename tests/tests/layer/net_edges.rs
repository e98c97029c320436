//! `GaussNet` at the edges of its input and size range: training batches a batch norm cannot
//! take, empty batches through gated layers, sizes whose element counts overflow.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gauss_layer::{
    gauss_layer, GaussError, GaussLayerConfig, GaussNet, GaussNetConfig, Parameterization,
};

use gauss_tests::{new_net, small_diag_net_config};

fn norm_stats(net: &GaussNet) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::new();
    let norms = net
        .input_norm()
        .into_iter()
        .chain(net.norms().iter().flatten());
    for norm in norms {
        out.push(norm.running_mean().to_vec1::<f32>()?);
        out.push(norm.running_var().to_vec1::<f32>()?);
    }
    Ok(out)
}

/// A batch norm in training needs two samples: with one, Candle's running-variance update
/// divides by B - 1 = 0 and writes NaN into `running_var`, which every later evaluation reads
/// (PyTorch's `BatchNorm1d` refuses such a batch). The refusal leaves the statistics as they
/// were; a batch of two updates them by the closed form.
#[test]
fn training_with_batch_norm_refuses_batches_below_two_and_keeps_the_running_statistics(
) -> Result<()> {
    let config = GaussNetConfig {
        input_batch_norm: true,
        batch_norm: true,
        ..small_diag_net_config()
    };
    let (net, _vars) = new_net(config, DType::F32)?;
    let fresh = norm_stats(&net)?;
    // Candle's initial running statistics: mean 0, variance 1.
    assert_eq!(fresh[0], vec![0.0; 3]);
    assert_eq!(fresh[1], vec![1.0; 3]);

    let one = Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu)?;
    match net.forward(&one, true) {
        Err(GaussError::Shape {
            what,
            expected,
            got,
        }) => {
            assert_eq!((what.as_str(), got), ("input x", vec![1, 3]));
            assert!(expected.contains("batch >= 2"), "{expected}");
        }
        other => panic!("a training batch of one through a batch norm: {other:?}"),
    }
    let none = Tensor::zeros((0, 3), DType::F32, &Device::Cpu)?;
    assert!(
        matches!(net.forward(&none, true), Err(GaussError::EmptyBatch { .. })),
        "an empty training batch through a batch norm must be refused"
    );
    assert_eq!(
        norm_stats(&net)?,
        fresh,
        "a refused batch changed the statistics"
    );
    // In evaluation a batch of one (and an empty one) is fine: the running statistics are used.
    let logits = net.forward(&one, false)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(logits.iter().all(|v| v.is_finite()), "{logits:?}");
    assert_eq!(net.forward(&none, false)?.dims(), [0, 2]);

    // Two samples: running_mean = 0.9·0 + 0.1·mean, running_var = 0.9·1 + 0.1·(unbiased
    // variance), Candle's momentum 0.1. Columns (1, 3), (2, 6), (3, −1): means 2, 4, 1;
    // squared deviations 2·1, 2·4, 2·4 over B − 1 = 1.
    let two = Tensor::new(&[[1f32, 2.0, 3.0], [3.0, 6.0, -1.0]], &Device::Cpu)?;
    net.forward(&two, true)?;
    let stats = norm_stats(&net)?;
    let expected_mean = [0.2f32, 0.4, 0.1];
    let expected_var = [1.1f32, 1.7, 1.7];
    for (got, want) in stats[0].iter().zip(expected_mean) {
        assert!((got - want).abs() <= 1e-6, "running mean {:?}", stats[0]);
    }
    for (got, want) in stats[1].iter().zip(expected_var) {
        assert!((got - want).abs() <= 1e-6, "running var {:?}", stats[1]);
    }
    assert!(stats.iter().flatten().all(|v| v.is_finite()), "{stats:?}");
    Ok(())
}

/// Training through a batch norm in F16 or BF16 was Candle's "dtype mismatch in add, lhs:
/// BF16, rhs: F32" (its batch norm computes half batches' statistics in f32 and adds them to
/// the running statistics in their own dtype). It trains now, updates the statistics as in
/// f32 (to the dtype's rounding), keeps their dtype, and sends gradients to every norm's
/// weight and bias.
#[test]
fn training_with_batch_norm_in_half_dtypes_updates_the_running_statistics() -> Result<()> {
    let config = GaussNetConfig {
        input_batch_norm: true,
        batch_norm: true,
        ..small_diag_net_config()
    };
    let rows = [[1f32, 2.0, 3.0], [3.0, 6.0, -1.0]];
    for dtype in [DType::F16, DType::BF16] {
        let (net, varmap) = new_net(config.clone(), dtype)?;
        let two = Tensor::new(&rows, &Device::Cpu)?.to_dtype(dtype)?;
        let logits = net.forward(&two, true)?;
        assert_eq!((logits.dims(), logits.dtype()), (&[2usize, 2][..], dtype));
        let input_norm = net.input_norm().expect("an input batch norm");
        assert_eq!(input_norm.running_mean().dtype(), dtype);
        let mean = input_norm
            .running_mean()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let var = input_norm
            .running_var()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        // As in the f32 test above: means 0.1·(2, 4, 1), variances 0.9 + 0.1·(2, 8, 8).
        for (got, want) in mean.iter().zip([0.2f32, 0.4, 0.1]) {
            assert!(
                (got - want).abs() <= 2e-3,
                "{dtype:?} running mean {mean:?}"
            );
        }
        for (got, want) in var.iter().zip([1.1f32, 1.7, 1.7]) {
            assert!((got - want).abs() <= 1e-2, "{dtype:?} running var {var:?}");
        }
        // The hidden norm's statistics moved too, and stay finite.
        let hidden = net.norms()[0].as_ref().expect("a hidden batch norm");
        let hidden_var = hidden
            .running_var()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        assert!(hidden_var.iter().all(|v| v.is_finite()), "{hidden_var:?}");
        let grads = logits.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
        let vars = varmap.data().lock().unwrap().clone();
        for name in ["input_norm.weight", "input_norm.bias", "norms.0.weight"] {
            assert!(
                grads.get(vars[name].as_tensor()).is_some(),
                "{dtype:?}: no gradient for {name}"
            );
        }
    }
    Ok(())
}

/// An empty batch gives empty outputs, as a single layer does, also through the gating of
/// the layers above the first (the gate's max over an empty tensor was a Candle error) and
/// in `max_gaussian`.
#[test]
fn empty_batches_give_empty_outputs_through_gated_layers() -> Result<()> {
    for batch_norm in [false, true] {
        let config = GaussNetConfig {
            hidden: vec![4, 5],
            input_batch_norm: batch_norm,
            batch_norm,
            ..small_diag_net_config()
        };
        assert!(config.gate, "gating is on by default");
        let (net, _vars) = new_net(config, DType::F32)?;
        let x = Tensor::zeros((0, 3), DType::F32, &Device::Cpu)?;
        let (logits, gaussians) = net.forward_with_gaussians(&x, false)?;
        assert_eq!(logits.dims(), [0, 2]);
        let dims: Vec<Vec<usize>> = gaussians.iter().map(|g| g.dims().to_vec()).collect();
        assert_eq!(dims, [vec![0, 4], vec![0, 5], vec![0, 2]]);
        assert_eq!(net.max_gaussian(&x)?.dims(), [0]);
        // The layer's own gate on zero rows (`ops::gate`'s max over them was the error).
        let empty_prev = Tensor::zeros((0, 3), DType::F32, &Device::Cpu)?;
        let (y, g) = net.layers()[1].forward_with_gaussian(
            &Tensor::zeros((0, 4), DType::F32, &Device::Cpu)?,
            Some(&empty_prev),
        )?;
        assert_eq!((y.dims(), g.dims()), ([0, 5].as_slice(), [0, 5].as_slice()));
        if !batch_norm {
            // Without a batch norm an empty batch trains (dropout aside) like any other.
            assert_eq!(net.forward(&x, true)?.dims(), [0, 2]);
        }
    }
    Ok(())
}

/// Sizes whose tensors cannot be counted in `usize` (or allocated: more than `isize::MAX`
/// bytes in f64) are an `InvalidConfig` error, not an arithmetic-overflow panic inside
/// Candle's shape products.
#[test]
fn sizes_beyond_one_allocation_are_refused_not_overflowed() -> Result<()> {
    let expect_size_error = |result: gauss_layer::Result<()>, case: &str| match result {
        Err(GaussError::InvalidConfig { field: "size", .. }) => {}
        other => panic!("{case}: expected an InvalidConfig `size` error, got {other:?}"),
    };
    // The limit: f64 storage of at most isize::MAX bytes, i.e. ⌊isize::MAX / 8⌋ elements.
    let limit = (isize::MAX as usize) / 8;
    let cholesky = GaussLayerConfig::default();
    // d = 1: the (Z, 1, 1) factor and the (Z, 1) weight have Z elements each.
    cholesky.validate_sizes(1, limit)?;
    expect_size_error(cholesky.validate_sizes(1, limit + 1), "Z over the limit");
    // Z·d·d overflows usize; Z·d alone does not.
    expect_size_error(cholesky.validate_sizes(1 << 31, 1 << 31), "Z·d² overflows");
    let sphere = GaussLayerConfig::with_parameterization(Parameterization::Sphere);
    sphere.validate_sizes(1 << 20, 1 << 20)?;
    expect_size_error(sphere.validate_sizes(1 << 32, 1 << 32), "Z·d overflows");
    // lowrank's rank + 1 columns overflow for the largest rank its width allows.
    let lowrank =
        GaussLayerConfig::with_parameterization(Parameterization::LowRank { rank: usize::MAX });
    expect_size_error(lowrank.validate_sizes(usize::MAX, 1), "rank + 1 overflows");

    // The constructors refuse them before any tensor is made.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    expect_size_error(
        gauss_layer(1 << 33, 1 << 33, GaussLayerConfig::default(), vb.pp("a")).map(|_| ()),
        "gauss_layer",
    );
    expect_size_error(
        gauss_layer(usize::MAX, 1, lowrank, vb.pp("b")).map(|_| ()),
        "gauss_layer lowrank",
    );
    assert!(
        varmap.all_vars().is_empty(),
        "a refused layer created tensors"
    );
    let config = GaussNetConfig {
        in_features: 64,
        hidden: vec![1 << 62],
        out_features: 10,
        ..Default::default()
    };
    expect_size_error(config.validate(), "hidden width 2^62");
    let e = config.validate().unwrap_err().to_string();
    assert!(
        e.contains("overflows") && e.contains("4611686018427387904 neurons"),
        "{e}"
    );
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    expect_size_error(GaussNet::new(config, vb).map(|_| ()), "GaussNet::new");
    Ok(())
}

/// `GaussNet::from_parts` refuses parts its config does not describe: a checkpoint saves the
/// config and rebuilds the network from it, so a layer built with `tanh` under a config
/// without it saved, loaded back and computed other logits without any error (a norm of
/// another epsilon likewise; one without weight and bias saved a file that did not load; a
/// layer of another dtype failed every forward as a bad "input x"). Parts that
/// match (seeded layers included: `init` is not compared) assemble, and the checkpoint of
/// the assembled network computes the same logits bit for bit.
#[test]
fn from_parts_refuses_parts_the_config_does_not_describe() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let plain = GaussLayerConfig::with_parameterization(Parameterization::Diag);
    let tanh = GaussLayerConfig {
        tanh: true,
        ..plain.clone()
    };
    let layer = |config: &GaussLayerConfig, i: usize, o: usize, name: &str| {
        gauss_layer(i, o, config.clone(), vb.pp(name))
    };
    // f64: candle_nn's BatchNormConfig takes its epsilon as an f64 host scalar.
    let norm = |width: usize, eps: f64, name: &str| {
        candle_nn::batch_norm(
            width,
            candle_nn::BatchNormConfig {
                eps,
                ..Default::default()
            },
            vb.pp(name),
        )
    };
    let config = GaussNetConfig {
        batch_norm: true,
        layer: plain.clone(),
        ..small_diag_net_config()
    };
    // f64: the config's batch-norm epsilon, a host scalar.
    let eps = config.batch_norm_eps;
    let expect_config_error = |result: gauss_layer::Result<GaussNet>, field: &str| match result {
        Err(GaussError::InvalidConfig { field: f, .. }) if f == field => {}
        other => panic!("expected an InvalidConfig `{field}` error, got {other:?}"),
    };
    // The hidden layer was built with tanh, the config says none.
    expect_config_error(
        GaussNet::from_parts(
            config.clone(),
            None,
            vec![layer(&tanh, 3, 4, "a")?, layer(&plain, 4, 2, "b")?],
            vec![Some(norm(4, eps, "n0")?)],
        ),
        "layer",
    );
    // The output layer's config names another parameterization.
    let sphere = GaussLayerConfig::with_parameterization(Parameterization::Sphere);
    expect_config_error(
        GaussNet::from_parts(
            GaussNetConfig {
                output_layer: Some(plain.clone()),
                ..config.clone()
            },
            None,
            vec![layer(&plain, 3, 4, "c")?, layer(&sphere, 4, 2, "d")?],
            vec![Some(norm(4, eps, "n1")?)],
        ),
        "output_layer",
    );
    // A batch norm of another epsilon, and one of another width.
    expect_config_error(
        GaussNet::from_parts(
            config.clone(),
            None,
            vec![layer(&plain, 3, 4, "e")?, layer(&plain, 4, 2, "f")?],
            // f64: another batch-norm epsilon (host scalar).
            vec![Some(norm(4, 1e-3, "n2")?)],
        ),
        "batch_norm_eps",
    );
    // A batch norm without weight and bias: the checkpoint's reader would miss them.
    let bare = candle_nn::batch_norm(
        4,
        candle_nn::BatchNormConfig {
            eps,
            affine: false,
            ..Default::default()
        },
        vb.pp("n5"),
    )?;
    expect_config_error(
        GaussNet::from_parts(
            config.clone(),
            None,
            vec![layer(&plain, 3, 4, "k")?, layer(&plain, 4, 2, "l")?],
            vec![Some(bare)],
        ),
        "batch_norm",
    );
    match GaussNet::from_parts(
        config.clone(),
        None,
        vec![layer(&plain, 3, 4, "g")?, layer(&plain, 4, 2, "h")?],
        vec![Some(norm(5, eps, "n3")?)],
    ) {
        Err(GaussError::Shape { what, got, .. }) => {
            assert_eq!(
                (what.as_str(), got),
                ("batch norm norms.0.running_mean", vec![5])
            )
        }
        other => panic!("a batch norm of width 5 after 4 neurons: {other:?}"),
    }

    // An output layer of another dtype: refused here, not later as a bad "input x" of
    // layer 1 (nor at save).
    let bf16 = VarBuilder::from_varmap(&varmap, DType::BF16, &Device::Cpu);
    match GaussNet::from_parts(
        config.clone(),
        None,
        vec![
            layer(&plain, 3, 4, "m")?,
            gauss_layer(4, 2, plain.clone(), bf16.pp("o"))?,
        ],
        vec![Some(norm(4, eps, "n6")?)],
    ) {
        Err(GaussError::DType { what, got, .. }) => {
            assert_eq!((what.as_str(), got), ("layer 1's center", DType::BF16))
        }
        other => panic!("a BF16 layer after an F32 one: {other:?}"),
    }

    // Matching parts, the hidden layer seeded (its init differs from the config's).
    let seeded = GaussLayerConfig {
        init: gauss_layer::InitConfig {
            seed: Some(3),
            ..Default::default()
        },
        ..plain.clone()
    };
    let net = GaussNet::from_parts(
        config,
        None,
        vec![layer(&seeded, 3, 4, "i")?, layer(&plain, 4, 2, "j")?],
        vec![Some(norm(4, eps, "n4")?)],
    )?;
    let x = Tensor::new(&[[0.1f32, -0.2, 0.3], [0.0, 0.05, -0.1]], &Device::Cpu)?;
    let before = net.forward(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
    let dir = gauss_tests::temp_dir("layer-from-parts")?;
    let path = dir.join("net.safetensors");
    net.save(&path)?;
    let loaded = gauss_layer::checkpoint::load(&path, &Device::Cpu, None)?;
    let after = loaded
        .net
        .forward(&x, false)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    std::fs::remove_dir_all(&dir)?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&before), bits(&after), "{before:?} vs {after:?}");
    Ok(())
}

//! Cross-crate layer tests: creating a layer through a `VarMap`, saving it with candle's own
//! safetensors support and loading it back through a `VarBuilder` under the documented
//! tensor names; one optimizer step on every parameterization.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer, VarBuilder, VarMap};
use gauss_layer::testing::relative_error;
use gauss_layer::{gauss_layer, GaussLayerConfig, Parameterization, Precision};

use gauss_tests::temp_dir;

fn layer_saves_and_loads_under_documented_names(device: &Device) -> anyhow::Result<()> {
    let dir = temp_dir("layer-vb")?;
    for parameterization in Parameterization::ALL {
        let config = GaussLayerConfig::with_parameterization(parameterization);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let layer = gauss_layer(5, 3, config.clone(), vb.pp("layer0"))?;
        let names = {
            let data = varmap.data().lock().expect("varmap lock");
            let mut names: Vec<String> = data.keys().cloned().collect();
            names.sort();
            names
        };
        let mut expected = vec![
            "layer0.bias".to_string(),
            "layer0.center".to_string(),
            format!("layer0.{}", Precision::tensor_name(parameterization)),
            "layer0.weight".to_string(),
        ];
        expected.sort();
        assert_eq!(names, expected, "{parameterization}");

        let path = dir.join(format!("{parameterization}.safetensors"));
        varmap.save(&path)?;
        // SAFETY: the file was just written by this test and is not modified while mapped.
        let loaded_vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device)? };
        let loaded = gauss_layer(5, 3, config, loaded_vb.pp("layer0"))?;
        let x = Tensor::randn(0f32, 1.0, (4, 5), device)?;
        let err = relative_error(&loaded.forward(&x)?, &layer.forward(&x)?)?;
        assert_eq!(err, 0.0, "{parameterization}: loaded layer differs");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
gauss_layer::test_device!(layer_saves_and_loads_under_documented_names);

/// One SGD step on `sum(y · upstream) + Σ g` moves every parameter and lowers the loss for a
/// small enough step (first-order descent).
fn one_training_step_lowers_the_loss_f64(device: &Device) -> anyhow::Result<()> {
    for parameterization in Parameterization::ALL {
        let config = GaussLayerConfig::with_parameterization(parameterization);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, device);
        let layer = gauss_layer(4, 3, config, vb)?;
        let x = Tensor::randn(0f64, 1.0, (8, 4), device)?;
        let upstream = Tensor::randn(0f64, 1.0, (8, 3), device)?;
        let loss_of = |layer: &gauss_layer::GaussLayer| -> anyhow::Result<Tensor> {
            let (y, g) = layer.forward_with_gaussian(&x, None)?;
            Ok(((y * &upstream)?.sum_all()? + g.sum_all()?)?)
        };
        let before = loss_of(&layer)?;
        let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 1e-3)?;
        sgd.backward_step(&before)?;
        let after = loss_of(&layer)?.to_scalar::<f64>()?;
        let before = before.to_scalar::<f64>()?;
        assert!(after < before, "{parameterization}: {after} !< {before}");
    }
    Ok(())
}
gauss_layer::test_device!(one_training_step_lowers_the_loss_f64);

//! What a checkpoint must hold: its config, parsed strictly and upgraded from older format
//! versions, and the tensors that config implies (names, shapes), computed with checked
//! arithmetic and without building a network or allocating a tensor.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::net::GaussNetConfig;
use crate::precision::Precision;

/// The format version this crate writes.
pub(crate) const CURRENT_VERSION: u32 = 2;

/// Config fields added by each format version, with the JSON value that reproduces what a
/// file of the older version meant. Loading a version-`v` file applies every row of every
/// entry with `from >= v`, in order, to the config JSON before strict deserialization: a row
/// inserts its value where the field is absent and its parent object exists (an
/// `output_layer` of `null` has no fields to fill).
///
/// **Adding a config field**: bump [`CURRENT_VERSION`] (in `mod.rs`, `FORMAT_VERSION`), add an
/// entry `Upgrade { from: <old version>, added: &[("path.to.field", "<default JSON>")] }`,
/// with one row per place the field occurs (`layer.…` and `output_layer.…` for a layer
/// field), and a fixture of the old version under `tests/data/checkpoint/`.
pub(crate) struct Upgrade {
    /// The version this entry upgrades from (to `from + 1`).
    pub from: u32,
    /// `(dotted field path, default value as JSON)`.
    pub added: &'static [(&'static str, &'static str)],
}

/// The upgrade table (see [`Upgrade`]).
pub(crate) const UPGRADES: &[Upgrade] = &[Upgrade {
    // Version 1 configs were parsed leniently (missing fields took their defaults); the
    // fields added during version 1 are the initialization seed and the portable switch. Version 2 is strict.
    from: 1,
    added: &[
        ("layer.init.seed", "null"),
        ("output_layer.init.seed", "null"),
        ("layer.portable", "false"),
        ("output_layer.portable", "false"),
    ],
}];

/// Parses the `config` metadata of a version-`version` checkpoint strictly: unknown and
/// missing fields are errors naming the field's path.
pub(crate) fn parse_config(json: &str, version: u32) -> Result<GaussNetConfig, String> {
    let parsed = if version == CURRENT_VERSION {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let config = serde_path_to_error::deserialize(&mut deserializer).map_err(describe)?;
        deserializer.end().map_err(|e| e.to_string())?;
        config
    } else {
        // Parsed through `UniqueKeys`: a plain `Value` would keep the last of duplicate keys.
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let mut value = UniqueKeys
            .deserialize(&mut deserializer)
            .map_err(|e| e.to_string())?;
        deserializer.end().map_err(|e| e.to_string())?;
        upgrade(&mut value, version)?;
        serde_path_to_error::deserialize(value).map_err(describe)?
    };
    Ok(parsed)
}

/// A JSON value in which a key given twice in one object is an error (`"gate"` twice would
/// otherwise be read last-wins).
struct UniqueKeys;

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(UniqueKeys)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let value = map.next_value_seed(UniqueKeys)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// `at `layer.init`: missing field `seed``: the serde error with the path it happened at.
fn describe<E: std::fmt::Display>(error: serde_path_to_error::Error<E>) -> String {
    let path = error.path().to_string();
    if path == "." {
        error.into_inner().to_string()
    } else {
        format!("at `{path}`: {}", error.into_inner())
    }
}

/// Applies the [`UPGRADES`] rows from `version` on.
fn upgrade(config: &mut Value, version: u32) -> Result<(), String> {
    if !config.is_object() {
        return Err("expected a JSON object".to_string());
    }
    for entry in UPGRADES.iter().filter(|u| u.from >= version) {
        for (path, default) in entry.added {
            let default: Value = serde_json::from_str(default)
                .map_err(|e| format!("internal: upgrade default of `{path}`: {e}"))?;
            insert_if_absent(config, path, default);
        }
    }
    Ok(())
}

/// Inserts `value` at the dotted `path` when the field is absent and every parent is an
/// object; leaves anything else to the strict parse.
fn insert_if_absent(config: &mut Value, path: &str, value: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(field) = parts.pop() else { return };
    let mut node = config;
    for part in parts {
        match node.get_mut(part) {
            Some(child) if child.is_object() => node = child,
            _ => return,
        }
    }
    if let Some(object) = node.as_object_mut() {
        object.entry(field).or_insert(value);
    }
}

/// One tensor the config implies.
#[derive(Clone, Debug)]
pub(crate) struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub numel: usize,
}

fn overflow(what: &str) -> String {
    format!("the network in `config` is too large: the size of {what} overflows")
}

fn checked_numel(name: &str, shape: &[usize]) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| overflow(&format!("tensor `{name}` {shape:?}")))
}

/// Calls `visit` for every tensor of the network in `config`, one at a time (so a config
/// that implies millions of tensors costs no memory before its first missing tensor is
/// found), stopping at the first error. Names and shapes match
/// [`crate::GaussNet::named_tensors`]; a test checks them against real networks.
pub(crate) fn visit_expected(
    config: &GaussNetConfig,
    visit: &mut dyn FnMut(ExpectedTensor) -> Result<(), String>,
) -> Result<(), String> {
    let mut emit = |name: String, shape: Vec<usize>| -> Result<(), String> {
        let numel = checked_numel(&name, &shape)?;
        visit(ExpectedTensor { name, shape, numel })
    };
    let norm = |emit: &mut dyn FnMut(String, Vec<usize>) -> Result<(), String>,
                prefix: &str,
                width: usize|
     -> Result<(), String> {
        for field in ["running_mean", "running_var", "weight", "bias"] {
            emit(format!("{prefix}.{field}"), vec![width])?;
        }
        Ok(())
    };
    if config.input_batch_norm {
        norm(&mut emit, "input_norm", config.in_features)?;
    }
    let layers = config.hidden.len() + 1;
    let mut width = config.in_features;
    for i in 0..layers {
        let (out, layer) = match config.hidden.get(i) {
            Some(&w) => (w, &config.layer),
            None => (
                config.out_features,
                config.output_layer.as_ref().unwrap_or(&config.layer),
            ),
        };
        let prefix = format!("layers.{i}");
        if !layer.gaussian_only {
            emit(format!("{prefix}.weight"), vec![out, width])?;
            if !layer.tied_bias {
                emit(format!("{prefix}.bias"), vec![out])?;
            }
        }
        emit(format!("{prefix}.center"), vec![out, width])?;
        let name = Precision::tensor_name(layer.parameterization);
        emit(
            format!("{prefix}.{name}"),
            Precision::raw_shape(layer.parameterization, out, width),
        )?;
        if i + 1 < layers && config.batch_norm {
            norm(&mut emit, &format!("norms.{i}"), out)?;
        }
        width = out;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GaussLayerConfig, Parameterization};
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn expected(config: &GaussNetConfig) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        visit_expected(config, &mut |t| {
            assert_eq!(t.numel, t.shape.iter().product::<usize>());
            out.push((t.name, t.shape));
            Ok(())
        })
        .unwrap();
        out.sort();
        out
    }

    #[test]
    fn expected_tensors_match_a_real_network() {
        let mut configs = Vec::new();
        for parameterization in Parameterization::ALL {
            for (tied_bias, gaussian_only) in [(false, false), (true, false), (false, true)] {
                for (batch_norm, input_batch_norm) in [(false, false), (true, true)] {
                    configs.push(GaussNetConfig {
                        in_features: 3,
                        hidden: vec![4, 2],
                        out_features: 5,
                        layer: GaussLayerConfig {
                            parameterization,
                            tied_bias,
                            gaussian_only,
                            ..Default::default()
                        },
                        output_layer: Some(GaussLayerConfig {
                            parameterization: Parameterization::Diag,
                            ..Default::default()
                        }),
                        batch_norm,
                        input_batch_norm,
                        ..Default::default()
                    });
                }
            }
        }
        configs.push(GaussNetConfig::default());
        for config in configs {
            let varmap = VarMap::new();
            let net = crate::GaussNet::new(
                config.clone(),
                VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            )
            .unwrap();
            let real: Vec<(String, Vec<usize>)> = net
                .named_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.dims().to_vec()))
                .collect();
            assert_eq!(expected(&config), real, "{config:?}");
        }
    }

    #[test]
    fn sizes_that_overflow_are_errors() {
        let config = GaussNetConfig {
            in_features: 8,
            hidden: vec![1 << 63],
            ..Default::default()
        };
        let mut seen = 0;
        let result = visit_expected(&config, &mut |_| {
            seen += 1;
            Ok(())
        });
        let err = result.unwrap_err();
        assert!(
            err.contains("overflows") && err.contains("layers.0"),
            "{err}"
        );
        // weight (2^63, 8) overflows: nothing was visited.
        assert_eq!(seen, 0);
    }

    #[test]
    fn version_1_configs_get_the_fields_added_since() {
        let mut value = serde_json::to_value(GaussNetConfig {
            output_layer: Some(GaussLayerConfig::default()),
            ..Default::default()
        })
        .unwrap();
        value["layer"]["init"]
            .as_object_mut()
            .unwrap()
            .remove("seed");
        value["output_layer"]["init"]
            .as_object_mut()
            .unwrap()
            .remove("seed");
        let json = value.to_string();
        let upgraded = parse_config(&json, 1).unwrap();
        assert_eq!(upgraded.layer.init.seed, None);
        // Version 2 is strict: the same JSON is refused, naming the path.
        let err = parse_config(&json, 2).unwrap_err();
        assert!(err.contains("layer.init") && err.contains("seed"), "{err}");
        // An upgrade never overwrites a value that is there, and unknown fields stay errors.
        value["layer"]["init"]["seed"] = serde_json::json!(5);
        assert_eq!(
            parse_config(&value.to_string(), 1).unwrap().layer.init.seed,
            Some(5)
        );
        value["layer"]["tanx"] = serde_json::json!(true);
        let err = parse_config(&value.to_string(), 1).unwrap_err();
        assert!(
            err.contains("layer") && err.contains("unknown field `tanx`"),
            "{err}"
        );
    }
}

//! What a checkpoint must hold: its config, parsed strictly and upgraded from older format
//! versions, and the tensors that config implies (names, shapes), computed with checked
//! arithmetic and without building a network or allocating a tensor.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::net::GaussNetConfig;
use crate::precision::Precision;

/// The format version this crate writes.
pub(crate) const CURRENT_VERSION: u32 = 3;

/// What changed in the config from one format version to the next, with what reproduces the
/// older meaning. Loading a version-`v` file applies every entry with `from >= v`, in order,
/// to the config JSON before strict deserialization.
///
/// **Adding a config field**: bump [`CURRENT_VERSION`] (in `mod.rs`, `FORMAT_VERSION`), add an
/// entry `Upgrade { from: <old version>, added: &[("path.to.field", "<default JSON>")], .. }`,
/// with one row per place the field occurs (`layer.…` and `output_layer.…` for a layer
/// field), and a fixture of the old version under `tests/data/checkpoint/`. **Moving a
/// field** is a `moved` row `(old path, new path)`.
pub(crate) struct Upgrade {
    /// The version this entry upgrades from (to `from + 1`).
    pub from: u32,
    /// `(dotted field path, default value as JSON)`: inserted where the field is absent and
    /// its parent object exists (an `output_layer` of `null` has no fields to fill).
    pub added: &'static [(&'static str, &'static str)],
    /// `(old dotted path, new dotted path)`: the value is taken out of the old place and put
    /// in the new one, creating the new parent object if needed. A file holding the field in
    /// both places is an error; one holding it in neither is left to the strict parse.
    pub moved: &'static [(&'static str, &'static str)],
}

/// The upgrade table (see [`Upgrade`]).
pub(crate) const UPGRADES: &[Upgrade] = &[
    Upgrade {
        // Version 1 configs were parsed leniently (missing fields took their defaults); the
        // fields added during version 1 are the initialization seed and the portable switch.
        // Version 2 is strict.
        from: 1,
        added: &[
            ("layer.init.seed", "null"),
            ("output_layer.init.seed", "null"),
            ("layer.portable", "false"),
            ("output_layer.portable", "false"),
        ],
        moved: &[],
    },
    Upgrade {
        // Version 3 nests the precision fields of a layer config in `precision` (a
        // `PrecisionConfig`), so they are said once.
        from: 2,
        added: &[],
        moved: &[
            ("layer.parameterization", "layer.precision.parameterization"),
            ("layer.positive_map", "layer.precision.positive_map"),
            (
                "layer.factor_diag_floor",
                "layer.precision.factor_diag_floor",
            ),
            ("layer.width_floor", "layer.precision.width_floor"),
            ("layer.portable", "layer.precision.portable"),
            (
                "output_layer.parameterization",
                "output_layer.precision.parameterization",
            ),
            (
                "output_layer.positive_map",
                "output_layer.precision.positive_map",
            ),
            (
                "output_layer.factor_diag_floor",
                "output_layer.precision.factor_diag_floor",
            ),
            (
                "output_layer.width_floor",
                "output_layer.precision.width_floor",
            ),
            ("output_layer.portable", "output_layer.precision.portable"),
        ],
    },
];

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
    let entries: Vec<&Upgrade> = UPGRADES.iter().filter(|u| u.from >= version).collect();
    for (i, entry) in entries.iter().enumerate() {
        for (path, default) in entry.added {
            // A field is absent only if it is at neither its place in this version nor the
            // place later versions moved it to (a complete newer config labelled older).
            if value_at(config, &moved_path(path, &entries[i + 1..])).is_some() {
                continue;
            }
            let default: Value = serde_json::from_str(default)
                .map_err(|e| format!("internal: upgrade default of `{path}`: {e}"))?;
            insert_if_absent(config, path, default);
        }
        for (from, to) in entry.moved {
            move_field(config, from, to)?;
        }
    }
    Ok(())
}

/// The object at the dotted `path` of parents (`None` where one is missing or not an object).
fn object_at<'a>(
    config: &'a mut Value,
    parents: &[&str],
) -> Option<&'a mut serde_json::Map<String, Value>> {
    let mut node = config;
    for part in parents {
        node = node.get_mut(*part).filter(|child| child.is_object())?;
    }
    node.as_object_mut()
}

fn split_path(path: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let field = parts.pop().unwrap_or_default();
    (parts, field)
}

/// Where the later `entries` move the field at `path`.
fn moved_path(path: &str, entries: &[&Upgrade]) -> String {
    let mut path = path.to_string();
    for entry in entries {
        if let Some((_, to)) = entry.moved.iter().find(|(from, _)| *from == path) {
            path = (*to).to_string();
        }
    }
    path
}

/// The value at the dotted `path`, if there is one.
fn value_at<'a>(config: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(config, |node, part| node.get(part))
}

/// Inserts `value` at the dotted `path` when the field is absent and every parent is an
/// object; leaves anything else to the strict parse.
fn insert_if_absent(config: &mut Value, path: &str, value: Value) {
    let (parents, field) = split_path(path);
    if let Some(object) = object_at(config, &parents) {
        object.entry(field).or_insert(value);
    }
}

/// Moves the field at `from` to `to` (see [`Upgrade::moved`]).
fn move_field(config: &mut Value, from: &str, to: &str) -> Result<(), String> {
    let (from_parents, from_field) = split_path(from);
    let Some(value) = object_at(config, &from_parents).and_then(|o| o.remove(from_field)) else {
        return Ok(());
    };
    let (to_parents, to_field) = split_path(to);
    // Create the new parents below the deepest existing one (the old field's parent exists).
    let mut node = &mut *config;
    for part in to_parents {
        let object = node.as_object_mut().ok_or_else(|| {
            format!("cannot move `{from}` to `{to}`: `{part}`'s parent is not an object")
        })?;
        node = object
            .entry(part)
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
    let object = node.as_object_mut().ok_or_else(|| {
        format!("cannot move `{from}` to `{to}`: its new parent is not an object")
    })?;
    if object.contains_key(to_field) {
        return Err(format!("`{from}` and `{to}` are both given; the format version this file names has only `{from}`"));
    }
    object.insert(to_field.to_string(), value);
    Ok(())
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
        let name = Precision::tensor_name(layer.precision.parameterization);
        emit(
            format!("{prefix}.{name}"),
            Precision::raw_shape(layer.precision.parameterization, out, width),
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
                            tied_bias,
                            gaussian_only,
                            ..GaussLayerConfig::with_parameterization(parameterization)
                        },
                        output_layer: Some(GaussLayerConfig::with_parameterization(
                            Parameterization::Diag,
                        )),
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
        // A version-1 file has its precision fields beside `tanh`, and may lack `portable`.
        let mut flat = value.clone();
        flat["layer"] = flattened(&flat["layer"]);
        flat["layer"].as_object_mut().unwrap().remove("portable");
        let upgraded = parse_config(&flat.to_string(), 1).unwrap();
        assert_eq!(
            (upgraded.layer.init.seed, upgraded.layer.precision.portable),
            (None, false)
        );
        // The current version is strict: the same JSON is refused, naming the path.
        let err = parse_config(&json, CURRENT_VERSION).unwrap_err();
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

    /// Decimals that `serde_json`'s default float parse reads one ulp off (the workspace turns
    /// on its `float_roundtrip` feature): every config field comes back with the bits it was
    /// written with, in the current version and through the upgrade from version 2.
    #[test]
    fn floats_come_back_bit_for_bit() {
        let config = GaussNetConfig {
            layer: GaussLayerConfig {
                precision: crate::PrecisionConfig {
                    factor_diag_floor: 4.984_131_188_374_780_4e-5,
                    width_floor: Some(4.544_697_111_263_059_6e-5),
                    ..Default::default()
                },
                init: crate::InitConfig {
                    center_std: 5.873_272_580_101_452_4e-5,
                    ..Default::default()
                },
                ..Default::default()
            },
            output_layer: Some(GaussLayerConfig {
                precision: crate::PrecisionConfig {
                    width_floor: Some(4.984_131_188_374_780_4e-5),
                    ..Default::default()
                },
                ..Default::default()
            }),
            batch_norm_eps: 4.539_025_429_288_408_3e-5,
            ..Default::default()
        };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(parse_config(&json, CURRENT_VERSION).unwrap(), config);
        let mut value = serde_json::to_value(&config).unwrap();
        value["layer"] = flattened(&value["layer"]);
        value["output_layer"] = flattened(&value["output_layer"]);
        let json = serde_json::to_string(&value).unwrap();
        assert_eq!(parse_config(&json, 2).unwrap(), config);
    }

    /// A layer config as format version 2 wrote it: the precision fields beside `tanh`.
    fn flattened(layer: &serde_json::Value) -> serde_json::Value {
        let mut flat = layer.clone();
        let object = flat.as_object_mut().unwrap();
        let precision = object.remove("precision").unwrap();
        for (key, value) in precision.as_object().unwrap() {
            object.insert(key.clone(), value.clone());
        }
        flat
    }

    #[test]
    fn version_2_configs_have_their_precision_fields_moved() {
        let config = GaussNetConfig {
            layer: GaussLayerConfig {
                precision: crate::PrecisionConfig {
                    parameterization: Parameterization::Diag,
                    positive_map: crate::PositiveMap::Exp,
                    factor_diag_floor: 0.25,
                    width_floor: Some(0.5),
                    portable: true,
                },
                tanh: true,
                ..Default::default()
            },
            output_layer: Some(GaussLayerConfig::with_parameterization(
                Parameterization::LowRank { rank: 2 },
            )),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&config).unwrap();
        value["layer"] = flattened(&value["layer"]);
        value["output_layer"] = flattened(&value["output_layer"]);
        assert!(value["layer"].get("precision").is_none() && value["layer"]["width_floor"] == 0.5);
        assert_eq!(parse_config(&value.to_string(), 2).unwrap(), config);
        // Version 1 too (whose upgrade adds `portable` at the old place first).
        value["layer"].as_object_mut().unwrap().remove("portable");
        let mut expected = config.clone();
        expected.layer.precision.portable = false;
        assert_eq!(parse_config(&value.to_string(), 1).unwrap(), expected);
        // Version 2 had `portable`: without it the file is refused, naming it.
        let err = parse_config(&value.to_string(), 2).unwrap_err();
        assert!(
            err.contains("layer.precision") && err.contains("portable"),
            "{err}"
        );
        value["layer"]["portable"] = serde_json::json!(false);
        // A network without an output layer config (`null`) has nothing to move there.
        value["output_layer"] = serde_json::Value::Null;
        expected.output_layer = None;
        assert_eq!(parse_config(&value.to_string(), 2).unwrap(), expected);
        // The flat form is not version 3, and a field in both places is refused.
        let err = parse_config(&value.to_string(), CURRENT_VERSION).unwrap_err();
        assert!(
            err.contains("unknown field `factor_diag_floor`") && err.contains("`precision`"),
            "{err}"
        );
        value["layer"]["precision"] = serde_json::json!({"parameterization": "diag"});
        let err = parse_config(&value.to_string(), 2).unwrap_err();
        assert!(
            err.contains(
                "`layer.parameterization` and `layer.precision.parameterization` are both given"
            ),
            "{err}"
        );
    }
}

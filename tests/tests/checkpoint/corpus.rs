//! A deterministic corpus of damaged checkpoints, generated here from two small saved
//! networks: header-length edits, truncations, header JSON edits (shapes huge, negative or of
//! the wrong rank, dtypes, byte ranges, unknown and missing keys), duplicate keys, metadata
//! and config edits (every field removed, renamed, given huge or wrong-typed values),
//! non-finite tensors, and seeded random byte flips. Every structured case must give a clean
//! `Err`; random flips may still load (a flipped digit of a user value) but must not panic.
//! Every case runs under a memory cap, measured by the counting allocator of this test
//! binary (per thread, so parallel tests do not disturb it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::Result;
use candle_core::{DType, Device};
use gauss_layer::checkpoint::{self, LoadOptions};
use gauss_layer::{
    GaussError, GaussLayerConfig, GaussNetConfig, InitConfig, Parameterization, PrecisionConfig,
};
use serde_json::{json, Value};

use gauss_tests::{new_net, temp_dir};

/// Counts the bytes live on each thread and their peak.
struct CountingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result with the peak of bytes allocated by this thread meanwhile
/// (above what was live when it started).
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let result = f();
    let peak = PEAK.with(Cell::get) - start;
    (result, peak.max(0) as usize)
}

/// What a case must give.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// A checkpoint error whose reason contains the text.
    Error(&'static str),
    /// `Ok` or any error, but no panic (random flips).
    NoPanic,
}

struct Case {
    label: String,
    bytes: Vec<u8>,
    expect: Expect,
}

/// A saved checkpoint split into its parts.
struct Base {
    header: Value,
    config: Value,
    data: Vec<u8>,
    bytes: Vec<u8>,
    /// Tensor names in the header.
    tensors: Vec<String>,
    dtype_size: usize,
}

fn save_base(name: &str, config: GaussNetConfig, dtype: DType) -> Result<Base> {
    let dir = temp_dir(&format!("corpus-{name}"))?;
    let (net, _vars) = new_net(config, dtype)?;
    let path = dir.join("base.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("note".to_string(), "user value 12345".to_string());
    checkpoint::save_with_metadata(&net, &path, &meta)?;
    let bytes = std::fs::read(&path)?;
    std::fs::remove_dir_all(&dir)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let config: Value = serde_json::from_str(
        header["__metadata__"]["config"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no config"))?,
    )?;
    let tensors = header
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("header"))?
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    // Re-serialized with sorted keys: the writer's metadata order varies between runs, and
    // the random flips must hit the same bytes every time.
    let canonical = assemble(&header.to_string(), &bytes[8 + n..]);
    Ok(Base {
        header,
        config,
        data: bytes[8 + n..].to_vec(),
        bytes: canonical,
        tensors,
        dtype_size: dtype.size_in_bytes(),
    })
}

fn assemble(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn with_header(base: &Base, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut header = base.header.clone();
    edit(&mut header);
    assemble(&header.to_string(), &base.data)
}

fn with_config(base: &Base, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut config = base.config.clone();
    edit(&mut config);
    with_header(base, |h| {
        h["__metadata__"]["config"] = Value::String(config.to_string());
    })
}

/// Every dotted path of the config's object fields.
fn field_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, child) in map {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            out.push(path.clone());
            field_paths(child, &path, out);
        }
    }
}

fn parent_and_key<'a>(root: &'a mut Value, path: &str) -> (&'a mut Value, String) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let key = parts.pop().unwrap_or_default().to_string();
    let mut node = root;
    for part in parts {
        node = &mut node[part];
    }
    (node, key)
}

/// A seeded generator (SplitMix64), so the corpus is the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn cases_for(base: &Base, tag: &str, seed: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |label: String, bytes: Vec<u8>, expect: Expect| {
        cases.push(Case {
            label: format!("{tag}: {label}"),
            bytes,
            expect,
        })
    };
    let n = u64::from_le_bytes(base.bytes[..8].try_into().unwrap_or_default());
    let len = base.bytes.len() as u64;

    // 1. The header length.
    for (what, value) in [
        ("0", 0),
        ("1", 1),
        ("n - 1", n - 1),
        ("n + 1", n + 1),
        ("the file's length", len),
        ("the file's length - 7", len - 7),
        ("100 MB + 1", 100_000_001),
        ("2^32", 1 << 32),
        ("2^63", 1 << 63),
        ("-1 as u64", u64::MAX),
        ("-8 as u64", u64::MAX - 7),
    ] {
        let mut bytes = base.bytes.clone();
        bytes[..8].copy_from_slice(&value.to_le_bytes());
        add(format!("header length {what}"), bytes, Expect::Error(""));
    }

    // 2. Truncations: every byte of the length, through the header, through the data.
    let mut cuts: Vec<usize> = (0..8).collect();
    cuts.extend((8..8 + n as usize).step_by((n as usize / 12).max(1)));
    cuts.extend((8 + n as usize..base.bytes.len()).step_by((base.data.len() / 12).max(1)));
    cuts.push(base.bytes.len() - 1);
    for cut in cuts {
        add(
            format!("truncated to {cut} bytes"),
            base.bytes[..cut].to_vec(),
            Expect::Error(""),
        );
    }
    // Extra bytes after the data section.
    let mut longer = base.bytes.clone();
    longer.extend_from_slice(&[0u8; 16]);
    add(
        "16 bytes appended".into(),
        longer,
        Expect::Error("extra bytes"),
    );

    // 3. Tensor entries in the header.
    for (i, name) in base.tensors.iter().enumerate() {
        // A few edits on every tensor, all of them on one in three.
        let all = i % 3 == 0;
        let shape = base.header[name]["shape"].clone();
        let rank = shape.as_array().map_or(0, Vec::len);
        let mut shape_edits: Vec<(String, Value)> = vec![
            ("first dim 2^62".into(), {
                let mut s = shape.clone();
                s[0] = json!(1u64 << 62);
                s
            }),
            ("a dim 1000000".into(), {
                let mut s = shape.clone();
                s[rank - 1] = json!(1_000_000);
                s
            }),
            ("one more dim".into(), {
                let mut s = shape.clone();
                if let Some(a) = s.as_array_mut() {
                    a.push(json!(1));
                }
                s
            }),
        ];
        if all {
            shape_edits.extend([
                ("first dim u64::MAX".to_string(), {
                    let mut s = shape.clone();
                    s[0] = json!(u64::MAX);
                    s
                }),
                ("a dim -1".into(), {
                    let mut s = shape.clone();
                    s[0] = json!(-1);
                    s
                }),
                ("a dim 1.5".into(), {
                    let mut s = shape.clone();
                    s[0] = json!(1.5);
                    s
                }),
                ("rank 0".into(), json!([])),
                ("rank 9".into(), json!([1, 1, 1, 1, 1, 1, 1, 1, 1])),
                ("dims 2^32 × 2^32".into(), json!([1u64 << 32, 1u64 << 32])),
                ("a dim 0".into(), {
                    let mut s = shape.clone();
                    s[0] = json!(0);
                    s
                }),
            ]);
        }
        for (what, new_shape) in shape_edits {
            add(
                format!("`{name}` shape {what}"),
                with_header(base, |h| h[name]["shape"] = new_shape),
                Expect::Error(""),
            );
        }
        let offsets = base.header[name]["data_offsets"].clone();
        let (begin, end) = (
            offsets[0].as_u64().unwrap_or(0),
            offsets[1].as_u64().unwrap_or(0),
        );
        let data_len = base.data.len() as u64;
        let mut offset_edits = vec![
            (
                "beyond the data".to_string(),
                json!([data_len, data_len + end - begin]),
            ),
            ("swapped".into(), json!([end, begin])),
            ("end u64::MAX".into(), json!([begin, u64::MAX])),
        ];
        if all {
            offset_edits.extend([
                ("negative".to_string(), json!([-4, end])),
                (
                    "shifted by one element".into(),
                    json!([begin + base.dtype_size as u64, end + base.dtype_size as u64]),
                ),
                (
                    "one element short".into(),
                    json!([begin, end - base.dtype_size as u64]),
                ),
                ("three numbers".into(), json!([begin, end, end])),
                (
                    "strings".into(),
                    json!([begin.to_string(), end.to_string()]),
                ),
            ]);
        }
        for (what, new_offsets) in offset_edits {
            add(
                format!("`{name}` data_offsets {what}"),
                with_header(base, |h| h[name]["data_offsets"] = new_offsets),
                Expect::Error(""),
            );
        }
        let dtypes: &[&str] = if all {
            &["F64", "F16", "I64", "U8", "BOOL", "f32", "XYZ", ""]
        } else {
            &["I64", "XYZ"]
        };
        for dtype in dtypes {
            if base.header[name]["dtype"] == json!(dtype) {
                continue;
            }
            add(
                format!("`{name}` dtype {dtype:?}"),
                with_header(base, |h| h[name]["dtype"] = json!(dtype)),
                Expect::Error(""),
            );
        }
        add(
            format!("`{name}` removed from the header"),
            with_header(base, |h| {
                h.as_object_mut().map(|o| o.remove(name));
            }),
            Expect::Error(""),
        );
        add(
            format!("`{name}` with an unknown key"),
            with_header(base, |h| h[name]["endianness"] = json!("big")),
            Expect::Error("endianness"),
        );
        add(
            format!("`{name}` without `shape`"),
            with_header(base, |h| {
                h[name].as_object_mut().map(|o| o.remove("shape"));
            }),
            Expect::Error("shape"),
        );
        // The tensor's first element NaN, +∞, -∞ (the data itself).
        for (what, value) in [
            ("NaN", f64::NAN),
            ("+inf", f64::INFINITY),
            ("-inf", f64::NEG_INFINITY),
        ] {
            if begin == end || !(all || what == "NaN") {
                continue;
            }
            let mut data = base.data.clone();
            let at = begin as usize;
            if base.dtype_size == 4 {
                data[at..at + 4].copy_from_slice(&(value as f32).to_le_bytes());
            } else {
                data[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            add(
                format!("`{name}` holds {what}"),
                assemble(&base.header.to_string(), &data),
                Expect::Error(if all { "non-finite" } else { "" }),
            );
        }
    }
    // A tensor the config does not know (empty, so the byte ranges still tile the data).
    let first = base.tensors[0].clone();
    let dtype = base.header[&first]["dtype"].clone();
    add(
        "an unexpected tensor".into(),
        with_header(base, |h| {
            h["layers.99.weight"] = json!({"dtype": dtype, "shape": [0], "data_offsets": [0, 0]});
        }),
        Expect::Error("unexpected tensor `layers.99.weight`"),
    );

    // 4. Duplicate keys, written into the raw header text.
    let text = base.header.to_string();
    let dup_meta = text.replacen(
        "\"__metadata__\":{",
        "\"__metadata__\":{\"format\":\"x\",",
        1,
    );
    add(
        "duplicate metadata key `format`".into(),
        assemble(&dup_meta, &base.data),
        Expect::Error("duplicate metadata key `format`"),
    );
    let entry = base.header[&first].to_string();
    let dup_tensor = text.replacen('{', &format!("{{\"{first}\":{entry},"), 1);
    add(
        "duplicate tensor key".into(),
        assemble(&dup_tensor, &base.data),
        Expect::Error("duplicate tensor"),
    );
    let metadata = base.header["__metadata__"].to_string();
    let dup_block = text.replacen('{', &format!("{{\"__metadata__\":{metadata},"), 1);
    add(
        "duplicate `__metadata__`".into(),
        assemble(&dup_block, &base.data),
        Expect::Error("duplicate key `__metadata__`"),
    );

    // 5. Metadata fields.
    for key in ["format", "format_version", "config", "dtype"] {
        add(
            format!("metadata `{key}` removed"),
            with_header(base, |h| {
                h["__metadata__"].as_object_mut().map(|o| o.remove(key));
            }),
            Expect::Error("missing"),
        );
        add(
            format!("metadata `{key}` a number"),
            with_header(base, |h| h["__metadata__"][key] = json!(2)),
            Expect::Error(""),
        );
    }
    add(
        "no metadata at all".into(),
        with_header(base, |h| {
            h.as_object_mut().map(|o| o.remove("__metadata__"));
        }),
        Expect::Error("missing"),
    );
    for version in ["0", "4", "-1", "1.5", "", "99999999999999999999", " 2"] {
        add(
            format!("format_version {version:?}"),
            with_header(base, |h| {
                h["__metadata__"]["format_version"] = json!(version)
            }),
            Expect::Error("format_version"),
        );
    }
    for format in ["gauss-layer.gauss-ne", "", "GAUSS-LAYER.GAUSS-NET"] {
        add(
            format!("format {format:?}"),
            with_header(base, |h| h["__metadata__"]["format"] = json!(format)),
            Expect::Error("format"),
        );
    }
    for dtype in ["u8", "i64", "f8", "", "F32", "float32"] {
        add(
            format!("metadata dtype {dtype:?}"),
            with_header(base, |h| h["__metadata__"]["dtype"] = json!(dtype)),
            Expect::Error("dtype"),
        );
    }
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for (what, config) in [
        ("not JSON", "{not json".to_string()),
        ("an array", "[1, 2]".to_string()),
        ("100000 nested arrays", nested),
        ("empty", String::new()),
        ("trailing text", format!("{} x", base.config)),
    ] {
        add(
            format!("config {what}"),
            with_header(base, |h| h["__metadata__"]["config"] = json!(config)),
            Expect::Error("config"),
        );
    }

    // 6. The config: every field removed and renamed; sizes huge, zero, negative; wrong types.
    let mut paths = Vec::new();
    field_paths(&base.config, "", &mut paths);
    for path in &paths {
        add(
            format!("config `{path}` removed"),
            with_config(base, |c| {
                let (parent, key) = parent_and_key(c, path);
                parent.as_object_mut().map(|o| o.remove(&key));
            }),
            Expect::Error("missing field"),
        );
        add(
            format!("config `{path}` renamed"),
            with_config(base, |c| {
                let (parent, key) = parent_and_key(c, path);
                if let Some(o) = parent.as_object_mut() {
                    let v = o.remove(&key).unwrap_or(Value::Null);
                    o.insert(format!("{key}x"), v);
                }
            }),
            Expect::Error("unknown field"),
        );
    }
    let huge: [(&str, Value); 8] = [
        ("2^63", json!(1u64 << 63)),
        ("u64::MAX", json!(u64::MAX)),
        ("10^6", json!(1_000_000)),
        ("10^12", json!(1_000_000_000_000u64)),
        ("0", json!(0)),
        ("-1", json!(-1)),
        ("1.5", json!(1.5)),
        ("\"8\"", json!("8")),
    ];
    for field in ["in_features", "out_features"] {
        for (what, value) in &huge {
            add(
                format!("config `{field}` = {what}"),
                with_config(base, |c| c[field] = value.clone()),
                Expect::Error(""),
            );
        }
    }
    for (what, value) in &huge {
        add(
            format!("config `hidden` = [{what}]"),
            with_config(base, |c| c["hidden"] = json!([value.clone()])),
            Expect::Error(""),
        );
    }
    for (what, hidden) in [
        ("[2^63, 2^63]", json!([1u64 << 63, 1u64 << 63])),
        ("[10^6] × 1000", json!(vec![1_000_000; 1000])),
        ("[1] × 100000", json!(vec![1; 100_000])),
        ("[]", json!([])),
        ("null", Value::Null),
    ] {
        if base.config["hidden"] == hidden {
            continue;
        }
        add(
            format!("config `hidden` = {what}"),
            with_config(base, |c| c["hidden"] = hidden.clone()),
            Expect::Error(""),
        );
    }
    for (path, value) in [
        ("layer.parameterization", json!("cholesky ")),
        ("layer.parameterization", json!("low_rank")),
        ("layer.tanh", json!("tanh")),
        ("layer.tanh", json!(1)),
        ("layer.kernel", json!("projected_")),
        ("layer.factor_diag_floor", json!(-1.0)),
        ("layer.width_floor", json!(0.0)),
        ("layer.init.center_std", json!(-1.0)),
        ("layer.init.seed", json!(-1)),
        ("dropout", json!(1.0)),
        ("dropout", json!(-0.5)),
        ("batch_norm_eps", json!(-1e-5)),
        // 0 divides by a zero variance (a constant feature, a batch of one): NaN.
        ("batch_norm_eps", json!(0.0)),
        ("gate", Value::Null),
        ("output_layer", json!(7)),
        ("layer", Value::Null),
    ] {
        add(
            format!("config `{path}` = {value}"),
            with_config(base, |c| {
                let (parent, key) = parent_and_key(c, path);
                parent[&key] = value.clone();
            }),
            Expect::Error(""),
        );
    }

    // 7. Random byte flips: in the header they mostly break it; in the data they may give
    // another valid network. No panic either way.
    let mut rng = Rng(seed);
    for i in 0..60 {
        let mut bytes = base.bytes.clone();
        let flips = 1 + rng.below(4);
        for _ in 0..flips {
            let at = if i % 2 == 0 {
                8 + rng.below(n as usize)
            } else {
                rng.below(bytes.len())
            };
            bytes[at] ^= 1 << rng.below(8);
        }
        add(format!("random flips #{i}"), bytes, Expect::NoPanic);
    }
    cases
}

fn bases() -> Result<Vec<(&'static str, Base)>> {
    // Seeded, so the bases (and the random flips applied to them) are the same on every run.
    let init = InitConfig {
        seed: Some(9),
        ..Default::default()
    };
    let a = GaussNetConfig {
        in_features: 3,
        hidden: vec![4],
        out_features: 2,
        layer: GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(Parameterization::Cholesky),
            tanh: true,
            init: init.clone(),
            ..Default::default()
        },
        output_layer: Some(GaussLayerConfig {
            precision: PrecisionConfig {
                parameterization: Parameterization::Diag,
                width_floor: Some(0.5),
                ..Default::default()
            },
            init: init.clone(),
            ..Default::default()
        }),
        input_batch_norm: true,
        batch_norm: true,
        ..Default::default()
    };
    let b = GaussNetConfig {
        in_features: 2,
        hidden: vec![],
        out_features: 3,
        layer: GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(Parameterization::Expm),
            tied_bias: true,
            init: init.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    // Large enough that the tensor bytes, not the fixed allowance, dominate the cap.
    let c = GaussNetConfig {
        in_features: 48,
        hidden: vec![24],
        out_features: 4,
        layer: GaussLayerConfig {
            precision: PrecisionConfig::with_parameterization(Parameterization::Cholesky),
            init: init.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(vec![
        (
            "f32 cholesky+diag, batch norms",
            save_base("a", a, DType::F32)?,
        ),
        ("f64 expm, tied bias", save_base("b", b, DType::F64)?),
        ("f32 cholesky 48-24-4", save_base("c", c, DType::F32)?),
    ])
}

/// The memory a load may take: twice the file (its tensors, and one tensor's copy while it is
/// converted), 16 times the header (its parse) and 256 KiB for the network's own structures
/// (a small network takes about 10 KiB).
fn memory_cap(bytes: &[u8]) -> usize {
    let header = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0)
        .min(bytes.len() as u64) as usize;
    2 * bytes.len() + 16 * header + (256 << 10)
}

#[test]
fn every_damaged_checkpoint_is_a_clean_error_within_the_memory_cap() -> Result<()> {
    let mut counts = BTreeMap::<&str, usize>::new();
    let mut total = 0;
    let mut worst = (0f64, String::new());
    for (index, (tag, base)) in bases()?.into_iter().enumerate() {
        // The unmodified base loads, under the same cap.
        let (result, peak) =
            peak_of(|| checkpoint::load_from_bytes(&base.bytes, tag, &Device::Cpu, None));
        result?;
        assert!(
            peak <= memory_cap(&base.bytes),
            "{tag}: base took {peak} bytes"
        );
        eprintln!(
            "corpus base {tag}: file {} bytes, load peak {peak} bytes",
            base.bytes.len()
        );

        for case in cases_for(&base, tag, 0x5EED + index as u64) {
            total += 1;
            let cap = memory_cap(&case.bytes);
            let (outcome, peak) = peak_of(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    checkpoint::load_from_bytes(&case.bytes, "case", &Device::Cpu, None)
                }))
            });
            let label = &case.label;
            let result = match outcome {
                Ok(result) => result,
                Err(_) => panic!("{label}: the loader panicked"),
            };
            assert!(
                peak <= cap,
                "{label}: peak allocation {peak} bytes exceeds the cap {cap} (file {} bytes)",
                case.bytes.len()
            );
            let ratio = peak as f64 / cap as f64;
            if ratio > worst.0 {
                worst = (ratio, label.clone());
            }
            match (case.expect, result) {
                (Expect::Error(needle), Err(GaussError::Checkpoint { reason, .. })) => {
                    assert!(
                        reason.contains(needle),
                        "{label}: reason {reason:?} lacks {needle:?}"
                    );
                    assert!(
                        !reason.contains('\n'),
                        "{label}: multi-line reason {reason:?}"
                    );
                    *counts.entry("error").or_default() += 1;
                }
                (Expect::Error(_), Err(other)) => {
                    panic!("{label}: expected a checkpoint error, got {other}")
                }
                (Expect::Error(_), Ok(_)) => panic!("{label}: loaded but should not"),
                (Expect::NoPanic, Ok(_)) => *counts.entry("random: loaded").or_default() += 1,
                (Expect::NoPanic, Err(_)) => *counts.entry("random: error").or_default() += 1,
            }
        }
    }
    eprintln!("corpus: {total} cases, {counts:?}; largest peak/cap ratio {worst:?}");
    assert!(total >= 300, "corpus too small: {total}");
    Ok(())
}

#[test]
fn the_same_checks_hold_through_files_and_with_dtype_conversion() -> Result<()> {
    // A sample of the corpus through `load` (positioned file reads) and with a requested dtype.
    let dir = temp_dir("corpus-files")?;
    let mut checked = 0;
    for (tag, base) in bases()? {
        for (i, case) in cases_for(&base, tag, 1).into_iter().enumerate() {
            if i % 7 != 0 || case.expect == Expect::NoPanic {
                continue;
            }
            let path = dir.join("case.safetensors");
            std::fs::write(&path, &case.bytes)?;
            for dtype in [None, Some(DType::F64)] {
                let options = LoadOptions {
                    dtype,
                    ..Default::default()
                };
                let result = catch_unwind(AssertUnwindSafe(|| {
                    checkpoint::load_with_options(&path, &Device::Cpu, &options)
                }));
                match result {
                    Ok(Err(GaussError::Checkpoint { .. })) => checked += 1,
                    Ok(Err(other)) => panic!("{}: unexpected error kind {other}", case.label),
                    // A wrong tensor dtype is the one damage a requested dtype converts.
                    Ok(Ok(_)) if dtype.is_some() && case.label.contains("dtype \"F") => {}
                    Ok(Ok(_)) => panic!("{} ({dtype:?}): loaded but should not", case.label),
                    Err(_) => panic!("{}: panicked", case.label),
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} file cases");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

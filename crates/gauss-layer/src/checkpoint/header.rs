//! The safetensors header, read and parsed with bounded memory before any tensor.
//!
//! Layout of a safetensors file: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (an object: `"__metadata__"` → string map, and each tensor name → `{dtype, shape,
//! data_offsets}`), then the data section, where every tensor occupies
//! `[begin, end)` relative to the section's start.
//!
//! Everything a file declares is checked against the file itself before it is trusted: `n`
//! against the file's length (and [`MAX_HEADER_BYTES`]), each tensor's byte count against its
//! shape and dtype (checked arithmetic), its byte range against the data section, and the
//! ranges together must tile the data section exactly (no gap, overlap or trailing bytes).
//! Duplicate keys, at the top level or in `__metadata__`, are errors (a JSON parser would
//! silently keep the last one). Ranks are capped at [`MAX_RANK`], so no declared size ever
//! sizes an allocation.

use std::collections::BTreeMap;
use std::fmt;

use candle_core::DType;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::source::Source;

/// The largest header this loader reads (the safetensors crate's own limit).
pub(crate) const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The largest tensor rank accepted in a header (a network's tensors have rank 1 to 3).
pub(crate) const MAX_RANK: usize = 8;

/// One tensor as the header declares it, with its ranges checked against the file.
#[derive(Clone, Debug)]
pub(crate) struct TensorEntry {
    /// The safetensors dtype name as written (`"F32"`, ...).
    pub dtype_name: String,
    /// The candle dtype, for the float dtypes a network may hold.
    pub dtype: Option<DType>,
    /// The declared shape.
    pub shape: Vec<usize>,
    /// Number of elements (checked product of `shape`).
    pub numel: usize,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Length of the data in bytes (`numel · dtype size`).
    pub len: u64,
}

/// The parsed header: metadata and tensors sorted by name.
#[derive(Debug)]
pub(crate) struct Header {
    /// The `__metadata__` map; `None` when the file has none.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// Byte size of one element of a safetensors dtype, and the candle float dtype it maps to.
fn dtype_info(name: &str) -> Option<(u64, Option<DType>)> {
    Some(match name {
        "F64" => (8, Some(DType::F64)),
        "F32" => (4, Some(DType::F32)),
        "F16" => (2, Some(DType::F16)),
        "BF16" => (2, Some(DType::BF16)),
        "I64" | "U64" => (8, None),
        "I32" | "U32" => (4, None),
        "I16" | "U16" => (2, None),
        "I8" | "U8" | "BOOL" | "F8_E5M2" | "F8_E4M3" => (1, None),
        _ => return None,
    })
}

/// Reads and validates the header of `source`; errors are one-line reasons.
pub(crate) fn read_header(source: &mut dyn Source) -> Result<Header, String> {
    let file_len = source.len();
    if file_len < 8 {
        return Err(format!(
            "not a safetensors file: {file_len} bytes, too short for the 8-byte header length (truncated?)"
        ));
    }
    let mut prefix = [0u8; 8];
    source
        .read_at(0, &mut prefix)
        .map_err(|e| format!("cannot read the safetensors header length: {e}"))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES {
        return Err(format!(
            "not a readable safetensors file: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes (corrupt or another format)"
        ));
    }
    if n > file_len - 8 {
        return Err(format!(
            "not a readable safetensors file: header length {n} but only {} bytes follow (truncated or another format)",
            file_len - 8
        ));
    }
    // `n <= file_len`: this allocation is backed by the file's own bytes.
    let mut json = vec![0u8; n as usize];
    source
        .read_at(8, &mut json)
        .map_err(|e| format!("cannot read the safetensors header: {e}"))?;
    if json.first() != Some(&b'{') {
        return Err(
            "not a readable safetensors file: the header is not a JSON object (another format?)"
                .to_string(),
        );
    }
    let mut deserializer = serde_json::Deserializer::from_slice(&json);
    let (metadata, raw) = HeaderSeed
        .deserialize(&mut deserializer)
        .and_then(|v| deserializer.end().map(|()| v))
        .map_err(|e| format!("not a readable safetensors file: header: {e}"))?;
    drop(json);

    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut tensors = BTreeMap::new();
    let mut ranges = Vec::with_capacity(raw.len());
    for (name, entry) in raw {
        let shape = entry.shape.0;
        let (size, dtype) = dtype_info(&entry.dtype)
            .ok_or_else(|| format!("tensor `{name}` has unknown dtype {:?}", entry.dtype))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                format!("tensor `{name}` has shape {shape:?}, whose element count overflows")
            })?;
        let (begin, end) = entry.data_offsets;
        let expected_len = (numel as u64).checked_mul(size).ok_or_else(|| {
            format!("tensor `{name}` has shape {shape:?}, whose byte size overflows")
        })?;
        if end < begin || end - begin != expected_len {
            return Err(format!(
                "tensor `{name}` declares bytes {begin}..{end}, but shape {shape:?} of {} needs {expected_len} bytes",
                entry.dtype
            ));
        }
        if end > data_len {
            return Err(format!(
                "tensor `{name}` occupies bytes {begin}..{end} of the data section, which has {data_len} bytes (truncated file?)"
            ));
        }
        ranges.push((begin, end, name.clone()));
        tensors.insert(
            name,
            TensorEntry {
                dtype_name: entry.dtype,
                dtype,
                shape,
                numel,
                offset: data_start + begin,
                len: expected_len,
            },
        );
    }
    // The ranges must tile the data section: no gap, no overlap, nothing after the last.
    ranges.sort();
    let mut position = 0u64;
    for (begin, end, name) in &ranges {
        if *begin != position {
            return Err(format!(
                "tensor `{name}` starts at byte {begin} of the data section, expected {position} (overlapping or non-contiguous tensors)"
            ));
        }
        position = *end;
    }
    if position != data_len {
        return Err(format!(
            "the data section has {data_len} bytes but the tensors cover {position} (extra bytes after the last tensor)"
        ));
    }
    Ok(Header { metadata, tensors })
}

/// A tensor entry exactly as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: BoundedShape,
    data_offsets: (u64, u64),
}

type RawHeader = (Option<BTreeMap<String, String>>, Vec<(String, RawEntry)>);

/// Deserializes the top-level object, rejecting duplicate keys.
struct HeaderSeed;

impl<'de> DeserializeSeed<'de> for HeaderSeed {
    type Value = RawHeader;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(HeaderVisitor)
    }
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut metadata = None;
        let mut tensors: BTreeMap<String, RawEntry> = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if metadata.is_some() {
                    return Err(de::Error::custom("duplicate key `__metadata__`"));
                }
                metadata = Some(map.next_value_seed(MetadataSeed)?);
            } else {
                if tensors.contains_key(&key) {
                    return Err(de::Error::custom(format!("duplicate tensor `{key}`")));
                }
                let entry: RawEntry = map
                    .next_value()
                    .map_err(|e| de::Error::custom(format!("tensor `{key}`: {e}")))?;
                tensors.insert(key, entry);
            }
        }
        Ok((metadata, tensors.into_iter().collect()))
    }
}

/// The `__metadata__` map: strings only, no duplicate keys.
struct MetadataSeed;

impl<'de> DeserializeSeed<'de> for MetadataSeed {
    type Value = BTreeMap<String, String>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(MetadataVisitor)
    }
}

struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`__metadata__` as an object of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate metadata key `{key}`")));
            }
            let value: String = map
                .next_value()
                .map_err(|e| de::Error::custom(format!("metadata key `{key}`: {e}")))?;
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// A shape of at most [`MAX_RANK`] dimensions.
struct BoundedShape(Vec<usize>);

impl<'de> serde::Deserialize<'de> for BoundedShape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = BoundedShape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a shape of at most {MAX_RANK} non-negative integers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut dims = Vec::new();
        while let Some(d) = seq.next_element::<u64>()? {
            if dims.len() == MAX_RANK {
                return Err(de::Error::custom(format!(
                    "shape has more than {MAX_RANK} dimensions"
                )));
            }
            let d = usize::try_from(d)
                .map_err(|_| de::Error::custom(format!("dimension {d} does not fit in usize")))?;
            dims.push(d);
        }
        Ok(BoundedShape(dims))
    }
}

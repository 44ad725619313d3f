//! The safetensors header, validated before anything in it is trusted.
//!
//! File layout: `u64` little-endian header length `N`, `N` bytes of UTF-8 JSON (an object:
//! tensor name -> `{"dtype", "shape", "data_offsets": [begin, end]}`, plus an optional
//! `"__metadata__"` string -> string map), then the data section; offsets are relative to it.
#![forbid(unsafe_code)]

use super::Dtype;
use crate::{HiggsError, Result};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

/// Largest header accepted (as the reference implementation: 100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor of a validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// `[begin, end)` relative to the data section; `end - begin` is the tensor's byte length.
    pub data_offsets: [usize; 2],
}

/// A validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON text (the `N` of the prefix).
    pub header_len: usize,
    /// Where the data section starts in the file: `8 + header_len`.
    pub data_start: usize,
    /// Length of the data section, which the tensors cover exactly.
    pub data_len: usize,
    /// Tensors in data order (by begin offset; zero-length ties by name).
    pub tensors: Vec<HeaderTensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Validate the header of a safetensors file of `file_len` bytes whose start is `bytes`
/// (at least the 8-byte prefix and the JSON; the data section need not be there).
/// Total: any input gives `Ok` or a `HiggsError::Format`, never a panic.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header> {
    parse_header_of(Path::new("<safetensors header>"), bytes, file_len)
}

/// [`parse_header`] with errors naming `path`.
pub(crate) fn parse_header_of(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header> {
    parse(bytes, file_len).map_err(|message| HiggsError::format(path, message))
}

/// The header length the 8-byte prefix declares, if the prefix is there.
pub(crate) fn declared_header_len(bytes: &[u8]) -> Option<u64> {
    let prefix: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(prefix))
}

fn parse(bytes: &[u8], file_len: u64) -> std::result::Result<Header, String> {
    if file_len < 8 {
        return Err(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length of a safetensors file"
        ));
    }
    let declared = declared_header_len(bytes).ok_or_else(|| {
        format!(
            "only {} bytes of the 8-byte header length are readable",
            bytes.len()
        )
    })?;
    if declared > MAX_HEADER_LEN {
        return Err(format!(
            "header length {declared} exceeds the limit of {MAX_HEADER_LEN} bytes (corrupt or not a safetensors file)"
        ));
    }
    if declared > file_len - 8 {
        return Err(format!(
            "header length {declared} runs past the end of the file ({file_len} bytes): truncated or not a safetensors file"
        ));
    }
    // Both bounded by the checks above (<= 100 MB, <= file_len), so they fit usize.
    let header_len = usize::try_from(declared)
        .map_err(|_| "header length does not fit in memory".to_string())?;
    let data_start = 8 + header_len;
    let data_len = usize::try_from(file_len - data_start as u64)
        .map_err(|_| format!("file of {file_len} bytes is too large to address on this machine"))?;
    let json = bytes.get(8..data_start).ok_or_else(|| {
        format!(
            "header is {header_len} bytes but only {} are readable",
            bytes.len().saturating_sub(8)
        )
    })?;
    let text = std::str::from_utf8(json).map_err(|e| format!("header is not valid UTF-8: {e}"))?;
    if !text.starts_with('{') {
        return Err("header does not start with '{' (not a safetensors file?)".to_string());
    }
    let raw: RawObject =
        serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;

    let mut seen = HashSet::with_capacity(raw.0.len());
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if !seen.insert(name.clone()) {
            return Err(format!("duplicate entry {name:?} in the header"));
        }
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
        } else {
            tensors.push(parse_tensor(name, value, data_len)?);
        }
    }

    // In data order, tensors must tile the data section: no overlap, no hole, no tail.
    tensors.sort_by(|a, b| {
        a.data_offsets
            .cmp(&b.data_offsets)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut covered = 0usize;
    let mut previous: Option<&HeaderTensor> = None;
    for t in &tensors {
        let [begin, end] = t.data_offsets;
        if begin < covered {
            let other = previous.map(|p| p.name.as_str()).unwrap_or("");
            return Err(format!(
                "tensor {:?} (bytes {begin}..{end}) overlaps tensor {other:?} (which ends at {covered})",
                t.name
            ));
        }
        if begin > covered {
            return Err(match previous {
                Some(p) => format!(
                    "hole in the data section: bytes {covered}..{begin} between tensors {:?} and {:?} belong to no tensor",
                    p.name, t.name
                ),
                None => format!(
                    "hole in the data section: bytes 0..{begin} before tensor {:?} belong to no tensor",
                    t.name
                ),
            });
        }
        covered = end;
        previous = Some(t);
    }
    if covered != data_len {
        return Err(format!(
            "data section is {data_len} bytes but the tensors cover only {covered}: {} trailing bytes belong to no tensor",
            data_len - covered
        ));
    }
    Ok(Header {
        header_len,
        data_start,
        data_len,
        tensors,
        metadata,
    })
}

fn parse_metadata(value: Value) -> std::result::Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "__metadata__ must be an object of strings, found {}",
            kind(&value)
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(format!(
                "__metadata__ entry {k:?} must be a string, found {}",
                kind(&other)
            )),
        })
        .collect()
}

fn parse_tensor(
    name: String,
    value: Value,
    data_len: usize,
) -> std::result::Result<HeaderTensor, String> {
    let Value::Object(fields) = value else {
        return Err(format!(
            "tensor {name:?}: entry must be an object, found {}",
            kind(&value)
        ));
    };
    let dtype = match fields.get("dtype") {
        Some(Value::String(s)) => s
            .parse::<Dtype>()
            .map_err(|e| format!("tensor {name:?}: {e}"))?,
        Some(other) => {
            return Err(format!(
                "tensor {name:?}: dtype must be a string, found {}",
                kind(other)
            ))
        }
        None => return Err(format!("tensor {name:?}: missing \"dtype\"")),
    };
    let shape = match fields.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or_else(|| {
                    format!("tensor {name:?}: shape dimension {i} is {}, not a non-negative integer", short(d))
                })
            })
            .collect::<std::result::Result<Vec<usize>, String>>()?,
        Some(other) => return Err(format!("tensor {name:?}: shape must be an array, found {}", kind(other))),
        None => return Err(format!("tensor {name:?}: missing \"shape\"")),
    };
    let offsets = match fields.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => o,
        Some(other) => {
            return Err(format!(
                "tensor {name:?}: data_offsets must be an array [begin, end], found {}",
                short(other)
            ))
        }
        None => return Err(format!("tensor {name:?}: missing \"data_offsets\"")),
    };
    let offset = |i: usize| {
        offsets[i].as_u64().ok_or_else(|| {
            format!(
                "tensor {name:?}: data_offsets[{i}] is {}, not a non-negative integer",
                short(&offsets[i])
            )
        })
    };
    let (begin, end) = (offset(0)?, offset(1)?);
    if begin > end {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] has begin after end"
        ));
    }
    if end > data_len as u64 {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] extend past the data section ({data_len} bytes): file truncated?"
        ));
    }
    let expected = dtype.byte_len(&shape).ok_or_else(|| {
        format!("tensor {name:?}: shape {shape:?} of {dtype} overflows the addressable size")
    })?;
    // end <= data_len, so both fit usize.
    let (begin, end) = (begin as usize, end as usize);
    if expected != end - begin {
        return Err(format!(
            "tensor {name:?}: shape {shape:?} of {dtype} needs {expected} bytes but data_offsets [{begin}, {end}] hold {}",
            end - begin
        ));
    }
    Ok(HeaderTensor {
        name,
        dtype,
        shape,
        data_offsets: [begin, end],
    })
}

/// A value for an error message, cut to a readable length.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object's entries in file order, duplicates kept (serde_json's map would keep only
/// the last one, hiding a duplicate name).
struct RawObject(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawObject, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(RawObject(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file prefix: length, JSON, then `data_len` zero bytes.
    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn check(json: &str, data_len: usize) -> std::result::Result<Header, String> {
        let bytes = file(json, data_len);
        parse_header(&bytes, bytes.len() as u64).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_a_valid_header_and_orders_by_offset() {
        let h = check(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},
               "__metadata__":{"format":"pt"}}  "#,
            16,
        )
        .unwrap();
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(h.tensors[1].shape, [2, 2]);
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.data_len, 16);
    }

    #[test]
    fn accepts_zero_length_tensors_and_an_empty_header() {
        let h = check(
            r#"{"z":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
            4,
        )
        .unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert!(check("{}", 0).unwrap().tensors.is_empty());
    }

    #[test]
    fn rejects_each_kind_of_inconsistency_naming_it() {
        let cases: &[(&str, usize, &str)] = &[
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
                "extend past",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
                "needs 12 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
                8,
                "begin after end",
            ),
            (
                r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
                8,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
                8,
                "not a non-negative integer",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}"#,
                8,
                "not a non-negative integer",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
                8,
                "data_offsets must be",
            ),
            (
                r#"{"a":{"shape":[2],"data_offsets":[0,8]}}"#,
                8,
                "missing \"dtype\"",
            ),
            (r#"{"a":[1]}"#, 8, "must be an object"),
            (r#"{"__metadata__":{"k":1}}"#, 0, "must be a string"),
            (r#"{"__metadata__":[]}"#, 0, "object of strings"),
            (r#"[1,2]"#, 0, "does not start with"),
            (r#"{"a":"#, 0, "not valid JSON"),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
                16,
                "duplicate entry \"a\"",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "overlaps tensor \"a\"",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
                20,
                "hole in the data section: bytes 8..12",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                12,
                "4 trailing bytes",
            ),
            (
                r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
                0,
                "overflows",
            ),
        ];
        for (json, data_len, expected) in cases {
            let err = check(json, *data_len).expect_err(json);
            assert!(err.contains(expected), "{json}: {err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn rejects_bad_lengths_and_bytes() {
        let err = |bytes: &[u8], len: u64| parse_header(bytes, len).unwrap_err().to_string();
        assert!(err(b"abc", 3).contains("shorter than the 8-byte"));
        assert!(err(&u64::MAX.to_le_bytes(), 8).contains("exceeds the limit"));
        assert!(err(&100u64.to_le_bytes(), 50).contains("runs past the end"));
        // Declared length fits the file but the caller passed fewer bytes.
        assert!(err(&4u64.to_le_bytes(), 12).contains("only 0 are readable"));
        let mut bad_utf8 = 2u64.to_le_bytes().to_vec();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert!(err(&bad_utf8, 10).contains("UTF-8"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let json = format!(
            "{{\"__metadata__\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(check(&json, 0).unwrap_err().contains("JSON"));
    }
}

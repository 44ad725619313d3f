//! safetensors in (validated, memory-mapped) and out (streamed, atomic).
//!
//! - [`parse_header`]: a pure, total validator of a safetensors header (the fuzz target).
//!   Nothing of a file is trusted before it passes: lengths, dtypes, shapes, offsets, overlaps
//!   and holes, duplicate names, `__metadata__`.
//! - [`Checkpoint`]: one `.safetensors` file, or a directory (`model.safetensors`, shards listed
//!   by `model.safetensors.index.json`, or every `*.safetensors`), memory-mapped; tensors in file
//!   order, then offset order within a file (sequential reads), with lookup by name.
//! - [`SafetensorsWriter`]: a shard whose header is computed from the declared entries before any
//!   data, streamed to a temporary file beside the target and renamed into place on
//!   [`SafetensorsWriter::finish`]; on error or drop the temporary file is removed.
//! - [`atomic_write`]: the same temp + fsync + rename for small files.
#![deny(unsafe_code)]

mod header;
mod reader;
mod writer;

pub use header::{parse_header, Header, HeaderTensor, MAX_HEADER_LEN};
pub use reader::{Checkpoint, TensorInfo};
pub use writer::{atomic_write, SafetensorsWriter};

use std::fmt;
use std::str::FromStr;

/// The element types of safetensors (the byte-sized ones; sub-byte F4/F6 are rejected
/// by name as unsupported).
/// Variants are spelled as in the header (`F8_E4M3`), so code and files read alike.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl Dtype {
    /// Every dtype, in the order of the enum.
    pub const ALL: [Dtype; 17] = [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// The name in a safetensors header.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::C64 => "C64",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8_E5M2
            | Dtype::F8_E4M3
            | Dtype::F8_E8M0 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::C64 | Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The dtype a header names, if it is one of ours.
    pub fn parse(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes of a tensor of this dtype and `shape`, or `None` on overflow.
    pub fn byte_len(self, shape: &[usize]) -> Option<usize> {
        shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?
            .checked_mul(self.size())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Dtype, String> {
        Dtype::parse(s).ok_or_else(|| match s {
            "F4" | "F6_E2M3" | "F6_E3M2" => format!("sub-byte dtype {s} is not supported"),
            _ => format!("unknown dtype {s:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip_and_sizes_are_the_safetensors_ones() {
        for d in Dtype::ALL {
            assert_eq!(d.as_str().parse::<Dtype>(), Ok(d));
            assert_eq!(d.to_string(), d.as_str());
        }
        assert_eq!(Dtype::BF16.size(), 2);
        assert_eq!(Dtype::F8_E4M3.size(), 1);
        assert_eq!(Dtype::C64.size(), 8);
        assert!("bf16".parse::<Dtype>().is_err());
        assert!("F4".parse::<Dtype>().unwrap_err().contains("sub-byte"));
    }

    #[test]
    fn byte_len_checks_overflow() {
        assert_eq!(Dtype::F32.byte_len(&[3, 5]), Some(60));
        assert_eq!(Dtype::F32.byte_len(&[]), Some(4));
        assert_eq!(Dtype::U8.byte_len(&[0, usize::MAX]), Some(0));
        assert_eq!(Dtype::F32.byte_len(&[usize::MAX / 2, 1]), None);
        assert_eq!(Dtype::U8.byte_len(&[1 << 40, 1 << 40]), None);
    }
}

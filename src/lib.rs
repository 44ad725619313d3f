//! higgs_rs: data-free LLM weight quantization with HIGGS
//! (random Hadamard rotation + Gaussian MSE-optimal grids), and the kernels to run it.
//!
//! Module map (one concept each):
//! - [`hadamard`]: orthonormal fast Walsh–Hadamard transforms (power-of-two and m·2^k orders), SIMD dispatch.
//! - [`grid`]: Gaussian MSE-optimal grids shipped as generated data, with identities (p, n, version).
//! - [`assign`]: exact nearest-grid-point search.
//! - [`codec`]: one tensor: rotate, scale, assign, pack; dequantize; bits per weight.
//! - [`checkpoint`]: validated memory-mapped safetensors in, atomic streamed safetensors out.
//! - [`pipeline`]: plan and run the quantization of a whole checkpoint.
//! - [`allocate`]: per-layer bit widths from the linearity theorem (multiple-choice knapsack).
//! - [`cpu_kernels`]: LUT-GEMV/GEMM on packed codes for CPU inference.
//! - `cuda` (feature `cuda`): NVRTC-compiled LUT-GEMM kernels launched through cudarc.
//! - `python` (feature `python`): the PyO3 bindings, and the only file that knows Python.

pub mod allocate;
pub mod assign;
pub mod checkpoint;
pub mod codec;
pub mod cpu_kernels;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod grid;
pub mod hadamard;
pub mod pipeline;
pub mod rng;

#[cfg(feature = "python")]
mod python;

/// Every failure the crate reports. Messages name the file, tensor or position at fault,
/// so a person can act on them; the Python binding maps variants to exception types.
#[derive(Debug, thiserror::Error)]
pub enum HiggsError {
    /// An argument the method cannot take (shape, bits, sizes).
    #[error("{0}")]
    InvalidArgument(String),
    /// A NaN or infinity in the input weights.
    #[error("non-finite value {value} in {what} at row {row}, column {col}")]
    NonFinite {
        what: String,
        row: usize,
        col: usize,
        value: f32,
    },
    /// A malformed, truncated or inconsistent file.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    /// An operating-system I/O failure, with the path it concerned.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Something valid that this build or machine does not support.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, HiggsError>;

impl HiggsError {
    pub fn invalid(message: impl Into<String>) -> Self {
        HiggsError::InvalidArgument(message.into())
    }
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        HiggsError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    pub fn format(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        HiggsError::Format {
            path: path.as_ref().display().to_string(),
            message: message.into(),
        }
    }
}

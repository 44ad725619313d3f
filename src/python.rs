//! PyO3 bindings: convert arguments, release the GIL around the work, map errors to exceptions.
//! The only file of the crate that knows Python.
#![forbid(unsafe_code)]

use crate::checkpoint::Checkpoint;
use crate::codec::{self, ElemType, QuantSpec, Source};
use crate::grid::Grid;
use crate::pipeline;
use crate::{hadamard, HiggsError};
use half::{bf16, f16};
use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyNotImplementedError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;
use std::path::PathBuf;

create_exception!(
    _core,
    HiggsFormatError,
    PyValueError,
    "A malformed, truncated or inconsistent file (safetensors or HIGGS checkpoint)."
);

impl From<HiggsError> for PyErr {
    fn from(err: HiggsError) -> PyErr {
        let message = err.to_string();
        match err {
            HiggsError::InvalidArgument(_) | HiggsError::NonFinite { .. } => {
                PyValueError::new_err(message)
            }
            HiggsError::Format { .. } => HiggsFormatError::new_err(message),
            HiggsError::Io { .. } => PyOSError::new_err(message),
            HiggsError::Unsupported(_) => PyNotImplementedError::new_err(message),
        }
    }
}

/// Run `work` on a rayon pool of `threads` threads (None: all cores), without the GIL.
fn run_detached<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let result = py.detach(|| match threads {
        None => work(),
        Some(0) => Err(HiggsError::invalid("threads must be at least 1")),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| HiggsError::invalid(format!("cannot start {n} threads: {e}")))?
            .install(work),
    });
    Ok(result?)
}

/// A quantized matrix: packed codes, scales and the spec that made them.
#[pyclass(module = "higgs_rs._core", frozen)]
pub struct QuantizedTensor {
    inner: codec::QuantizedTensor,
}

#[pymethods]
impl QuantizedTensor {
    /// Rebuild from stored arrays (as read from a checkpoint); checks every size.
    #[staticmethod]
    #[pyo3(signature = (codes, scales, cols, p, n, hadamard_size, group_size, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        codes: PyReadonlyArray2<'_, u8>,
        scales: PyReadonlyArray2<'_, f16>,
        cols: usize,
        p: usize,
        n: usize,
        hadamard_size: usize,
        group_size: usize,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let spec = QuantSpec {
            p,
            n,
            hadamard_size: Some(hadamard_size),
            group_size,
            seed,
        };
        let rows = codes.shape()[0];
        let layout = spec.layout(rows, cols)?;
        let codes = codes.as_array().iter().copied().collect::<Vec<u8>>();
        let scales = scales.as_array().iter().copied().collect::<Vec<f16>>();
        codec::check_parts(&spec, &layout, &codes, &scales)?;
        Ok(QuantizedTensor {
            inner: codec::QuantizedTensor {
                spec,
                layout,
                codes,
                scales,
                squared_error: f64::NAN,
                squared_norm: f64::NAN,
            },
        })
    }

    /// Packed codes, `rows × row_bytes` uint8.
    #[getter]
    fn codes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let l = self.inner.layout;
        PyArray1::from_slice(py, &self.inner.codes).reshape([l.rows, l.row_bytes])
    }
    /// Scales, `rows × groups` float16.
    #[getter]
    fn scales<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f16>>> {
        let l = self.inner.layout;
        PyArray1::from_slice(py, &self.inner.scales).reshape([l.rows, l.groups])
    }
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.layout.rows, self.inner.layout.cols)
    }
    #[getter]
    fn p(&self) -> usize {
        self.inner.spec.p
    }
    #[getter]
    fn n(&self) -> usize {
        self.inner.spec.n
    }
    #[getter]
    fn bits(&self) -> f64 {
        self.inner.spec.bits()
    }
    #[getter]
    fn hadamard_size(&self) -> usize {
        self.inner.layout.block
    }
    #[getter]
    fn group_size(&self) -> usize {
        self.inner.spec.group_size
    }
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.inner.spec.seed
    }
    #[getter]
    fn padded_cols(&self) -> usize {
        self.inner.layout.padded_cols
    }
    /// Stored bits per weight: codes (padding included) and f16 scales.
    #[getter]
    fn bits_per_weight(&self) -> f64 {
        self.inner.bits_per_weight()
    }
    /// ‖Ŵ − W‖² / ‖W‖² measured when quantizing (NaN for tensors rebuilt from parts).
    #[getter]
    fn relative_mse(&self) -> f64 {
        self.inner.relative_mse()
    }
    /// Name of the grid: "p2_n256_v1".
    #[getter]
    fn grid_id(&self) -> PyResult<String> {
        Ok(Grid::load(self.inner.spec.p, self.inner.spec.n)?.id())
    }
    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "QuantizedTensor(shape=({}, {}), p={}, n={}, hadamard_size={}, group_size={}, seed={:?}, bits_per_weight={:.4})",
            s.layout.rows, s.layout.cols, s.spec.p, s.spec.n, s.layout.block, s.spec.group_size, s.spec.seed, s.bits_per_weight()
        )
    }
}

/// Quantize a 2-D array. `array` is float32, float16, or uint16 holding bfloat16 bits
/// (`is_bf16=True`); it is read in place when C-contiguous.
#[pyfunction]
#[pyo3(signature = (array, *, p, n, hadamard_size=None, group_size=64, seed=Some(0), is_bf16=false, threads=None, scale_search="fast"))]
#[allow(clippy::too_many_arguments)]
fn quantize_tensor(
    py: Python<'_>,
    array: &Bound<'_, PyAny>,
    p: usize,
    n: usize,
    hadamard_size: Option<usize>,
    group_size: usize,
    seed: Option<u64>,
    is_bf16: bool,
    threads: Option<usize>,
    scale_search: &str,
) -> PyResult<QuantizedTensor> {
    let search = codec::ScaleSearch::parse(scale_search)?;
    let spec = QuantSpec {
        p,
        n,
        hadamard_size,
        group_size,
        seed,
    };
    let run = |source: Source<'_>, rows: usize, cols: usize| {
        run_detached(py, threads, || {
            codec::quantize_with(source, rows, cols, &spec, search)
        })
    };
    let inner = if let Ok(a) = array.cast::<PyArray2<f32>>() {
        let a = a.readonly();
        let (rows, cols) = (a.shape()[0], a.shape()[1]);
        match a.as_slice() {
            Ok(s) => run(Source::F32(s), rows, cols)?,
            Err(_) => run(
                Source::F32(&a.as_array().iter().copied().collect::<Vec<_>>()),
                rows,
                cols,
            )?,
        }
    } else if let Ok(a) = array.cast::<PyArray2<f16>>() {
        let a = a.readonly();
        let (rows, cols) = (a.shape()[0], a.shape()[1]);
        match a.as_slice() {
            Ok(s) => run(Source::F16(s), rows, cols)?,
            Err(_) => run(
                Source::F16(&a.as_array().iter().copied().collect::<Vec<_>>()),
                rows,
                cols,
            )?,
        }
    } else if let (true, Ok(a)) = (is_bf16, array.cast::<PyArray2<u16>>()) {
        let a = a.readonly();
        let (rows, cols) = (a.shape()[0], a.shape()[1]);
        let bits: Vec<bf16>;
        let source = match a.as_slice() {
            Ok(s) => Source::Bytes(ElemType::Bf16, as_le_bytes(s)),
            Err(_) => {
                bits = a.as_array().iter().map(|&b| bf16::from_bits(b)).collect();
                Source::Bf16(&bits)
            }
        };
        run(source, rows, cols)?
    } else {
        let described = array
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| array.get_type().to_string());
        let ndim = array
            .getattr("ndim")
            .map(|d| d.to_string())
            .unwrap_or_default();
        return Err(PyValueError::new_err(format!(
            "expected a 2-D numpy array of float32, float16 or bfloat16 bits (uint16 with is_bf16=True); got dtype {described}, ndim {ndim}"
        )));
    };
    Ok(QuantizedTensor { inner })
}

/// u16 values as their little-endian bytes (a copy only on big-endian machines).
fn as_le_bytes(values: &[u16]) -> &[u8] {
    #[cfg(target_endian = "little")]
    {
        bytemuck_cast(values)
    }
    #[cfg(not(target_endian = "little"))]
    compile_error!("big-endian hosts are not supported")
}

fn bytemuck_cast(values: &[u16]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Dequantize to a float32 `rows × cols` array.
#[pyfunction]
#[pyo3(signature = (tensor, threads=None))]
fn dequantize<'py>(
    py: Python<'py>,
    tensor: &QuantizedTensor,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let values = run_detached(py, threads, || codec::dequantize(&tensor.inner))?;
    let l = tensor.inner.layout;
    PyArray1::from_vec(py, values).reshape([l.rows, l.cols])
}

/// The points of the shipped grid (p, n), as an `n × p` float32 array.
#[pyfunction]
fn grid_points<'py>(py: Python<'py>, p: usize, n: usize) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let grid = Grid::load(p, n)?;
    PyArray1::from_slice(py, &grid.points).reshape([n, p])
}

/// Every shipped grid as (p, n).
#[pyfunction]
fn available_grids() -> Vec<(usize, usize)> {
    Grid::available()
}

/// In-place orthonormal Hadamard transform of each row's blocks of `order` (float32, C-contiguous).
#[pyfunction]
#[pyo3(signature = (array, order, inverse=false))]
fn hadamard_transform(
    py: Python<'_>,
    mut array: PyReadwriteArray2<'_, f32>,
    order: usize,
    inverse: bool,
) -> PyResult<()> {
    let data = array.as_slice_mut().map_err(|_| {
        PyValueError::new_err("hadamard_transform needs a C-contiguous float32 array")
    })?;
    py.detach(|| {
        if inverse {
            hadamard::inverse(data, order)
        } else {
            hadamard::forward(data, order)
        }
    })?;
    Ok(())
}

/// The ±1 signs that seed `seed` gives for `len` values (float32).
#[pyfunction]
fn random_signs<'py>(py: Python<'py>, seed: u64, len: usize) -> Bound<'py, PyArray1<f32>> {
    PyArray1::from_vec(py, hadamard::random_signs(seed, len))
}

/// The Hadamard orders the transform supports, as a predicate.
#[pyfunction]
fn is_supported_hadamard_order(order: usize) -> bool {
    hadamard::is_supported_order(order)
}

/// Which SIMD implementation the Hadamard transform uses on this machine.
#[pyfunction]
fn simd_path() -> &'static str {
    hadamard::simd_path()
}

/// Quantize a checkpoint directory (or file) into a HIGGS checkpoint directory; returns a summary
/// dict, or with `dry_run` the printed plan (and nothing is written).
#[pyfunction]
#[pyo3(signature = (src, dst, *, p, n, hadamard_size=None, group_size=64, seed=Some(0), skip=Vec::new(),
    overrides=BTreeMap::new(), threads=None, overwrite=false, dry_run=false, progress=true,
    max_shard_bytes=5_000_000_000, scale_search="fast"))]
#[allow(clippy::too_many_arguments)]
fn quantize_checkpoint<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: Option<PathBuf>,
    p: usize,
    n: usize,
    hadamard_size: Option<usize>,
    group_size: usize,
    seed: Option<u64>,
    skip: Vec<String>,
    overrides: BTreeMap<String, (usize, usize, Option<usize>, usize)>,
    threads: Option<usize>,
    overwrite: bool,
    dry_run: bool,
    progress: bool,
    max_shard_bytes: u64,
    scale_search: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let search = codec::ScaleSearch::parse(scale_search)?;
    let spec_of = |p, n, hadamard_size, group_size| QuantSpec {
        p,
        n,
        hadamard_size,
        group_size,
        seed,
    };
    let options = pipeline::Options {
        spec: spec_of(p, n, hadamard_size, group_size),
        overrides: overrides
            .into_iter()
            .map(|(name, (p, n, h, g))| (name, spec_of(p, n, h, g)))
            .collect(),
        skip,
        max_shard_bytes,
        scale_search: search,
    };
    let out = PyDict::new(py);
    let result = run_detached(py, threads, || {
        let checkpoint = Checkpoint::open(&src)?;
        let plan = pipeline::plan(&checkpoint, &options)?;
        if dry_run {
            return Ok((plan, None));
        }
        let dst = dst.ok_or_else(|| HiggsError::invalid("a destination directory is needed"))?;
        let source_dir = if src.is_dir() {
            src.clone()
        } else {
            src.parent().map(PathBuf::from).unwrap_or_default()
        };
        let summary = pipeline::run(
            &checkpoint,
            &source_dir,
            &plan,
            &options,
            &dst,
            overwrite,
            progress,
        )?;
        Ok((plan, Some(summary)))
    })?;
    let (plan, summary) = result;
    out.set_item("plan", pipeline::describe(&plan))?;
    out.set_item("source_bytes", plan.source_bytes())?;
    out.set_item("output_bytes", plan.output_bytes())?;
    out.set_item("bits_per_weight", plan.quantized_bits_per_weight())?;
    if let Some(s) = summary {
        out.set_item("tensors", s.tensors)?;
        out.set_item("quantized", s.quantized)?;
        out.set_item("seconds", s.seconds)?;
        out.set_item("quantized_weights", s.quantized_weights)?;
        out.set_item(
            "relative_mse",
            s.relative_mse.into_iter().collect::<BTreeMap<_, _>>(),
        )?;
    }
    Ok(out)
}

/// Linearity-theorem allocation: one option per layer minimizing Σ `errors[l][k]` with
/// Σ `costs[l][k]` <= `budget` (and Σ `second_costs` <= `second_budget` when given); a dict with
/// `choices`, `cost`, `error`, `lower_bound`, `exact`, `unit`.
#[pyfunction]
#[pyo3(signature = (costs, errors, budget, *, second_costs=None, second_budget=None,
    max_cells=crate::allocate::DEFAULT_MAX_CELLS))]
#[allow(clippy::too_many_arguments)]
fn allocate<'py>(
    py: Python<'py>,
    costs: Vec<Vec<u64>>,
    errors: Vec<Vec<f64>>,
    budget: u64,
    second_costs: Option<Vec<Vec<u64>>>,
    second_budget: Option<u64>,
    max_cells: usize,
) -> PyResult<Bound<'py, PyDict>> {
    use crate::allocate::{allocate, allocate_two_budgets, Choice};
    if costs.len() != errors.len() || costs.iter().zip(&errors).any(|(c, e)| c.len() != e.len()) {
        return Err(PyValueError::new_err(
            "costs and errors must have the same shape (layers × options)",
        ));
    }
    let layers: Vec<Vec<Choice>> = costs
        .iter()
        .zip(&errors)
        .map(|(c, e)| {
            c.iter()
                .zip(e)
                .map(|(&cost, &error)| Choice { cost, error })
                .collect()
        })
        .collect();
    let result = py.detach(|| match (second_costs, second_budget) {
        (None, None) => allocate(&layers, budget, max_cells),
        (Some(second), Some(second_budget)) => {
            allocate_two_budgets(&layers, &second, budget, second_budget, max_cells)
        }
        _ => Err(HiggsError::invalid(
            "second_costs and second_budget go together",
        )),
    })?;
    let out = PyDict::new(py);
    out.set_item("choices", result.choices)?;
    out.set_item("cost", result.cost)?;
    out.set_item("error", result.error)?;
    out.set_item("lower_bound", result.lower_bound)?;
    out.set_item("exact", result.exact)?;
    out.set_item("unit", result.unit)?;
    Ok(out)
}

/// Bits a `rows × cols` tensor stores with this spec: packed codes (padding included) and f16 scales.
#[pyfunction]
#[pyo3(signature = (rows, cols, p, n, hadamard_size=None, group_size=64))]
fn stored_bits(
    rows: usize,
    cols: usize,
    p: usize,
    n: usize,
    hadamard_size: Option<usize>,
    group_size: usize,
) -> PyResult<u64> {
    let spec = QuantSpec {
        p,
        n,
        hadamard_size,
        group_size,
        seed: None,
    };
    Ok(crate::allocate::stored_bits(&spec, rows, cols)?)
}

/// `x @ W.T` for a HIGGS-packed `W` (rows = out_features), on the CPU, without materializing `W`:
/// the activations are rotated like the weights were, then a LUT product runs on the codes.
/// `x` is float32 `batch × cols`; returns float32 `batch × rows`.
#[pyfunction]
#[pyo3(signature = (x, codes, scales, grid, signs, hadamard_size, group_size, threads=None))]
#[allow(clippy::too_many_arguments)]
fn lut_linear<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    codes: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f16>,
    grid: PyReadonlyArray2<'py, f32>,
    signs: Option<numpy::PyReadonlyArray1<'py, f32>>,
    hadamard_size: usize,
    group_size: usize,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    use std::borrow::Cow;
    fn contiguous<'a, T: numpy::Element + Copy, D: numpy::ndarray::Dimension>(
        a: &'a numpy::PyReadonlyArray<'_, T, D>,
    ) -> Cow<'a, [T]> {
        match a.as_slice() {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
        }
    }
    let (batch, cols) = (x.shape()[0], x.shape()[1]);
    let rows = codes.shape()[0];
    let (n, p) = (grid.shape()[0], grid.shape()[1]);
    if scales.shape()[0] != rows {
        return Err(PyValueError::new_err(format!(
            "scales have {} rows but codes have {rows}; both need one row per output feature",
            scales.shape()[0]
        )));
    }
    let (x_values, code_bytes, scale_values, grid_values) = (
        contiguous(&x),
        contiguous(&codes),
        contiguous(&scales),
        contiguous(&grid),
    );
    let sign_values = signs.as_ref().map(contiguous);
    let weights = crate::cpu_kernels::LutWeights {
        rows,
        cols,
        p,
        n,
        hadamard_size,
        group_size,
        codes: &code_bytes,
        scales: &scale_values,
        grid: &grid_values,
        signs: sign_values.as_deref(),
    };
    // Rows come from `codes` and were matched above, so the total sizes checked here pin
    // every dimension.
    weights.layout()?;
    let y = run_detached(py, threads, || {
        let mut y = vec![0f32; batch * rows];
        crate::cpu_kernels::lut_linear(&weights, &x_values, batch, &mut y)?;
        Ok(y)
    })?;
    PyArray1::from_vec(py, y).reshape([batch, rows])
}

/// A HIGGS layer prepared once for the CPU kernels (layout, kernel, lookup tables; grid and signs
/// copied in). Codes and scales are passed to each call, so it holds no copy of the weights.
#[pyclass(module = "higgs_rs._core", frozen)]
pub struct CpuLutPlan {
    plan: crate::cpu_kernels::LutPlan,
}

#[pymethods]
impl CpuLutPlan {
    /// Check the parts like `lut_linear` does and prepare the kernel. With `bf16_grid`, the grid
    /// points are rounded to bfloat16 first (bf16 precision, like a bf16 `F.linear`; the kernels
    /// then look up half as many bytes).
    #[new]
    #[pyo3(signature = (codes, scales, grid, signs, cols, hadamard_size, group_size, bf16_grid=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        codes: PyReadonlyArray2<'_, u8>,
        scales: PyReadonlyArray2<'_, f16>,
        grid: PyReadonlyArray2<'_, f32>,
        signs: Option<numpy::PyReadonlyArray1<'_, f32>>,
        cols: usize,
        hadamard_size: usize,
        group_size: usize,
        bf16_grid: bool,
    ) -> PyResult<Self> {
        let contiguous = |name: &str| {
            PyValueError::new_err(format!("CpuLutPlan needs a C-contiguous `{name}` array"))
        };
        let mut grid_values = grid.as_slice().map_err(|_| contiguous("grid"))?.to_vec();
        if bf16_grid {
            grid_values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
        let weights = crate::cpu_kernels::LutWeights {
            rows: codes.shape()[0],
            cols,
            p: grid.shape()[1],
            n: grid.shape()[0],
            hadamard_size,
            group_size,
            codes: codes.as_slice().map_err(|_| contiguous("codes"))?,
            scales: scales.as_slice().map_err(|_| contiguous("scales"))?,
            grid: &grid_values,
            signs: match &signs {
                Some(s) => Some(s.as_slice().map_err(|_| contiguous("signs"))?),
                None => None,
            },
        };
        let plan =
            crate::cpu_kernels::LutPlan::new(&weights, crate::cpu_kernels::KernelPath::Auto)?;
        Ok(CpuLutPlan { plan })
    }

    /// The kernel this plan runs ("avx512/planes", ..., "scalar").
    #[getter]
    fn kernel_path(&self) -> &'static str {
        self.plan.kernel_path()
    }

    /// `out = x @ W.T (+ bias)` on the global rayon pool, without the GIL. `x` (`batch × cols`)
    /// and `out` (`batch × rows`) are C-contiguous float32 arrays, or both uint16 arrays holding
    /// bfloat16 bits; `bias` is float32.
    #[pyo3(signature = (x, codes, scales, out, bias=None))]
    fn forward(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        codes: PyReadonlyArray2<'_, u8>,
        scales: PyReadonlyArray2<'_, f16>,
        out: &Bound<'_, PyAny>,
        bias: Option<numpy::PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<()> {
        use crate::cpu_kernels::{Activations, Outputs};
        let contiguous =
            |name: &str| PyValueError::new_err(format!("forward needs a C-contiguous `{name}`"));
        let codes = codes.as_slice().map_err(|_| contiguous("codes"))?;
        let scales = scales.as_slice().map_err(|_| contiguous("scales"))?;
        let bias = match &bias {
            Some(b) => Some(b.as_slice().map_err(|_| contiguous("bias"))?),
            None => None,
        };
        let batch = |shape: &[usize]| shape.first().copied().unwrap_or(0);
        if let (Ok(x), Ok(out)) = (x.cast::<PyArray2<f32>>(), out.cast::<PyArray2<f32>>()) {
            let (x, mut out) = (x.readonly(), out.readwrite());
            let rows = batch(x.shape());
            let xs = x.as_slice().map_err(|_| contiguous("x"))?;
            let ys = out.as_slice_mut().map_err(|_| contiguous("out"))?;
            let (xs, ys) = (Activations::F32(xs), Outputs::F32(ys));
            py.detach(|| self.plan.run(codes, scales, xs, rows, ys, bias))?;
        } else if let (Ok(x), Ok(out)) = (x.cast::<PyArray2<u16>>(), out.cast::<PyArray2<u16>>()) {
            let (x, mut out) = (x.readonly(), out.readwrite());
            let rows = batch(x.shape());
            let xs = x.as_slice().map_err(|_| contiguous("x"))?;
            let ys = out.as_slice_mut().map_err(|_| contiguous("out"))?;
            let xs = Activations::Bf16(bytemuck::cast_slice(xs));
            let ys = Outputs::Bf16(bytemuck::cast_slice_mut(ys));
            py.detach(|| self.plan.run(codes, scales, xs, rows, ys, bias))?;
        } else {
            return Err(PyValueError::new_err(
                "forward takes x and out as 2-D float32 arrays, or both as uint16 arrays of bfloat16 bits",
            ));
        }
        Ok(())
    }

    /// Values per rotated row (`rotated_width`): the width of `rotate` and `dequantize_rotated`.
    #[getter]
    fn rotated_width(&self) -> usize {
        self.plan.rotated_width()
    }

    /// The batched path: `out` (`rows × rotated_width`, float32 or uint16 bfloat16 bits) = the
    /// rotated weights, grid point × scale, for a dense product with `rotate`'s activations.
    fn dequantize_rotated(
        &self,
        py: Python<'_>,
        codes: PyReadonlyArray2<'_, u8>,
        scales: PyReadonlyArray2<'_, f16>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        use crate::cpu_kernels::Outputs;
        let contiguous = |name: &str| {
            PyValueError::new_err(format!("dequantize_rotated needs a C-contiguous `{name}`"))
        };
        let codes = codes.as_slice().map_err(|_| contiguous("codes"))?;
        let scales = scales.as_slice().map_err(|_| contiguous("scales"))?;
        if let Ok(out) = out.cast::<PyArray2<f32>>() {
            let mut out = out.readwrite();
            let ys = Outputs::F32(out.as_slice_mut().map_err(|_| contiguous("out"))?);
            py.detach(|| self.plan.dequantize_rotated(codes, scales, ys))?;
        } else if let Ok(out) = out.cast::<PyArray2<u16>>() {
            let mut out = out.readwrite();
            let ys = out.as_slice_mut().map_err(|_| contiguous("out"))?;
            let ys = Outputs::Bf16(bytemuck::cast_slice_mut(ys));
            py.detach(|| self.plan.dequantize_rotated(codes, scales, ys))?;
        } else {
            return Err(PyValueError::new_err(
                "dequantize_rotated writes a 2-D float32 array or a uint16 array of bfloat16 bits",
            ));
        }
        Ok(())
    }

    /// The batched path: `out` (`batch × rotated_width`) = rows of `x` (`batch × cols`) rotated
    /// like the weights were. Each of `x` and `out` is float32 or uint16 (bfloat16 bits).
    fn rotate(&self, py: Python<'_>, x: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<()> {
        use crate::cpu_kernels::{Activations, Outputs};
        let contiguous =
            |name: &str| PyValueError::new_err(format!("rotate needs a C-contiguous `{name}`"));
        let bad = || {
            PyValueError::new_err(
                "rotate takes 2-D float32 arrays or uint16 arrays of bfloat16 bits",
            )
        };
        let (x32, x16) = (x.cast::<PyArray2<f32>>(), x.cast::<PyArray2<u16>>());
        let (x32, x16) = (x32.map(|a| a.readonly()), x16.map(|a| a.readonly()));
        let (xs, batch) = match (&x32, &x16) {
            (Ok(a), _) => (
                Activations::F32(a.as_slice().map_err(|_| contiguous("x"))?),
                a.shape()[0],
            ),
            (_, Ok(a)) => (
                Activations::Bf16(bytemuck::cast_slice(
                    a.as_slice().map_err(|_| contiguous("x"))?,
                )),
                a.shape()[0],
            ),
            _ => return Err(bad()),
        };
        if let Ok(out) = out.cast::<PyArray2<f32>>() {
            let mut out = out.readwrite();
            let ys = Outputs::F32(out.as_slice_mut().map_err(|_| contiguous("out"))?);
            py.detach(|| self.plan.rotate_into(xs, batch, ys))?;
        } else if let Ok(out) = out.cast::<PyArray2<u16>>() {
            let mut out = out.readwrite();
            let ys = out.as_slice_mut().map_err(|_| contiguous("out"))?;
            let ys = Outputs::Bf16(bytemuck::cast_slice_mut(ys));
            py.detach(|| self.plan.rotate_into(xs, batch, ys))?;
        } else {
            return Err(bad());
        }
        Ok(())
    }
}

/// Split the CPU LUT products of `CpuLutPlan.forward` over an OpenMP team: the runtime that the
/// already loaded library at `path` resolves `GOMP_parallel` to (pass `libtorch_cpu.so` to get
/// torch's own team, whose workers spin between torch's ops). Returns the runtime's file.
/// Raises `NotImplementedError` if `path` is not loaded or no GNU OpenMP entry points are found
/// through it, `ValueError` if a different runtime was attached before.
#[pyfunction]
fn cpu_openmp_attach(path: std::path::PathBuf) -> PyResult<Option<std::path::PathBuf>> {
    Ok(crate::cpu_kernels::omp_team::install(&path)?)
}

/// Turn the attached OpenMP team on or off for the CPU LUT products and set the work (code bytes
/// × batch rows) from which a product is split; returns (in use, threshold) after the change.
#[pyfunction]
#[pyo3(signature = (enabled=None, min_work=None))]
fn cpu_openmp_settings(enabled: Option<bool>, min_work: Option<usize>) -> (bool, usize) {
    use crate::cpu_kernels::omp_team;
    if enabled.is_some() || min_work.is_some() {
        let on = enabled.unwrap_or_else(|| omp_team::settings().0);
        omp_team::configure(on, min_work);
    }
    omp_team::settings()
}

/// Whether the CUDA kernels can run here: built with the `cuda` feature, the NVIDIA driver and
/// NVRTC found, and a GPU of compute capability 8.0 or newer present.
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    py.detach(cuda_status_result).is_ok()
}

/// Which GPU the CUDA kernels use, or why they cannot run on this machine.
#[pyfunction]
fn cuda_status(py: Python<'_>) -> String {
    match py.detach(cuda_status_result) {
        Ok(s) => s,
        Err(reason) => format!("CUDA unavailable: {reason}"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_status_result() -> std::result::Result<String, String> {
    crate::cuda::status()
}

#[cfg(not(feature = "cuda"))]
fn cuda_status_result() -> std::result::Result<String, String> {
    Err(
        "this build of higgs_rs has no CUDA support (it was built without the `cuda` feature)"
            .into(),
    )
}

/// Errors of the CUDA driver or compiler become RuntimeError; argument errors stay ValueError.
#[cfg(feature = "cuda")]
fn cuda_err(err: HiggsError) -> PyErr {
    match err {
        HiggsError::Unsupported(m) if m.starts_with("CUDA: ") => {
            pyo3::exceptions::PyRuntimeError::new_err(m)
        }
        other => other.into(),
    }
}

/// Launch `out = x @ W.T` for a HIGGS layer on the GPU (the activation Hadamard kernel, then the
/// LUT-GEMM) on the raw CUDA stream `stream`, without synchronizing. All tensors are given as
/// device addresses (`tensor.data_ptr()`); `signs` may be 0. Returns 0 when launched, or the
/// workspace bytes needed (nothing launched) when `workspace_bytes` is too small. `counters` is a
/// zero-filled buffer of `counters_bytes` (at least 16 per 128 output rows, rounded up to 256;
/// calls leave it zero). `rotated`: the workspace already holds this call's rotated activations
/// (the previous call on the stream rotated the same input the same way): skip the Hadamard
/// kernel; `rotated_overlap`: launch its LUT-GEMM as a programmatic dependent of the kernel before
/// it (only when nothing in flight writes this layer's codes, scales or grid). `mt`/`splits`
/// override the launch heuristics. `siblings`: up to two more layers with the same input and
/// shape but their rows, as `(codes, scales, out, out_features)`, computed by the same launch
/// (the counters then cover all their rows). `addend`: a `batch × out_features` tensor (same
/// dtype) added to the output as `addend + layer(x)` rounds in PyTorch (not with `siblings`).
#[cfg(feature = "cuda")]
#[pyfunction]
#[pyo3(signature = (x, out, workspace, workspace_bytes, batch, in_features, out_features, codes, scales, grid, signs,
    row_bytes, groups, p, n, hadamard_size, group_size, dtype, stream, device, mt=0, splits=0, tiled=false,
    counters=0, counters_bytes=0, rotated=false, rotated_overlap=false, siblings=Vec::new(), addend=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_lut_linear(
    py: Python<'_>,
    x: u64,
    out: u64,
    workspace: u64,
    workspace_bytes: usize,
    batch: usize,
    in_features: usize,
    out_features: usize,
    codes: u64,
    scales: u64,
    grid: u64,
    signs: u64,
    row_bytes: usize,
    groups: usize,
    p: usize,
    n: usize,
    hadamard_size: usize,
    group_size: usize,
    dtype: &str,
    stream: u64,
    device: usize,
    mt: usize,
    splits: usize,
    tiled: bool,
    counters: u64,
    counters_bytes: usize,
    rotated: bool,
    rotated_overlap: bool,
    siblings: Vec<(u64, u64, u64, usize)>,
    addend: u64,
) -> PyResult<usize> {
    use crate::cuda;
    if siblings.len() > 2 {
        return Err(PyValueError::new_err(format!(
            "at most two sibling layers share a launch; got {}",
            siblings.len()
        )));
    }
    let mut sibling_slots = [cuda::Sibling::default(); 2];
    for (slot, &(codes, scales, out, out_features)) in sibling_slots.iter_mut().zip(&siblings) {
        *slot = cuda::Sibling {
            codes,
            scales,
            out,
            out_features,
        };
    }
    let call = cuda::LinearCall {
        shape: cuda::LayerShape {
            in_features,
            out_features,
            p,
            n,
            hadamard_size,
            group_size,
            row_bytes,
            groups,
        },
        batch,
        x,
        out,
        codes,
        scales,
        grid,
        signs,
        workspace,
        workspace_bytes,
        counters,
        counters_bytes,
        rotated,
        rotated_overlap,
        act: cuda::ActType::parse(dtype)?,
        stream,
        device,
        tuning: cuda::Tuning { mt, splits },
        tiled,
        siblings: sibling_slots,
        addend,
    };
    py.detach(|| cuda::lut_linear(&call)).map_err(cuda_err)
}

/// Whether layers of `group_size` called with `batch` rows can run as one launch with their
/// siblings (`cuda_lut_linear(..., siblings=...)`).
#[cfg(feature = "cuda")]
#[pyfunction]
fn cuda_groups_launch(batch: usize, group_size: usize) -> bool {
    crate::cuda::groups_launch(batch, group_size)
}

/// Launch the activation rotation alone: `out[b, :]` (`batch × out_width`, zeros past the padded
/// width) = Hadamard blocks of `signs ⊙ pad(x[b, :])`, as the LUT-GEMM consumes it. A prologue
/// (pointers, 0: none) may compute the rows to rotate, written to `pre_out` (`batch ×
/// in_features`) too: with `norm_weight` the RMSNorm `norm_weight ⊙ x / sqrt(mean(x²) + eps)`,
/// with `up` the SiLU-gated product `silu(x) ⊙ up` (`batch × in_features`).
#[cfg(feature = "cuda")]
#[pyfunction]
#[pyo3(signature = (x, out, signs, batch, in_features, hadamard_size, out_width, dtype, stream, device,
    norm_weight=0, up=0, pre_out=0, eps=0.0))]
#[allow(clippy::too_many_arguments)]
fn cuda_hadamard(
    py: Python<'_>,
    x: u64,
    out: u64,
    signs: u64,
    batch: usize,
    in_features: usize,
    hadamard_size: usize,
    out_width: usize,
    dtype: &str,
    stream: u64,
    device: usize,
    norm_weight: u64,
    up: u64,
    pre_out: u64,
    eps: f32,
) -> PyResult<()> {
    use crate::cuda::Prologue;
    let act = crate::cuda::ActType::parse(dtype)?;
    let prologue = match (norm_weight, up) {
        (0, 0) => None,
        (weight, 0) => Some(Prologue::RmsNorm {
            weight,
            eps,
            out: pre_out,
        }),
        (0, up) => Some(Prologue::SiluGate { up, out: pre_out }),
        _ => {
            return Err(PyValueError::new_err(
                "the rotation takes one prologue: norm_weight or up, not both",
            ))
        }
    };
    py.detach(|| {
        crate::cuda::hadamard_rotate(
            x,
            out,
            signs,
            batch,
            in_features,
            hadamard_size,
            out_width,
            act,
            stream,
            device,
            prologue,
        )
    })
    .map_err(cuda_err)
}

/// Launch the dequantization of a layer into its rotated-domain weights (`out_features × ld`,
/// activation dtype), for large batches that go through a library GEMM. `tiled`: the codes are in
/// the tiled order `higgs_rs.cuda` repacks them into.
#[cfg(feature = "cuda")]
#[pyfunction]
#[pyo3(signature = (codes, scales, grid, out, ld, in_features, out_features, row_bytes, groups, p, n,
    hadamard_size, group_size, dtype, stream, device, tiled=false))]
#[allow(clippy::too_many_arguments)]
fn cuda_dequantize_rotated(
    py: Python<'_>,
    codes: u64,
    scales: u64,
    grid: u64,
    out: u64,
    ld: usize,
    in_features: usize,
    out_features: usize,
    row_bytes: usize,
    groups: usize,
    p: usize,
    n: usize,
    hadamard_size: usize,
    group_size: usize,
    dtype: &str,
    stream: u64,
    device: usize,
    tiled: bool,
) -> PyResult<()> {
    use crate::cuda;
    let shape = cuda::LayerShape {
        in_features,
        out_features,
        p,
        n,
        hadamard_size,
        group_size,
        row_bytes,
        groups,
    };
    let act = cuda::ActType::parse(dtype)?;
    py.detach(|| {
        cuda::dequantize_rotated(
            &shape, codes, scales, grid, out, ld, act, stream, device, tiled,
        )
    })
    .map_err(cuda_err)
}

/// Launch the rotary embedding of queries `q` and keys `k` (device addresses; `(batch, heads, seq,
/// head_dim)` with element strides `(b, h, s)`, head_dim contiguous) into `q_out` / `k_out`
/// (`(batch, seq, heads, head_dim)` contiguous), with `cos` / `sin` (`(batch, seq, head_dim)`,
/// strides `(b, s)`, 0 where broadcast). See `higgs_rs.cuda.rope`.
#[cfg(feature = "cuda")]
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_rope(
    py: Python<'_>,
    q: (u64, u64, usize, [i64; 3]),
    k: (u64, u64, usize, [i64; 3]),
    cos: (u64, [i64; 2]),
    sin: (u64, [i64; 2]),
    batch: usize,
    seq: usize,
    head_dim: usize,
    dtype: &str,
    stream: u64,
    device: usize,
) -> PyResult<()> {
    use crate::cuda;
    let tensor = |(x, out, heads, strides): (u64, u64, usize, [i64; 3])| cuda::RopeTensor {
        x,
        out,
        heads,
        strides,
    };
    let call = cuda::RopeCall {
        q: tensor(q),
        k: tensor(k),
        cos: cos.0,
        sin: sin.0,
        cos_strides: cos.1,
        sin_strides: sin.1,
        batch,
        seq,
        dim: head_dim,
        act: cuda::ActType::parse(dtype)?,
        stream,
        device,
    };
    py.detach(|| cuda::rope(&call)).map_err(cuda_err)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HiggsFormatError", m.py().get_type::<HiggsFormatError>())?;
    m.add_class::<QuantizedTensor>()?;
    m.add_function(wrap_pyfunction!(quantize_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(grid_points, m)?)?;
    m.add_function(wrap_pyfunction!(available_grids, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_transform, m)?)?;
    m.add_function(wrap_pyfunction!(random_signs, m)?)?;
    m.add_function(wrap_pyfunction!(is_supported_hadamard_order, m)?)?;
    m.add_function(wrap_pyfunction!(simd_path, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(allocate, m)?)?;
    m.add_function(wrap_pyfunction!(stored_bits, m)?)?;
    m.add_function(wrap_pyfunction!(lut_linear, m)?)?;
    m.add_class::<CpuLutPlan>()?;
    m.add_function(wrap_pyfunction!(cpu_openmp_attach, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_openmp_settings, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_status, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_function(wrap_pyfunction!(cuda_lut_linear, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_function(wrap_pyfunction!(cuda_hadamard, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_function(wrap_pyfunction!(cuda_groups_launch, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_function(wrap_pyfunction!(cuda_dequantize_rotated, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_function(wrap_pyfunction!(cuda_rope, m)?)?;
    Ok(())
}

//! Quantize a whole checkpoint: plan which tensors become HIGGS codes, then stream them,
//! one tensor at a time (rows in parallel), into atomically written safetensors shards.
//!
//! Output layout (format version 1), for a quantized weight `P.weight` of shape rows × cols:
//! - `P.higgs_codes`  U8  [rows, row_bytes]  packed codes (see [`crate::codec`]);
//! - `P.higgs_scales` F16 [rows, groups];
//! - `higgs.grid.p{p}_n{n}_v{version}` F32 [n, p], one per grid used;
//! - `higgs.signs` I8 [max padded width]: the ±1 signs (a prefix serves every width), when seeded.
//!
//! Every other tensor is copied bit-exact. `config.json` gains `quantization_config` with the
//! per-module spec, and is written last: a directory without it is not a finished output.
#![forbid(unsafe_code)]

use crate::checkpoint::{atomic_write, Checkpoint, Dtype, SafetensorsWriter};
use crate::codec::{self, ElemType, QuantSpec, Source};
use crate::grid::Grid;
use crate::{hadamard, HiggsError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Version of the checkpoint layout written here.
pub const FORMAT_VERSION: u32 = 1;

/// Plain tensors are copied in pieces of this size (see `write_tensor_in_chunks`).
const COPY_CHUNK_BYTES: usize = 64 << 20;

/// What to quantize and how.
#[derive(Clone, Debug)]
pub struct Options {
    /// The spec of every quantized tensor without an override.
    pub spec: QuantSpec,
    /// Per-tensor specs (by weight name), e.g. from the bit allocation.
    pub overrides: BTreeMap<String, QuantSpec>,
    /// Substrings: tensors whose name contains one are kept as they are.
    pub skip: Vec<String>,
    /// Largest output shard in bytes (a tensor is never split).
    pub max_shard_bytes: u64,
    /// How each group's scale is chosen (the format written is the same).
    pub scale_search: codec::ScaleSearch,
}

/// What happens to one tensor.
#[derive(Clone, Debug)]
pub enum Action {
    Copy,
    Quantize {
        spec: QuantSpec,
        layout: codec::Layout,
    },
}

#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub action: Action,
    /// Bytes in the source and in the output.
    pub source_bytes: u64,
    pub output_bytes: u64,
    /// Why it is copied, for the printed plan.
    pub reason: &'static str,
}

impl TensorPlan {
    pub fn bits_per_weight(&self) -> f64 {
        let count: usize = self.shape.iter().product();
        self.output_bytes as f64 * 8.0 / count.max(1) as f64
    }
}

/// The whole job, decided before any data is read.
#[derive(Clone, Debug)]
pub struct Plan {
    pub tensors: Vec<TensorPlan>,
    pub seed: Option<u64>,
}

impl Plan {
    pub fn source_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.source_bytes).sum()
    }
    pub fn output_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.output_bytes).sum::<u64>() + self.extra_bytes()
    }
    /// Quantized weights, their stored bits, and bits per weight over them.
    pub fn quantized_bits_per_weight(&self) -> f64 {
        let (bits, weights) = self
            .tensors
            .iter()
            .filter(|t| matches!(t.action, Action::Quantize { .. }))
            .fold((0f64, 0f64), |(b, w), t| {
                (
                    b + t.output_bytes as f64 * 8.0,
                    w + t.shape.iter().product::<usize>() as f64,
                )
            });
        if weights == 0.0 {
            0.0
        } else {
            bits / weights
        }
    }
    fn grids(&self) -> Vec<(usize, usize)> {
        let mut grids: Vec<(usize, usize)> = self
            .tensors
            .iter()
            .filter_map(|t| match &t.action {
                Action::Quantize { spec, .. } => Some((spec.p, spec.n)),
                Action::Copy => None,
            })
            .collect();
        grids.sort_unstable();
        grids.dedup();
        grids
    }
    fn signs_len(&self) -> usize {
        self.tensors
            .iter()
            .filter_map(|t| match &t.action {
                Action::Quantize { layout, spec } if spec.seed.is_some() => {
                    Some(layout.padded_cols)
                }
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
    /// Grid tables and signs.
    fn extra_bytes(&self) -> u64 {
        let grids: usize = self.grids().iter().map(|&(p, n)| p * n * 4).sum();
        (grids + self.signs_len()) as u64
    }
}

/// Names that stay in full precision by default: embeddings, the output head, norms.
fn default_keep_reason(name: &str) -> Option<&'static str> {
    if name.contains("embed") || name.contains("wte") || name.contains("wpe") {
        Some("embedding")
    } else if name.contains("lm_head") {
        Some("output head")
    } else if name.contains("norm") || name.contains(".ln_") {
        Some("norm")
    } else {
        None
    }
}

fn elem_type(dtype: Dtype) -> Option<ElemType> {
    match dtype {
        Dtype::F32 => Some(ElemType::F32),
        Dtype::F16 => Some(ElemType::F16),
        Dtype::BF16 => Some(ElemType::Bf16),
        _ => None,
    }
}

/// Decide, for every tensor of `checkpoint`, whether it is copied or quantized.
pub fn plan(checkpoint: &Checkpoint, options: &Options) -> Result<Plan> {
    let mut tensors = Vec::new();
    let mut seed = None;
    for info in checkpoint.tensors() {
        let source_bytes = info.byte_len() as u64;
        let copy = |reason| TensorPlan {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            action: Action::Copy,
            source_bytes,
            output_bytes: source_bytes,
            reason,
        };
        let reason = if !info.name.ends_with(".weight") {
            Some("not a weight")
        } else if info.shape.len() != 2 {
            Some("not 2-D")
        } else if elem_type(info.dtype).is_none() {
            Some("not a float type")
        } else if options.skip.iter().any(|s| info.name.contains(s.as_str())) {
            Some("skipped (--skip)")
        } else if options.overrides.contains_key(&info.name) {
            None
        } else {
            default_keep_reason(&info.name)
        };
        if let Some(reason) = reason {
            tensors.push(copy(reason));
            continue;
        }
        let spec = options
            .overrides
            .get(&info.name)
            .unwrap_or(&options.spec)
            .clone();
        let layout = spec
            .layout(info.shape[0], info.shape[1])
            .map_err(|e| HiggsError::invalid(format!("{}: {e}", info.name)))?;
        if spec.seed.is_some() {
            if seed.is_some() && seed != spec.seed {
                return Err(HiggsError::invalid(
                    "all quantized tensors must share one seed",
                ));
            }
            seed = spec.seed;
        }
        let output_bytes = (layout.rows * (layout.row_bytes + 2 * layout.groups)) as u64;
        tensors.push(TensorPlan {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            action: Action::Quantize { spec, layout },
            source_bytes,
            output_bytes,
            reason: "",
        });
    }
    Ok(Plan { tensors, seed })
}

/// Human-readable plan: one line per tensor, then totals (the `--dry-run` output).
pub fn describe(plan: &Plan) -> String {
    let mut out = String::new();
    for t in &plan.tensors {
        let shape = format!("{:?}", t.shape);
        let what = match &t.action {
            Action::Copy => format!("copy ({})", t.reason),
            Action::Quantize { spec, layout } => format!(
                "HIGGS p={} n={} h={} g={}{}",
                spec.p,
                spec.n,
                layout.block,
                spec.group_size,
                if layout.padded_cols != layout.cols {
                    format!(" padded to {}", layout.padded_cols)
                } else {
                    String::new()
                }
            ),
        };
        out.push_str(&format!(
            "{:<60} {:>5} {:<14} {:<40} {:>6.3} bits/w {:>10}\n",
            t.name,
            t.dtype.as_str(),
            shape,
            what,
            t.bits_per_weight(),
            human_bytes(t.output_bytes)
        ));
    }
    let quantized = plan
        .tensors
        .iter()
        .filter(|t| matches!(t.action, Action::Quantize { .. }))
        .count();
    out.push_str(&format!(
        "{} tensors, {} quantized at {:.4} bits/weight (codes + scales); {} -> {}\n",
        plan.tensors.len(),
        quantized,
        plan.quantized_bits_per_weight(),
        human_bytes(plan.source_bytes()),
        human_bytes(plan.output_bytes())
    ));
    out
}

pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// What a finished run measured.
#[derive(Clone, Debug)]
pub struct Summary {
    pub tensors: usize,
    pub quantized: usize,
    pub source_bytes: u64,
    pub output_bytes: u64,
    pub bits_per_weight: f64,
    pub seconds: f64,
    pub quantized_weights: u64,
    /// (weight name, relative MSE) for each quantized tensor.
    pub relative_mse: Vec<(String, f64)>,
}

/// One output tensor: name, dtype, shape.
type Entry = (String, Dtype, Vec<usize>);

fn module_name(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}

fn grid_tensor_name(p: usize, n: usize) -> Result<String> {
    Ok(format!("higgs.grid.{}", Grid::load(p, n)?.id()))
}

/// Output tensors of one planned tensor.
fn entries_of(t: &TensorPlan) -> Vec<Entry> {
    match &t.action {
        Action::Copy => vec![(t.name.clone(), t.dtype, t.shape.clone())],
        Action::Quantize { layout, .. } => {
            let m = module_name(&t.name);
            vec![
                (
                    format!("{m}.higgs_codes"),
                    Dtype::U8,
                    vec![layout.rows, layout.row_bytes],
                ),
                (
                    format!("{m}.higgs_scales"),
                    Dtype::F16,
                    vec![layout.rows, layout.groups],
                ),
            ]
        }
    }
}

/// Split tensors (by plan index) into shards of at most `max_bytes` each, in order.
fn shard_ranges(plan: &Plan, max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in plan.tensors.iter().enumerate() {
        if i > start && size + t.output_bytes > max_bytes {
            ranges.push(start..i);
            start = i;
            size = 0;
        }
        size += t.output_bytes;
    }
    ranges.push(start..plan.tensors.len());
    ranges
}

/// Run `plan`: read `checkpoint`, write the HIGGS checkpoint into `dst` (a directory that must
/// not hold a finished output unless `overwrite`). Runs on the current rayon pool.
pub fn run(
    checkpoint: &Checkpoint,
    source_dir: &Path,
    plan: &Plan,
    options: &Options,
    dst: &Path,
    overwrite: bool,
    progress: bool,
) -> Result<Summary> {
    let scale_search = options.scale_search;
    prepare_destination(source_dir, dst, overwrite)?;
    let started = Instant::now();
    let ranges = shard_ranges(plan, options.max_shard_bytes);
    let shard_names: Vec<String> = if ranges.len() == 1 {
        vec!["model.safetensors".to_string()]
    } else {
        (1..=ranges.len())
            .map(|i| format!("model-{i:05}-of-{:05}.safetensors", ranges.len()))
            .collect()
    };

    let bar = if progress {
        let bar = ProgressBar::new(plan.source_bytes());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_length(plan.source_bytes());
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut relative_mse = Vec::new();
    let mut quantized_weights = 0u64;
    let mut weight_map = Map::new();
    let mut done_tensors = 0usize;

    for (shard_index, range) in ranges.iter().enumerate() {
        let mut entries: Vec<Entry> = plan.tensors[range.clone()]
            .iter()
            .flat_map(entries_of)
            .collect();
        // Grid tables and signs go into the last shard.
        let last = shard_index + 1 == ranges.len();
        let mut extra: Vec<(Entry, Vec<u8>)> = Vec::new();
        if last {
            for (p, n) in plan.grids() {
                let grid = Grid::load(p, n)?;
                let bytes = grid.points.iter().flat_map(|v| v.to_le_bytes()).collect();
                extra.push(((grid_tensor_name(p, n)?, Dtype::F32, vec![n, p]), bytes));
            }
            if let Some(seed) = plan.seed {
                let len = plan.signs_len();
                let bytes = hadamard::random_signs(seed, len)
                    .iter()
                    .map(|&s| (s as i8) as u8)
                    .collect();
                extra.push((("higgs.signs".to_string(), Dtype::I8, vec![len]), bytes));
            }
            entries.extend(extra.iter().map(|(e, _)| e.clone()));
        }
        let shard_path = dst.join(&shard_names[shard_index]);
        for e in &entries {
            weight_map.insert(e.0.clone(), Value::String(shard_names[shard_index].clone()));
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        metadata.insert(
            "higgs_format_version".to_string(),
            FORMAT_VERSION.to_string(),
        );
        let mut writer = SafetensorsWriter::create(&shard_path, entries, metadata)?;
        for t in &plan.tensors[range.clone()] {
            let info = checkpoint.get(&t.name).ok_or_else(|| {
                HiggsError::invalid(format!("{}: tensor vanished from the checkpoint", t.name))
            })?;
            let bytes = checkpoint.bytes(info);
            match &t.action {
                // In pieces, releasing each from the map once written: peak memory stays at
                // a piece, not the largest plain tensor (a 128256×8192 embedding is 2.1 GB).
                Action::Copy => {
                    writer.write_tensor_in_chunks(&t.name, bytes, COPY_CHUNK_BYTES, |r| {
                        checkpoint.release_range(info, r.start, r.len())
                    })?
                }
                Action::Quantize { spec, layout } => {
                    let elem = elem_type(info.dtype).expect("planned tensors are float");
                    let source = Source::Bytes(elem, bytes);
                    let q =
                        codec::quantize_with(source, layout.rows, layout.cols, spec, scale_search)
                            .map_err(|e| in_tensor(&t.name, e))?;
                    let m = module_name(&t.name);
                    writer.write_tensor(&format!("{m}.higgs_codes"), &q.codes)?;
                    let scales: &[u8] = bytemuck::cast_slice(&q.scales);
                    writer.write_tensor(&format!("{m}.higgs_scales"), scales)?;
                    quantized_weights += (layout.rows * layout.cols) as u64;
                    if progress {
                        bar.println(format!(
                            "[{:>4}/{:>4}] {:<56} {:>5} {:>12} -> p={} n={} h={} g={}  {:.3} bits/w  rel. MSE {:.5}",
                            done_tensors + 1,
                            plan.tensors.len(),
                            t.name,
                            t.dtype.as_str(),
                            format!("{}x{}", layout.rows, layout.cols),
                            spec.p,
                            spec.n,
                            layout.block,
                            spec.group_size,
                            q.bits_per_weight(),
                            q.relative_mse()
                        ));
                    }
                    relative_mse.push((t.name.clone(), q.relative_mse()));
                }
            }
            checkpoint.release(info);
            done_tensors += 1;
            bar.inc(t.source_bytes);
            bar.set_message(format!("{done_tensors}/{} tensors", plan.tensors.len()));
        }
        for ((name, _, _), bytes) in &extra {
            writer.write_tensor(name, bytes)?;
        }
        writer.finish()?;
    }
    bar.finish_and_clear();

    if shard_names.len() > 1 {
        let index = json!({
            "metadata": {"total_size": plan.output_bytes()},
            "weight_map": weight_map,
        });
        write_json(&dst.join("model.safetensors.index.json"), &index)?;
    }
    copy_side_files(source_dir, dst)?;
    write_config(source_dir, dst, plan)?;
    let summary = Summary {
        tensors: plan.tensors.len(),
        quantized: relative_mse.len(),
        source_bytes: plan.source_bytes(),
        output_bytes: plan.output_bytes(),
        bits_per_weight: plan.quantized_bits_per_weight(),
        seconds: started.elapsed().as_secs_f64(),
        quantized_weights,
        relative_mse,
    };
    Ok(summary)
}

fn in_tensor(name: &str, err: HiggsError) -> HiggsError {
    match err {
        HiggsError::InvalidArgument(m) => HiggsError::InvalidArgument(format!("{name}: {m}")),
        HiggsError::NonFinite {
            what: _,
            row,
            col,
            value,
        } => HiggsError::NonFinite {
            what: format!("tensor {name}"),
            row,
            col,
            value,
        },
        HiggsError::Unsupported(m) => HiggsError::Unsupported(format!("{name}: {m}")),
        other => other,
    }
}

/// Output files of a previous run: shards and index.
fn is_output_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name == "model.safetensors.index.json"
}

fn prepare_destination(source_dir: &Path, dst: &Path, overwrite: bool) -> Result<()> {
    // Writing into the source directory would delete or shadow the checkpoint being read.
    if let (Ok(a), Ok(b)) = (source_dir.canonicalize(), dst.canonicalize()) {
        if a == b {
            return Err(HiggsError::invalid(format!(
                "the destination {} is the source directory; choose another directory",
                dst.display()
            )));
        }
    }
    if dst.join("config.json").exists() && !overwrite {
        return Err(HiggsError::invalid(format!(
            "{} already holds a model (config.json); pass overwrite to replace it",
            dst.display()
        )));
    }
    if !overwrite && dst.is_dir() {
        // Shards of an unfinished run would mix with this run's (a stale index would even
        // take precedence when reading): refuse rather than delete files we did not write now.
        for entry in std::fs::read_dir(dst).map_err(|e| HiggsError::io(dst, e))? {
            let path = entry.map_err(|e| HiggsError::io(dst, e))?.path();
            if is_output_file(path.file_name().and_then(|n| n.to_str()).unwrap_or("")) {
                return Err(HiggsError::invalid(format!(
                    "{} holds {} (from an unfinished run?); pass overwrite to replace it",
                    dst.display(),
                    path.display()
                )));
            }
        }
    }
    std::fs::create_dir_all(dst).map_err(|e| HiggsError::io(dst, e))?;
    if overwrite {
        // The old config goes first, so the directory never looks finished half-way.
        let config = dst.join("config.json");
        if config.exists() {
            std::fs::remove_file(&config).map_err(|e| HiggsError::io(&config, e))?;
        }
        for entry in std::fs::read_dir(dst).map_err(|e| HiggsError::io(dst, e))? {
            let path = entry.map_err(|e| HiggsError::io(dst, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if is_output_file(name) {
                std::fs::remove_file(&path).map_err(|e| HiggsError::io(&path, e))?;
            }
        }
    }
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| HiggsError::invalid(format!("cannot encode {}: {e}", path.display())))?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}

/// Tokenizer, generation config and other small files, copied as they are.
fn copy_side_files(source_dir: &Path, dst: &Path) -> Result<()> {
    if !source_dir.is_dir() {
        return Ok(());
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(source_dir)
        .map_err(|e| HiggsError::io(source_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let wanted = path.is_file()
            && name != "config.json"
            && name != "model.safetensors.index.json"
            && !name.ends_with(".safetensors")
            && [".json", ".txt", ".model", ".tiktoken", ".jinja", ".py"]
                .iter()
                .any(|ext| name.ends_with(ext));
        if wanted {
            let bytes = std::fs::read(&path).map_err(|e| HiggsError::io(&path, e))?;
            atomic_write(dst.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// `config.json` with `quantization_config`; written last, it marks the output as complete.
fn write_config(source_dir: &Path, dst: &Path, plan: &Plan) -> Result<()> {
    let source_config = source_dir.join("config.json");
    let mut config: Value = if source_config.is_file() {
        let text = std::fs::read_to_string(&source_config)
            .map_err(|e| HiggsError::io(&source_config, e))?;
        serde_json::from_str(&text)
            .map_err(|e| HiggsError::format(&source_config, format!("not valid JSON: {e}")))?
    } else {
        json!({})
    };
    let mut modules = Map::new();
    for t in &plan.tensors {
        if let Action::Quantize { spec, layout } = &t.action {
            modules.insert(
                module_name(&t.name).to_string(),
                json!({
                    "p": spec.p,
                    "n": spec.n,
                    "bits": spec.bits(),
                    "hadamard_size": layout.block,
                    "group_size": spec.group_size,
                    "in_features": layout.cols,
                    "out_features": layout.rows,
                    "padded_in_features": layout.padded_cols,
                    "row_bytes": layout.row_bytes,
                    "grid": grid_tensor_name(spec.p, spec.n)?,
                    "source_dtype": t.dtype.as_str(),
                }),
            );
        }
    }
    let quantization = json!({
        "quant_method": "higgs_rs",
        "format_version": FORMAT_VERSION,
        "seed": plan.seed,
        "signs": plan.seed.map(|_| "higgs.signs"),
        "sign_rule": "SplitMix64(seed): sign i is -1 where bit (i % 64) of output (i / 64) is 1",
        "codes": "LSB-first bit stream of log2(n)-bit indices per row, rows padded to whole bytes",
        "scales": "f16 per-group scale s of each group of group_size rotated values (value = grid point × s), chosen to minimize the group's squared error",
        "rotation": "x -> H_m1 ⊗ H_m2 ⊗ H_2^k / sqrt(h) per block of hadamard_size after signs; Paley orders 12, 20, 28",
        "bits_per_weight": plan.quantized_bits_per_weight(),
        "modules": modules,
    });
    config
        .as_object_mut()
        .ok_or_else(|| HiggsError::format(&source_config, "config.json is not a JSON object"))?
        .insert("quantization_config".to_string(), quantization);
    write_json(&dst.join("config.json"), &config)
}

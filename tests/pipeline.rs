//! Quantize a tiny Llama-shaped checkpoint end to end: plan, run, read the output back.

use half::{bf16, f16};
use higgs_rs::checkpoint::{Checkpoint, Dtype, SafetensorsWriter};
use higgs_rs::codec::{self, QuantSpec, QuantizedTensor};
use higgs_rs::pipeline::{self, Action, Options};
use higgs_rs::rng::SplitMix64;
use higgs_rs::HiggsError;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A fresh directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("higgs-pipeline-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const HIDDEN: usize = 64;
const MLP: usize = 192;
const VOCAB: usize = 40;

/// (name, shape) of the source checkpoint: embedding, one decoder layer, final norm, head.
fn layout() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("model.embed_tokens.weight", vec![VOCAB, HIDDEN]),
        ("model.layers.0.input_layernorm.weight", vec![HIDDEN]),
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![HIDDEN, HIDDEN],
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            vec![HIDDEN, HIDDEN],
        ),
        ("model.layers.0.mlp.up_proj.weight", vec![MLP, HIDDEN]),
        ("model.layers.0.mlp.down_proj.weight", vec![HIDDEN, MLP]),
        ("model.norm.weight", vec![HIDDEN]),
        ("lm_head.weight", vec![VOCAB, HIDDEN]),
    ]
}

/// Writes the source checkpoint (random bf16 weights, config, tokenizer) and returns each
/// tensor's bytes.
fn make_source(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut rng = SplitMix64::new(1234);
    let entries = layout()
        .into_iter()
        .map(|(n, s)| (n.to_string(), Dtype::BF16, s))
        .collect();
    let mut writer =
        SafetensorsWriter::create(dir.join("model.safetensors"), entries, BTreeMap::new()).unwrap();
    let mut data = BTreeMap::new();
    for (name, shape) in layout() {
        let mut values = vec![0f32; shape.iter().product()];
        rng.fill_gaussian(&mut values);
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v * 0.02).to_le_bytes())
            .collect();
        writer.write_tensor(name, &bytes).unwrap();
        data.insert(name.to_string(), bytes);
    }
    writer.finish().unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 64, "torch_dtype": "bfloat16"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"version": "1.0"}"#).unwrap();
    data
}

fn options(max_shard_bytes: u64) -> Options {
    Options {
        spec: QuantSpec {
            p: 2,
            n: 256,
            hadamard_size: None,
            group_size: 64,
            seed: Some(7),
        },
        overrides: BTreeMap::new(),
        skip: Vec::new(),
        max_shard_bytes,
        scale_search: Default::default(),
    }
}

fn run_with_threads(
    threads: usize,
    source: &Path,
    dst: &Path,
    options: &Options,
    overwrite: bool,
) -> higgs_rs::Result<pipeline::Summary> {
    let checkpoint = Checkpoint::open(source)?;
    let plan = pipeline::plan(&checkpoint, options)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| pipeline::run(&checkpoint, source, &plan, options, dst, overwrite, false))
}

/// Every file of a directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

#[test]
fn plan_quantizes_linear_weights_and_keeps_embeddings_norms_and_head() {
    let dir = Scratch::new("plan");
    make_source(&dir.0);
    let checkpoint = Checkpoint::open(&dir.0).unwrap();
    let plan = pipeline::plan(&checkpoint, &options(u64::MAX)).unwrap();
    let quantized: Vec<&str> = plan
        .tensors
        .iter()
        .filter(|t| matches!(t.action, Action::Quantize { .. }))
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        quantized,
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ]
    );
    let text = pipeline::describe(&plan);
    // Embedding and head by name; the 1-D norms as not 2-D.
    assert!(
        text.contains("copy (embedding)")
            && text.contains("copy (output head)")
            && text.contains("copy (not 2-D)"),
        "{text}"
    );
    // 8-bit codes for pairs (4 bits/weight) plus one f16 scale per 64 weights.
    assert!(
        (plan.quantized_bits_per_weight() - 4.25).abs() < 1e-9,
        "{}",
        plan.quantized_bits_per_weight()
    );
}

#[test]
fn run_writes_codes_scales_copies_and_config_identically_for_any_thread_count() {
    let source = Scratch::new("source");
    let data = make_source(&source.0);
    let one = Scratch::new("one-thread");
    let two = Scratch::new("two-threads");
    let opts = options(u64::MAX);
    let summary = run_with_threads(1, &source.0, &one.0, &opts, false).unwrap();
    run_with_threads(2, &source.0, &two.0, &opts, true).unwrap();
    assert_eq!(summary.tensors, layout().len());
    assert_eq!(summary.quantized, 4);

    let out_one = files(&one.0);
    let out_two = files(&two.0);
    assert_eq!(
        out_one.keys().collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "tokenizer.json"],
        "no temporary files left"
    );
    assert!(out_one == out_two, "1 and 2 threads give different bytes");
    assert_eq!(
        out_one["tokenizer.json"],
        std::fs::read(source.0.join("tokenizer.json")).unwrap()
    );

    let config: Value = serde_json::from_slice(&out_one["config.json"]).unwrap();
    assert_eq!(config["model_type"], "llama", "source config kept");
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "higgs_rs");
    assert_eq!(q["seed"], 7);
    let up = &q["modules"]["model.layers.0.mlp.up_proj"];
    assert_eq!((up["p"].as_u64(), up["n"].as_u64()), (Some(2), Some(256)));
    assert_eq!(up["in_features"], HIDDEN);
    assert_eq!(up["out_features"], MLP);

    let out = Checkpoint::open(&one.0).unwrap();
    for (name, bytes) in &data {
        if let Some(info) = out.get(name) {
            assert_eq!(out.bytes(info), &bytes[..], "{name} copied bit-exact");
        }
    }
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ] {
        assert!(out.get(name).is_some(), "{name} kept");
    }
    let grid = q["modules"]["model.layers.0.mlp.up_proj"]["grid"]
        .as_str()
        .unwrap();
    let grid_info = out.get(grid).expect("grid table stored");
    assert_eq!(
        (grid_info.dtype, grid_info.shape.clone()),
        (Dtype::F32, vec![256, 2])
    );
    let signs = out.get("higgs.signs").expect("signs stored");
    assert_eq!(signs.dtype, Dtype::I8);
    assert!(out.bytes(signs).iter().all(|&s| s == 1 || s == 0xff));

    // Each quantized weight: codes and scales of the declared shapes, which decode back to
    // the source weights with the error the run reported.
    for (name, mse) in &summary.relative_mse {
        let module = name.strip_suffix(".weight").unwrap();
        assert!(out.get(name).is_none(), "{name} replaced by codes");
        let codes = out.get(&format!("{module}.higgs_codes")).unwrap();
        let scales = out.get(&format!("{module}.higgs_scales")).unwrap();
        let meta = &q["modules"][module];
        let spec = QuantSpec {
            p: meta["p"].as_u64().unwrap() as usize,
            n: meta["n"].as_u64().unwrap() as usize,
            hadamard_size: Some(meta["hadamard_size"].as_u64().unwrap() as usize),
            group_size: meta["group_size"].as_u64().unwrap() as usize,
            seed: q["seed"].as_u64(),
        };
        let shape = &layout().into_iter().find(|(n, _)| n == name).unwrap().1;
        let layout = spec.layout(shape[0], shape[1]).unwrap();
        assert_eq!(
            (codes.dtype, codes.shape.clone()),
            (Dtype::U8, vec![layout.rows, layout.row_bytes])
        );
        assert_eq!(
            (scales.dtype, scales.shape.clone()),
            (Dtype::F16, vec![layout.rows, layout.groups])
        );
        let q = QuantizedTensor {
            spec,
            layout,
            codes: out.bytes(codes).to_vec(),
            scales: out
                .bytes(scales)
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect(),
            squared_error: 0.0,
            squared_norm: 0.0,
        };
        let decoded = codec::dequantize(&q).unwrap();
        let original = to_f32(&data[name.as_str()]);
        let err: f64 = decoded
            .iter()
            .zip(&original)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = original.iter().map(|&b| (b as f64).powi(2)).sum();
        let decoded_mse = err / norm;
        assert!(*mse > 0.0 && *mse < 0.03, "{name}: relative MSE {mse}");
        assert!(
            (decoded_mse - mse).abs() < 0.1 * mse,
            "{name}: stored codes decode to MSE {decoded_mse}, run reported {mse}"
        );
    }
}

#[test]
fn finished_output_is_refused_without_overwrite() {
    let source = Scratch::new("refuse-src");
    make_source(&source.0);
    let dst = Scratch::new("refuse-dst");
    run_with_threads(1, &source.0, &dst.0, &options(u64::MAX), false).unwrap();
    let before = files(&dst.0);
    match run_with_threads(1, &source.0, &dst.0, &options(u64::MAX), false) {
        Err(HiggsError::InvalidArgument(m)) => assert!(m.contains("already holds a model"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(files(&dst.0) == before, "refused run changed the output");
    // With overwrite, the result is the same as before.
    run_with_threads(1, &source.0, &dst.0, &options(u64::MAX), true).unwrap();
    assert!(files(&dst.0) == before);
}

#[test]
fn small_shards_get_an_index_that_reads_back() {
    let source = Scratch::new("shards-src");
    let data = make_source(&source.0);
    let dst = Scratch::new("shards-dst");
    run_with_threads(2, &source.0, &dst.0, &options(12_000), false).unwrap();
    let names: Vec<String> = files(&dst.0).into_keys().collect();
    assert!(
        names.contains(&"model.safetensors.index.json".to_string()),
        "{names:?}"
    );
    let shards = names.iter().filter(|n| n.ends_with(".safetensors")).count();
    assert!(shards > 1, "{names:?}");
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "no temporary files: {names:?}"
    );
    let out = Checkpoint::open(&dst.0).unwrap();
    assert_eq!(out.files().count(), shards);
    let embed = out.get("model.embed_tokens.weight").unwrap();
    assert_eq!(out.bytes(embed), &data["model.embed_tokens.weight"][..]);
    assert!(out
        .get("model.layers.0.mlp.down_proj.higgs_codes")
        .is_some());
}

#[test]
fn source_directory_and_unfinished_outputs_are_refused() {
    let source = Scratch::new("self-src");
    let data = make_source(&source.0);
    for overwrite in [false, true] {
        match run_with_threads(1, &source.0, &source.0, &options(u64::MAX), overwrite) {
            Err(HiggsError::InvalidArgument(m)) => {
                assert!(m.contains("is the source directory"), "{m}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let reread = Checkpoint::open(&source.0).unwrap();
    assert_eq!(
        reread.bytes(reread.get("lm_head.weight").unwrap()),
        &data["lm_head.weight"][..]
    );

    // A shard left by an unfinished run (no config.json): refused, then replaced with overwrite.
    let dst = Scratch::new("unfinished");
    std::fs::write(dst.0.join("model-00001-of-00002.safetensors"), b"partial").unwrap();
    match run_with_threads(1, &source.0, &dst.0, &options(u64::MAX), false) {
        Err(HiggsError::InvalidArgument(m)) => assert!(m.contains("unfinished run"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    run_with_threads(1, &source.0, &dst.0, &options(u64::MAX), true).unwrap();
    assert_eq!(
        files(&dst.0).into_keys().collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
}

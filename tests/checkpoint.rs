//! The checkpoint reader and writer against real files: round trips, shards and indexes, and
//! one generated malformed file per kind of corruption (generated here, so no adversarial
//! binaries are committed), each of which must give a clear `Format` error naming the fault.

use higgs_rs::checkpoint::{atomic_write, Checkpoint, Dtype, SafetensorsWriter};
use higgs_rs::HiggsError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A fresh directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("higgs-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A safetensors file from raw parts: declared header length, JSON text, data bytes.
fn raw_file(declared_len: u64, json: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = declared_len.to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A consistent file from a JSON header and data.
fn file_of(json: &str, data: &[u8]) -> Vec<u8> {
    raw_file(json.len() as u64, json, data)
}

/// Deterministic test bytes.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

fn write_checkpoint(path: &Path, tensors: &[(&str, Dtype, Vec<usize>)], salt: u8) -> Vec<Vec<u8>> {
    let entries = tensors
        .iter()
        .map(|(n, d, s)| (n.to_string(), *d, s.clone()))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut writer = SafetensorsWriter::create(path, entries, meta).unwrap();
    let mut datas = Vec::new();
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let data = pattern(dtype.byte_len(shape).unwrap(), salt.wrapping_add(i as u8));
        writer.write_tensor(name, &data).unwrap();
        datas.push(data);
    }
    writer.finish().unwrap();
    datas
}

fn format_error(path: &Path) -> (String, String) {
    match Checkpoint::open(path) {
        Err(HiggsError::Format { path, message }) => (path, message),
        Err(other) => panic!("{}: expected a Format error, got {other:?}", path.display()),
        Ok(c) => panic!("{}: malformed file accepted: {c:?}", path.display()),
    }
}

#[test]
fn round_trip_keeps_names_dtypes_shapes_bytes_and_metadata() {
    let dir = Scratch::new("roundtrip");
    let path = dir.path("model.safetensors");
    let tensors = [
        (
            "model.layers.0.mlp.up_proj.weight",
            Dtype::BF16,
            vec![8, 16],
        ),
        ("model.embed_tokens.weight", Dtype::F32, vec![5, 3]),
        ("scalar", Dtype::F64, vec![]),
        ("empty", Dtype::F16, vec![0, 7]),
        ("flags", Dtype::BOOL, vec![3]),
        ("codes", Dtype::U8, vec![2, 5]),
        ("idx", Dtype::I64, vec![2]),
    ];
    let datas = write_checkpoint(&path, &tensors, 3);
    assert_eq!(
        dir.listing(),
        ["model.safetensors"],
        "no temporary file left"
    );

    // The file is a valid safetensors file: header length, JSON padded to 8, data.
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + header_len) % 8, 0);
    let data_len: usize = datas.iter().map(Vec::len).sum();
    assert_eq!(bytes.len(), 8 + header_len + data_len);

    for opened in [
        Checkpoint::open(&path).unwrap(),
        Checkpoint::open(&dir.0).unwrap(),
    ] {
        let names: Vec<&str> = opened.tensors().map(|t| t.name.as_str()).collect();
        // Written order = offset order, which is the listing order.
        let expected: Vec<&str> = {
            // zero-length "empty" sits at its offset; ties between equal offsets go by name
            let mut order: Vec<(usize, &str)> = Vec::new();
            let mut offset = 0;
            for (n, d, s) in &tensors {
                order.push((offset, n));
                offset += d.byte_len(s).unwrap();
            }
            order.sort();
            order.into_iter().map(|(_, n)| n).collect()
        };
        assert_eq!(names, expected);
        for ((name, dtype, shape), data) in tensors.iter().zip(&datas) {
            let info = opened.get(name).unwrap();
            assert_eq!(info.dtype, *dtype);
            assert_eq!(&info.shape, shape);
            assert_eq!(info.byte_len(), data.len());
            assert_eq!(opened.bytes(info), &data[..], "{name}");
            opened.release(info);
            assert_eq!(opened.bytes(info), &data[..], "{name} after release");
        }
        assert_eq!(opened.metadata(0).unwrap()["format"], "pt");
        assert!(opened.get("missing").is_none());
        assert_eq!(opened.len(), tensors.len());
    }
}

#[test]
fn checkpoint_is_shareable_across_threads() {
    fn check<T: Send + Sync>() {}
    check::<Checkpoint>();
}

/// `release` (the module's `unsafe` madvise) drops the tensor's pages from this process's
/// resident set, and the data reads back unchanged afterwards.
#[test]
#[cfg(target_os = "linux")]
fn release_drops_resident_pages_and_data_survives() {
    let dir = Scratch::new("release");
    let path = dir.path("big.safetensors");
    let len = 16 << 20;
    let datas = write_checkpoint(
        &path,
        &[("big", Dtype::U8, vec![len]), ("tail", Dtype::U8, vec![3])],
        9,
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let info = ckpt.get("big").unwrap();
    let bytes = ckpt.bytes(info);
    let checksum = |b: &[u8]| {
        b.iter().fold(0u64, |h, &x| {
            h.wrapping_mul(1_000_003).wrapping_add(x as u64)
        })
    };
    assert_eq!(checksum(bytes), checksum(&datas[0]));
    let before = mapping_rss_kib(bytes.as_ptr() as usize);
    assert!(
        before >= (len / 1024) as u64 * 9 / 10,
        "all pages touched: {before} KiB resident"
    );
    ckpt.release(info);
    let after = mapping_rss_kib(bytes.as_ptr() as usize);
    assert!(
        after < 64,
        "{after} KiB still resident after release (was {before})"
    );
    assert_eq!(checksum(ckpt.bytes(info)), checksum(&datas[0]));
    assert_eq!(ckpt.bytes(ckpt.get("tail").unwrap()), &datas[1][..]);
}

/// Resident KiB of the mapping containing `address`, from /proc/self/smaps.
#[cfg(target_os = "linux")]
fn mapping_rss_kib(address: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&address);
                continue;
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix("Rss:") {
                return rest.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    panic!("no mapping holds {address:#x}");
}

#[test]
fn sharded_checkpoint_with_index_lists_file_then_offset() {
    let dir = Scratch::new("sharded");
    let first = write_checkpoint(
        &dir.path("model-00001-of-00002.safetensors"),
        &[
            ("b.weight", Dtype::F16, vec![2, 2]),
            ("a.weight", Dtype::F16, vec![2]),
        ],
        1,
    );
    let second = write_checkpoint(
        &dir.path("model-00002-of-00002.safetensors"),
        &[("c.weight", Dtype::F32, vec![3])],
        2,
    );
    let index = r#"{"metadata":{"total_size":32},"weight_map":{"a.weight":"model-00001-of-00002.safetensors",
        "b.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.path("model.safetensors.index.json"), index).unwrap();
    std::fs::write(dir.path("config.json"), "{}").unwrap();

    let ckpt = Checkpoint::open(&dir.0).unwrap();
    let names: Vec<&str> = ckpt.tensors().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["b.weight", "a.weight", "c.weight"]);
    assert_eq!(ckpt.files().count(), 2);
    assert_eq!(ckpt.bytes(ckpt.get("a.weight").unwrap()), &first[1][..]);
    assert_eq!(ckpt.bytes(ckpt.get("c.weight").unwrap()), &second[0][..]);
    assert_eq!(ckpt.get("c.weight").unwrap().file(), 1);

    // Without the index, every *.safetensors file (sorted) gives the same listing.
    std::fs::remove_file(dir.path("model.safetensors.index.json")).unwrap();
    let unindexed = Checkpoint::open(&dir.0).unwrap();
    let names: Vec<&str> = unindexed.tensors().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["b.weight", "a.weight", "c.weight"]);
}

#[test]
fn index_errors_name_the_index_tensor_and_file() {
    let dir = Scratch::new("index");
    write_checkpoint(&dir.path("s1.safetensors"), &[("a", Dtype::U8, vec![2])], 0);
    let index = dir.path("model.safetensors.index.json");
    let cases = [
        (
            r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
            "s2.safetensors (for tensor \"b\"), which does not exist",
        ),
        (
            r#"{"weight_map":{"a":"s1.safetensors","z":"s1.safetensors"}}"#,
            "names tensor \"z\" in s1.safetensors, which does not hold it",
        ),
        (
            r#"{"weight_map":{"a":"../s1.safetensors"}}"#,
            "not a plain file name",
        ),
        (
            r#"{"weight_map":{"a":"/etc/passwd"}}"#,
            "not a plain file name",
        ),
        (
            r#"{"weight_map":{"a":7}}"#,
            "tensor \"a\" is not a file name",
        ),
        (r#"{"metadata":{}}"#, "no \"weight_map\""),
        (r#"{"weight_map":"#, "not valid JSON"),
    ];
    for (json, expected) in cases {
        std::fs::write(&index, json).unwrap();
        let (path, message) = format_error(&dir.0);
        assert_eq!(path, index.display().to_string());
        assert!(
            message.contains(expected),
            "{json}: {message:?} lacks {expected:?}"
        );
    }

    // A tensor in two shards.
    write_checkpoint(&dir.path("s2.safetensors"), &[("a", Dtype::U8, vec![2])], 0);
    std::fs::write(
        &index,
        r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
    )
    .unwrap();
    let (_, message) = format_error(&dir.0);
    assert!(message.contains("tensor \"a\" is also in"), "{message}");
    // The index must put a tensor where it is.
    std::fs::write(
        dir.path("s2.safetensors"),
        file_of(
            r#"{"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            &[0],
        ),
    )
    .unwrap();
    std::fs::write(
        &index,
        r#"{"weight_map":{"a":"s2.safetensors","b":"s1.safetensors"}}"#,
    )
    .unwrap();
    let (_, message) = format_error(&dir.0);
    assert!(
        message.contains("puts tensor \"a\" in s2.safetensors but it is in"),
        "{message}"
    );
}

#[test]
fn directory_without_safetensors_is_a_clear_error() {
    let dir = Scratch::new("emptydir");
    std::fs::write(dir.path("config.json"), "{}").unwrap();
    let (_, message) = format_error(&dir.0);
    assert!(message.contains("no model.safetensors"), "{message}");
    match Checkpoint::open(dir.path("nope.safetensors")) {
        Err(HiggsError::Io { path, .. }) => assert!(path.ends_with("nope.safetensors")),
        other => panic!("{other:?}"),
    }
}

/// One generated malformed file per kind of corruption, with the words its error must contain.
fn attacks() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let ok_json = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#;
    let ok = file_of(ok_json, &[0u8; 24]);
    let mut attacks = vec![
        ("empty_file", vec![], "shorter than the 8-byte"),
        (
            "seven_bytes",
            vec![1, 0, 0, 0, 0, 0, 0],
            "shorter than the 8-byte",
        ),
        (
            "truncated_data",
            ok[..ok.len() - 5].to_vec(),
            "tensor \"b\": data_offsets [16, 24] extend past the data section (19 bytes)",
        ),
        (
            "truncated_header",
            ok[..8 + ok_json.len() / 2].to_vec(),
            "runs past the end of the file",
        ),
        (
            "header_length_lies_long",
            raw_file(ok_json.len() as u64 + 100, ok_json, &[0; 24]),
            "runs past the end",
        ),
        (
            "header_length_lies_short",
            raw_file(ok_json.len() as u64 - 10, ok_json, &[0; 24]),
            "not valid JSON",
        ),
        (
            "header_length_huge",
            raw_file(u64::MAX, ok_json, &[0; 24]),
            "exceeds the limit",
        ),
        (
            "header_length_just_over_limit",
            raw_file(100_000_001, ok_json, &[0; 24]),
            "exceeds the limit",
        ),
        (
            "offsets_out_of_bounds",
            file_of(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[1000,1008]}}"#,
                &[0; 8],
            ),
            "tensor \"w\": data_offsets [1000, 1008] extend past",
        ),
        (
            "offsets_huge",
            file_of(
                r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
                &[],
            ),
            "tensor \"w\"",
        ),
        (
            "offsets_reversed",
            file_of(
                r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[8,4]}}"#,
                &[0; 8],
            ),
            "tensor \"w\": data_offsets [8, 4] has begin after end",
        ),
        (
            "offsets_negative",
            file_of(
                r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[-4,0]}}"#,
                &[0; 8],
            ),
            "tensor \"w\": data_offsets[0] is -4",
        ),
        (
            "overlap",
            file_of(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
            "tensor \"v\" (bytes 4..12) overlaps tensor \"w\"",
        ),
        (
            "hole",
            file_of(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#,
                &[0; 24],
            ),
            "bytes 8..16 between tensors \"w\" and \"v\" belong to no tensor",
        ),
        (
            "hole_at_start",
            file_of(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
            "bytes 0..4 before tensor \"w\"",
        ),
        (
            "trailing_bytes",
            file_of(ok_json, &[0; 30]),
            "6 trailing bytes",
        ),
        (
            "shape_dtype_mismatch",
            file_of(
                r#"{"w":{"dtype":"BF16","shape":[3,3],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
            "tensor \"w\": shape [3, 3] of BF16 needs 18 bytes but data_offsets [0, 16] hold 16",
        ),
        (
            "bad_dtype",
            file_of(
                r#"{"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}}"#,
                &[0; 2],
            ),
            "tensor \"w\": unknown dtype \"Q4_K\"",
        ),
        (
            "sub_byte_dtype",
            file_of(
                r#"{"w":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#,
                &[0; 2],
            ),
            "sub-byte dtype F4 is not supported",
        ),
        (
            "dtype_not_string",
            file_of(
                r#"{"w":{"dtype":4,"shape":[2],"data_offsets":[0,2]}}"#,
                &[0; 2],
            ),
            "dtype must be a string",
        ),
        (
            "bad_json",
            file_of(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]"#,
                &[0; 8],
            ),
            "not valid JSON",
        ),
        (
            "not_an_object",
            file_of(r#"[{"dtype":"F32"}]  "#, &[]),
            "does not start with '{'",
        ),
        (
            "json_trailing_garbage",
            file_of(r#"{} {}"#, &[]),
            "not valid JSON",
        ),
        (
            "duplicate_names",
            file_of(
                r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"w":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
                &[0; 4],
            ),
            "duplicate entry \"w\"",
        ),
        (
            "huge_shape_overflow",
            file_of(
                r#"{"w":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,0]}}"#,
                &[],
            ),
            "tensor \"w\": shape [4611686018427387904, 8] of F32 overflows",
        ),
        (
            "shape_negative",
            file_of(
                r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}"#,
                &[],
            ),
            "shape dimension 0 is -1",
        ),
        (
            "shape_too_big_for_u64",
            file_of(
                r#"{"w":{"dtype":"U8","shape":[1e30],"data_offsets":[0,0]}}"#,
                &[],
            ),
            "shape dimension 0 is 1e+30",
        ),
        (
            "metadata_not_strings",
            file_of(r#"{"__metadata__":{"format":["pt"]}}"#, &[]),
            "__metadata__ entry \"format\" must be a string",
        ),
        (
            "missing_offsets",
            file_of(r#"{"w":{"dtype":"U8","shape":[2]}}"#, &[0; 2]),
            "tensor \"w\": missing \"data_offsets\"",
        ),
    ];
    attacks.push((
        "bad_utf8",
        raw_file(4, "", &[b'{', 0xff, 0xfe, b'}']),
        "not valid UTF-8",
    ));
    let deep = format!(
        r#"{{"__metadata__":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    attacks.push(("deep_nesting", file_of(&deep, &[]), "not valid JSON"));
    attacks
}

#[test]
fn every_malformed_file_gives_a_clear_format_error() {
    let dir = Scratch::new("attacks");
    for (name, bytes, expected) in attacks() {
        let path = dir.path(&format!("{name}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let (error_path, message) = format_error(&path);
        assert_eq!(error_path, path.display().to_string(), "{name}");
        assert!(
            message.contains(expected),
            "{name}: {message:?} lacks {expected:?}"
        );
        // And inside a directory, found as its only *.safetensors.
        let sub = dir.path(name);
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("model.safetensors"), &bytes).unwrap();
        let (_, message) = format_error(&sub);
        assert!(
            message.contains(expected),
            "{name} in a directory: {message:?}"
        );
    }
}

/// The attack generator writes its files here when asked (to check them against another
/// reader, e.g. Python's `safetensors`): `HIGGS_ATTACKS_DIR=/tmp/attacks cargo test --test checkpoint write_attacks`.
#[test]
fn write_attacks() {
    if let Ok(out) = std::env::var("HIGGS_ATTACKS_DIR") {
        std::fs::create_dir_all(&out).unwrap();
        for (name, bytes, _) in attacks() {
            std::fs::write(Path::new(&out).join(format!("{name}.safetensors")), bytes).unwrap();
        }
    }
}

#[test]
fn writer_checks_order_and_length_and_cleans_up() {
    let dir = Scratch::new("writer");
    let path = dir.path("out.safetensors");
    std::fs::write(&path, b"previous contents").unwrap();
    let entries = || {
        vec![
            ("x".to_string(), Dtype::F32, vec![2]),
            ("y".to_string(), Dtype::U8, vec![3]),
        ]
    };

    // Wrong name, then wrong length: clear errors; dropping removes the temporary file and the
    // old file is untouched.
    let mut w = SafetensorsWriter::create(&path, entries(), BTreeMap::new()).unwrap();
    assert_eq!(
        dir.listing().len(),
        2,
        "temporary file beside the target: {:?}",
        dir.listing()
    );
    assert!(dir
        .listing()
        .iter()
        .any(|n| n.starts_with(".out.safetensors.tmp-")));
    let err = w.write_tensor("y", &[0; 3]).unwrap_err().to_string();
    assert!(
        err.contains("\"y\" written where \"x\" (number 1 of 2) was declared"),
        "{err}"
    );
    let err = w.write_tensor("x", &[0; 7]).unwrap_err().to_string();
    assert!(
        err.contains("\"x\" has 7 bytes but was declared with 8"),
        "{err}"
    );
    drop(w);
    assert_eq!(dir.listing(), ["out.safetensors"]);
    assert_eq!(std::fs::read(&path).unwrap(), b"previous contents");

    // Finishing early is an error and leaves nothing behind.
    let mut w = SafetensorsWriter::create(&path, entries(), BTreeMap::new()).unwrap();
    w.write_tensor("x", &[0; 8]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("finished after 1 of 2 tensors; \"y\""),
        "{err}"
    );
    assert_eq!(dir.listing(), ["out.safetensors"]);

    // Writing past the declared tensors.
    let mut w = SafetensorsWriter::create(&path, vec![], BTreeMap::new()).unwrap();
    assert!(w
        .write_tensor("z", &[])
        .unwrap_err()
        .to_string()
        .contains("after all 0 declared"));
    w.finish().unwrap();
    assert_eq!(Checkpoint::open(&path).unwrap().len(), 0);
    assert_eq!(dir.listing(), ["out.safetensors"]);

    // Duplicate declared names are refused before anything is created.
    let dup = vec![
        ("x".to_string(), Dtype::U8, vec![1]),
        ("x".to_string(), Dtype::U8, vec![1]),
    ];
    assert!(SafetensorsWriter::create(&path, dup, BTreeMap::new()).is_err());
    assert_eq!(dir.listing(), ["out.safetensors"]);
}

#[test]
fn writer_io_errors_name_the_path() {
    let dir = Scratch::new("writer-io");
    let path = dir.path("no/such/dir/out.safetensors");
    match SafetensorsWriter::create(&path, vec![], BTreeMap::new()) {
        Err(HiggsError::Io { path: p, source }) => {
            assert_eq!(p, path.display().to_string());
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    match atomic_write(&path, b"x") {
        Err(HiggsError::Io { path: p, .. }) => assert_eq!(p, path.display().to_string()),
        other => panic!("{other:?}"),
    }
    assert!(dir.listing().is_empty());
}

/// Rename onto a directory fails at `finish` (after all data is written): the temp file goes.
#[test]
fn failed_rename_removes_the_temp_file() {
    let dir = Scratch::new("rename");
    let path = dir.path("taken");
    std::fs::create_dir_all(path.join("inside")).unwrap();
    let mut w = SafetensorsWriter::create(
        &path,
        vec![("t".into(), Dtype::U8, vec![2])],
        BTreeMap::new(),
    )
    .unwrap();
    w.write_tensor("t", &[1, 2]).unwrap();
    match w.finish() {
        Err(HiggsError::Io { path: p, .. }) => assert_eq!(p, path.display().to_string()),
        other => panic!("{other:?}"),
    }
    assert_eq!(dir.listing(), ["taken"]);
}

//! A checkpoint of one or more safetensors files, validated, then memory-mapped.
//!
//! The only `unsafe` of the module is here: mapping a file and advising the kernel to drop
//! the pages of finished tensors.
#![allow(unsafe_code)]

use super::header::{declared_header_len, parse_header_of, Header, MAX_HEADER_LEN};
use super::Dtype;
use crate::{HiggsError, Result};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Name of the single-file checkpoint in a directory.
const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a [`Checkpoint`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index of its file in [`Checkpoint::files`].
    file: usize,
    /// Absolute byte range in that file.
    start: usize,
    len: usize,
}

impl TensorInfo {
    /// Bytes of the tensor (elements × dtype size, checked when the header was validated).
    pub fn byte_len(&self) -> usize {
        self.len
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Index of the file holding it, in [`Checkpoint::files`].
    pub fn file(&self) -> usize {
        self.file
    }
    /// Absolute byte offset of its data in that file.
    pub fn offset(&self) -> usize {
        self.start
    }
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
    metadata: BTreeMap<String, String>,
}

/// A validated, memory-mapped safetensors checkpoint.
///
/// Tensors are listed in file order (the index's files, or `*.safetensors`, sorted by file
/// name), then by offset within each file: a pass over [`Checkpoint::tensors`] reads every
/// file front to back.
pub struct Checkpoint {
    root: PathBuf,
    files: Vec<MappedFile>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("root", &self.root)
            .field("files", &self.files().collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Open a `.safetensors` file, or a directory holding `model.safetensors`, shards listed by
    /// `model.safetensors.index.json`, or (without either) every `*.safetensors` file in it.
    /// Every header is validated, and the index checked against the files, before anything
    /// is mapped: each file the index names must exist, and each tensor it names must be in
    /// the file it says. Tensors of those files that the index omits are still listed (as
    /// transformers loads them); a name in two files is an error.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| HiggsError::io(path, e))?;
        if !meta.is_dir() {
            return Checkpoint::from_files(path, &[path.to_path_buf()], None);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            let (files, weight_map) = read_index(path, &index)?;
            return Checkpoint::from_files(path, &files, Some((&index, weight_map)));
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Checkpoint::from_files(path, &[single], None);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| HiggsError::io(path, e))? {
            let entry_path = entry.map_err(|e| HiggsError::io(path, e))?.path();
            let name = entry_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            if name.ends_with(".safetensors") && !name.starts_with('.') && entry_path.is_file() {
                files.push(entry_path);
            }
        }
        if files.is_empty() {
            return Err(HiggsError::format(
                path,
                format!("no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in this directory"),
            ));
        }
        files.sort();
        Checkpoint::from_files(path, &files, None)
    }

    fn from_files(
        root: &Path,
        paths: &[PathBuf],
        index: Option<(&Path, BTreeMap<String, String>)>,
    ) -> Result<Checkpoint> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors: Vec<TensorInfo> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (file_index, path) in paths.iter().enumerate() {
            let (header, map) = map_validated(path)?;
            for t in header.tensors {
                if let Some(&previous) = by_name.get(&t.name) {
                    let other = &paths[tensors[previous].file];
                    return Err(HiggsError::format(
                        path,
                        format!("tensor {:?} is also in {}", t.name, other.display()),
                    ));
                }
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(TensorInfo {
                    start: header.data_start + t.data_offsets[0],
                    len: t.data_offsets[1] - t.data_offsets[0],
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    file: file_index,
                });
            }
            files.push(MappedFile {
                path: path.clone(),
                map,
                metadata: header.metadata,
            });
        }
        if let Some((index_path, weight_map)) = index {
            for (name, file_name) in &weight_map {
                let found = by_name.get(name).map(|&i| &files[tensors[i].file].path);
                let expected = root.join(file_name);
                match found {
                    Some(actual) if *actual == expected => {}
                    Some(actual) => {
                        return Err(HiggsError::format(
                            index_path,
                            format!(
                                "weight_map puts tensor {name:?} in {file_name} but it is in {}",
                                actual.display()
                            ),
                        ))
                    }
                    None => {
                        return Err(HiggsError::format(
                            index_path,
                            format!("weight_map names tensor {name:?} in {file_name}, which does not hold it"),
                        ))
                    }
                }
            }
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            files,
            tensors,
            by_name,
        })
    }

    /// The path it was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Its files, in the order tensors are listed.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The `__metadata__` of file `file` (an index into [`Checkpoint::files`]).
    pub fn metadata(&self, file: usize) -> Option<&BTreeMap<String, String>> {
        self.files.get(file).map(|f| &f.metadata)
    }

    /// Every tensor: by file, then by offset within the file.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = &TensorInfo> {
        self.tensors.iter()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, in place in the mapped file (little-endian, as safetensors stores them).
    ///
    /// # Panics
    /// If `info` does not come from this checkpoint (then its file or range need not exist).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.files[info.file].map[info.start..info.start + info.len]
    }

    /// Tell the kernel the tensor's pages are no longer needed, so the page-cache pages of
    /// finished tensors leave this process's resident set. Later reads still see the file's
    /// contents (they fault the pages back in). A hint: failures are ignored.
    pub fn release(&self, info: &TensorInfo) {
        self.release_range(info, 0, info.len);
    }

    /// [`release`](Self::release) for `len` bytes of the tensor from `offset` (clamped to it):
    /// lets a long copy drop what it has already written.
    pub fn release_range(&self, info: &TensorInfo, offset: usize, len: usize) {
        let len = len.min(info.len.saturating_sub(offset));
        #[cfg(not(unix))]
        let _ = (info, len);
        #[cfg(unix)]
        if let Some(file) = self.files.get(info.file) {
            let start = info.start + offset;
            if len > 0 && start + len <= file.map.len() {
                // SAFETY: the range is inside the mapping (checked above; memmap2 widens it
                // down to a page boundary, still inside the mapping). The mapping is a shared,
                // read-only map of a file (`Mmap::map`): MADV_DONTNEED on such a mapping only
                // drops page-table entries, and the next access faults the same file pages back
                // in, so slices handed out by `bytes` (here or on other threads) keep reading
                // the file's contents; nothing is written or freed from under them.
                let _ = unsafe {
                    file.map
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                };
            }
        }
    }
}

/// Validate a file's header, reading only the header, then map the file.
fn map_validated(path: &Path) -> Result<(Header, Mmap)> {
    let mut file = File::open(path).map_err(|e| HiggsError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| HiggsError::io(path, e))?.len();
    let mut prefix = Vec::with_capacity(8);
    (&mut file)
        .take(8)
        .read_to_end(&mut prefix)
        .map_err(|e| HiggsError::io(path, e))?;
    let mut bytes = prefix;
    if let Some(declared) = declared_header_len(&bytes) {
        // Read the JSON only when its declared length is sane; otherwise `parse_header`
        // reports the lie from the prefix alone.
        if declared <= MAX_HEADER_LEN && declared <= file_len.saturating_sub(8) {
            (&mut file)
                .take(declared)
                .read_to_end(&mut bytes)
                .map_err(|e| HiggsError::io(path, e))?;
        }
    }
    let header = parse_header_of(path, &bytes, file_len)?;
    // SAFETY: `Mmap::map` is unsafe because another process could truncate or modify the file
    // while it is mapped (reads would then fault or see changing bytes). The file is opened
    // read-only and mapped read-only and shared; a checkpoint being quantized is not expected
    // to change underneath us, and every offset used was validated against the length below.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| HiggsError::io(path, e))?;
    if map.len() as u64 != file_len {
        return Err(HiggsError::format(
            path,
            format!(
                "file changed size while being opened ({file_len} -> {} bytes)",
                map.len()
            ),
        ));
    }
    Ok((header, map))
}

/// The shard files named by an index (sorted, deduplicated) and its weight map.
fn read_index(dir: &Path, index: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, String>)> {
    let text = std::fs::read_to_string(index).map_err(|e| HiggsError::io(index, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| HiggsError::format(index, format!("not valid JSON: {e}")))?;
    let weight_map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| HiggsError::format(index, "no \"weight_map\" object"))?;
    let mut map = BTreeMap::new();
    for (name, file) in weight_map {
        let file = file.as_str().ok_or_else(|| {
            HiggsError::format(
                index,
                format!("weight_map entry for tensor {name:?} is not a file name"),
            )
        })?;
        let plain = !file.is_empty()
            && Path::new(file).file_name().and_then(|n| n.to_str()) == Some(file)
            && file != "..";
        if !plain {
            return Err(HiggsError::format(
                index,
                format!(
                    "weight_map puts tensor {name:?} in {file:?}, which is not a plain file name"
                ),
            ));
        }
        map.insert(name.clone(), file.to_string());
    }
    let mut files: Vec<PathBuf> = map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            let tensor = map
                .iter()
                .find(|(_, v)| dir.join(v) == *f)
                .map(|(k, _)| k.as_str())
                .unwrap_or("");
            return Err(HiggsError::format(
                index,
                format!(
                    "weight_map names {} (for tensor {tensor:?}), which does not exist",
                    f.display()
                ),
            ));
        }
    }
    Ok((files, map))
}

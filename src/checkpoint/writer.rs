//! Streamed, atomic safetensors output.
//!
//! The header is computed from the declared entries before any data, so tensors stream to
//! disk one at a time and the shard is never held in memory. Data goes to `.<name>.tmp-<pid>`
//! beside the target, which `finish` flushes, fsyncs and renames into place: a reader sees the
//! old file or the complete new one, never a partial one. Any error, or dropping an unfinished
//! writer, removes the temporary file.
#![forbid(unsafe_code)]

use super::Dtype;
use crate::{HiggsError, Result};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const BUFFER_BYTES: usize = 1 << 20;

/// The temporary name of `path` while it is being written: `.<name>.tmp-<pid>` in its directory.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Make the rename durable: fsync the directory (best effort; not every platform or filesystem
/// supports it, and the data itself is already synced).
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Write `bytes` to `path` atomically: a temporary file beside it, fsync, rename.
pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let temp = temp_path(path);
    let result = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(HiggsError::io(path, e));
    }
    sync_parent(path);
    Ok(())
}

struct Entry {
    name: String,
    len: usize,
}

/// A safetensors file written tensor by tensor, in the declared order.
pub struct SafetensorsWriter {
    path: PathBuf,
    temp: PathBuf,
    /// `None` once finished, or after an error (the temporary file is gone by then).
    file: Option<BufWriter<File>>,
    entries: Vec<Entry>,
    next: usize,
}

impl std::fmt::Debug for SafetensorsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsWriter")
            .field("path", &self.path)
            .field("written", &self.next)
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// The header text for `entries` (offsets in their order), padded with spaces so the data
/// section starts at a multiple of 8, as the reference implementation does.
fn header_json(
    path: &Path,
    entries: &[(String, Dtype, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
) -> Result<(String, Vec<Entry>)> {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&format!("{}:{}", quote(k), quote(v)));
        }
        json.push('}');
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    let mut offset = 0usize;
    for (name, dtype, shape) in entries {
        if name == "__metadata__" || !seen.insert(name.as_str()) {
            return Err(HiggsError::invalid(format!(
                "{}: tensor name {name:?} is reserved or declared twice",
                path.display()
            )));
        }
        let len = dtype.byte_len(shape).ok_or_else(|| {
            HiggsError::invalid(format!(
                "{}: tensor {name:?} of shape {shape:?} is too large",
                path.display()
            ))
        })?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| HiggsError::invalid(format!("{}: shard too large", path.display())))?;
        if json.len() > 1 {
            json.push(',');
        }
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            quote(name),
            dtype.as_str(),
            dims.join(",")
        ));
        out.push(Entry {
            name: name.clone(),
            len,
        });
        offset = end;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    Ok((json, out))
}

impl SafetensorsWriter {
    /// Start writing `path` with these tensors (name, dtype, shape), whose data will follow in
    /// this order. The header is written now; the file appears at `path` on [`finish`].
    ///
    /// [`finish`]: SafetensorsWriter::finish
    pub fn create(
        path: impl AsRef<Path>,
        entries: Vec<(String, Dtype, Vec<usize>)>,
        metadata: BTreeMap<String, String>,
    ) -> Result<SafetensorsWriter> {
        let path = path.as_ref().to_path_buf();
        let (json, entries) = header_json(&path, &entries, &metadata)?;
        let temp = temp_path(&path);
        let file = File::create(&temp).map_err(|e| HiggsError::io(&path, e))?;
        let mut writer = SafetensorsWriter {
            path,
            temp,
            file: Some(BufWriter::with_capacity(BUFFER_BYTES, file)),
            entries,
            next: 0,
        };
        writer.write_raw(&(json.len() as u64).to_le_bytes())?;
        writer.write_raw(json.as_bytes())?;
        Ok(writer)
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append the data of the next declared tensor, which must be `name`, with exactly its size.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_tensor_in_chunks(name, bytes, bytes.len().max(1), |_| {})
    }

    /// [`write_tensor`](Self::write_tensor) in pieces of `chunk` bytes, calling `written` with
    /// each piece's range once it is handed to the file: a copy out of a memory map can release
    /// the source pages as it goes, so copying a large tensor does not hold it all in memory.
    pub fn write_tensor_in_chunks(
        &mut self,
        name: &str,
        bytes: &[u8],
        chunk: usize,
        mut written: impl FnMut(std::ops::Range<usize>),
    ) -> Result<()> {
        let Some(expected) = self.entries.get(self.next) else {
            return Err(HiggsError::invalid(format!(
                "{}: tensor {name:?} written after all {} declared tensors",
                self.path.display(),
                self.entries.len()
            )));
        };
        if expected.name != name {
            return Err(HiggsError::invalid(format!(
                "{}: tensor {name:?} written where {:?} (number {} of {}) was declared",
                self.path.display(),
                expected.name,
                self.next + 1,
                self.entries.len()
            )));
        }
        if expected.len != bytes.len() {
            return Err(HiggsError::invalid(format!(
                "{}: tensor {name:?} has {} bytes but was declared with {}",
                self.path.display(),
                bytes.len(),
                expected.len
            )));
        }
        for start in (0..bytes.len()).step_by(chunk.max(1)) {
            let end = (start + chunk).min(bytes.len());
            self.write_raw(&bytes[start..end])?;
            written(start..end);
        }
        self.next += 1;
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(HiggsError::invalid(format!(
                "{}: writer already failed or finished",
                self.path.display()
            )));
        };
        if let Err(e) = file.write_all(bytes) {
            return Err(self.fail(e));
        }
        Ok(())
    }

    /// Drop the file and remove the temporary; the error to return.
    fn fail(&mut self, e: std::io::Error) -> HiggsError {
        if let Some(file) = self.file.take() {
            // Whatever is still buffered is abandoned with the file.
            drop(file.into_parts());
        }
        let _ = std::fs::remove_file(&self.temp);
        HiggsError::io(&self.path, e)
    }

    /// Check every declared tensor was written, flush, fsync, and rename into place.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.entries.len() {
            let missing = &self.entries[self.next].name;
            return Err(HiggsError::invalid(format!(
                "{}: finished after {} of {} tensors; {missing:?} and the rest were not written",
                self.path.display(),
                self.next,
                self.entries.len()
            )));
            // Drop removes the temporary file.
        }
        let Some(buffered) = self.file.take() else {
            return Err(HiggsError::invalid(format!(
                "{}: writer already failed",
                self.path.display()
            )));
        };
        let file = match buffered.into_inner() {
            Ok(file) => file,
            Err(e) => {
                let error = std::io::Error::new(e.error().kind(), e.error().to_string());
                drop(e.into_inner().into_parts());
                return Err(self.fail(error));
            }
        };
        if let Err(e) = file.sync_all() {
            return Err(self.fail(e));
        }
        drop(file);
        if let Err(e) = std::fs::rename(&self.temp, &self.path) {
            return Err(self.fail(e));
        }
        sync_parent(&self.path);
        self.next = usize::MAX; // finished: nothing for Drop to remove
        Ok(())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if self.next != usize::MAX {
            if let Some(file) = self.file.take() {
                // Discard buffered data instead of flushing it into a file about to be removed.
                drop(file.into_parts());
            }
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{parse_header, Checkpoint};

    /// A fresh directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("higgs-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn entries() -> Vec<(String, Dtype, Vec<usize>)> {
        vec![
            ("a".to_string(), Dtype::U8, vec![3]),
            ("b\"quoted\"".to_string(), Dtype::F32, vec![2, 1]),
        ]
    }

    #[test]
    fn header_is_padded_to_8_and_parses_back() {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let (json, e) = header_json(Path::new("x"), &entries(), &meta).unwrap();
        assert_eq!(json.len() % 8, 0);
        assert_eq!(e[1].len, 8);
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + 11, 0);
        let header = parse_header(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(header.tensors[1].name, "b\"quoted\"");
        assert_eq!(header.tensors[1].data_offsets, [3, 11]);
        assert_eq!(header.data_start % 8, 0);
        assert_eq!(header.metadata, meta);
    }

    #[test]
    fn rejects_duplicate_and_reserved_names() {
        let mut e = entries();
        e.push(("a".to_string(), Dtype::U8, vec![1]));
        assert!(header_json(Path::new("x"), &e, &BTreeMap::new()).is_err());
        let e = vec![("__metadata__".to_string(), Dtype::U8, vec![1])];
        assert!(header_json(Path::new("x"), &e, &BTreeMap::new()).is_err());
    }

    /// A real ENOSPC from the kernel: the writer's file handle is swapped for `/dev/full`.
    #[test]
    #[cfg(target_os = "linux")]
    fn enospc_during_write_removes_the_temp_file_and_names_the_path() {
        let dir = scratch("enospc");
        let path = dir.join("model.safetensors");
        let mut w = SafetensorsWriter::create(
            &path,
            vec![("big".into(), Dtype::U8, vec![4 << 20])],
            BTreeMap::new(),
        )
        .unwrap();
        assert!(w.temp.exists());
        let full = File::options().write(true).open("/dev/full").unwrap();
        w.file = Some(BufWriter::with_capacity(BUFFER_BYTES, full));
        let err = w.write_tensor("big", &vec![7u8; 4 << 20]).unwrap_err();
        match &err {
            HiggsError::Io { path: p, source } => {
                assert_eq!(p, &path.display().to_string());
                assert_eq!(source.raw_os_error(), Some(28), "{source}"); // ENOSPC
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(!w.temp.exists());
        assert!(w.finish().is_err());
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(&*dir).unwrap().count(), 0);
    }

    /// ENOSPC surfacing only at the final flush (small data stays in the buffer until then).
    #[test]
    #[cfg(target_os = "linux")]
    fn enospc_at_finish_removes_the_temp_file() {
        let dir = scratch("enospc-finish");
        let path = dir.join("x.safetensors");
        let mut w = SafetensorsWriter::create(
            &path,
            vec![("t".into(), Dtype::U8, vec![4])],
            BTreeMap::new(),
        )
        .unwrap();
        let full = File::options().write(true).open("/dev/full").unwrap();
        w.file = Some(BufWriter::with_capacity(BUFFER_BYTES, full));
        w.write_tensor("t", &[1, 2, 3, 4]).unwrap();
        let temp = w.temp.clone();
        let err = w.finish().unwrap_err();
        assert!(matches!(err, HiggsError::Io { .. }), "{err:?}");
        assert!(!temp.exists());
        assert!(!path.exists());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = scratch("atomic");
        let path = dir.join("config.json");
        atomic_write(&path, b"one").unwrap();
        atomic_write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&*dir).unwrap().count(), 1);
        let err = atomic_write(dir.join("missing/x.json"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing/x.json"), "{err}");
    }

    #[test]
    fn written_file_reads_back() {
        let dir = scratch("roundtrip");
        let path = dir.join("m.safetensors");
        let mut w = SafetensorsWriter::create(&path, entries(), BTreeMap::new()).unwrap();
        w.write_tensor("a", &[1, 2, 3]).unwrap();
        w.write_tensor("b\"quoted\"", &[9; 8]).unwrap();
        w.finish().unwrap();
        let c = Checkpoint::open(&path).unwrap();
        assert_eq!(c.bytes(c.get("a").unwrap()), [1, 2, 3]);
        assert_eq!(c.bytes(c.get("b\"quoted\"").unwrap()), [9; 8]);
    }

    #[test]
    fn chunked_write_is_byte_identical_and_reports_every_piece() {
        let dir = scratch("chunks");
        let data: Vec<u8> = (0..8u8).map(|i| i * 17 + 1).collect();
        let mut files = Vec::new();
        for chunk in [1usize, 3, 8, 100] {
            let path = dir.join(format!("m{chunk}.safetensors"));
            let mut w = SafetensorsWriter::create(&path, entries(), BTreeMap::new()).unwrap();
            w.write_tensor("a", &[1, 2, 3]).unwrap();
            let mut pieces = Vec::new();
            w.write_tensor_in_chunks("b\"quoted\"", &data, chunk, |r| pieces.push(r))
                .unwrap();
            w.finish().unwrap();
            // The pieces tile the tensor in order, none larger than `chunk`.
            let mut next = 0;
            for r in &pieces {
                assert_eq!(r.start, next);
                assert!(r.len() <= chunk && !r.is_empty());
                next = r.end;
            }
            assert_eq!(next, data.len());
            let c = Checkpoint::open(&path).unwrap();
            let info = c.get("b\"quoted\"").unwrap();
            // Releasing pages (also a range past the end) leaves the contents readable.
            c.release_range(info, 3, 100);
            assert_eq!(c.bytes(info), &data[..]);
            files.push(std::fs::read(&path).unwrap());
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]));
        // A wrong size is refused before anything is written.
        let path = dir.join("bad.safetensors");
        let mut w = SafetensorsWriter::create(&path, entries(), BTreeMap::new()).unwrap();
        w.write_tensor("a", &[1, 2, 3]).unwrap();
        let err = w
            .write_tensor_in_chunks("b\"quoted\"", &data[..5], 2, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("has 5 bytes but was declared with 8"), "{err}");
    }
}

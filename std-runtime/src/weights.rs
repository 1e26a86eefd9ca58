//! The tensors of a checkpoint, by name, in their stored dtype.
//!
//! Safetensors files (single or sharded through `model.safetensors.index.json`)
//! are memory-mapped and read in place; a tensor whose offset is not aligned
//! to its element size is copied once into an aligned buffer, keeping its
//! dtype. `pytorch_model.bin` (torch's zip + pickle) is read into memory by
//! [`crate::torch_bin`] without executing any code.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use mamba_core::DType;
use memmap2::Mmap;

use crate::aligned::LineBuf;
use crate::config::read_json_object;
use crate::error::{Error, Result};
use crate::torch_bin::{read_torch_bin, TorchDType};

/// Where a tensor's bytes live.
enum Backing {
    Mmap(Mmap),
    /// Owned bytes on a cache line (`len` of them are used), as
    /// [`crate::quantize`] writes tensors: products over weights that start
    /// mid-line load vectors across two lines.
    Owned(LineBuf<u64>, usize),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v, len) => &bytemuck::cast_slice(v)[..*len],
        }
    }

    fn owned(bytes: &[u8]) -> Backing {
        let mut v = LineBuf::<u64>::zeroed_huge(bytes.len().div_ceil(8));
        bytemuck::cast_slice_mut::<u64, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
        Backing::Owned(v, bytes.len())
    }
}

/// One tensor's place: dtype (or the name of an unsupported one), shape, bytes.
struct Entry {
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    backing: usize,
    start: usize,
    len: usize,
    file: PathBuf,
}

/// A stored tensor as read: dtype, shape and little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    pub file: &'a Path,
}

/// All tensors of a model directory.
pub struct TensorStore {
    dir: PathBuf,
    backings: Vec<Backing>,
    entries: HashMap<String, Entry>,
    /// The weight files read, for messages and `inspect`.
    pub files: Vec<PathBuf>,
}

impl TensorStore {
    /// Open the weights of `dir`: `model.safetensors.index.json`, else
    /// `model.safetensors`, else any single `*.safetensors`, else `pytorch_model.bin`.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut store = TensorStore::empty(dir);
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let bin = dir.join("pytorch_model.bin");
        if index.is_file() {
            for shard in shard_files(&index)? {
                store.add_safetensors(&dir.join(shard))?;
            }
        } else if single.is_file() {
            store.add_safetensors(&single)?;
        } else if let Some(other) = lone_safetensors(dir)? {
            store.add_safetensors(&other)?;
        } else if bin.is_file() {
            store.add_torch_bin(&bin)?;
        } else {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                what: "no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
                    .into(),
            });
        }
        Ok(store)
    }

    /// A store over tensors held in memory, `(name, dtype, shape, words)`: each
    /// tensor's little-endian bytes come in words on a cache line (`ceil(bytes / 8)` of them, little-endian
    /// bytes in memory order, the tail of the last word unused) and are kept
    /// as they are, without a copy.
    pub fn from_words(
        origin: &Path,
        tensors: Vec<(String, DType, Vec<usize>, LineBuf<u64>)>,
    ) -> Result<Self> {
        let mut store = TensorStore::empty(origin);
        for (name, dtype, shape, words) in tensors {
            let len = shape.iter().product::<usize>() * dtype.size();
            if words.len() != len.div_ceil(8) {
                return Err(Error::TensorShape {
                    name,
                    file: origin.to_path_buf(),
                    expected: shape,
                    got: vec![words.len() * 8 / dtype.size()],
                });
            }
            store.push_whole(name, dtype, shape, Backing::Owned(words, len), origin);
        }
        Ok(store)
    }

    /// A store over one buffer of words that holds every tensor, `(name,
    /// dtype, shape, first word)`: a tensor's little-endian bytes start at
    /// its word (on a cache line when the word is a multiple of 8) and are
    /// kept where they are, without a copy.
    pub fn from_arena(
        origin: &Path,
        words: LineBuf<u64>,
        tensors: Vec<(String, DType, Vec<usize>, usize)>,
    ) -> Result<Self> {
        let mut store = TensorStore::empty(origin);
        let size = words.len() * 8;
        store.backings.push(Backing::Owned(words, size));
        for (name, dtype, shape, word) in tensors {
            let len = shape.iter().product::<usize>() * dtype.size();
            if word * 8 + len > size {
                return Err(Error::TensorShape {
                    name,
                    file: origin.to_path_buf(),
                    expected: shape,
                    got: vec![size.saturating_sub(word * 8) / dtype.size()],
                });
            }
            let entry = Entry {
                dtype: Ok(dtype),
                shape,
                backing: 0,
                start: word * 8,
                len,
                file: origin.to_path_buf(),
            };
            store.entries.insert(name, entry);
        }
        Ok(store)
    }

    fn empty(dir: &Path) -> Self {
        TensorStore { dir: dir.to_path_buf(), backings: vec![], entries: HashMap::new(), files: vec![] }
    }

    /// Add a tensor that is the whole of its own backing.
    fn push_whole(&mut self, name: String, dtype: DType, shape: Vec<usize>, backing: Backing, file: &Path) {
        let len = backing.bytes().len();
        let entry = Entry {
            dtype: Ok(dtype),
            shape,
            backing: self.backings.len(),
            start: 0,
            len,
            file: file.to_path_buf(),
        };
        self.entries.insert(name, entry);
        self.backings.push(backing);
    }

    fn add_safetensors(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotFound { path: path.to_path_buf(), what: "weight file not found".into() }
            }
            _ => Error::io(path, e),
        })?;
        // SAFETY-free: memmap2's map is `unsafe` because another process may
        // change the file under us; checkpoints are read-only inputs.
        let mmap = map_file(&file).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::Safetensors { path: path.to_path_buf(), msg };
        safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| bad(describe_safetensors_error(e, &mmap)))?;
        let (header, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| bad(describe_safetensors_error(e, &mmap)))?;
        let base = 8 + header;
        let idx = self.backings.len();
        let mut copies = vec![];
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => Ok(DType::F32),
                safetensors::Dtype::F16 => Ok(DType::F16),
                safetensors::Dtype::BF16 => Ok(DType::BF16),
                // The int8 quants of a Q8_0 weight; its scales are the F16
                // tensor named `<name>_scale` (see `crate::quantize`).
                safetensors::Dtype::I8 => Ok(DType::Q8_0),
                other => Err(format!("{other:?}")),
            };
            let (s, e) = info.data_offsets;
            let (start, len) = (base + s, e - s);
            let align = dtype.as_ref().map_or(1, |d| d.size());
            let entry = Entry {
                dtype,
                shape: info.shape.clone(),
                backing: idx,
                start,
                len,
                file: path.to_path_buf(),
            };
            if start % align != 0 {
                copies.push((name.clone(), entry));
            } else {
                self.entries.insert(name.clone(), entry);
            }
        }
        for (name, mut entry) in copies {
            let owned = Backing::owned(&mmap[entry.start..entry.start + entry.len]);
            entry.backing = self.backings.len() + 1;
            entry.start = 0;
            self.entries.insert(name, entry);
            self.backings.push(owned);
        }
        self.backings.insert(idx, Backing::Mmap(mmap));
        self.files.push(path.to_path_buf());
        Ok(())
    }

    fn add_torch_bin(&mut self, path: &Path) -> Result<()> {
        for t in read_torch_bin(path)? {
            let dtype = match t.dtype {
                TorchDType::F32 => DType::F32,
                TorchDType::F16 => DType::F16,
                TorchDType::BF16 => DType::BF16,
            };
            self.push_whole(t.name, dtype, t.shape, Backing::owned(&t.data), path);
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The tensor `name`, or a clear error when it is missing or of an unsupported dtype.
    pub fn get(&self, name: &str) -> Result<RawTensor<'_>> {
        let (key, e) = self
            .entries
            .get_key_value(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), dir: self.dir.clone() })?;
        let dtype = e.dtype.clone().map_err(|dtype| Error::TensorDtype {
            name: name.to_string(),
            file: e.file.clone(),
            dtype,
        })?;
        let bytes = &self.backings[e.backing].bytes()[e.start..e.start + e.len];
        Ok(RawTensor { name: key, dtype, shape: &e.shape, bytes, file: &e.file })
    }
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only; a checkpoint changed by another process
    // while we run is outside what any loader can defend against.
    let map = unsafe { Mmap::map(file) }?;
    // Ask for the file's pages in 2 MiB folios, mapped as huge pages (as
    // `crate::aligned::LineBuf` does for owned weights). Read after the
    // page cache was dropped, 130m-shaped files were PMD-mapped 0% -> 99%
    // (Q8_0) and 2% -> 94% (bf16); batch-1 decode, six alternated runs:
    // Q8_0 215 -> 230 tok/s, bf16 153 -> 168. A hint: a kernel without
    // THP keeps small pages.
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

/// What is wrong with a safetensors file, in words, with the sizes that tell
/// a truncated file from a foreign one.
fn describe_safetensors_error(e: safetensors::SafeTensorError, bytes: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let size = bytes.len();
    let n = bytes.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let header = usize::try_from(n).ok().and_then(|n| bytes.get(8..8usize.checked_add(n)?));
    match e {
        E::HeaderTooSmall => format!("the file has {size} bytes, fewer than the 8 of the header length"),
        E::HeaderTooLarge => format!(
            "the header length in the first 8 bytes ({n}) is implausibly large: \
             corrupt, or not a safetensors file"
        ),
        E::InvalidHeaderLength => format!(
            "the header length in the first 8 bytes ({n}) runs past the end of the file ({size} bytes): \
             truncated, or not a safetensors file"
        ),
        E::InvalidHeader | E::InvalidHeaderStart => "the header is not UTF-8 JSON text".into(),
        E::InvalidHeaderDeserialization => match header.map(serde_json::from_slice::<serde_json::Value>) {
            Some(Err(json)) => format!("the header is not valid JSON: {json}"),
            _ => "the header is not valid tensor metadata (an unknown dtype or a malformed entry)".into(),
        },
        E::MetadataIncompleteBuffer => {
            // Where the header says the tensor data ends.
            let end =
                header.and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok()).and_then(|v| {
                    v.as_object()?
                        .values()
                        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                        .max()
                        .map(|e| e.saturating_add(8 + n))
                });
            match end {
                Some(want) if (size as u64) < want => {
                    format!("truncated: the header describes {want} bytes, the file has {size}")
                }
                Some(want) => {
                    format!("the header describes {want} bytes, the file has {size} (trailing bytes)")
                }
                None => format!("the tensor data does not fill the file of {size} bytes"),
            }
        }
        E::InvalidOffset(name) => format!("tensor `{name}` has data offsets that overlap or leave a gap"),
        E::TensorInvalidInfo => "a tensor's data offsets do not match its shape and dtype".into(),
        E::ValidationOverflow => "a tensor's shape is too large (its size overflows)".into(),
        other => format!("{other:?}"),
    }
}

/// The shard file names of an index, in first-seen order.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let obj = read_json_object(index)?;
    let map = obj.get("weight_map").and_then(|v| v.as_object()).ok_or_else(|| Error::ConfigValue {
        path: index.to_path_buf(),
        key: "weight_map".into(),
        msg: "missing or not an object".into(),
    })?;
    let mut files: Vec<String> = vec![];
    for (name, v) in map {
        let f = v.as_str().ok_or_else(|| Error::ConfigValue {
            path: index.to_path_buf(),
            key: format!("weight_map.{name}"),
            msg: "expected a file name".into(),
        })?;
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(Error::ConfigValue {
                path: index.to_path_buf(),
                key: format!("weight_map.{name}"),
                msg: format!("shard `{f}` is not a plain file name"),
            });
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    Ok(files)
}

/// The only `*.safetensors` file of `dir`, if there is exactly one.
fn lone_safetensors(dir: &Path) -> Result<Option<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let found: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    Ok(if found.len() == 1 { found.into_iter().next() } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arena_holds_its_tensors_in_place_and_refuses_one_past_its_end() {
        let mut words = LineBuf::<u64>::zeroed(24);
        words[8] = u64::from_le_bytes(*b"abcdefgh");
        let at = words.as_ptr() as usize;
        let tensors = vec![("a".into(), DType::F32, vec![2, 3], 0), ("b".into(), DType::BF16, vec![4], 8)];
        let store = TensorStore::from_arena(Path::new("synthetic:t"), words, tensors).unwrap();
        let b = store.get("b").unwrap();
        assert_eq!((b.dtype, b.shape, b.bytes), (DType::BF16, &[4][..], &b"abcdefgh"[..]));
        assert_eq!(b.bytes.as_ptr() as usize, at + 64, "copied, or not on its cache line");
        assert_eq!(store.get("a").unwrap().bytes.len(), 24);

        let past = vec![("c".into(), DType::F32, vec![5], 22)];
        match TensorStore::from_arena(Path::new("synthetic:t"), LineBuf::zeroed(24), past) {
            Err(Error::TensorShape { name, expected, got, .. }) => {
                assert_eq!((name.as_str(), expected, got), ("c", vec![5], vec![4]))
            }
            other => panic!("expected a shape error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn weight_files_are_mapped_asking_for_huge_pages() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![0u8; 4 << 20];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1 << 20], &data).unwrap();
        safetensors::serialize_to_file([("w", view)], &None, &dir.path().join("model.safetensors")).unwrap();
        let store = TensorStore::open(dir.path()).unwrap();
        let w = store.get("w").unwrap();
        assert_ne!(
            crate::aligned::advised_huge(w.bytes.as_ptr()),
            Some(false),
            "mapped without MADV_HUGEPAGE"
        );
    }
}

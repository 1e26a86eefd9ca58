//! Reader for PyTorch `torch.save` checkpoints (`pytorch_model.bin`).
//!
//! Since torch 1.6, `torch.save` writes a zip archive:
//!
//! ```text
//! <archive>/data.pkl        pickle of the saved object (here: a state dict)
//! <archive>/data/<key>      raw bytes of each tensor storage
//! <archive>/byteorder       "little" or "big" (absent in older files: little)
//! <archive>/version         format version
//! ```
//!
//! The pickle is interpreted by a tiny pickle virtual machine that never
//! executes code: it understands only the opcodes `torch.save` emits for a
//! state dict and resolves `GLOBAL`s against a fixed allow-list
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter[_with_state]`,
//! `torch._tensor._rebuild_from_type_v2`, `torch.{Float,Half,BFloat16}Storage`
//! and the tensor type markers `torch.Tensor` / `torch.nn.parameter.Parameter`).
//! Anything else is rejected with an error naming the global.
//!
//! All input is treated as untrusted: every read is bounds-checked, and
//! malformed files produce a [`TorchBinError`], never a panic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Element type of a tensor storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchDType {
    F32,
    F16,
    BF16,
}

/// One tensor from the checkpoint, made contiguous (row-major), little-endian bytes in its stored dtype.
#[derive(Debug, Clone)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: TorchDType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Errors from [`read_torch_bin`]. Every message starts with the file path.
#[derive(Debug, thiserror::Error)]
pub enum TorchBinError {
    /// The file could not be opened or read.
    #[error("{}: I/O error: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a zip archive, or it is truncated / corrupt.
    #[error(
        "{}: not a valid torch.save zip archive (not a zip file, or truncated/corrupt): {detail}",
        .path.display()
    )]
    NotZip { path: PathBuf, detail: String },
    /// The archive has no `<archive>/data.pkl` entry.
    #[error("{}: zip archive has no `<archive>/data.pkl` entry (not a torch.save checkpoint)", .path.display())]
    MissingDataPkl { path: PathBuf },
    /// The `byteorder` record says something other than `little`.
    #[error(
        "{}: unsupported byte order `{byteorder}` (only little-endian checkpoints are supported)",
        .path.display()
    )]
    UnsupportedByteOrder { path: PathBuf, byteorder: String },
    /// The pickle uses an opcode this reader does not implement.
    #[error(
        "{}: unsupported pickle opcode {} at offset {offset} of data.pkl",
        .path.display(),
        describe_opcode(.opcode)
    )]
    UnsupportedOpcode { path: PathBuf, opcode: u8, offset: usize },
    /// The pickle is structurally invalid (truncated, stack underflow, wrong argument types, ...).
    #[error("{}: malformed pickle at offset {offset} of data.pkl: {detail}", .path.display())]
    MalformedPickle { path: PathBuf, offset: usize, detail: String },
    /// The pickle references a global outside the allow-list.
    #[error("{}: pickle references disallowed global `{global}`", .path.display())]
    DisallowedGlobal { path: PathBuf, global: String },
    /// A tensor storage has a dtype other than f32 / f16 / bf16.
    #[error(
        "{}: unsupported tensor dtype storage `{storage}` (only torch.FloatStorage, torch.HalfStorage and torch.BFloat16Storage are supported)",
        .path.display()
    )]
    UnsupportedDType { path: PathBuf, storage: String },
    /// The pickle references a storage whose `<archive>/data/<key>` entry does not exist.
    #[error("{}: storage `{key}` is missing from the archive (no entry `{entry}`)", .path.display())]
    MissingStorage { path: PathBuf, key: String, entry: String },
    /// A tensor's offset / size / stride reaches outside its storage.
    #[error("{}: tensor `{name}` is out of bounds of its storage `{key}`: {detail}", .path.display())]
    OutOfBounds { path: PathBuf, name: String, key: String, detail: String },
    /// The unpickled object is not a dict mapping strings to tensors.
    #[error("{}: checkpoint is not a dict of tensors: {detail}", .path.display())]
    NotTensorDict { path: PathBuf, detail: String },
}

/// Read all tensors of a torch.save'd state dict.
///
/// Tensors are returned in the dict's insertion order. Views (non-zero
/// `storage_offset`, non-contiguous strides, several tensors sharing one
/// storage) are copied out into contiguous row-major buffers.
pub fn read_torch_bin(path: &Path) -> Result<Vec<TorchTensor>, TorchBinError> {
    let file =
        std::fs::File::open(path).map_err(|source| TorchBinError::Io { path: path.to_path_buf(), source })?;
    read_from_reader(std::io::BufReader::new(file), path)
}

// ---------------------------------------------------------------------------
// Archive level
// ---------------------------------------------------------------------------

/// Largest `data.pkl` accepted (state-dict pickles are typically a few hundred KB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// Largest amount of data a view may produce beyond the size of its storage
/// (only possible with zero strides, i.e. expanded tensors).
const MAX_EXPANDED_BYTES: usize = 1 << 30;

fn read_from_reader<R: Read + Seek>(reader: R, path: &Path) -> Result<Vec<TorchTensor>, TorchBinError> {
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| zip_error(path, e))?;

    let prefix = find_archive_prefix(&archive)
        .ok_or_else(|| TorchBinError::MissingDataPkl { path: path.to_path_buf() })?;

    if let Some(index) = archive.index_for_name(&format!("{prefix}/byteorder")) {
        let raw = read_entry(&mut archive, index, path, 64)?;
        let order = String::from_utf8_lossy(&raw);
        let order = order.trim();
        if order != "little" {
            return Err(TorchBinError::UnsupportedByteOrder {
                path: path.to_path_buf(),
                byteorder: order.to_string(),
            });
        }
    }

    let pkl_index = archive
        .index_for_name(&format!("{prefix}/data.pkl"))
        .ok_or_else(|| TorchBinError::MissingDataPkl { path: path.to_path_buf() })?;
    let pickle = read_entry(&mut archive, pkl_index, path, MAX_PICKLE_BYTES)?;

    let root = Unpickler::new(&pickle, path).run()?;
    let entries = state_dict_entries(&root, path)?;
    drop(root);

    // How many tensors still need each storage: a storage is freed (or handed
    // over without a copy) after its last use, so peak memory stays near the
    // checkpoint size.
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (_, view) in &entries {
        *uses.entry(view.storage.key.clone()).or_insert(0) += 1;
    }
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (name, view) in entries {
        let key = &view.storage.key;
        if !storages.contains_key(key) {
            let entry = format!("{prefix}/data/{key}");
            let index = archive.index_for_name(&entry).ok_or_else(|| TorchBinError::MissingStorage {
                path: path.to_path_buf(),
                key: key.clone(),
                entry: entry.clone(),
            })?;
            let bytes = read_entry(&mut archive, index, path, u64::MAX)?;
            storages.insert(key.clone(), bytes);
        }
        let last_use = match uses.get_mut(key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => true,
        };
        let data = if last_use {
            let bytes = storages.remove(key).unwrap_or_default();
            if covers_whole_storage(&view, &bytes) {
                bytes
            } else {
                materialize(&view, &bytes, &name, path)?
            }
        } else {
            let bytes = storages.get(key).map(Vec::as_slice).unwrap_or(&[]);
            materialize(&view, bytes, &name, path)?
        };
        out.push(TorchTensor { name, dtype: view.storage.dtype, shape: view.size.clone(), data });
    }
    Ok(out)
}

/// The archive folder name: the `<prefix>` of the first `<prefix>/data.pkl` entry.
fn find_archive_prefix<R: Read + Seek>(archive: &zip::ZipArchive<R>) -> Option<String> {
    archive.file_names().find_map(|name| {
        let prefix = name.strip_suffix("/data.pkl")?;
        (!prefix.is_empty() && !prefix.contains('/')).then(|| prefix.to_string())
    })
}

fn zip_error(path: &Path, err: zip::result::ZipError) -> TorchBinError {
    match err {
        zip::result::ZipError::Io(e)
            if e.kind() != std::io::ErrorKind::UnexpectedEof
                && e.kind() != std::io::ErrorKind::InvalidData =>
        {
            TorchBinError::Io { path: path.to_path_buf(), source: e }
        }
        other => TorchBinError::NotZip { path: path.to_path_buf(), detail: other.to_string() },
    }
}

/// Read one whole archive entry, verifying its size (and, through the zip
/// reader, its CRC). Entries larger than `limit` are rejected.
fn read_entry<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    index: usize,
    path: &Path,
    limit: u64,
) -> Result<Vec<u8>, TorchBinError> {
    let mut file = archive.by_index(index).map_err(|e| zip_error(path, e))?;
    let name = file.name().to_string();
    let declared = file.size();
    let not_zip = |detail: String| TorchBinError::NotZip { path: path.to_path_buf(), detail };
    if declared > limit {
        return Err(not_zip(format!("entry `{name}` is {declared} bytes, more than the {limit} allowed")));
    }
    let mut buf = Vec::new();
    // Reserve up front (one allocation for multi-GB storages), bounded by what
    // the compressed data could expand to (deflate's ratio is at most ~1032:1),
    // and failing gracefully rather than aborting.
    let plausible = file.compressed_size().saturating_mul(1032).saturating_add(64);
    let reserve = usize::try_from(declared.min(plausible)).unwrap_or(usize::MAX);
    buf.try_reserve_exact(reserve)
        .map_err(|e| not_zip(format!("entry `{name}`: cannot allocate {reserve} bytes: {e}")))?;
    // Read at most one byte more than declared: enough to reach end of stream
    // (which triggers the CRC check) and to detect a lying size field.
    file.by_ref().take(declared.saturating_add(1)).read_to_end(&mut buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData => {
            not_zip(format!("reading entry `{name}`: {e}"))
        }
        _ => TorchBinError::Io { path: path.to_path_buf(), source: e },
    })?;
    if buf.len() as u64 != declared {
        return Err(not_zip(format!(
            "entry `{name}` holds {} bytes but its header declares {declared}",
            buf.len()
        )));
    }
    Ok(buf)
}

/// Extract `(name, tensor)` pairs from the unpickled root object.
fn state_dict_entries(root: &Value, path: &Path) -> Result<Vec<(String, Rc<TensorView>)>, TorchBinError> {
    let not_dict = |detail: String| TorchBinError::NotTensorDict { path: path.to_path_buf(), detail };
    let Value::Dict(dict) = root else {
        return Err(not_dict(format!("top-level object is {}, not a dict", root.type_name())));
    };
    let dict = dict.try_borrow().map_err(|_| not_dict("top-level dict is in use".to_string()))?;
    let mut out = Vec::with_capacity(dict.entries.len());
    for (key, value) in &dict.entries {
        let Value::Str(name) = key else {
            return Err(not_dict(format!("dict key is {}, not a string", key.type_name())));
        };
        let Value::Tensor(view) = value else {
            return Err(not_dict(format!("value of `{name}` is {}, not a tensor", value.type_name())));
        };
        out.push((name.to_string(), Rc::clone(view)));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------

fn elem_size(dtype: TorchDType) -> usize {
    match dtype {
        TorchDType::F32 => 4,
        TorchDType::F16 | TorchDType::BF16 => 2,
    }
}

/// A storage reference from a `BINPERSID` record.
struct StorageRef {
    dtype: TorchDType,
    key: String,
    /// Number of elements the pickle says the storage holds.
    numel: usize,
}

/// A tensor as described by `_rebuild_tensor_v2`: a strided view of a storage.
struct TensorView {
    storage: Rc<StorageRef>,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Whether the view is exactly the whole storage in row-major order, so that
/// the storage bytes can be used as the tensor data without copying.
fn covers_whole_storage(view: &TensorView, storage: &[u8]) -> bool {
    let es = elem_size(view.storage.dtype);
    let numel = view.size.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n));
    view.offset == 0
        && numel.is_some_and(|n| n > 0 && n <= view.storage.numel && n.checked_mul(es) == Some(storage.len()))
        && is_row_major(&view.size, &view.stride)
}

/// Whether `stride` is the row-major (C-contiguous) stride of `size`
/// (dimensions of extent 1 may have any stride).
fn is_row_major(size: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    size.len() == stride.len()
}

/// Copy a (possibly strided) view out of its storage bytes into a contiguous buffer.
fn materialize(view: &TensorView, storage: &[u8], name: &str, path: &Path) -> Result<Vec<u8>, TorchBinError> {
    let oob = |detail: String| TorchBinError::OutOfBounds {
        path: path.to_path_buf(),
        name: name.to_string(),
        key: view.storage.key.clone(),
        detail,
    };
    let es = elem_size(view.storage.dtype);
    let available = view.storage.numel.min(storage.len() / es);
    let numel = view
        .size
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .ok_or_else(|| oob(format!("element count of shape {:?} overflows", view.size)))?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    // Largest storage element index the view touches.
    let mut last = view.offset;
    for (&n, &s) in view.size.iter().zip(&view.stride) {
        last = n
            .checked_sub(1)
            .and_then(|m| m.checked_mul(s))
            .and_then(|d| last.checked_add(d))
            .ok_or_else(|| oob("element index overflows".to_string()))?;
    }
    if last >= available {
        return Err(oob(format!(
            "view (storage_offset {}, size {:?}, stride {:?}) reaches element {last}, but the storage holds {available} elements ({} bytes, {} declared)",
            view.offset,
            view.size,
            view.stride,
            storage.len(),
            view.storage.numel
        )));
    }
    let nbytes = numel.checked_mul(es).ok_or_else(|| oob("byte size overflows".to_string()))?;
    if numel > available && nbytes > MAX_EXPANDED_BYTES {
        return Err(oob(format!(
            "view of shape {:?} expands its {available}-element storage to {nbytes} bytes",
            view.size
        )));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(nbytes).map_err(|e| oob(format!("cannot allocate {nbytes} bytes: {e}")))?;

    let slice = |start: usize, count: usize| -> Result<&[u8], TorchBinError> {
        start
            .checked_mul(es)
            .zip(count.checked_mul(es))
            .and_then(|(a, len)| storage.get(a..a.checked_add(len)?))
            .ok_or_else(|| oob(format!("elements {start}..{start}+{count} out of range")))
    };

    // Fast path: already contiguous row-major.
    if is_row_major(&view.size, &view.stride) {
        out.extend_from_slice(slice(view.offset, numel)?);
        return Ok(out);
    }

    // General path: walk the outer dimensions with an odometer and copy the
    // innermost dimension as one run (stride 1) or element by element.
    let (inner_n, inner_s, outer_n, outer_s) = match (view.size.split_last(), view.stride.split_last()) {
        (Some((&n, outer_n)), Some((&s, outer_s))) => (n, s, outer_n, outer_s),
        // 0-d tensors are always contiguous; unreachable in practice.
        _ => (1, 1, &[][..], &[][..]),
    };
    let mut counters: Vec<(usize, usize, usize)> =
        outer_n.iter().zip(outer_s).map(|(&n, &s)| (n, s, 0usize)).collect();
    let mut base = view.offset;
    loop {
        if inner_s == 1 {
            out.extend_from_slice(slice(base, inner_n)?);
        } else {
            for j in 0..inner_n {
                let index = j
                    .checked_mul(inner_s)
                    .and_then(|d| base.checked_add(d))
                    .ok_or_else(|| oob("element index overflows".to_string()))?;
                out.extend_from_slice(slice(index, 1)?);
            }
        }
        let mut wrapped_all = true;
        for (n, s, i) in counters.iter_mut().rev() {
            *i += 1;
            base = base.saturating_add(*s);
            if *i < *n {
                wrapped_all = false;
                break;
            }
            base = base.saturating_sub(s.saturating_mul(*n));
            *i = 0;
        }
        if wrapped_all {
            break;
        }
    }
    if out.len() != nbytes {
        return Err(oob(format!("copied {} bytes, expected {nbytes}", out.len())));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Pickle virtual machine
// ---------------------------------------------------------------------------

/// Allow-listed globals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` / `torch.nn.parameter.Parameter`, only usable as the
    /// `new_type` argument of `_rebuild_from_type_v2`.
    TensorType,
    Storage(TorchDType),
}

impl Global {
    fn name(self) -> &'static str {
        match self {
            Global::OrderedDict => "collections.OrderedDict",
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::RebuildParameter => "torch._utils._rebuild_parameter",
            Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2",
            Global::TensorType => "torch.Tensor",
            Global::Storage(TorchDType::F32) => "torch.FloatStorage",
            Global::Storage(TorchDType::F16) => "torch.HalfStorage",
            Global::Storage(TorchDType::BF16) => "torch.BFloat16Storage",
        }
    }
}

#[derive(Default)]
struct Dict {
    entries: Vec<(Value, Value)>,
    /// Position in `entries` of hashable (str / int) keys, for replacement semantics.
    index: HashMap<DictKey, usize>,
}

#[derive(PartialEq, Eq, Hash)]
enum DictKey {
    Str(Rc<str>),
    Int(i64),
}

impl Dict {
    fn set(&mut self, key: Value, value: Value) {
        let hashed = match &key {
            Value::Str(s) => Some(DictKey::Str(Rc::clone(s))),
            Value::Int(i) => Some(DictKey::Int(*i)),
            _ => None,
        };
        if let Some(h) = hashed {
            if let Some(slot) = self.index.get(&h).and_then(|&i| self.entries.get_mut(i)) {
                slot.1 = value;
                return;
            }
            self.index.insert(h, self.entries.len());
        }
        self.entries.push((key, value));
    }
}

/// A pickle value. Containers are reference-counted so that memo references
/// are cheap and shared, as in Python.
#[derive(Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// Floats and bytes never matter for a state dict; only their presence is kept.
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Dict>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorView>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    fn new_dict() -> Value {
        Value::Dict(Rc::new(RefCell::new(Dict::default())))
    }

    /// Move the children of a uniquely owned container into `out`.
    fn take_children(&mut self, out: &mut Vec<Value>) {
        match self {
            Value::Tuple(rc) => {
                if let Some(items) = Rc::get_mut(rc) {
                    out.append(items);
                }
            }
            Value::List(rc) => {
                if let Some(cell) = Rc::get_mut(rc) {
                    out.append(cell.get_mut());
                }
            }
            Value::Dict(rc) => {
                if let Some(cell) = Rc::get_mut(rc) {
                    let dict = cell.get_mut();
                    dict.index.clear();
                    for (k, v) in dict.entries.drain(..) {
                        out.push(k);
                        out.push(v);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Drop for Value {
    /// Iterative drop, so deeply nested (malicious) pickles cannot overflow
    /// the call stack when their values are freed.
    fn drop(&mut self) {
        let mut work = Vec::new();
        self.take_children(&mut work);
        while let Some(mut v) = work.pop() {
            v.take_children(&mut work);
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed (for error messages).
    op_start: usize,
    path: &'a Path,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

type PResult<T> = Result<T, TorchBinError>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], path: &'a Path) -> Self {
        Unpickler {
            data,
            pos: 0,
            op_start: 0,
            path,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn bad(&self, detail: impl Into<String>) -> TorchBinError {
        TorchBinError::MalformedPickle {
            path: self.path.to_path_buf(),
            offset: self.op_start,
            detail: detail.into(),
        }
    }

    // --- raw reads ---

    fn bytes(&mut self, n: usize) -> PResult<&'a [u8]> {
        let data = self.data;
        let slice = self.pos.checked_add(n).and_then(|end| data.get(self.pos..end)).ok_or_else(|| {
            self.bad(format!(
                "truncated: needs {n} more bytes at offset {}, {} left",
                self.pos,
                data.len().saturating_sub(self.pos)
            ))
        })?;
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64_len(&mut self) -> PResult<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.bad(format!("length {n} too large")))
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.bad("truncated: unterminated GLOBAL line"))?;
        let bytes = self.bytes(len + 1)?;
        let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        std::str::from_utf8(text).map_err(|_| self.bad("GLOBAL line is not valid UTF-8"))
    }

    fn string(&mut self, n: usize) -> PResult<Value> {
        let bytes = self.bytes(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.bad("string is not valid UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    // --- stack helpers ---

    fn mark_base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> PResult<Value> {
        if self.stack.len() <= self.mark_base() {
            return Err(self.bad("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.bad("stack underflow"))
    }

    fn top(&self) -> PResult<&Value> {
        if self.stack.len() <= self.mark_base() {
            return Err(self.bad("stack underflow"));
        }
        self.stack.last().ok_or_else(|| self.bad("stack underflow"))
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let mark = self.marks.pop().ok_or_else(|| self.bad("no MARK on the stack"))?;
        if mark > self.stack.len() {
            return Err(self.bad("MARK beyond the top of the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn pop_tuple(&mut self, n: usize) -> PResult<Value> {
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.pop()?);
        }
        items.reverse();
        Ok(Value::Tuple(Rc::new(items)))
    }

    fn memo_put(&mut self, key: u32) -> PResult<()> {
        let value = self.top()?.clone();
        self.memo.insert(key, value);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> PResult<()> {
        let value =
            self.memo.get(&key).cloned().ok_or_else(|| self.bad(format!("memo key {key} not found")))?;
        self.stack.push(value);
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> PResult<()> {
        let Value::List(list) = self.top()? else {
            return Err(self.bad(format!("APPEND(S) on {}", self.top()?.type_name())));
        };
        let list = Rc::clone(list);
        let mut list = list.try_borrow_mut().map_err(|_| self.bad("list is in use"))?;
        list.extend(items);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> PResult<()> {
        if items.len() % 2 == 1 {
            return Err(self.bad("SETITEMS with an odd number of items"));
        }
        let Value::Dict(dict) = self.top()? else {
            return Err(self.bad(format!("SETITEM(S) on {}", self.top()?.type_name())));
        };
        let dict = Rc::clone(dict);
        let mut dict = dict.try_borrow_mut().map_err(|_| self.bad("dict is in use"))?;
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.set(k, v);
        }
        Ok(())
    }

    fn int(&self, v: &Value, what: &str) -> PResult<usize> {
        match v {
            Value::Int(i) => usize::try_from(*i).map_err(|_| self.bad(format!("{what} is negative: {i}"))),
            Value::Bool(b) => Ok(usize::from(*b)),
            other => Err(self.bad(format!("{what} is {}, not an int", other.type_name()))),
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> PResult<Vec<usize>> {
        match v {
            Value::Tuple(items) => items.iter().map(|x| self.int(x, what)).collect(),
            Value::List(items) => {
                let items = items.try_borrow().map_err(|_| self.bad("list is in use"))?;
                items.iter().map(|x| self.int(x, what)).collect()
            }
            other => Err(self.bad(format!("{what} is {}, not a tuple", other.type_name()))),
        }
    }

    // --- globals and calls ---

    fn resolve_global(&self, module: &str, name: &str) -> PResult<Global> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
            ("torch", "Tensor")
            | ("torch._tensor", "Tensor")
            | ("torch.nn", "Parameter")
            | ("torch.nn.parameter", "Parameter") => Global::TensorType,
            ("torch", "FloatStorage") => Global::Storage(TorchDType::F32),
            ("torch", "HalfStorage") => Global::Storage(TorchDType::F16),
            ("torch", "BFloat16Storage") => Global::Storage(TorchDType::BF16),
            ("torch" | "torch.storage", n) if n.ends_with("Storage") => {
                return Err(TorchBinError::UnsupportedDType {
                    path: self.path.to_path_buf(),
                    storage: format!("{module}.{name}"),
                })
            }
            _ => {
                return Err(TorchBinError::DisallowedGlobal {
                    path: self.path.to_path_buf(),
                    global: format!("{module}.{name}"),
                })
            }
        };
        Ok(global)
    }

    fn call(&self, func: Global, args: &[Value]) -> PResult<Value> {
        match (func, args) {
            (Global::OrderedDict, []) => Ok(Value::new_dict()),
            (
                Global::RebuildTensorV2,
                [storage, offset, size, stride, _requires_grad, _hooks]
                | [storage, offset, size, stride, _requires_grad, _hooks, _],
            ) => {
                let Value::Storage(storage) = storage else {
                    return Err(
                        self.bad(format!("_rebuild_tensor_v2 storage argument is {}", storage.type_name()))
                    );
                };
                let offset = self.int(offset, "storage_offset")?;
                let size = self.int_tuple(size, "size")?;
                let stride = self.int_tuple(stride, "stride")?;
                if size.len() != stride.len() {
                    return Err(
                        self.bad(format!("size {size:?} and stride {stride:?} have different lengths"))
                    );
                }
                Ok(Value::Tensor(Rc::new(TensorView { storage: Rc::clone(storage), offset, size, stride })))
            }
            (Global::RebuildParameter, [data, _requires_grad, _hooks])
            | (Global::RebuildParameterWithState, [data, _requires_grad, _hooks, _]) => match data {
                Value::Tensor(_) => Ok(data.clone()),
                other => Err(self.bad(format!("{} data argument is {}", func.name(), other.type_name()))),
            },
            (Global::RebuildFromTypeV2, [inner, new_type, inner_args, _state]) => {
                if !matches!(new_type, Value::Global(Global::TensorType)) {
                    return Err(self.bad(format!(
                        "_rebuild_from_type_v2 new_type is {}, not a tensor type",
                        new_type.type_name()
                    )));
                }
                let Value::Tuple(inner_args) = inner_args else {
                    return Err(self.bad("_rebuild_from_type_v2 args is not a tuple"));
                };
                match inner {
                    Value::Global(g @ Global::RebuildTensorV2) => self.call(*g, inner_args),
                    other => Err(self.bad(format!(
                        "_rebuild_from_type_v2 function is {}, not _rebuild_tensor_v2",
                        other.type_name()
                    ))),
                }
            }
            _ => Err(self.bad(format!("cannot call {} with {} argument(s)", func.name(), args.len()))),
        }
    }

    fn persistent_load(&self, pid: &Value) -> PResult<Value> {
        let Value::Tuple(items) = pid else {
            return Err(self.bad(format!("persistent id is {}, not a tuple", pid.type_name())));
        };
        let [tag, storage_type, key, _location, numel] = items.as_slice() else {
            return Err(self.bad(format!("persistent id has {} fields, expected 5", items.len())));
        };
        if !matches!(tag, Value::Str(s) if &**s == "storage") {
            return Err(self.bad("persistent id is not a ('storage', ...) record"));
        }
        let Value::Global(Global::Storage(dtype)) = storage_type else {
            return Err(self.bad(format!(
                "persistent id storage type is {}, not a storage class",
                storage_type.type_name()
            )));
        };
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => {
                return Err(self.bad(format!("storage key is {}", other.type_name())));
            }
        };
        let numel = self.int(numel, "storage numel")?;
        Ok(Value::Storage(Rc::new(StorageRef { dtype: *dtype, key, numel })))
    }

    // --- main loop ---

    fn run(mut self) -> PResult<Value> {
        loop {
            self.op_start = self.pos;
            let op = match self.data.get(self.pos) {
                Some(&op) => op,
                None => return Err(self.bad("truncated: reached end of data without STOP")),
            };
            self.pos += 1;
            match op {
                // PROTO
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.bad(format!("unsupported pickle protocol {proto}")));
                    }
                }
                // FRAME: framing is transparent to us.
                0x95 => {
                    self.bytes(8)?;
                }
                b'.' => {
                    // STOP
                    return self.pop();
                }
                b'}' => self.stack.push(Value::new_dict()),
                b']' => self.stack.push(Value::List(Rc::default())),
                b')' => self.stack.push(Value::Tuple(Rc::default())),
                b'(' => self.marks.push(self.stack.len()),
                // BINUNICODE / SHORT_BINUNICODE / BINUNICODE8
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.u64_len()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                // BINBYTES / SHORT_BINBYTES / BINBYTES8
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => usize::from(self.u8()?),
                        _ => self.u64_len()?,
                    };
                    self.bytes(n)?;
                    self.stack.push(Value::Bytes);
                }
                // BININT / BININT1 / BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(i64::from(v)));
                }
                // LONG1 / LONG4
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        usize::from(self.u8()?)
                    } else {
                        let n = i32::from_le_bytes(self.array()?);
                        usize::try_from(n).map_err(|_| self.bad("negative LONG4 length"))?
                    };
                    let bytes = self.bytes(n)?;
                    let v = decode_long(bytes).ok_or_else(|| self.bad("integer too large"))?;
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    self.bytes(8)?;
                    self.stack.push(Value::Float);
                }
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'N' => self.stack.push(Value::None),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let v = self.pop_tuple(usize::from(op - 0x84))?;
                    self.stack.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::new_dict());
                    self.set_items(items)?;
                }
                // BINPUT / LONG_BINPUT / MEMOIZE
                b'q' => {
                    let key = u32::from(self.u8()?);
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = u32::try_from(self.memo.len()).map_err(|_| self.bad("memo too large"))?;
                    self.memo_put(key)?;
                }
                // BINGET / LONG_BINGET
                b'h' => {
                    let key = u32::from(self.u8()?);
                    self.memo_get(key)?;
                }
                b'j' => {
                    let key = self.u32()?;
                    self.memo_get(key)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                // GLOBAL / STACK_GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.resolve_global(module, name)?;
                    self.stack.push(Value::Global(g));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.bad("STACK_GLOBAL operands are not strings"));
                    };
                    let g = self.resolve_global(module, name)?;
                    self.stack.push(Value::Global(g));
                }
                // REDUCE
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let Value::Tuple(args) = &args else {
                        return Err(
                            self.bad(format!("REDUCE arguments are {}, not a tuple", args.type_name()))
                        );
                    };
                    let Value::Global(func) = func else {
                        return Err(self.bad(format!("cannot call {}", func.type_name())));
                    };
                    let v = self.call(func, args)?;
                    self.stack.push(v);
                }
                // NEWOBJ
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match (&cls, &args) {
                        (Value::Global(Global::OrderedDict), Value::Tuple(a)) if a.is_empty() => {
                            self.stack.push(Value::new_dict());
                        }
                        _ => {
                            return Err(self.bad(format!(
                                "NEWOBJ of {} is not supported",
                                match cls {
                                    Value::Global(g) => g.name(),
                                    ref other => other.type_name(),
                                }
                            )))
                        }
                    }
                }
                // BUILD: the state (OrderedDict `_metadata`, tensor attributes) is irrelevant.
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            return Err(self.bad(format!("BUILD on {}", other.type_name())));
                        }
                    }
                }
                // BINPERSID
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.stack.push(v);
                }
                // POP / POP_MARK / DUP
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                other => {
                    return Err(TorchBinError::UnsupportedOpcode {
                        path: self.path.to_path_buf(),
                        opcode: other,
                        offset: self.op_start,
                    });
                }
            }
        }
    }
}

/// Decode a little-endian two's-complement integer (LONG1 / LONG4 payload).
fn decode_long(bytes: &[u8]) -> Option<i64> {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0x00 };
    let mut buf = [fill; 8];
    for (dst, src) in buf.iter_mut().zip(bytes) {
        *dst = *src;
    }
    let v = i64::from_le_bytes(buf);
    // Bytes beyond the eighth must be pure sign extension.
    let rest_ok = bytes.iter().skip(8).all(|&b| b == fill);
    (rest_ok && (v < 0) == negative).then_some(v)
}

/// Human-readable opcode for error messages: hex byte, printable char, pickle name.
fn describe_opcode(op: &u8) -> String {
    let name = match *op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    };
    if op.is_ascii_graphic() {
        format!("0x{op:02x} ('{}', {name})", char::from(*op))
    } else {
        format!("0x{op:02x} ({name})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn fixture(name: &str) -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch_bin")).join(name)
    }

    fn to_f32(t: &TorchTensor) -> Vec<f32> {
        match t.dtype {
            TorchDType::F32 => {
                t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            TorchDType::F16 => {
                t.data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            TorchDType::BF16 => {
                t.data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
        }
    }

    /// Compare every tensor against the JSON written by tools/make_torch_bin_fixtures.py.
    fn check_against_json(tensors: &[TorchTensor], json_name: &str) {
        let text = std::fs::read_to_string(fixture(json_name)).expect("read json");
        let json: serde_json::Value = serde_json::from_str(&text).expect("parse json");
        let expected = json.as_object().expect("json object");
        assert_eq!(tensors.len(), expected.len(), "tensor count");
        for t in tensors {
            let e = expected.get(&t.name).unwrap_or_else(|| panic!("unexpected tensor {}", t.name));
            let dtype = match e["dtype"].as_str().expect("dtype") {
                "F32" => TorchDType::F32,
                "F16" => TorchDType::F16,
                "BF16" => TorchDType::BF16,
                other => panic!("bad dtype {other}"),
            };
            assert_eq!(t.dtype, dtype, "{}", t.name);
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|v| v.as_u64().expect("dim") as usize)
                .collect();
            assert_eq!(t.shape, shape, "{}", t.name);
            let numel: usize = shape.iter().product();
            assert_eq!(t.data.len(), numel * elem_size(dtype), "{}", t.name);
            let want: Vec<f32> = e["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|v| v.as_f64().expect("value") as f32)
                .collect();
            let got = to_f32(t);
            assert_eq!(got.len(), want.len(), "{}", t.name);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{}[{i}]: got {g}, want {w}", t.name);
            }
        }
    }

    fn names(tensors: &[TorchTensor]) -> Vec<&str> {
        tensors.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn reads_plain_dict_fixture() {
        let tensors = read_torch_bin(&fixture("state_dict.bin")).expect("read");
        assert_eq!(
            names(&tensors),
            [
                "layer.weight",
                "layer.bias_f16",
                "block.bf16_3d",
                "base",
                "transposed",
                "shared_a",
                "shared_b",
                "scalar1",
                "stepped_f16",
                "tagged",
            ]
        );
        check_against_json(&tensors, "state_dict.json");
        let get = |n: &str| tensors.iter().find(|t| t.name == n).expect(n);
        // Spot checks independent of the JSON.
        assert_eq!(get("transposed").shape, [4, 3]);
        assert_eq!(to_f32(get("transposed"))[..4], [100.0, 104.0, 108.0, 101.0]);
        assert_eq!(to_f32(get("shared_a")), [-1.5, -2.5, -3.5]);
        assert_eq!(to_f32(get("shared_b")), [-5.5, -6.5, -7.5, -8.5, -9.5]);
        assert_eq!(to_f32(get("scalar1")), [3.25]);
        assert_eq!(get("scalar1").shape, [1]);
        assert_eq!(get("block.bf16_3d").dtype, TorchDType::BF16);
        assert_eq!(to_f32(get("tagged")), [0.25, -0.75]);
    }

    #[test]
    fn reads_ordered_dict_fixture() {
        let tensors = read_torch_bin(&fixture("ordered.bin")).expect("read");
        assert_eq!(names(&tensors), ["0.weight", "0.bias", "1.weight", "1.bias", "extra_param"]);
        check_against_json(&tensors, "ordered.json");
    }

    #[test]
    fn reads_protocol4_fixture() {
        let tensors = read_torch_bin(&fixture("protocol4.bin")).expect("read");
        assert_eq!(names(&tensors), ["long_f16", "scalar0", "empty", "bf16_t"]);
        check_against_json(&tensors, "protocol4.json");
        let scalar = &tensors[1];
        assert!(scalar.shape.is_empty());
        assert_eq!(to_f32(scalar), [-7.5]);
        assert!(tensors[2].data.is_empty());
    }

    // --- helpers for synthetic archives ---

    fn read_all_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).expect("zip");
        (0..archive.len())
            .map(|i| {
                let mut f = archive.by_index(i).expect("entry");
                let mut data = Vec::new();
                f.read_to_end(&mut data).expect("read entry");
                (f.name().to_string(), data)
            })
            .collect()
    }

    fn write_zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            w.start_file(name.as_str(), opts).expect("start");
            w.write_all(data).expect("write");
        }
        w.finish().expect("finish").into_inner()
    }

    /// Rebuild a fixture archive, letting `edit` replace (Some) or drop (None) entries.
    fn rezip(fixture_name: &str, mut edit: impl FnMut(&str, Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
        let original = std::fs::read(fixture(fixture_name)).expect("fixture");
        let entries: Vec<(String, Vec<u8>)> = read_all_entries(&original)
            .into_iter()
            .filter_map(|(name, data)| edit(&name, data).map(|d| (name, d)))
            .collect();
        write_zip(&entries)
    }

    fn read_bytes(bytes: &[u8]) -> Result<Vec<TorchTensor>, TorchBinError> {
        read_from_reader(Cursor::new(bytes), Path::new("mem.bin"))
    }

    fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let pos = haystack.windows(from.len()).position(|w| w == from).expect("pattern present");
        let mut out = haystack[..pos].to_vec();
        out.extend_from_slice(to);
        out.extend_from_slice(&haystack[pos + from.len()..]);
        out
    }

    fn pickle_only(pickle: Vec<u8>) -> Vec<u8> {
        write_zip(&[
            ("archive/data.pkl".to_string(), pickle),
            ("archive/byteorder".to_string(), b"little".to_vec()),
        ])
    }

    #[test]
    fn rezipped_fixture_still_reads() {
        let bytes = rezip("state_dict.bin", |_, d| Some(d));
        let tensors = read_bytes(&bytes).expect("read");
        check_against_json(&tensors, "state_dict.json");
    }

    #[test]
    fn error_not_a_zip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("garbage.bin");
        std::fs::write(&p, b"this is not a zip file at all").expect("write");
        let err = read_torch_bin(&p).expect_err("must fail");
        assert!(matches!(err, TorchBinError::NotZip { .. }), "{err}");
        assert!(err.to_string().contains("garbage.bin"), "{err}");
    }

    #[test]
    fn error_missing_file() {
        let err = read_torch_bin(Path::new("/nonexistent/dir/model.bin")).expect_err("fail");
        assert!(matches!(err, TorchBinError::Io { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/dir/model.bin"));
    }

    #[test]
    fn error_missing_data_pkl() {
        let bytes = rezip("state_dict.bin", |name, d| (!name.ends_with("data.pkl")).then_some(d));
        let err = read_bytes(&bytes).expect_err("fail");
        assert!(matches!(err, TorchBinError::MissingDataPkl { .. }), "{err}");
        assert!(err.to_string().contains("mem.bin"), "{err}");
    }

    #[test]
    fn error_big_endian() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("big.bin");
        let bytes = rezip("state_dict.bin", |name, d| {
            Some(if name.ends_with("/byteorder") { b"big".to_vec() } else { d })
        });
        std::fs::write(&p, bytes).expect("write");
        let err = read_torch_bin(&p).expect_err("fail");
        assert!(
            matches!(&err, TorchBinError::UnsupportedByteOrder { byteorder, .. } if byteorder == "big"),
            "{err}"
        );
        assert!(err.to_string().contains("big.bin"), "{err}");
    }

    #[test]
    fn missing_byteorder_means_little() {
        let bytes = rezip("state_dict.bin", |name, d| (!name.ends_with("/byteorder")).then_some(d));
        check_against_json(&read_bytes(&bytes).expect("read"), "state_dict.json");
    }

    #[test]
    fn error_disallowed_global() {
        let bytes = rezip("state_dict.bin", |name, d| {
            Some(if name.ends_with("data.pkl") {
                replace(&d, b"ccollections\nOrderedDict\n", b"cos\nsystem\n")
            } else {
                d
            })
        });
        let err = read_bytes(&bytes).expect_err("fail");
        assert!(
            matches!(&err, TorchBinError::DisallowedGlobal { global, .. } if global == "os.system"),
            "{err}"
        );
        assert!(err.to_string().contains("os.system"));
    }

    #[test]
    fn error_unsupported_dtype() {
        let bytes = rezip("state_dict.bin", |name, d| {
            Some(if name.ends_with("data.pkl") {
                replace(&d, b"torch\nFloatStorage\n", b"torch\nDoubleStorage\n")
            } else {
                d
            })
        });
        let err = read_bytes(&bytes).expect_err("fail");
        assert!(
            matches!(&err, TorchBinError::UnsupportedDType { storage, .. } if storage == "torch.DoubleStorage"),
            "{err}"
        );
    }

    #[test]
    fn error_missing_storage() {
        let bytes = rezip("state_dict.bin", |name, d| (!name.ends_with("/data/2")).then_some(d));
        let err = read_bytes(&bytes).expect_err("fail");
        assert!(matches!(&err, TorchBinError::MissingStorage { key, .. } if key == "2"), "{err}");
    }

    #[test]
    fn error_out_of_bounds() {
        // Shrink the storage of `layer.weight` (key 0, 6 floats) to 5 floats.
        let bytes = rezip("state_dict.bin", |name, mut d| {
            if name.ends_with("/data/0") {
                d.truncate(20);
            }
            Some(d)
        });
        let err = read_bytes(&bytes).expect_err("fail");
        assert!(
            matches!(&err, TorchBinError::OutOfBounds { name, key, .. } if name == "layer.weight" && key == "0"),
            "{err}"
        );
    }

    #[test]
    fn error_unsupported_opcode() {
        // INST is never emitted by torch.save.
        let err = read_bytes(&pickle_only(b"\x80\x02i".to_vec())).expect_err("fail");
        assert!(matches!(err, TorchBinError::UnsupportedOpcode { opcode: b'i', offset: 2, .. }), "{err}");
        assert!(err.to_string().contains("0x69"), "{err}");
        assert!(err.to_string().contains("INST"), "{err}");
    }

    #[test]
    fn error_not_a_tensor_dict() {
        // {'a': 1}
        let err = read_bytes(&pickle_only(b"\x80\x02}X\x01\x00\x00\x00aK\x01s.".to_vec())).expect_err("fail");
        assert!(matches!(err, TorchBinError::NotTensorDict { .. }), "{err}");
        // [] at top level
        let err = read_bytes(&pickle_only(b"\x80\x02].".to_vec())).expect_err("fail");
        assert!(matches!(err, TorchBinError::NotTensorDict { .. }), "{err}");
    }

    #[test]
    fn empty_dict_is_ok() {
        let tensors = read_bytes(&pickle_only(b"\x80\x02}.".to_vec())).expect("read");
        assert!(tensors.is_empty());
    }

    #[test]
    fn pickle_ints_and_misc_opcodes() {
        let path = Path::new("x");
        // (BININT -5, LONG1 2**40, LONG1 -1, BININT2 513, BINFLOAT 1.5, None, True,
        //  a str and its DUP, [7] via LIST + APPEND)
        let mut p = b"\x80\x02(J\xfb\xff\xff\xff\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x01\xff".to_vec();
        p.extend_from_slice(b"M\x01\x02G\x3f\xf8\x00\x00\x00\x00\x00\x00N\x88");
        p.extend_from_slice(b"X\x01\x00\x00\x00z2(lK\x07at.");
        let v = Unpickler::new(&p, path).run().expect("run");
        let Value::Tuple(items) = &v else { panic!("not a tuple") };
        assert_eq!(items.len(), 10);
        assert!(matches!(items[0], Value::Int(-5)));
        assert!(matches!(items[1], Value::Int(v) if v == 1 << 40));
        assert!(matches!(items[2], Value::Int(-1)));
        assert!(matches!(items[3], Value::Int(513)));
        assert!(matches!(items[4], Value::Float));
        assert!(matches!(items[5], Value::None));
        assert!(matches!(items[6], Value::Bool(true)));
        assert!(matches!(&items[7], Value::Str(s) if &**s == "z"));
        assert!(matches!(&items[8], Value::Str(s) if &**s == "z"));
        assert!(matches!(&items[9], Value::List(l) if l.borrow().len() == 1));

        assert_eq!(decode_long(&[]), Some(0));
        assert_eq!(decode_long(&[0xff, 0x7f]), Some(32767));
        assert_eq!(decode_long(&[0x00, 0x80]), Some(-32768));
        assert_eq!(decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0xff]), Some(i64::MIN));
        assert_eq!(decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0x00]), None);
        assert_eq!(decode_long(&[1, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn deeply_nested_pickle_does_not_overflow() {
        let mut p = b"\x80\x02N".to_vec();
        p.resize(p.len() + 1_000_000, 0x85);
        p.push(b'.');
        let err = read_bytes(&pickle_only(p)).expect_err("fail");
        assert!(matches!(err, TorchBinError::NotTensorDict { .. }), "{err}");

        // Self-referencing list (a cycle) must not hang or crash.
        let p = b"\x80\x02]q\x00h\x00a}q\x01X\x01\x00\x00\x00kh\x00s0h\x01.".to_vec();
        let err = read_bytes(&pickle_only(p)).expect_err("fail");
        assert!(matches!(err, TorchBinError::NotTensorDict { .. }), "{err}");
    }

    fn assert_same(a: &[TorchTensor], b: &[TorchTensor]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.name, y.name);
            assert_eq!(x.dtype, y.dtype);
            assert_eq!(x.shape, y.shape);
            assert_eq!(x.data, y.data);
        }
    }

    #[test]
    fn fuzz_truncated_and_flipped_files() {
        for fixture_name in ["state_dict.bin", "ordered.bin", "protocol4.bin"] {
            let original = std::fs::read(fixture(fixture_name)).expect("fixture");
            let good = read_bytes(&original).expect("original reads");

            // Every truncation of the file fails.
            for len in 0..original.len() {
                assert!(
                    read_bytes(&original[..len]).is_err(),
                    "{fixture_name} truncated to {len} bytes was accepted"
                );
            }

            // Byte flips: either rejected, or (flip in a byte the reader does
            // not depend on) the very same result.
            for pos in 0..original.len() {
                for mask in [0x01u8, 0x80, 0xff] {
                    let mut bytes = original.clone();
                    bytes[pos] ^= mask;
                    if let Ok(t) = read_bytes(&bytes) {
                        assert_same(&t, &good);
                    }
                }
            }
        }
    }

    #[test]
    fn fuzz_mutated_pickle() {
        // Mutations behind a valid zip (CRC recomputed) reach the pickle VM.
        for fixture_name in ["state_dict.bin", "ordered.bin", "protocol4.bin"] {
            let original = std::fs::read(fixture(fixture_name)).expect("fixture");
            let entries = read_all_entries(&original);
            let pkl_idx = entries.iter().position(|(n, _)| n.ends_with("/data.pkl")).expect("data.pkl");
            let pickle = entries[pkl_idx].1.clone();
            let with_pickle = |p: Vec<u8>| {
                let mut e = entries.clone();
                e[pkl_idx].1 = p;
                write_zip(&e)
            };

            for len in 0..pickle.len() {
                let err = read_bytes(&with_pickle(pickle[..len].to_vec()));
                assert!(err.is_err(), "{fixture_name}: pickle cut at {len} accepted");
            }
            for pos in 0..pickle.len() {
                for val in [0x00u8, 0x01, 0x7f, 0x80, 0xff, b'(', b'.', b'h', b'R'] {
                    let mut p = pickle.clone();
                    p[pos] = val;
                    // Must not panic; Ok or Err are both acceptable.
                    let _ = read_bytes(&with_pickle(p));
                }
            }
        }
    }
}

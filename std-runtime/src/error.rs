//! Errors of the runtime. Each names the file, tensor or value at fault.

use std::path::PathBuf;

use mamba_core::CoreError;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {what}")]
    NotFound { path: PathBuf, what: String },
    #[error(
        "model `{repo}` is not a directory and is not in the local Hugging Face cache \
         (looked in {searched}); download it first, e.g. `huggingface-cli download {repo}` \
         (or `hf download {repo}`), or pass the path of a model directory"
    )]
    NotInCache { repo: String, searched: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: `{key}`: {msg}")]
    ConfigValue { path: PathBuf, key: String, msg: String },
    #[error("{path}: unsupported: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error(transparent)]
    TorchBin(#[from] crate::torch_bin::TorchBinError),
    #[error("tensor `{name}` is missing from {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` in {file} has shape {got:?}, expected {expected:?}")]
    TensorShape { name: String, file: PathBuf, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor `{name}` in {file} has unsupported dtype {dtype} (supported: F32, F16, BF16, and I8 with F16 scales for Q8_0)")]
    TensorDtype { name: String, file: PathBuf, dtype: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

//! Errors of the CUDA backend: each says what failed and why, never a panic.

use mamba_core::CoreError;

/// Anything that can go wrong between loading CUDA and reading logits back.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded (no driver, no toolkit on the loader path).
    #[error("no CUDA {what} found ({lib}): {why}")]
    Missing { what: &'static str, lib: &'static str, why: String },
    /// The driver is there but has no device with this index.
    #[error("no CUDA device {index}: {why}")]
    NoDevice { index: usize, why: String },
    /// A CUDA driver call failed.
    #[error("CUDA driver error while {during}: {source}")]
    Driver {
        during: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error while {during}: {status}")]
    Cublas { during: &'static str, status: String },
    /// NVRTC could not compile a kernel file.
    #[error("NVRTC could not compile {file} for {arch}: {log}")]
    Compile { file: &'static str, arch: String, log: String },
    /// Weights, batches or buffers that do not fit (the same checks as the CPU backend).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A request the backend cannot serve, with the reason.
    #[error("{0}")]
    Input(String),
}

impl CudaError {
    /// A `map_err` adapter for driver calls.
    pub fn driver(during: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
        move |source| CudaError::Driver { during, source }
    }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

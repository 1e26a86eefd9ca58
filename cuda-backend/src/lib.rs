//! `mamba-cuda`: the Mamba-1 operator trait ([`mamba_core::MambaOps`]) on
//! NVIDIA GPUs.
//!
//! CUDA is loaded at run time (cudarc, dynamic loading): the crate builds on
//! machines without CUDA, and every entry point returns a [`CudaError`]
//! naming what is missing instead of panicking.
//!
//! - [`probe`]: can the driver, NVRTC and cuBLAS be loaded?
//! - [`compile`]: the CUDA C++ kernels (`kernels/*.cu`), compiled with NVRTC
//!   for the device's architecture and cached.
//! - [`CudaBackend`] (`device`, `ops`, `gemm`): one device and stream; the
//!   operator trait over [`DeviceBuf`] and [`DeviceWeight`].
//! - [`DeviceModel`], [`CudaSession`]: a model uploaded to the device, a
//!   state pool in device memory, prefill and step as the CPU runtime has them.
//!
//! Environment variables: `MAMBA_CUDA_INCLUDE`, `MAMBA_CUDA_CACHE` (see
//! [`compile`]); the libraries are found through `LD_LIBRARY_PATH`.
#![deny(unsafe_code)]

mod buf;
pub mod compile;
mod device;
pub mod error;
mod gemm;
mod model;
mod ops;
pub mod plan;
pub mod probe;
mod session;
mod weight;

pub use buf::DeviceBuf;
pub use device::CudaBackend;
pub use error::{CudaError, Result};
pub use model::DeviceModel;
pub use session::{slots_for_memory, CudaSession, DeviceSampling, LogitsMode, DEFAULT_CHUNK_TOKENS};
pub use weight::{transposed_f32, upload_f32, upload_f32_transposed, upload_stored, DeviceWeight};

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
#![deny(unsafe_code)]

pub mod compile;
pub mod error;
pub mod probe;

pub use error::{CudaError, Result};

//! `mamba-core`: the whole Mamba-1 forward pass over caller-provided buffers.
//!
//! `no_std`, no `alloc`, no allocation. Weights are read in their stored
//! type (f32, f16, bf16) straight from the caller's bytes and widened in
//! registers; activations and the recurrent states are f32.
//!
//! The pieces:
//! - [`config`]: model dimensions, the fixed-size state layout and the
//!   scratch a prefill or a step needs ([`Footprint`]).
//! - [`tensor`]: borrowed weight views in their stored dtype.
//! - [`kernels`]: scalar reference kernels over slices.
//! - [`ops`]: the operator trait every backend implements.
//! - [`cpu`]: the CPU backend, built on [`kernels`].
//! - [`driver`]: the layer loop for ragged prefill and batched step,
//!   written once, generic over [`ops::MambaOps`].
#![no_std]
// Unsafe code lives only in `kernels::simd` (target-feature SIMD).
#![deny(unsafe_code)]

pub mod config;
pub mod cpu;
pub mod driver;
pub mod error;
pub mod kernels;
pub mod model;
pub mod ops;
mod shares;
pub mod tensor;

pub use config::{Footprint, MambaConfig, StateLayout, MAX_D_CONV, MAX_D_STATE};
pub use cpu::{CpuBackend, Parallel, Sequential};
pub use driver::{next_chunk, prefill, step, ChunkPiece, LogitsMode, Ragged, Scratch, ScratchPlan};
pub use error::CoreError;
pub use model::{LayerWeights, Model};
pub use ops::{Layer, MambaOps};
pub use tensor::{DType, Tensor, WData, Q8_BLOCK};

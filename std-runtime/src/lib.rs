//! `mamba-runtime`: loading real Mamba checkpoints and running them.
//!
//! - [`hub`]: resolve `--model` (a directory or a local Hugging Face cache entry).
//! - [`config`], [`weights`], [`torch_bin`], [`model`]: checkpoints in the
//!   Hugging Face and original `state-spaces` layouts.
//! - [`session`]: state slots, chunked ragged prefill and batched steps on the CPU backend.
//! - [`device`]: the same on a CUDA device (`--device cuda`, crate `mamba-cuda`).
//! - [`tokenizer`], [`sampling`]: text in and out.
#![deny(unsafe_code)]

pub mod aligned;
pub mod bench;
pub mod config;
pub mod convert;
pub mod cpu;
pub mod device;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod model;
pub mod parallel;
pub mod profile;
pub mod quantize;
pub mod sampling;
pub mod server;
pub mod session;
// The thread pool hands borrowed task functions to its workers.
#[allow(unsafe_code)]
pub mod spin_pool;
pub mod synthetic;
pub mod tokenizer;
pub mod torch_bin;
pub mod weights;

pub use error::{Error, Result};

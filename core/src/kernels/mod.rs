//! Scalar reference kernels over caller slices, f32 compute.
//!
//! Each kernel documents the shapes it reads and writes. They do not check
//! shapes themselves: the backend validates once per call, then dispatches.

pub mod act;
// Its x86-64 tiles and their constants are unused on other targets.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub mod avx512;
pub mod conv;
pub mod dot;
pub mod embed;
pub mod linear;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub mod neon;
pub mod norm;
pub mod scan;
pub mod scan_avx512;
pub mod simd;

pub use act::{silu, softplus};
pub use conv::{conv1d_seq, conv1d_step};
pub use dot::{dot, dot4, dot_portable};
pub use embed::embed_rows;
pub use linear::{dt_proj_softplus, linear};
pub use norm::rms_norm;
pub use scan::{
    a_from_a_log, gate_silu, selective_scan_channels, selective_scan_seq, selective_scan_step, ScanRows,
};

//! Scalar reference kernels over caller slices, f32 compute.
//!
//! Each kernel documents the shapes it reads and writes. They do not check
//! shapes themselves: the backend validates once per call, then dispatches.

pub mod act;
// Its x86-64 tiles and their constants are unused on other targets.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub mod avx512;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub mod bf16_avx512;
pub mod conv;
pub mod conv_avx512;
pub mod dot;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub mod dt_avx512;
pub mod embed;
pub mod linear;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub mod neon;
pub mod norm;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub mod q8_avx512;
pub mod scan;
pub mod scan_avx512;
pub mod simd;

pub use act::{silu, softplus};

/// `dst[..src.len()] = src` for the short runs the products and the scan
/// hand out (3, 16 or 64 values, or 1): fixed-size copies for those, which
/// compile to a few moves where a general copy is a call to memmove.
#[inline(always)]
pub fn copy_run(dst: &mut [f32], src: &[f32]) {
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32]) -> bool {
        let n = src.len().min(dst.len());
        match (<&mut [f32; N]>::try_from(&mut dst[..n]), <&[f32; N]>::try_from(src)) {
            (Ok(d), Ok(s)) => {
                *d = *s;
                true
            }
            _ => false,
        }
    }
    if !(fixed::<1>(dst, src) || fixed::<3>(dst, src) || fixed::<16>(dst, src) || fixed::<64>(dst, src)) {
        dst[..src.len()].copy_from_slice(src);
    }
}
pub use conv::{conv1d_channels, conv1d_seq, conv1d_step};
pub use dot::{dot, dot4, dot_portable};
pub use embed::embed_rows;
pub use linear::{dt_proj_softplus, linear, linear_strided};
pub use norm::rms_norm;
pub use scan::{a_from_a_log, selective_scan_channels, selective_scan_seq, selective_scan_step, ScanRows};

#[cfg(test)]
mod tests {
    #[test]
    fn copy_run_copies_every_length_into_a_longer_destination() {
        for n in [0, 1, 2, 3, 4, 15, 16, 17, 63, 64, 65] {
            let src: [f32; 70] = core::array::from_fn(|i| i as f32 + 0.5);
            let mut dst = [-1.0f32; 70];
            super::copy_run(&mut dst[2..], &src[..n]);
            assert_eq!(&dst[2..2 + n], &src[..n], "length {n}");
            assert!(dst[..2].iter().chain(&dst[2 + n..]).all(|&v| v == -1.0), "length {n}: wrote outside");
        }
    }
}

//! Dot products of a stored weight row with f32 activation rows.
//!
//! The portable code keeps eight independent accumulators so the compiler
//! can vectorise; bf16 and f16 are widened in registers, never copied. On
//! x86-64 with AVX2/FMA switched on ([`super::simd::enable_avx2`]) the
//! explicit SIMD kernels run instead; on aarch64 the NEON ones
//! (`kernels::neon`) always do.

use crate::tensor::{bf16_to_f32, q8_weight, WData, Q8_BLOCK};
use half::f16;

/// `sum_i w[i] * x[i]` over the shorter of the two.
#[inline]
pub fn dot(w: WData<'_>, x: &[f32]) -> f32 {
    if let Some(v) = super::avx512::dot(w, x) {
        return v;
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2_enabled() {
        use super::simd::x86;
        // SAFETY: enable_avx2's contract: the CPU has AVX2, FMA and F16C.
        #[allow(unsafe_code)]
        unsafe {
            return match w {
                WData::F32(a) => x86::dot_f32(a, x),
                WData::F16(a) => x86::dot_f16(a, x),
                WData::BF16(a) => x86::dot_bf16(a, x),
                WData::Q8_0 { q, d } => x86::dot_q8(q, d, x),
            };
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    return super::neon::dot(w, x);
    #[cfg(not(all(target_arch = "aarch64", target_feature = "neon")))]
    dot_portable(w, x)
}

/// Four activation rows against one weight row (a 1 x 4 block of a matrix product).
#[inline]
pub fn dot4(w: WData<'_>, x: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2_enabled() {
        use super::simd::x86;
        // SAFETY: enable_avx2's contract: the CPU has AVX2, FMA and F16C.
        #[allow(unsafe_code)]
        unsafe {
            return match w {
                WData::F32(a) => x86::dot4_f32(a, x),
                WData::F16(a) => x86::dot4_f16(a, x),
                WData::BF16(a) => x86::dot4_bf16(a, x),
                WData::Q8_0 { q, d } => x86::dot4_q8(q, d, x),
            };
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    return super::neon::dot4(w, x);
    #[cfg(not(all(target_arch = "aarch64", target_feature = "neon")))]
    x.map(|r| dot_portable(w, r))
}

/// Lanes of the partial sums that the element-wise kernels keep (one AVX-512
/// register of f32; the compiler splits it for narrower vectors).
pub(crate) const LANES: usize = 16;

/// The sum of [`LANES`] partial sums, added in one fixed tree, so every
/// instruction set gives the same bits.
#[inline(always)]
pub(crate) fn lane_sum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}

/// The portable reference.
#[inline]
pub fn dot_portable(w: WData<'_>, x: &[f32]) -> f32 {
    match w {
        WData::F32(a) => dot_with(a, x, |v| v),
        WData::F16(a) => dot_with(a, x, |v| v.to_f32()),
        WData::BF16(a) => dot_with(a, x, bf16_to_f32),
        WData::Q8_0 { q, d } => dot_q8(q, d, x),
    }
}

/// Q8_0 in [`dot_with`]'s order: the same bits as the f32 dot product over
/// the dequantized weights (each `q * d` is exact).
#[inline(always)]
fn dot_q8(q: &[i8], d: &[f16], x: &[f32]) -> f32 {
    let n = q.len().min(x.len()).min(d.len() * Q8_BLOCK);
    let mut acc = [0.0f32; 8];
    let mut i = 0;
    while i + 8 <= n {
        // A chunk of 8 never straddles a block of 32.
        let s = d[i / Q8_BLOCK].to_f32();
        for (j, a) in acc.iter_mut().enumerate() {
            *a += (q[i + j] as f32 * s) * x[i + j];
        }
        i += 8;
    }
    let mut tail = 0.0f32;
    while i < n {
        tail += q8_weight(q[i], d[i / Q8_BLOCK]) * x[i];
        i += 1;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline(always)]
fn dot_with<T: Copy>(a: &[T], x: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    let n = a.len().min(x.len());
    let (a, x) = (&a[..n], &x[..n]);
    let mut acc = [0.0f32; 8];
    let mut ac = a.chunks_exact(8);
    let mut xc = x.chunks_exact(8);
    for (ca, cx) in (&mut ac).zip(&mut xc) {
        for i in 0..8 {
            acc[i] += widen(ca[i]) * cx[i];
        }
    }
    let mut tail = 0.0f32;
    for (&va, &vx) in ac.remainder().iter().zip(xc.remainder()) {
        tail += widen(va) * vx;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn dot_agrees_across_dtypes() {
        let mut w = [0.0f32; 37];
        let mut x = [0.0f32; 37];
        for i in 0..37 {
            w[i] = (i as f32 * 0.37).sin();
            x[i] = (i as f32 * 0.11).cos();
        }
        let want: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((dot(WData::F32(&w), &x) as f64 - want).abs() < 1e-5);
        let wb: [bf16; 37] = core::array::from_fn(|i| bf16::from_f32(w[i]));
        let want_b: f64 = wb.iter().zip(&x).map(|(a, &b)| a.to_f64() * b as f64).sum();
        assert!((dot(WData::BF16(&wb), &x) as f64 - want_b).abs() < 1e-5);
        let wh: [f16; 37] = core::array::from_fn(|i| f16::from_f32(w[i]));
        let want_h: f64 = wh.iter().zip(&x).map(|(a, &b)| a.to_f64() * b as f64).sum();
        assert!((dot(WData::F16(&wh), &x) as f64 - want_h).abs() < 1e-5);
    }
}

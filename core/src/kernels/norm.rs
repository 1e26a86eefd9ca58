//! RMSNorm with f32 accumulation.

use super::dot::{lane_sum, LANES};
use super::simd::multiversion;
use crate::tensor::WData;

multiversion! {
    /// For each row of `x` (`[rows, w.len()]`): `out = x / sqrt(mean(x^2) + eps) * w`.
    pub fn rms_norm(x: &[f32], w: WData<'_>, eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let inv = 1.0 / libm::sqrtf(sum_squares(xr) / d as f32 + eps);
            match w {
                WData::F32(ws) => scale(xr, ws, inv, |v| v, or),
                WData::F16(ws) => scale_f16(xr, ws, inv, or),
                WData::BF16(ws) => scale(xr, ws, inv, crate::tensor::bf16_to_f32, or),
                // Never loaded so (validate refuses it); exact all the same.
                WData::Q8_0 { .. } => {
                    for (i, (o, &v)) in or.iter_mut().zip(xr).enumerate() {
                        *o = v * inv * w.get(i);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut blocks = x.chunks_exact(LANES);
    for b in &mut blocks {
        for j in 0..LANES {
            acc[j] += b[j] * b[j];
        }
    }
    for (j, v) in blocks.remainder().iter().enumerate() {
        acc[j] += v * v;
    }
    lane_sum(acc)
}

/// [`scale`] for f16 weights, widened a block at a time through F16C
/// ([`super::simd::widen_f16`]): `half`'s own conversion is software in
/// this crate (an f16 norm took 3.3x an f32 one). Kept out of line, so the
/// other dtypes' loops compile as before.
#[inline(never)]
fn scale_f16(x: &[f32], w: &[half::f16], inv: f32, out: &mut [f32]) {
    let mut wide = [0.0f32; 64];
    for ((xc, oc), wc) in x.chunks(64).zip(out.chunks_mut(64)).zip(w.chunks(64)) {
        let wide = &mut wide[..wc.len()];
        super::simd::widen_f16(wc, wide);
        scale(xc, wide, inv, |v| v, oc);
    }
}

#[inline(always)]
fn scale<T: Copy>(x: &[f32], w: &[T], inv: f32, widen: impl Fn(T) -> f32, out: &mut [f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * widen(g);
    }
}

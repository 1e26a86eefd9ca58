//! RMSNorm with f32 accumulation.

use crate::tensor::WData;

/// For each row of `x` (`[rows, w.len()]`): `out = x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: WData<'_>, eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / libm::sqrtf(ss / d as f32 + eps);
        for (i, (o, &v)) in or.iter_mut().zip(xr).enumerate() {
            *o = v * inv * w.get(i);
        }
    }
}

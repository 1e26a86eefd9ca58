//! Linear layers: `y = x W^T + b` with W stored `[out, in]` in any dtype.

use super::simd::multiversion;
use super::{
    act::softplus,
    dot::{dot, dot4},
};
use crate::tensor::Tensor;

/// Output features `f0..f1` for `rows` rows of `x` (`[rows, in]`):
/// `store(t, o, v)` hands token `t`'s features `o..o + v.len()`, each
/// `dot(w[o], x[t]) + bias[o]` (runs of one or a few consecutive features).
///
/// With AVX-512 the product runs in register tiles over panels of weight
/// rows ([`super::avx512`]). Otherwise features are the outer loop so each
/// weight row is read from memory once and reused, from cache, for every
/// row of `x`, four tokens at a time.
pub fn linear(
    x: &[f32],
    rows: usize,
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    features: (usize, usize),
    store: impl FnMut(usize, usize, &[f32]),
) {
    linear_strided((x, w.cols), rows, w, bias, features, store)
}

/// [`linear`] over rows of `x` that are `x_stride` apart (the first `in`
/// values of each are the row), such as dt_proj's columns of `x_proj`'s output.
pub fn linear_strided(
    (x, x_stride): (&[f32], usize),
    rows: usize,
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    (f0, f1): (usize, usize),
    mut store: impl FnMut(usize, usize, &[f32]),
) {
    if super::avx512::linear((x, x_stride), rows, w, bias, (f0, f1), &mut store) {
        return;
    }
    let k = w.cols;
    let xr = |t: usize| &x[t * x_stride..t * x_stride + k];
    for o in f0..f1 {
        let wr = w.row(o);
        let b = bias.map_or(0.0, |b| b.data.get(o));
        // Blocks of four tokens share each widened weight load.
        let mut t = 0;
        while t + 4 <= rows {
            let d = dot4(wr, [xr(t), xr(t + 1), xr(t + 2), xr(t + 3)]);
            for (j, v) in d.into_iter().enumerate() {
                store(t + j, o, &[v + b]);
            }
            t += 4;
        }
        for t in t..rows {
            store(t, o, &[dot(wr, xr(t)) + b]);
        }
    }
}

multiversion! {
    /// `dt[t, d - f0] = softplus(dt_proj[d] . dbc[t, 0..dt_rank] + dt_bias[d])`
    /// for channels `d` in `f0..f1`. `dbc`: `[rows, dbc_stride]`, `dt_proj`:
    /// `[d_inner, dt_rank]`, `dt`: `[rows, f1 - f0]`. A channel's value does
    /// not depend on the range it is computed in. `dt_proj_t`, the weight
    /// transposed in blocks of 64 channels ([`super::dt_avx512::blocked_at`]),
    /// is what the AVX-512 kernel reads; without it, or in other modes, the
    /// product reads `dt_proj`.
    #[allow(clippy::too_many_arguments)]
    pub fn dt_proj_softplus(
        dbc: &[f32],
        dbc_stride: usize,
        rows: usize,
        dt_proj: &Tensor<'_>,
        dt_proj_t: Option<&Tensor<'_>>,
        dt_bias: &Tensor<'_>,
        channels: (usize, usize),
        dt: &mut [f32],
    ) {
        let (f0, width) = (channels.0, channels.1 - channels.0);
        let shape = (dt_proj.rows, dt_proj.cols);
        let done = dt_proj_t.is_some_and(|wt| {
            super::dt_avx512::dt_proj_t((dbc, dbc_stride), rows, wt, shape, dt_bias, channels, dt)
        });
        // dt_rank's columns of each dbc row are the product's rows (read in place).
        if !done {
            linear_strided((dbc, dbc_stride), rows, dt_proj, Some(dt_bias), channels, |t, d, v| {
                super::copy_run(&mut dt[t * width + d - f0..], v)
            });
        }
        // A separate pass, so the branch-free softplus vectorises.
        for o in dt[..rows * width].iter_mut() {
            *o = softplus(*o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::WData;

    #[test]
    fn dt_proj_is_softplus_of_a_dot_per_channel_for_any_rank_rows_and_range() {
        const DI: usize = 8;
        // 48 (the 130m rank) and 200 (wider than any published one), rows read in place.
        for r in [48usize, 200] {
            let w: [f32; DI * 200] = core::array::from_fn(|i| ((i as f32) * 0.37).sin() * 0.2);
            let bias: [f32; DI] = core::array::from_fn(|i| i as f32 * 0.1 - 0.3);
            let (w, bias) =
                (Tensor::new(WData::F32(&w[..DI * r]), DI, r, "w").unwrap(), Tensor::vector_f32(&bias));
            let stride = r + 3;
            let dbc: [f32; 6 * 203] = core::array::from_fn(|i| ((i as f32) * 0.11).cos());
            for rows in [1, 5] {
                for (f0, f1) in [(0, DI), (3, 7)] {
                    let mut dt = [f32::NAN; 5 * DI];
                    dt_proj_softplus(&dbc, stride, rows, &w, None, &bias, (f0, f1), &mut dt);
                    let width = f1 - f0;
                    for t in 0..rows {
                        for d in f0..f1 {
                            let x = &dbc[t * stride..t * stride + r];
                            let want = softplus(dot(w.row(d), x) + bias.data.get(d));
                            assert_eq!(
                                dt[t * width + d - f0].to_bits(),
                                want.to_bits(),
                                "r={r} rows={rows} t={t} d={d}"
                            );
                        }
                    }
                }
            }
        }
    }
}

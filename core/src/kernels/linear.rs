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
    (f0, f1): (usize, usize),
    mut store: impl FnMut(usize, usize, &[f32]),
) {
    if super::avx512::linear(x, rows, w, bias, (f0, f1), &mut store) {
        return;
    }
    let k = w.cols;
    let xr = |t: usize| &x[t * k..(t + 1) * k];
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

/// Rows of the dt_proj input packed at a time, and the widest dt_rank packed
/// (2.8b has 160; wider ones take a dot product per element).
const DT_ROWS: usize = 4;
const DT_PACK: usize = 160;

multiversion! {
    /// `dt[t, d - f0] = softplus(dt_proj[d] . dbc[t, 0..dt_rank] + dt_bias[d])`
    /// for channels `d` in `f0..f1`. `dbc`: `[rows, dbc_stride]`, `dt_proj`:
    /// `[d_inner, dt_rank]`, `dt`: `[rows, f1 - f0]`. A channel's value does
    /// not depend on the range it is computed in.
    pub fn dt_proj_softplus(
        dbc: &[f32],
        dbc_stride: usize,
        rows: usize,
        dt_proj: &Tensor<'_>,
        dt_bias: &Tensor<'_>,
        channels: (usize, usize),
        dt: &mut [f32],
    ) {
        let r = dt_proj.cols;
        let (f0, width) = (channels.0, channels.1 - channels.0);
        let mut t0 = 0;
        while t0 < rows {
            let n = if r <= DT_PACK { (rows - t0).min(DT_ROWS) } else { 1 };
            let out = &mut dt[t0 * width..(t0 + n) * width];
            if r <= DT_PACK {
                // The dt_rank columns of a few rows, packed, through the
                // product's tiles (the same bits as a dot per element).
                let mut packed = [0.0f32; DT_ROWS * DT_PACK];
                for t in 0..n {
                    let row = (t0 + t) * dbc_stride;
                    packed[t * r..(t + 1) * r].copy_from_slice(&dbc[row..row + r]);
                }
                linear(&packed[..n * r], n, dt_proj, Some(dt_bias), channels, |t, d, v| {
                    super::copy_run(&mut out[t * width + d - f0..], v)
                });
            } else {
                let dt_in = &dbc[t0 * dbc_stride..t0 * dbc_stride + r];
                for (i, o) in out.iter_mut().enumerate() {
                    let d = f0 + i;
                    *o = dot(dt_proj.row(d), dt_in) + dt_bias.data.get(d);
                }
            }
            // A separate pass, so the branch-free softplus vectorises.
            for o in out.iter_mut() {
                *o = softplus(*o);
            }
            t0 += n;
        }
    }
}

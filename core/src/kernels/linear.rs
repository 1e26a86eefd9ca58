//! Linear layers: `y = x W^T + b` with W stored `[out, in]` in any dtype.

use super::{
    act::softplus,
    dot::{dot, dot4},
};
use crate::tensor::Tensor;

/// Output features `f0..f1` for `rows` rows of `x` (`[rows, in]`):
/// `out[t * out_stride + (o - f0)] = dot(w[o], x[t]) + bias[o]`.
///
/// Features are the outer loop so each weight row is read from memory once
/// and reused, from cache, for every row of `x`.
pub fn linear(
    x: &[f32],
    rows: usize,
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    (f0, f1): (usize, usize),
    out: &mut [f32],
    out_stride: usize,
) {
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
                out[(t + j) * out_stride + (o - f0)] = v + b;
            }
            t += 4;
        }
        for t in t..rows {
            out[t * out_stride + (o - f0)] = dot(wr, xr(t)) + b;
        }
    }
}

/// `dt[t, d] = softplus(dt_proj[d] . dbc[t, 0..dt_rank] + dt_bias[d])`.
/// `dbc`: `[rows, dbc_stride]`, `dt_proj`: `[d_inner, dt_rank]`, `dt`: `[rows, d_inner]`.
pub fn dt_proj_softplus(
    dbc: &[f32],
    dbc_stride: usize,
    rows: usize,
    dt_proj: &Tensor<'_>,
    dt_bias: &Tensor<'_>,
    dt: &mut [f32],
) {
    let (d_inner, r) = (dt_proj.rows, dt_proj.cols);
    for t in 0..rows {
        let dt_in = &dbc[t * dbc_stride..t * dbc_stride + r];
        let out = &mut dt[t * d_inner..(t + 1) * d_inner];
        for (d, o) in out.iter_mut().enumerate() {
            *o = softplus(dot(dt_proj.row(d), dt_in) + dt_bias.data.get(d));
        }
    }
}

//! Selective scan (the SSM recurrence), fused with the D skip and the SiLU(z) gate.
//!
//! Per channel `d` and state `n`:
//! `h[d,n] = exp(dt[d] * A[d,n]) * h[d,n] + dt[d] * B[n] * x[d]`,
//! `y[d] = (sum_n h[d,n] * C[n] + D[d] * x[d]) * silu(z[d])`.
//! Nothing of size `[tokens, d_inner, d_state]` is materialised.

use super::act::{exp_fast, silu};
use crate::config::MAX_D_STATE;
use crate::tensor::WData;

/// `A = -exp(A_log)`, computed once at load. `a_log`, `out`: `[d_inner * d_state]`.
pub fn a_from_a_log(a_log: WData<'_>, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate().take(a_log.len()) {
        *o = -libm::expf(a_log.get(i));
    }
}

/// The per-token rows a scan reads, for one sequence of `len` tokens.
/// - `x`: `[len, d_inner]` conv output
/// - `dt`: `[len, d_inner]` after softplus
/// - `dbc`: `[len, dt_rank + 2*d_state]` (B at `dt_rank..`, C after it)
/// - `xz`: `[len, 2*d_inner]`, the gate `z` in columns `d_inner..`
#[derive(Clone, Copy)]
pub struct ScanRows<'a> {
    pub x: &'a [f32],
    pub dt: &'a [f32],
    pub dbc: &'a [f32],
    pub xz: &'a [f32],
    pub d_inner: usize,
    pub d_state: usize,
    pub dt_rank: usize,
}

/// Scan one sequence of `len` tokens from `state` (`[d_inner, d_state]`,
/// left holding the final state). `a`: `[d_inner, d_state]`; `d_skip`: `[d_inner]`;
/// `y`: `[len, d_inner]`.
pub fn selective_scan_seq(
    rows: ScanRows<'_>,
    len: usize,
    a: WData<'_>,
    d_skip: WData<'_>,
    state: &mut [f32],
    y: &mut [f32],
) {
    let di = rows.d_inner;
    selective_scan_channels(rows, len, a, d_skip, 0, state, |t, d, v| y[t * di + d] = v);
}

/// The scan of channels `d0 .. d0 + state.len() / d_state` only (their
/// states are a contiguous part of the layer's state), handing each output
/// `y[t, d]` to `write(t, d, value)`: threads can take disjoint channel ranges.
pub fn selective_scan_channels(
    rows: ScanRows<'_>,
    len: usize,
    a: WData<'_>,
    d_skip: WData<'_>,
    d0: usize,
    state: &mut [f32],
    mut write: impl FnMut(usize, usize, f32),
) {
    let ScanRows { x, dt, dbc, xz, d_inner, d_state: n_s, dt_rank } = rows;
    let xp = dt_rank + 2 * n_s;
    let mut a_row = [0.0f32; MAX_D_STATE];
    for (k, h) in state.chunks_exact_mut(n_s).enumerate() {
        let d = d0 + k;
        for (n, v) in a_row.iter_mut().enumerate().take(n_s) {
            *v = a.get(d * n_s + n);
        }
        let dd = d_skip.get(d);
        for t in 0..len {
            let xv = x[t * d_inner + d];
            let dtv = dt[t * d_inner + d];
            let b = &dbc[t * xp + dt_rank..t * xp + dt_rank + n_s];
            let c = &dbc[t * xp + dt_rank + n_s..t * xp + xp];
            let acc = update(h, &a_row[..n_s], dtv, dtv * xv, b, c);
            let z = xz[t * 2 * d_inner + d_inner + d];
            write(t, d, (acc + dd * xv) * silu(z));
        }
    }
}

/// One channel, one token: `h = exp(dt A) h + dt x B`, returns `h . C`.
/// The decay and the update are element-wise passes that vectorise; only
/// the final sum is sequential.
#[inline(always)]
fn update(h: &mut [f32], a: &[f32], dt: f32, dtx: f32, b: &[f32], c: &[f32]) -> f32 {
    let n = h.len();
    let mut decay = [0.0f32; MAX_D_STATE];
    for (e, &av) in decay[..n].iter_mut().zip(a) {
        *e = exp_fast(dt * av);
    }
    for ((hv, &e), &bv) in h.iter_mut().zip(&decay[..n]).zip(&b[..n]) {
        *hv = e * *hv + dtx * bv;
    }
    h.iter().zip(&c[..n]).map(|(hv, cv)| hv * cv).sum()
}

/// One token of one sequence: the same recurrence, `len = 1`.
pub fn selective_scan_step(
    rows: ScanRows<'_>,
    a: WData<'_>,
    d_skip: WData<'_>,
    state: &mut [f32],
    y: &mut [f32],
) {
    let ScanRows { x, dt, dbc, xz, d_inner, d_state: n_s, dt_rank } = rows;
    let b = &dbc[dt_rank..dt_rank + n_s];
    let c = &dbc[dt_rank + n_s..dt_rank + 2 * n_s];
    let mut a_row = [0.0f32; MAX_D_STATE];
    for (d, h) in state.chunks_exact_mut(n_s).enumerate().take(d_inner) {
        let (xv, dtv) = (x[d], dt[d]);
        for (n, v) in a_row.iter_mut().enumerate().take(n_s) {
            *v = a.get(d * n_s + n);
        }
        let acc = update(h, &a_row[..n_s], dtv, dtv * xv, b, c);
        y[d] = (acc + d_skip.get(d) * xv) * silu(xz[d_inner + d]);
    }
}

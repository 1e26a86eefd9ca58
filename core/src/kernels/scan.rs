//! Selective scan (the SSM recurrence), fused with the D skip and the SiLU(z) gate.
//!
//! Per channel `d` and state `n`:
//! `h[d,n] = exp(dt[d] * A[d,n]) * h[d,n] + dt[d] * B[n] * x[d]`,
//! `y[d] = (sum_n h[d,n] * C[n] + D[d] * x[d]) * silu(z[d])`.
//! Nothing of size `[tokens, d_inner, d_state]` is materialised.

use super::act::{exp_fast, silu};
use super::dot::{lane_sum, LANES};
use super::scan_avx512;
use super::simd::multiversion;
use crate::config::MAX_D_STATE;
use crate::tensor::WData;

/// Tokens ahead whose inputs a channel block asks the cache for.
const AHEAD: usize = 8;

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

impl ScanRows<'_> {
    /// Where token `t`'s gate `z` for channel `d` sits in `xz`.
    #[inline(always)]
    fn z_at(&self, t: usize, d: usize) -> usize {
        (2 * t + 1) * self.d_inner + d
    }
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
    selective_scan_channels(rows, len, a, d_skip, 0, state, |t, d, v| {
        super::copy_run(&mut y[t * di + d..], v)
    });
}

multiversion! {
    /// The scan of channels `d0 .. d0 + state.len() / d_state` only (their
    /// states are a contiguous part of the layer's state), handing the
    /// gated outputs `y[t, d..d + v.len()]` to `write(t, d, v)`: threads
    /// can take disjoint channel ranges. The gate is applied per token as
    /// the outputs are made, on the scan's threads (as a pass of its own
    /// after them it ran on one thread: ~2% of a prefill).
    pub fn selective_scan_channels(
        rows: ScanRows<'_>,
        len: usize,
        a: WData<'_>,
        d_skip: WData<'_>,
        d0: usize,
        state: &mut [f32],
        write: impl FnMut(usize, usize, &[f32]),
    ) {
        let mut write = write;
        let ScanRows { x, dt, dbc, xz, d_inner, d_state: n_s, dt_rank } = rows;
        if n_s <= LANES {
            let channels = state.len() / n_s.max(1);
            let mut k = 0;
            while k < channels {
                let n = LANES.min(channels - k);
                let st = &mut state[k * n_s..(k + n) * n_s];
                if n == LANES && n_s == LANES {
                    scan_block::<LANES>(rows, len, a, d_skip, d0 + k, st, &mut write);
                } else {
                    scan_block::<0>(rows, len, a, d_skip, d0 + k, st, &mut write);
                }
                k += n;
            }
            return;
        }
        let xp = dt_rank + 2 * n_s;
        let mut a_buf = [0.0f32; MAX_D_STATE];
        for (k, h) in state.chunks_exact_mut(n_s).enumerate() {
            let d = d0 + k;
            let a_row = a_row(a, d, n_s, &mut a_buf);
            let dd = d_skip.get(d);
            for t in 0..len {
                let xv = x[t * d_inner + d];
                let dtv = dt[t * d_inner + d];
                let b = &dbc[t * xp + dt_rank..t * xp + dt_rank + n_s];
                let c = &dbc[t * xp + dt_rank + n_s..t * xp + xp];
                let acc = update(h, a_row, dtv, dtv * xv, b, c);
                write(t, d, &[(acc + dd * xv) * silu(xz[rows.z_at(t, d)])]);
            }
        }
    }
}

/// Up to [`LANES`] channels from `d0` (`state`: their `[n, d_state]`),
/// `d_state <= LANES`, vectorised over the channels: each state element is
/// a lane of one of `d_state` vectors carried across the tokens, its
/// recurrence independent of the others (the per-channel loop waits on one
/// chain and reduces a register per token). With 16 states and AVX-512 on,
/// the block is [`scan_avx512::block16`] (as the step is `step16`);
/// otherwise `y = h . C` is added in [`update`]'s order (`0 + h C` per
/// state, then [`lane_sum`]'s tree), so this loop and the portable step
/// give the same bits. `FULL` is [`LANES`] when the block is exactly
/// `LANES` channels of `LANES` states (every published model), so the
/// loops have fixed trip counts.
#[inline(always)]
fn scan_block<const FULL: usize>(
    rows: ScanRows<'_>,
    len: usize,
    a: WData<'_>,
    d_skip: WData<'_>,
    d0: usize,
    state: &mut [f32],
    write: &mut impl FnMut(usize, usize, &[f32]),
) {
    let ScanRows { x, dt, dbc, xz, d_inner, d_state, dt_rank } = rows;
    let n_s = if FULL == LANES { LANES } else { d_state };
    let nch = if FULL == LANES { LANES } else { state.len() / n_s };
    let xp = dt_rank + 2 * d_state;
    // h[n][j], at[n][j]: state n and A of channel d0 + j (lanes past nch stay 0).
    let mut h = [[0.0f32; LANES]; LANES];
    let mut at = [[0.0f32; LANES]; LANES];
    let mut dd = [0.0f32; LANES];
    for j in 0..nch {
        for n in 0..n_s {
            h[n][j] = state[j * n_s + n];
            at[n][j] = a.get((d0 + j) * n_s + n);
        }
        dd[j] = d_skip.get(d0 + j);
    }
    // Every block of 16-state channels goes through the AVX-512 kernel when
    // it is on (its arithmetic is fused, so it must take all of them).
    let done = n_s == LANES && {
        let token = |t: usize| {
            let (o, bc, oz) = (t * d_inner + d0, t * xp + dt_rank, rows.z_at(t, d0));
            let (o_next, bc_next, oz_next) = (o + AHEAD * d_inner, bc + AHEAD * xp, oz + AHEAD * 2 * d_inner);
            for p in [
                x.as_ptr().wrapping_add(o_next),
                dt.as_ptr().wrapping_add(o_next),
                xz.as_ptr().wrapping_add(oz_next),
            ] {
                super::simd::prefetch(p);
            }
            super::simd::prefetch(dbc.as_ptr().wrapping_add(bc_next));
            super::simd::prefetch(dbc.as_ptr().wrapping_add(bc_next + 2 * LANES - 1));
            scan_avx512::Token {
                x: &x[o..o + nch],
                dt: &dt[o..o + nch],
                z: &xz[oz..oz + nch],
                b: fixed(dbc, bc),
                c: fixed(dbc, bc + LANES),
            }
        };
        scan_avx512::block16(len, nch, &mut h, &at, &dd, token, &mut |t, y: &[f32; LANES]| {
            write(t, d0, &y[..nch])
        })
    };
    for t in (0..len).filter(|_| !done) {
        let (mut xv, mut dtv) = ([0.0f32; LANES], [0.0f32; LANES]);
        let o = t * d_inner + d0;
        xv[..nch].copy_from_slice(&x[o..o + nch]);
        dtv[..nch].copy_from_slice(&dt[o..o + nch]);
        let bc = &dbc[t * xp + dt_rank..t * xp + xp];
        let (b, c) = bc.split_at(d_state);
        let mut dtx = [0.0f32; LANES];
        for j in 0..LANES {
            dtx[j] = dtv[j] * xv[j];
        }
        // p[n]: state n's term of y, 0 for n past d_state, as update's lanes.
        let mut p = [[0.0f32; LANES]; LANES];
        for n in 0..n_s {
            let (bn, cn) = (b[n], c[n]);
            for j in 0..LANES {
                let hv = exp_fast(dtv[j] * at[n][j]) * h[n][j] + dtx[j] * bn;
                h[n][j] = hv;
                p[n][j] = 0.0 + hv * cn;
            }
        }
        // lane_sum's tree, across the states.
        let mut w = LANES;
        while w > 1 {
            w /= 2;
            let (lo, hi) = p.split_at_mut(w);
            for (pl, ph) in lo.iter_mut().zip(hi.iter()) {
                for (a, b) in pl.iter_mut().zip(ph) {
                    *a += b;
                }
            }
        }
        let oz = rows.z_at(t, d0);
        let mut y = [0.0f32; LANES];
        for (j, &z) in xz[oz..oz + nch].iter().enumerate() {
            y[j] = (p[0][j] + dd[j] * xv[j]) * silu(z);
        }
        write(t, d0, &y[..nch]);
    }
    for j in 0..nch {
        for n in 0..n_s {
            state[j * n_s + n] = h[n][j];
        }
    }
}

/// `s[o..o + LANES]` as an array.
#[inline(always)]
fn fixed(s: &[f32], o: usize) -> &[f32; LANES] {
    s[o..o + LANES].try_into().unwrap_or(&[0.0; LANES])
}

/// Row `d` of A (`[d_inner, d_state]`) as f32: borrowed when stored so.
#[inline(always)]
fn a_row<'b>(a: WData<'b>, d: usize, n_s: usize, buf: &'b mut [f32; MAX_D_STATE]) -> &'b [f32] {
    match a {
        WData::F32(s) => &s[d * n_s..(d + 1) * n_s],
        _ => {
            a.widen_into(d * n_s, &mut buf[..n_s]);
            &buf[..n_s]
        }
    }
}

/// One channel, one token: `h = exp(dt A) h + dt x B`, returns `h . C`.
/// Element-wise in blocks of [`LANES`] that vectorise (`d_state` 16, every
/// published Mamba, is one block), with `h . C` kept in
/// lane-wise partial sums added in a fixed tree at the end (a sequential
/// sum would cost a dependent add per state).
#[inline(always)]
fn update(h: &mut [f32], a: &[f32], dt: f32, dtx: f32, b: &[f32], c: &[f32]) -> f32 {
    let n = h.len();
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0.0f32; LANES];
    let full = n / LANES * LANES;
    let blocks = h[..full]
        .chunks_exact_mut(LANES)
        .zip(a.chunks_exact(LANES))
        .zip(b.chunks_exact(LANES))
        .zip(c.chunks_exact(LANES));
    for (((hb, ab), bb), cb) in blocks {
        for j in 0..LANES {
            let hv = exp_fast(dt * ab[j]) * hb[j] + dtx * bb[j];
            hb[j] = hv;
            acc[j] += hv * cb[j];
        }
    }
    for j in full..n {
        let hv = exp_fast(dt * a[j]) * h[j] + dtx * b[j];
        h[j] = hv;
        acc[j - full] += hv * c[j];
    }
    lane_sum(acc)
}

multiversion! {
    /// One token of one sequence, channels `d0 .. d0 + y.len()` (their states
    /// `[y.len(), d_state]` are `state`): the same recurrence, `len = 1`.
    pub fn selective_scan_step(
        rows: ScanRows<'_>,
        a: WData<'_>,
        d_skip: WData<'_>,
        d0: usize,
        state: &mut [f32],
        y: &mut [f32],
    ) {
        let ScanRows { x, dt, dbc, xz, d_inner, d_state: n_s, dt_rank } = rows;
        let b = &dbc[dt_rank..dt_rank + n_s];
        let c = &dbc[dt_rank + n_s..dt_rank + 2 * n_s];
        let n = y.len();
        // In AVX-512 mode every 16-state channel goes through step16, as
        // the prefill's go through block16 (their arithmetic is fused).
        let done = n_s == LANES
            && match a {
                WData::F32(av) => {
                    let (av, xs, dts) = (&av[d0 * LANES..(d0 + n) * LANES], &x[d0..d0 + n], &dt[d0..d0 + n]);
                    scan_avx512::step16(state, av, xs, dts, fixed(b, 0), fixed(c, 0), y)
                }
                // A not in f32 (never so loaded: it is computed at load),
                // widened a block of channels at a time.
                _ => {
                    let blocks = state.chunks_mut(LANES * LANES).zip(y.chunks_mut(LANES));
                    blocks.enumerate().all(|(i, (hs, ys))| {
                        let (d, m) = (d0 + i * LANES, ys.len());
                        let mut a_blk = [0.0f32; LANES * LANES];
                        a.widen_into(d * LANES, &mut a_blk[..m * LANES]);
                        let (xs, dts) = (&x[d..d + m], &dt[d..d + m]);
                        scan_avx512::step16(hs, &a_blk[..m * LANES], xs, dts, fixed(b, 0), fixed(c, 0), ys)
                    })
                }
            };
        let mut a_buf = [0.0f32; MAX_D_STATE];
        for (k, (h, yv)) in state.chunks_exact_mut(n_s).zip(y.iter_mut()).enumerate().filter(|_| !done) {
            let d = d0 + k;
            let (xv, dtv) = (x[d], dt[d]);
            let a_row = a_row(a, d, n_s, &mut a_buf);
            *yv = update(h, a_row, dtv, dtv * xv, b, c);
        }
        // D skip and gate as separate passes over the channels: they vectorise.
        let (x, z) = (&x[d0..d0 + n], &xz[d_inner + d0..d_inner + d0 + n]);
        match d_skip {
            WData::F32(dd) => skip(y, x, &dd[d0..d0 + n], |v| v),
            WData::F16(dd) => skip(y, x, &dd[d0..d0 + n], |v| v.to_f32()),
            WData::BF16(dd) => skip(y, x, &dd[d0..d0 + n], crate::tensor::bf16_to_f32),
            // Never loaded so (validate refuses it); exact all the same.
            WData::Q8_0 { .. } => {
                for (i, (yv, &xv)) in y.iter_mut().zip(x).enumerate() {
                    *yv += d_skip.get(d0 + i) * xv;
                }
            }
        }
        for (yv, &zv) in y.iter_mut().zip(z) {
            *yv *= silu(zv);
        }
    }
}

#[inline(always)]
fn skip<T: Copy>(y: &mut [f32], x: &[f32], d: &[T], widen: impl Fn(T) -> f32) {
    for ((yv, &xv), &dv) in y.iter_mut().zip(x).zip(d) {
        *yv += widen(dv) * xv;
    }
}

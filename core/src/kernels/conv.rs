//! Causal depthwise conv1d (+ bias) followed by SiLU, with a carried state.
//!
//! The conv state of a channel is its last `K` pre-conv inputs, newest last
//! (`[d_inner, K]`), as Hugging Face keeps it. Tap `K-1` multiplies the
//! newest input.

use super::act::silu;
use super::simd::multiversion;
use crate::config::MAX_D_CONV;
use crate::tensor::WData;

/// Channels per block of the prefill conv: one vector register of f32.
const LANES: usize = 16;

multiversion! {
    /// One sequence of `len` tokens. `xz`: `[len, xz_stride]` with the conv
    /// input `x` in columns `0..d_inner`; `w`: `[d_inner, K]`; `bias`: `[d_inner]`;
    /// `state`: `[d_inner, K]`, read as the history before the first token and
    /// left holding the last `K` inputs; `out`: `[len, d_inner]`, SiLU applied.
    ///
    /// Blocks of 16 channels (one f32 vector register) go through all tokens at once, the taps
    /// and the window of the last `K` inputs held per block, so the work per
    /// token is a few vector operations.
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d_seq(
        xz: &[f32],
        xz_stride: usize,
        len: usize,
        d_inner: usize,
        k: usize,
        w: WData<'_>,
        bias: Option<WData<'_>>,
        state: &mut [f32],
        out: &mut [f32],
    ) {
        let mut d0 = 0;
        while d0 < d_inner {
            let n = LANES.min(d_inner - d0);
            // taps[c][j] = w[d0 + j, c]; win[c][j] = the input c places
            // before the newest, oldest first (starting as the state).
            let mut taps = [[0.0f32; LANES]; MAX_D_CONV];
            let mut win = [[0.0f32; LANES]; MAX_D_CONV];
            let mut b = [0.0f32; LANES];
            for j in 0..n {
                for c in 0..k {
                    taps[c][j] = w.get((d0 + j) * k + c);
                    win[c][j] = state[(d0 + j) * k + c];
                }
                b[j] = bias.map_or(0.0, |v| v.get(d0 + j));
            }
            for t in 0..len {
                shift_window(&mut win, k);
                let xr = &xz[t * xz_stride + d0..t * xz_stride + d0 + n];
                super::copy_run(&mut win[k - 1], xr);
                let mut acc = b;
                for c in 0..k {
                    for j in 0..LANES {
                        acc[j] += taps[c][j] * win[c][j];
                    }
                }
                for (o, &v) in out[t * d_inner + d0..t * d_inner + d0 + n].iter_mut().zip(&acc) {
                    *o = silu(v);
                }
            }
            for j in 0..n {
                for c in 0..k {
                    state[(d0 + j) * k + c] = win[c][j];
                }
            }
            d0 += n;
        }
    }
}

multiversion! {
    /// One token, channels `d0 .. d0 + out.len()`: shift each channel's state
    /// left, append `x[d]`, convolve. `x`: `[d_inner]`; `w`: `[d_inner, K]`;
    /// `state`: `[out.len(), K]` (those channels'); `out`: SiLU applied.
    pub fn conv1d_step(
        x: &[f32],
        k: usize,
        w: WData<'_>,
        bias: Option<WData<'_>>,
        d0: usize,
        state: &mut [f32],
        out: &mut [f32],
    ) {
        let n = out.len();
        // The bias first, as the prefill kernel sums.
        for (i, o) in out.iter_mut().enumerate() {
            *o = bias.map_or(0.0, |b| b.get(d0 + i));
        }
        let x = &x[d0..d0 + n];
        match w {
            WData::F32(ws) => taps(x, k, &ws[d0 * k..], |v| v, state, out),
            WData::F16(ws) => taps(x, k, &ws[d0 * k..], |v| v.to_f32(), state, out),
            WData::BF16(ws) => taps(x, k, &ws[d0 * k..], crate::tensor::bf16_to_f32, state, out),
            // The loaders never quantize the conv (validate refuses it); exact all the same.
            WData::Q8_0 { .. } => {
                let mut buf = [0.0f32; LANES * MAX_D_CONV];
                for c0 in (0..n).step_by(LANES) {
                    let m = LANES.min(n - c0);
                    for (i, v) in buf[..m * k].iter_mut().enumerate() {
                        *v = w.get((d0 + c0) * k + i);
                    }
                    let (st, o) = (&mut state[c0 * k..(c0 + m) * k], &mut out[c0..c0 + m]);
                    taps(&x[c0..c0 + m], k, &buf[..m * k], |v| v, st, o);
                }
            }
        }
        // SiLU as its own pass: it vectorises.
        for o in out.iter_mut() {
            *o = silu(*o);
        }
    }
}

/// `win[..k]` moved one place to the front. The usual widths (every
/// Mamba-1 has 4) are constant-size copies, a few register moves; a
/// run-time width's `copy_within` is a memmove call (it had been 4% of
/// batch-64 decode, one a channel).
#[inline(always)]
fn shift_window<T: Copy>(win: &mut [T], k: usize) {
    match k {
        4 => win.copy_within(1..4, 0),
        3 => win.copy_within(1..3, 0),
        2 => win.copy_within(1..2, 0),
        _ => win.copy_within(1..k, 0),
    }
}

/// Each channel: shift its window, take the new input, add the taps in order.
#[inline(always)]
fn taps<T: Copy>(x: &[f32], k: usize, w: &[T], widen: impl Fn(T) -> f32, state: &mut [f32], out: &mut [f32]) {
    for (((s, o), &xv), wr) in state.chunks_exact_mut(k).zip(out.iter_mut()).zip(x).zip(w.chunks_exact(k)) {
        shift_window(s, k);
        s[k - 1] = xv;
        for (&v, &g) in s.iter().zip(wr) {
            *o += widen(g) * v;
        }
    }
}

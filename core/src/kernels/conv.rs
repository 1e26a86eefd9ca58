//! Causal depthwise conv1d (+ bias) followed by SiLU, with a carried state.
//!
//! The conv state of a channel is its last `K` pre-conv inputs, newest last
//! (`[d_inner, K]`), as Hugging Face keeps it. Tap `K-1` multiplies the
//! newest input.

use super::act::silu;
use super::simd::multiversion;
use crate::tensor::WData;

/// One sequence of `len` tokens. `xz`: `[len, xz_stride]` with the conv
/// input `x` in columns `0..d_inner`; `w`: `[d_inner, K]`; `bias`: `[d_inner]`;
/// `state`: `[d_inner, K]`, read as the history before the first token and
/// left holding the last `K` inputs; `out`: `[len, d_inner]`, SiLU applied.
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
    let input = |state: &[f32], j: isize, d: usize| -> f32 {
        if j >= 0 {
            xz[j as usize * xz_stride + d]
        } else {
            state[d * k + (k as isize + j) as usize]
        }
    };
    for t in 0..len {
        for d in 0..d_inner {
            let mut acc = bias.map_or(0.0, |b| b.get(d));
            for tap in 0..k {
                let j = t as isize + tap as isize - (k as isize - 1);
                acc += w.get(d * k + tap) * input(state, j, d);
            }
            out[t * d_inner + d] = silu(acc);
        }
    }
    // New state column c holds input j = len - K + c; old column L + c is
    // read before column c is written only when L + c > c, which holds for len > 0.
    if len == 0 {
        return;
    }
    for d in 0..d_inner {
        for c in 0..k {
            let j = len as isize - k as isize + c as isize;
            let v = input(state, j, d);
            state[d * k + c] = v;
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
        }
        // SiLU as its own pass: it vectorises.
        for o in out.iter_mut() {
            *o = silu(*o);
        }
    }
}

#[inline(always)]
fn taps<T: Copy>(x: &[f32], k: usize, w: &[T], widen: impl Fn(T) -> f32, state: &mut [f32], out: &mut [f32]) {
    for (((s, o), &xv), wr) in state.chunks_exact_mut(k).zip(out.iter_mut()).zip(x).zip(w.chunks_exact(k)) {
        s.copy_within(1.., 0);
        s[k - 1] = xv;
        for (&v, &g) in s.iter().zip(wr) {
            *o += widen(g) * v;
        }
    }
}

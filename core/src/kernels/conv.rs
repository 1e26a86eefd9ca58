//! Causal depthwise conv1d (+ bias) followed by SiLU, with a carried state.
//!
//! The conv state of a channel is its last `K` pre-conv inputs, newest last
//! (`[d_inner, K]`), as Hugging Face keeps it. Tap `K-1` multiplies the
//! newest input.

use super::act::silu;
use super::conv_avx512;
use super::simd::multiversion;
use crate::config::MAX_D_CONV;
use crate::tensor::WData;

/// Channels per block of the conv: one vector register of f32.
const LANES: usize = 16;
/// Tokens ahead whose inputs a block asks the cache for.
const AHEAD: usize = 8;

multiversion! {
    /// Channels `d0 .. d0 + state.len() / K` of one sequence of `len`
    /// tokens, handing `out[t, d..d + v.len()]` (SiLU applied) to
    /// `write(t, d, v)`, so threads can take disjoint channel ranges. `xz`:
    /// `[len, xz_stride]` with the conv input `x` in columns `0..d_inner`;
    /// `w`: `[d_inner, K]`; `bias`: `[d_inner]`; `state`: those channels'
    /// `[_, K]`, read as the history before the first token and left
    /// holding the last `K` inputs.
    ///
    /// Blocks of 16 channels (one f32 vector register) go through all
    /// tokens at once, the taps and the window of the last `K` inputs held
    /// per block, so the work per token is a few vector operations. The
    /// decode step is the same kernel over one token.
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d_channels(
        xz: &[f32],
        xz_stride: usize,
        len: usize,
        k: usize,
        w: WData<'_>,
        bias: Option<WData<'_>>,
        d0: usize,
        state: &mut [f32],
        write: impl FnMut(usize, usize, &[f32]),
    ) {
        let mut write = write;
        if k == 0 {
            return;
        }
        let channels = state.len() / k;
        let mut c0 = 0;
        while c0 < channels {
            let n = LANES.min(channels - c0);
            let st = &mut state[c0 * k..(c0 + n) * k];
            let block = (xz, xz_stride, len, w, bias, d0 + c0);
            // Fixed widths (every Mamba-1 has 4) shift the window by
            // renaming registers; other widths go through memory.
            match k {
                4 => conv_block::<4, 4>(block, 4, st, &mut write),
                3 => conv_block::<3, 3>(block, 3, st, &mut write),
                2 => conv_block::<2, 2>(block, 2, st, &mut write),
                _ => conv_block::<0, MAX_D_CONV>(block, k, st, &mut write),
            }
            c0 += n;
        }
    }
}

/// `conv1d_channels` over all `d_inner` channels into `out`: `[len, d_inner]`
/// (`state`: `[d_inner, K]`).
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
    conv1d_channels(xz, xz_stride, len, k, w, bias, 0, &mut state[..d_inner * k], |t, d, v| {
        super::copy_run(&mut out[t * d_inner + d..], v)
    });
}

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
    conv1d_channels(x, 0, 1, k, w, bias, d0, &mut state[..n * k], |_, d, v| {
        super::copy_run(&mut out[d - d0..], v)
    });
}

/// What a block reads: `xz`, its stride, the tokens, the taps, the bias and
/// the block's first channel.
type Block<'x, 'w> = (&'x [f32], usize, usize, WData<'w>, Option<WData<'w>>, usize);

/// Up to [`LANES`] channels from `d0` (`state`: their `[n, k]`), `K == k`
/// or 0 for a run-time width (`M`: the taps the buffers hold, `K` or
/// [`MAX_D_CONV`]). Per channel and token: the bias, then each
/// tap times its input oldest first (a multiply, then an add), then SiLU.
#[inline(always)]
fn conv_block<const K: usize, const M: usize>(
    (xz, xz_stride, len, w, bias, d0): Block<'_, '_>,
    k: usize,
    state: &mut [f32],
    write: &mut impl FnMut(usize, usize, &[f32]),
) {
    let k = if K == 0 { k } else { K };
    let n = state.len() / k;
    // The block's rows of w widened in one pass (the dtype matched once,
    // not per element: the decode step is mostly this set-up).
    // Buffers of `M` (the width, or MAX_D_CONV when it is not fixed) taps:
    // zeroing them at MAX_D_CONV's size had cost a third of a decode step's conv.
    let mut flat = [[0.0f32; M]; LANES];
    let flat = flat.as_flattened_mut();
    w.widen_into(d0 * k, &mut flat[..n * k]);
    let mut b = [0.0f32; LANES];
    if let Some(bias) = bias {
        bias.widen_into(d0, &mut b[..n]);
    }
    let x = |t: usize| {
        let row = t * xz_stride + d0;
        super::simd::prefetch(xz.as_ptr().wrapping_add(row + AHEAD * xz_stride));
        &xz[row..row + n]
    };
    if K == conv_avx512::K && n == conv_avx512::N {
        let block = <&mut [f32; conv_avx512::N * conv_avx512::K]>::try_from(&mut *state)
            .ok()
            .zip(flat.first_chunk::<{ conv_avx512::N * conv_avx512::K }>());
        if let Some((st, taps)) = block {
            let x16 = |t| x(t).first_chunk::<{ conv_avx512::N }>().expect("a whole block");
            if conv_avx512::block16(len, st, taps, &b, x16, &mut |t, v| write(t, d0, v)) {
                return;
            }
        }
    }
    // taps[c][j] = w[d0 + j, c]; win[c][j] = the input k - 1 - c tokens
    // before the newest of channel d0 + j (starting as the state).
    let mut taps = [[0.0f32; LANES]; M];
    let mut win = [[0.0f32; LANES]; M];
    for j in 0..n {
        for c in 0..k {
            taps[c][j] = flat[j * k + c];
            win[c][j] = state[j * k + c];
        }
    }
    for t in 0..len {
        for c in 1..k {
            win[c - 1] = win[c];
        }
        super::copy_run(&mut win[k - 1], x(t));
        let mut acc = b;
        for c in 0..k {
            for j in 0..LANES {
                acc[j] += taps[c][j] * win[c][j];
            }
        }
        for v in acc.iter_mut() {
            *v = silu(*v);
        }
        write(t, d0, &acc[..n]);
    }
    for j in 0..n {
        for c in 0..k {
            state[j * k + c] = win[c][j];
        }
    }
}

//! dt_proj on x86-64 AVX-512 from its weight transposed in blocks of
//! [`BLOCK`] channels (made at load by a host that can allocate), chosen
//! with the tiles ([`super::simd::avx512_enabled`]).
//!
//! A row of the stored `[d_inner, dt_rank]` weight is only 48-160 long, so
//! its dot products spent more on their horizontal sums than on their
//! multiply-adds (dt_proj was 7% of a prefill). Transposed, a channel is a
//! lane: a token's 16 channels take `dt_rank` fused multiply-adds and no
//! sums. A block's `[dt_rank, 64]` weights are contiguous, so a decode
//! step streams them (a plain transpose had it read 48 short runs far
//! apart, slower than the dot products). Each channel's value is
//! `((x[0] w[0] + x[1] w[1]) + ...)` in one fused chain from 0, then
//! `+ bias`, whatever the tokens and the channel range, so prefill = step,
//! ragged = solo and threaded = sequential hold.
#![allow(unsafe_code)]

use crate::tensor::Tensor;
#[cfg(target_arch = "x86_64")]
use crate::tensor::WData;

/// Channels a block of the layout holds (four registers).
pub const BLOCK: usize = 64;

/// Rows of the blocked layout (`[rows, BLOCK]`) of a `[d_inner, dt_rank]` weight.
pub fn blocked_rows(d_inner: usize, dt_rank: usize) -> usize {
    d_inner.div_ceil(BLOCK) * dt_rank
}

/// Where weight `[d, k]` of a `[d_inner, dt_rank]` dt_proj goes in the
/// blocked layout: block `d / 64`, its row `k`, column `d % 64` (a partial
/// last block is padded with zeros).
pub fn blocked_at(d: usize, k: usize, dt_rank: usize) -> usize {
    (d / BLOCK * dt_rank + k) * BLOCK + d % BLOCK
}

/// `w` (`[d_inner, dt_rank]`) laid out into `out` ([`blocked_rows`] x
/// [`BLOCK`] values) at [`blocked_at`]; the padding of a partial last block
/// is left as `out` holds it (zeros, for the kernel).
pub fn to_blocked<T: Copy>(w: &[T], d_inner: usize, dt_rank: usize, out: &mut [T]) {
    for (i, &v) in w.iter().enumerate().take(d_inner * dt_rank) {
        out[blocked_at(i / dt_rank, i % dt_rank, dt_rank)] = v;
    }
}

/// `out[t * (f1 - f0) + d - f0] = x[t] . dt_proj[d] + bias[d]` for channels
/// `d` in `f0..f1` (of `d_inner`) and `rows` rows of `x` that are
/// `x_stride` apart (their first `dt_rank` values), from `wt`, dt_proj in
/// the blocked layout ([`blocked_at`]) in f32, f16 or bf16. Returns
/// `false`, doing nothing, when the AVX-512 kernels are off or `wt` is Q8_0.
#[allow(clippy::too_many_arguments)]
pub fn dt_proj_t(
    (x, x_stride): (&[f32], usize),
    rows: usize,
    wt: &Tensor<'_>,
    (d_inner, r): (usize, usize),
    bias: &Tensor<'_>,
    (f0, f1): (usize, usize),
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        // The kernel reads raw pointers: everything it touches must be in bounds.
        assert!(
            f0 <= f1
                && f1 <= d_inner
                && wt.cols == BLOCK
                && wt.rows == blocked_rows(d_inner, r)
                && bias.len() >= f1
                && x_stride >= r
                && (rows == 0 || (rows - 1) * x_stride + r <= x.len())
                && out.len() >= rows * (f1 - f0),
            "dt_proj_t: operands shorter than their shapes"
        );
        let args = x86::Args { x: x.as_ptr(), x_stride, rows, r, f0, f1, out: out.as_mut_ptr() };
        // SAFETY: bounds checked above; enable_avx512's contract gives the features.
        unsafe {
            match wt.data {
                WData::F32(w) => x86::run(w.as_ptr(), bias, args),
                WData::F16(w) => x86::run(w.as_ptr(), bias, args),
                WData::BF16(w) => x86::run(w.as_ptr(), bias, args),
                WData::Q8_0 { .. } => return false,
            }
        }
        return true;
    }
    let _ = (x, x_stride, rows, wt, d_inner, r, bias, f0, f1, out);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use crate::kernels::avx512::x86::Widen16;
    use crate::tensor::Tensor;
    use core::arch::x86_64::*;

    /// The operands of [`run`], checked by the caller.
    pub struct Args {
        pub x: *const f32,
        pub x_stride: usize,
        pub rows: usize,
        pub r: usize,
        pub f0: usize,
        pub f1: usize,
        pub out: *mut f32,
    }

    /// Block by block of the layout (the channels of `f0..f1` in each),
    /// tokens four at a time then one.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; `w` holds the blocked layout of
    /// `r`-long rows covering `f1`; `a`'s bounds hold.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn run<W: Widen16>(w: *const W, bias: &Tensor<'_>, a: Args) {
        let width = a.f1 - a.f0;
        let mut c0 = a.f0 / BLOCK * BLOCK;
        while c0 < a.f1 {
            // This block's channels within f0..f1, as lanes lo..hi.
            let (lo, hi) = (a.f0.max(c0) - c0, a.f1.min(c0 + BLOCK) - c0);
            let m: [__mmask16; 4] = core::array::from_fn(|j| {
                let (l, h) = (lo.clamp(16 * j, 16 * j + 16) - 16 * j, hi.clamp(16 * j, 16 * j + 16) - 16 * j);
                (((1u32 << h) - 1) & !((1u32 << l) - 1)) as __mmask16
            });
            let mut b = [0.0f32; BLOCK];
            bias.data.widen_into(c0 + lo, &mut b[lo..hi]);
            // Loops, not `array::from_fn`, for the intrinsics: a closure does
            // not inherit the target features (see `avx512::x86::lane_sums16`).
            let mut bv = [_mm512_setzero_ps(); 4];
            for (j, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(b.as_ptr().add(16 * j));
            }
            // Lane 0 of the block's output, before `out` where lo > 0 (only
            // lanes lo.. are stored).
            let o = a.out.wrapping_add(c0).wrapping_sub(a.f0);
            let wb = w.add(c0 * a.r);
            let mut t = 0;
            while t + 4 <= a.rows {
                tile::<W, 4>(wb, &a, t, &m, &bv, o.wrapping_add(t * width), width);
                t += 4;
            }
            while t < a.rows {
                tile::<W, 1>(wb, &a, t, &m, &bv, o.wrapping_add(t * width), width);
                t += 1;
            }
            c0 += BLOCK;
        }
    }

    /// `T` tokens from `t0` against the block at `w` (`[r, 64]`), lanes `m`.
    #[inline(always)]
    unsafe fn tile<W: Widen16, const T: usize>(
        w: *const W,
        a: &Args,
        t0: usize,
        m: &[__mmask16; 4],
        b: &[__m512; 4],
        out: *mut f32,
        width: usize,
    ) {
        let x: [*const f32; T] = core::array::from_fn(|t| a.x.add((t0 + t) * a.x_stride));
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        for k in 0..a.r {
            let wk = w.add(k * BLOCK);
            let mut wv = [_mm512_setzero_ps(); 4];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = W::load16_masked(wk.add(16 * j), m[j]);
            }
            for t in 0..T {
                let xv = _mm512_set1_ps(*x[t].add(k));
                for j in 0..4 {
                    acc[t][j] = _mm512_fmadd_ps(xv, wv[j], acc[t][j]);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for j in 0..4 {
                let p = out.wrapping_add(t * width + 16 * j);
                _mm512_mask_storeu_ps(p, m[j], _mm512_add_ps(acc[j], b[j]));
            }
        }
    }
}

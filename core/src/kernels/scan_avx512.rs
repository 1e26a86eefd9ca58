//! The prefill scan of a block of 16 channels of 16 states in AVX-512
//! registers (every published Mamba-1 has `d_state` 16), chosen at run time
//! with the tiles ([`super::simd::avx512_enabled`]).
//!
//! The same arithmetic as [`super::scan`]'s `scan_block`, operation for
//! operation (separate multiplies and adds, never fused; [`exp16`] is
//! [`super::act::exp_fast`] on 16 lanes), so it gives the same bits as the
//! portable code and the decode step: compilers left to vectorise that
//! loop spill its sixteen state vectors on every token.
#![allow(unsafe_code)]

/// Channels per block, and states per channel.
pub const N: usize = 16;

/// One token's inputs for the block: `x`, `dt` of its 16 channels, `B` and
/// `C` (16 each).
pub struct Token<'a> {
    pub x: &'a [f32; N],
    pub dt: &'a [f32; N],
    pub b: &'a [f32; N],
    pub c: &'a [f32; N],
}

/// Run `len` tokens through the block: `h[n][j]` state `n` of channel `j`,
/// `at[n][j]` its A, `dd[j]` its D; `token(t)` gives token `t`'s inputs and
/// `write(t, y)` takes its 16 outputs (before the gate). Returns `false`,
/// doing nothing, when the AVX-512 kernels are off.
pub fn block16<'a>(
    len: usize,
    h: &mut [[f32; N]; N],
    at: &[[f32; N]; N],
    dd: &[f32; N],
    token: impl Fn(usize) -> Token<'a>,
    write: &mut impl FnMut(usize, &[f32; N]),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        // SAFETY: enable_avx512's contract gives the CPU features.
        unsafe { x86::block16(len, h, at, dd, token, write) };
        return true;
    }
    let _ = (len, h, at, dd, token, write);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Token, N};
    use core::arch::x86_64::*;

    /// [`crate::kernels::act::exp_fast`], lane-wise, the same operations in
    /// the same order.
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        const LOG2E: f32 = core::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        const ROUND: f32 = 12_582_912.0;
        let s = _mm512_set1_ps;
        let x = _mm512_min_ps(_mm512_max_ps(x, s(-87.0)), s(88.0));
        let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, s(LOG2E)), s(ROUND)), s(ROUND));
        let r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, s(LN2_HI))), _mm512_mul_ps(n, s(LN2_LO)));
        let mut p = _mm512_mul_ps(r, s(1.0 / 720.0));
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0] {
            p = _mm512_mul_ps(r, _mm512_add_ps(s(c), p));
        }
        p = _mm512_add_ps(s(1.0), p);
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_mul_ps(p, _mm512_castsi512_ps(e))
    }

    /// # Safety
    /// AVX-512 F/BW/VL are available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn block16<'a>(
        len: usize,
        h: &mut [[f32; N]; N],
        at: &[[f32; N]; N],
        dd: &[f32; N],
        token: impl Fn(usize) -> Token<'a>,
        write: &mut impl FnMut(usize, &[f32; N]),
    ) {
        let mut hv: [__m512; N] = core::array::from_fn(|n| _mm512_loadu_ps(h[n].as_ptr()));
        let ddv = _mm512_loadu_ps(dd.as_ptr());
        for t in 0..len {
            let tk = token(t);
            let xv = _mm512_loadu_ps(tk.x.as_ptr());
            let dtv = _mm512_loadu_ps(tk.dt.as_ptr());
            let dtx = _mm512_mul_ps(dtv, xv);
            let mut p = [_mm512_setzero_ps(); N];
            for n in 0..N {
                let e = exp16(_mm512_mul_ps(dtv, _mm512_loadu_ps(at[n].as_ptr())));
                let v = _mm512_add_ps(_mm512_mul_ps(e, hv[n]), _mm512_mul_ps(dtx, _mm512_set1_ps(tk.b[n])));
                hv[n] = v;
                p[n] = _mm512_add_ps(_mm512_setzero_ps(), _mm512_mul_ps(v, _mm512_set1_ps(tk.c[n])));
            }
            // lane_sum's tree across the states.
            let mut w = N;
            while w > 1 {
                w /= 2;
                for n in 0..w {
                    p[n] = _mm512_add_ps(p[n], p[n + w]);
                }
            }
            let mut y = [0.0f32; N];
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_add_ps(p[0], _mm512_mul_ps(ddv, xv)));
            write(t, &y);
        }
        for n in 0..N {
            _mm512_storeu_ps(h[n].as_mut_ptr(), hv[n]);
        }
    }
}

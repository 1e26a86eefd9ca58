//! The causal conv of width 4 (every published Mamba-1) over 16 channels in
//! AVX-512 registers, chosen at run time with the tiles
//! ([`super::simd::avx512_enabled`]).
//!
//! The state and the taps are stored channel by channel (`[16, 4]`), which
//! the portable block turns around one value at a time (most of a decode
//! step's conv); here four permutes a direction do it. The arithmetic is
//! [`super::conv`]'s operation for operation (the bias, then each tap times
//! its input, oldest first, a multiply then an add; SiLU as `x / (1 +
//! exp(-x))` with [`super::act::exp_fast`]'s steps), so every mode gives
//! the same bits.
#![allow(unsafe_code)]

/// Channels in a block, and the conv width this kernel takes.
pub const N: usize = 16;
pub const K: usize = 4;

/// Run `len` tokens through 16 channels: `state` their windows `[16, 4]`
/// (oldest first, left holding the last four inputs), `taps` their weights
/// `[16, 4]`, `x(t)` token `t`'s 16 inputs, `write(t, out)` its 16 outputs
/// (SiLU applied). Returns `false`, doing nothing, when the AVX-512 kernels
/// are off.
pub fn block16<'a>(
    len: usize,
    state: &mut [f32; N * K],
    taps: &[f32; N * K],
    bias: &[f32; N],
    x: impl Fn(usize) -> &'a [f32; N],
    write: &mut impl FnMut(usize, &[f32; N]),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        // SAFETY: enable_avx512's contract gives the CPU features.
        unsafe { x86::block16(len, state, taps, bias, x, write) };
        return true;
    }
    let _ = (len, state, taps, bias, x, write);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{K, N};
    use core::arch::x86_64::*;

    /// `[16 channels, 4 taps]` in four registers (channels `4i..4i + 4` in
    /// register `i`) to `[4 taps, 16 channels]`.
    #[inline(always)]
    unsafe fn by_tap(a: [__m512; K]) -> [__m512; K] {
        // Lane l of the pair (a[0], a[1]) of channels 0..8: tap l / 8 (+2 for
        // `hi`) of channel l % 8.
        let lo = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
        let hi = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
        let (u0, u1) = (_mm512_permutex2var_ps(a[0], lo, a[1]), _mm512_permutex2var_ps(a[0], hi, a[1]));
        let (v0, v1) = (_mm512_permutex2var_ps(a[2], lo, a[3]), _mm512_permutex2var_ps(a[2], hi, a[3]));
        [
            _mm512_shuffle_f32x4::<0b01_00_01_00>(u0, v0),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(u0, v0),
            _mm512_shuffle_f32x4::<0b01_00_01_00>(u1, v1),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(u1, v1),
        ]
    }

    /// The inverse of [`by_tap`].
    #[inline(always)]
    unsafe fn by_channel(t: [__m512; K]) -> [__m512; K] {
        // u0 = [tap 0 | tap 1] of channels 0..8, v0 of channels 8..16; u1, v1 taps 2, 3.
        let u0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(t[0], t[1]);
        let v0 = _mm512_shuffle_f32x4::<0b11_10_11_10>(t[0], t[1]);
        let u1 = _mm512_shuffle_f32x4::<0b01_00_01_00>(t[2], t[3]);
        let v1 = _mm512_shuffle_f32x4::<0b11_10_11_10>(t[2], t[3]);
        // Lane 4m + j: tap j of channel m (m + 4 for `second`).
        let first = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
        let second = _mm512_setr_epi32(4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31);
        [
            _mm512_permutex2var_ps(u0, first, u1),
            _mm512_permutex2var_ps(u0, second, u1),
            _mm512_permutex2var_ps(v0, first, v1),
            _mm512_permutex2var_ps(v0, second, v1),
        ]
    }

    #[inline(always)]
    unsafe fn load4(p: &[f32; N * K]) -> [__m512; K] {
        // A loop, not `array::from_fn`: a closure does not inherit the
        // caller's target features (see `avx512::x86::lane_sums16`).
        let mut v = [_mm512_setzero_ps(); K];
        for (i, v) in v.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(p.as_ptr().add(i * N));
        }
        v
    }

    /// # Safety
    /// AVX-512 F/BW/VL are available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn block16<'a>(
        len: usize,
        state: &mut [f32; N * K],
        taps: &[f32; N * K],
        bias: &[f32; N],
        x: impl Fn(usize) -> &'a [f32; N],
        write: &mut impl FnMut(usize, &[f32; N]),
    ) {
        let tv = by_tap(load4(taps));
        let mut win = by_tap(load4(state));
        let b = _mm512_loadu_ps(bias.as_ptr());
        // The sign bit flipped as integers: `_mm512_xor_ps` is AVX-512 DQ, which
        // this function does not enable (it was a call per use).
        let (one, sign) = (_mm512_set1_ps(1.0), _mm512_set1_epi32(i32::MIN));
        for t in 0..len {
            win = [win[1], win[2], win[3], _mm512_loadu_ps(x(t).as_ptr())];
            let mut acc = b;
            for c in 0..K {
                acc = _mm512_add_ps(acc, _mm512_mul_ps(tv[c], win[c]));
            }
            let e = super::super::scan_avx512::exp16(_mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(acc),
                sign,
            )));
            let mut out = [0.0f32; N];
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_div_ps(acc, _mm512_add_ps(one, e)));
            write(t, &out);
        }
        let back = by_channel(win);
        for (i, v) in back.iter().enumerate() {
            _mm512_storeu_ps(state.as_mut_ptr().add(i * N), *v);
        }
    }
}

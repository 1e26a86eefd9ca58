//! The selective scan with 16 states a channel (every published Mamba-1)
//! in AVX-512 registers, chosen at run time with the tiles
//! ([`super::simd::avx512_enabled`]):
//! - [`block16`], the prefill: up to 16 channels' states as 16 registers
//!   carried across the tokens (compilers left to vectorise that loop spill
//!   them on every token);
//! - [`step16`], the decode step: `h . C` of 16 channels reduced together,
//!   across registers, instead of one horizontal sum each.
//!
//! The arithmetic is [`super::scan`]'s with fused multiply-adds: `e^(dt A)`
//! is `exp_fast`'s reduction and polynomial in 15 operations where separate
//! multiplies and adds take 25, and the update is `fma(e, h, dt x B)`. The
//! exponential was three quarters of the scan's work, and the scan the
//! largest part of a prefill after the products. Both kernels do the same
//! operations in the same order (`h . C` in `lane_sum`'s tree), so prefill
//! and step give the same bits as each other (not as the portable code:
//! within a few ulps of it). In this mode every channel of a 16-state model
//! goes through them, so ragged = solo and prefill = step still hold.
#![allow(unsafe_code)]

/// Channels per block, and states per channel.
pub const N: usize = 16;

/// One token's inputs for the block: `x`, `dt` and the gate `z` of its
/// channels (at least the block's `nch`), `B` and `C` (16 each).
pub struct Token<'a> {
    pub x: &'a [f32],
    pub dt: &'a [f32],
    pub z: &'a [f32],
    pub b: &'a [f32; N],
    pub c: &'a [f32; N],
}

/// Run `len` tokens through a block of `nch <= 16` channels: `h[n][j]`
/// state `n` of channel `j`, `at[n][j]` its A, `dd[j]` its D; `token(t)`
/// gives token `t`'s inputs and `write(t, y)` takes its outputs, gated:
/// `y * silu(z)` with `silu`'s operations, so its bits (lanes past `nch`
/// are to be ignored). Returns `false`, doing nothing, when the AVX-512
/// kernels are off.
#[allow(clippy::too_many_arguments)]
pub fn block16<'a>(
    len: usize,
    nch: usize,
    h: &mut [[f32; N]; N],
    at: &[[f32; N]; N],
    dd: &[f32; N],
    token: impl Fn(usize) -> Token<'a>,
    write: &mut impl FnMut(usize, &[f32; N]),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        assert!(nch <= N, "block16: more than 16 channels");
        // The kernel loads `nch` lanes of x, dt and z through their pointers.
        let token = |t| {
            let tk = token(t);
            assert!(
                tk.x.len() >= nch && tk.dt.len() >= nch && tk.z.len() >= nch,
                "block16: short token rows"
            );
            tk
        };
        // SAFETY: enable_avx512's contract gives the CPU features; rows checked above.
        unsafe { x86::block16(len, nch, h, at, dd, token, write) };
        return true;
    }
    let _ = (len, nch, h, at, dd, token, write);
    false
}

/// One token through channels with 16 states each (`h`: their states
/// `[n, 16]`; `a`: their rows of A `[n, 16]`; `x`, `dt`: their inputs `[n]`;
/// `b`, `c`: the token's B and C): `y[k] = h_k . C`, before D and the gate,
/// as [`block16`] computes it. Sixteen channels' `h . C` are reduced
/// together, across registers, instead of one register each. Returns
/// `false`, doing nothing, when the AVX-512 kernels are off.
pub fn step16(
    h: &mut [f32],
    a: &[f32],
    x: &[f32],
    dt: &[f32],
    b: &[f32; N],
    c: &[f32; N],
    y: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        let n = y.len();
        assert!(
            h.len() >= n * N && a.len() >= n * N && x.len() >= n && dt.len() >= n,
            "step16: short operands"
        );
        // SAFETY: lengths checked just above; enable_avx512's contract gives the features.
        unsafe { x86::step16(h, a, x, dt, b, c, y) };
        return true;
    }
    let _ = (h, a, x, dt, b, c, y);
    false
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::exp16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Token, N};
    use crate::kernels::act::{EXP_HI, EXP_LO, LN2_HI, LN2_LO, LOG2E, ROUND};
    use crate::kernels::avx512::x86::lane_sums16;
    use core::arch::x86_64::*;

    /// How far ahead of the channel it updates [`step16`] asks for a state
    /// (48 channels, 3 KiB): a batched step streams every sequence's states
    /// from memory, 96 KiB a sequence and layer at 130m, and the hardware
    /// prefetchers alone left it waiting. Measured at batch 64 (bf16, 130m,
    /// 2 threads, `bench --profile`), six pairs alternated with the kernel
    /// without it: the step's scan took less in all six (12.1 -> 10.5,
    /// 17.9 -> 16.8, 17.6 -> 15.2, 17.9 -> 16.9, 17.7 -> 17.0, 18.0 -> 17.4
    /// ms), the whole step less in five (at most 3%; decode tokens/s moved
    /// within the noise); batch-1 decode unchanged (0.953 -> 0.950 of the
    /// bound, four pairs). 16 channels ahead gained less, 96 and 192 no more.
    const STATE_AHEAD: usize = 48;

    /// [`crate::kernels::act::exp_fast`], lane-wise, the same operations in
    /// the same order.
    #[inline(always)]
    pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let x = _mm512_min_ps(_mm512_max_ps(x, s(EXP_LO)), s(EXP_HI));
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

    /// `e^x` for the scan: [`exp16`]'s reduction and polynomial with fused
    /// multiply-adds (15 operations, not 25), and `2^n` from the low bits
    /// of the rounded `x log2(e)` as `exp_fast` takes it. A NaN stays NaN
    /// (`max`/`min` return their second operand when one is NaN).
    #[inline(always)]
    unsafe fn exp16_fused(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let x = _mm512_min_ps(s(EXP_HI), _mm512_max_ps(s(EXP_LO), x));
        let shifted = _mm512_fmadd_ps(x, s(LOG2E), s(ROUND));
        let n = _mm512_sub_ps(shifted, s(ROUND));
        let r = _mm512_fnmadd_ps(n, s(LN2_LO), _mm512_fnmadd_ps(n, s(LN2_HI), x));
        let mut p = s(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, s(c));
        }
        // `shifted` is ROUND + n (|n| <= 127, ROUND's low 9 bits are 0):
        // `(bits + 127) << 23` is 2^n's bits.
        let e =
            _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(127)));
        _mm512_mul_ps(p, _mm512_castsi512_ps(e))
    }

    /// # Safety
    /// AVX-512 F/BW/VL are available; `h`, `a` hold `y.len() * 16` values,
    /// `x`, `dt` at least `y.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn step16(
        h: &mut [f32],
        a: &[f32],
        x: &[f32],
        dt: &[f32],
        b: &[f32; N],
        c: &[f32; N],
        y: &mut [f32],
    ) {
        let (bv, cv) = (_mm512_loadu_ps(b.as_ptr()), _mm512_loadu_ps(c.as_ptr()));
        let n = y.len();
        let mut k0 = 0;
        while k0 < n {
            let m = (n - k0).min(N);
            let mut p = [_mm512_setzero_ps(); N];
            for (j, pj) in p.iter_mut().enumerate().take(m) {
                let k = k0 + j;
                let (dtv, xv) = (*dt.get_unchecked(k), *x.get_unchecked(k));
                let hp = h.as_mut_ptr().add(k * N);
                crate::kernels::simd::prefetch(hp.wrapping_add(STATE_AHEAD * N));
                let e =
                    exp16_fused(_mm512_mul_ps(_mm512_set1_ps(dtv), _mm512_loadu_ps(a.as_ptr().add(k * N))));
                let dtx = _mm512_set1_ps(dtv * xv);
                let v = _mm512_fmadd_ps(e, _mm512_loadu_ps(hp), _mm512_mul_ps(dtx, bv));
                _mm512_storeu_ps(hp, v);
                *pj = _mm512_mul_ps(v, cv);
            }
            let sums = lane_sums16(p);
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(k0), ((1u32 << m) - 1) as __mmask16, sums);
            k0 += m;
        }
    }

    /// `silu(z)`: `z / (1 + e^-z)` with [`exp16`], the operations of
    /// [`crate::kernels::act::silu`], so the same bits.
    #[inline(always)]
    unsafe fn silu16(z: __m512) -> __m512 {
        // -z as a sign flip, exactly the scalar negation (`0 - z` is not, for 0 and NaN).
        let neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN)));
        _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0), exp16(neg)))
    }

    /// # Safety
    /// AVX-512 F/BW/VL are available; every token's `x`, `dt` and `z` hold `nch <= 16` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn block16<'a>(
        len: usize,
        nch: usize,
        h: &mut [[f32; N]; N],
        at: &[[f32; N]; N],
        dd: &[f32; N],
        token: impl Fn(usize) -> Token<'a>,
        write: &mut impl FnMut(usize, &[f32; N]),
    ) {
        let m = ((1u32 << nch) - 1) as __mmask16;
        // A loop, not `array::from_fn`: a closure does not inherit the
        // target features (see `avx512::x86::lane_sums16`).
        let mut hv = [_mm512_setzero_ps(); N];
        for (v, hn) in hv.iter_mut().zip(h.iter()) {
            *v = _mm512_loadu_ps(hn.as_ptr());
        }
        let ddv = _mm512_loadu_ps(dd.as_ptr());
        for t in 0..len {
            let tk = token(t);
            let xv = _mm512_maskz_loadu_ps(m, tk.x.as_ptr());
            let dtv = _mm512_maskz_loadu_ps(m, tk.dt.as_ptr());
            let gate = silu16(_mm512_maskz_loadu_ps(m, tk.z.as_ptr()));
            let dtx = _mm512_mul_ps(dtv, xv);
            // State n's term of y: its update, then `h C`, as step16's
            // lanes. Spelled out per state, so the 16 states stay in
            // registers (a loop over them kept them on the stack).
            macro_rules! term {
                ($n:literal) => {{
                    let e = exp16_fused(_mm512_mul_ps(dtv, _mm512_loadu_ps(at[$n].as_ptr())));
                    let v = _mm512_fmadd_ps(e, hv[$n], _mm512_mul_ps(dtx, _mm512_set1_ps(tk.b[$n])));
                    hv[$n] = v;
                    _mm512_mul_ps(v, _mm512_set1_ps(tk.c[$n]))
                }};
            }
            // lane_sum's tree across the states (n + 8, then + 4, + 2, + 1),
            // walked depth first so a few partial sums are live, not 16.
            macro_rules! pair {
                ($a:literal, $b:literal) => {
                    _mm512_add_ps(term!($a), term!($b))
                };
            }
            use _mm512_add_ps as add;
            let even = add(add(pair!(0, 8), pair!(4, 12)), add(pair!(2, 10), pair!(6, 14)));
            let odd = add(add(pair!(1, 9), pair!(5, 13)), add(pair!(3, 11), pair!(7, 15)));
            let p0 = add(even, odd);
            let mut y = [0.0f32; N];
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_mul_ps(_mm512_add_ps(p0, _mm512_mul_ps(ddv, xv)), gate));
            write(t, &y);
        }
        for n in 0..N {
            _mm512_storeu_ps(h[n].as_mut_ptr(), hv[n]);
        }
    }
}

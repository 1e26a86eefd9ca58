//! aarch64 NEON dot products of a stored weight row with f32 activations.
//!
//! NEON is part of the aarch64 baseline, so these run without detection.
//! Weights are widened in registers: bf16 by a shift, f16 with FCVTL (base
//! NEON, not the FP16 extension), Q8_0 as `q * d`, which is exact, so a
//! Q8_0 row gives the bits of its dequantized f32 row.
//!
//! Each block of 16 weights feeds four independent FMA chains, one 4-lane
//! register each (two chains of 2 x float32x4: the even and the odd 8), so a
//! lone row (decode) does not wait on the FMA latency. [`dot4`] sums each
//! row in exactly the order [`dot`] does, so a token's result does not depend
//! on its neighbours. The module is compiled only where NEON is enabled
//! (every aarch64 target but the soft-float ones).
#![allow(unsafe_code)]

use crate::tensor::{bf16_to_f32, q8_weight, WData, Q8_BLOCK};
use core::arch::aarch64::*;
use half::{bf16, f16};

/// `sum_i w[i] * x[i]` over the shorter of the two.
#[inline]
pub fn dot(w: WData<'_>, x: &[f32]) -> f32 {
    // SAFETY: NEON is enabled (the module is compiled only then) and
    // `dot_impl` reads below the length it is given, which no row exceeds.
    unsafe {
        match w {
            WData::F32(a) => dot_impl(a.as_ptr(), a.len(), x),
            WData::F16(a) => dot_impl(a.as_ptr(), a.len(), x),
            WData::BF16(a) => dot_impl(a.as_ptr(), a.len(), x),
            WData::Q8_0 { q, d } => dot_impl(Q8Src::new(q, d), q8_len(q, d), x),
        }
    }
}

/// One weight row against four activation rows; row `k` of the result has
/// the bits of `dot(w, x[k])`.
#[inline]
pub fn dot4(w: WData<'_>, x: [&[f32]; 4]) -> [f32; 4] {
    // SAFETY: as in `dot`; `dot4_impl` also stops at the shortest `x` row.
    unsafe {
        match w {
            WData::F32(a) => dot4_impl(a.as_ptr(), a.len(), x),
            WData::F16(a) => dot4_impl(a.as_ptr(), a.len(), x),
            WData::BF16(a) => dot4_impl(a.as_ptr(), a.len(), x),
            WData::Q8_0 { q, d } => dot4_impl(Q8Src::new(q, d), q8_len(q, d), x),
        }
    }
}

/// Four f16 values widened as the kernels widen them (exposed so tests can
/// check it against `half` on every bit pattern).
pub fn widen_f16x4(h: [f16; 4]) -> [f32; 4] {
    let mut out = [0.0f32; 4];
    // SAFETY: both arrays hold four elements.
    unsafe { vst1q_f32(out.as_mut_ptr(), (h.as_ptr()).load4(0)) };
    out
}

/// Quants that have a scale.
#[inline(always)]
fn q8_len(q: &[i8], d: &[f16]) -> usize {
    q.len().min(d.len().saturating_mul(Q8_BLOCK))
}

/// Where a product reads its weights, widened to f32.
trait Src: Copy {
    /// Weights `i..i+16` as four registers.
    /// # Safety
    /// They are readable; `i` is a multiple of 16.
    unsafe fn load16(self, i: usize) -> [float32x4_t; 4];
    /// Weights `i..i+4`.
    /// # Safety
    /// They are readable; `i` is a multiple of 4.
    unsafe fn load4(self, i: usize) -> float32x4_t;
    /// Weight `i`.
    /// # Safety
    /// It is readable.
    unsafe fn get(self, i: usize) -> f32;
}

impl Src for *const f32 {
    #[inline(always)]
    unsafe fn load16(self, i: usize) -> [float32x4_t; 4] {
        let p = self.add(i);
        [vld1q_f32(p), vld1q_f32(p.add(4)), vld1q_f32(p.add(8)), vld1q_f32(p.add(12))]
    }
    #[inline(always)]
    unsafe fn load4(self, i: usize) -> float32x4_t {
        vld1q_f32(self.add(i))
    }
    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        *self.add(i)
    }
}

impl Src for *const bf16 {
    #[inline(always)]
    unsafe fn load16(self, i: usize) -> [float32x4_t; 4] {
        // bf16 is the top half of an f32: widen with a shift of 16.
        let p = self.add(i) as *const u16;
        let (a, b) = (vld1q_u16(p), vld1q_u16(p.add(8)));
        [
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(a))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(a)),
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(b))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(b)),
        ]
    }
    #[inline(always)]
    unsafe fn load4(self, i: usize) -> float32x4_t {
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(self.add(i) as *const u16)))
    }
    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        bf16_to_f32(*self.add(i))
    }
}

impl Src for *const f16 {
    #[inline(always)]
    unsafe fn load16(self, i: usize) -> [float32x4_t; 4] {
        let p = self.add(i) as *const u16;
        let (a, b) = (vreinterpretq_f16_u16(vld1q_u16(p)), vreinterpretq_f16_u16(vld1q_u16(p.add(8))));
        [
            vcvt_f32_f16(vget_low_f16(a)),
            vcvt_high_f32_f16(a),
            vcvt_f32_f16(vget_low_f16(b)),
            vcvt_high_f32_f16(b),
        ]
    }
    #[inline(always)]
    unsafe fn load4(self, i: usize) -> float32x4_t {
        vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(self.add(i) as *const u16)))
    }
    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        (*self.add(i)).to_f32()
    }
}

/// Q8_0 blocks: int8 quants, one f16 scale per [`Q8_BLOCK`].
#[derive(Clone, Copy)]
struct Q8Src {
    q: *const i8,
    d: *const f16,
}

impl Q8Src {
    fn new(q: &[i8], d: &[f16]) -> Self {
        Q8Src { q: q.as_ptr(), d: d.as_ptr() }
    }
    /// The scale of weight `i`, broadcast.
    #[inline(always)]
    unsafe fn scale(self, i: usize) -> float32x4_t {
        vdupq_n_f32((*self.d.add(i / Q8_BLOCK)).to_f32())
    }
}

/// Four int32 lanes to f32 times the scale: exact (8 x 11 significant bits).
#[inline(always)]
unsafe fn q8_quad(q: int32x4_t, s: float32x4_t) -> float32x4_t {
    vmulq_f32(vcvtq_f32_s32(q), s)
}

impl Src for Q8Src {
    #[inline(always)]
    unsafe fn load16(self, i: usize) -> [float32x4_t; 4] {
        // 16 weights from a multiple of 16 lie in one block of 32.
        let s = self.scale(i);
        let v = vld1q_s8(self.q.add(i));
        let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        [
            q8_quad(vmovl_s16(vget_low_s16(lo)), s),
            q8_quad(vmovl_high_s16(lo), s),
            q8_quad(vmovl_s16(vget_low_s16(hi)), s),
            q8_quad(vmovl_high_s16(hi), s),
        ]
    }
    #[inline(always)]
    unsafe fn load4(self, i: usize) -> float32x4_t {
        // Only four bytes are readable: widen them from a padded copy.
        let b = core::ptr::read_unaligned(self.q.add(i) as *const [i8; 4]);
        let w = vmovl_s8(vld1_s8([b[0], b[1], b[2], b[3], 0, 0, 0, 0].as_ptr()));
        q8_quad(vmovl_s16(vget_low_s16(w)), self.scale(i))
    }
    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        q8_weight(*self.q.add(i), *self.d.add(i / Q8_BLOCK))
    }
}

/// The fixed reduction of the four chains, shared by [`dot_impl`] and [`dot4_impl`].
#[inline(always)]
unsafe fn reduce(a: [float32x4_t; 4]) -> f32 {
    vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])))
}

/// `sum w[i] x[i]` for `i < min(n, x.len())`: blocks of 16 into the four
/// chains, then leftover groups of 4 into chains 0, 1, 2, then a scalar tail.
/// # Safety
/// `w` has `n` readable weights.
#[inline(always)]
unsafe fn dot_impl<S: Src>(w: S, n: usize, x: &[f32]) -> f32 {
    let n = n.min(x.len());
    let xp = x.as_ptr();
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        let wv = w.load16(i);
        for (j, a) in acc.iter_mut().enumerate() {
            *a = vfmaq_f32(*a, wv[j], vld1q_f32(xp.add(i + 4 * j)));
        }
        i += 16;
    }
    let mut j = 0;
    while i + 4 <= n {
        acc[j] = vfmaq_f32(acc[j], w.load4(i), vld1q_f32(xp.add(i)));
        i += 4;
        j += 1;
    }
    let mut s = reduce(acc);
    while i < n {
        s += w.get(i) * *xp.add(i);
        i += 1;
    }
    s
}

/// [`dot_impl`] for four rows of x, each weight register widened once.
/// # Safety
/// `w` has `n` readable weights.
#[inline(always)]
unsafe fn dot4_impl<S: Src>(w: S, n: usize, x: [&[f32]; 4]) -> [f32; 4] {
    let n = x.iter().fold(n, |m, r| m.min(r.len()));
    let xp = x.map(|r| r.as_ptr());
    let mut acc = [[vdupq_n_f32(0.0); 4]; 4];
    let mut i = 0;
    while i + 16 <= n {
        let wv = w.load16(i);
        for (ak, p) in acc.iter_mut().zip(xp) {
            for (j, a) in ak.iter_mut().enumerate() {
                *a = vfmaq_f32(*a, wv[j], vld1q_f32(p.add(i + 4 * j)));
            }
        }
        i += 16;
    }
    let mut j = 0;
    while i + 4 <= n {
        let wv = w.load4(i);
        for (ak, p) in acc.iter_mut().zip(xp) {
            ak[j] = vfmaq_f32(ak[j], wv, vld1q_f32(p.add(i)));
        }
        i += 4;
        j += 1;
    }
    let mut out = [0.0f32; 4];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = reduce(a);
    }
    while i < n {
        let wv = w.get(i);
        for (o, p) in out.iter_mut().zip(xp) {
            *o += wv * *p.add(i);
        }
        i += 1;
    }
    out
}

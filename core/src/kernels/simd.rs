//! x86-64 AVX2 + FMA (+ F16C) dot products, chosen at run time.
//!
//! The core cannot detect CPU features without `std`, so the caller that
//! can (the std runtime, with `is_x86_feature_detected!`) switches them on
//! once through [`enable_avx2`]. Until then, and on every other target, the
//! portable kernels in [`mod@super::dot`] run; they stay the reference the tests
//! compare against.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicBool, Ordering};

static AVX2: AtomicBool = AtomicBool::new(false);

/// Use the AVX2/FMA/F16C kernels from now on.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (the runtime checks this with
/// `is_x86_feature_detected!` before calling).
pub unsafe fn enable_avx2() {
    AVX2.store(cfg!(target_arch = "x86_64"), Ordering::Relaxed);
}

/// Whether the AVX2 kernels are in use.
#[inline(always)]
pub fn avx2_enabled() -> bool {
    AVX2.load(Ordering::Relaxed)
}

static AVX512: AtomicBool = AtomicBool::new(false);

/// Use the AVX-512 tiles ([`super::avx512`]) for matrix products and dot
/// products from now on (and the AVX2 kernels for the rest).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL as well as AVX2, FMA and F16C.
pub unsafe fn enable_avx512() {
    enable_avx2();
    AVX512.store(cfg!(target_arch = "x86_64"), Ordering::Relaxed);
}

/// Switch the AVX-512 tiles (and VNNI) off again (the AVX2 kernels stay as
/// they were), so tests and benchmarks can compare both in one process.
pub fn disable_avx512() {
    AVX512.store(false, Ordering::Relaxed);
    VNNI.store(false, Ordering::Relaxed);
    BF16_DOT.store(false, Ordering::Relaxed);
}

/// Whether the AVX-512 tiles are in use.
#[inline(always)]
pub fn avx512_enabled() -> bool {
    AVX512.load(Ordering::Relaxed)
}

static VNNI: AtomicBool = AtomicBool::new(false);

/// Run Q8_0 products in int8 with AVX-512 VNNI ([`super::q8_avx512`]) from
/// now on; without it, the AVX-512 tiles dequantize Q8_0 weights to f32.
/// Switches the AVX-512 tiles on too.
///
/// # Safety
/// As [`enable_avx512`], and the CPU must support AVX-512 VNNI.
pub unsafe fn enable_vnni() {
    enable_avx512();
    VNNI.store(cfg!(target_arch = "x86_64"), Ordering::Relaxed);
}

/// Whether Q8_0 products run in int8 with AVX-512 VNNI.
#[inline(always)]
pub fn vnni_enabled() -> bool {
    VNNI.load(Ordering::Relaxed)
}

static BF16_DOT: AtomicBool = AtomicBool::new(false);

/// Run bf16 products with AVX-512 BF16's `vdpbf16ps` from now on, over
/// activations rounded to bf16 ([`super::bf16_avx512`]): about twice the
/// products a cycle, at bf16's precision instead of f32's. Switches the
/// AVX-512 tiles on too. Other formats are not affected.
///
/// # Safety
/// As [`enable_avx512`], and the CPU must support AVX-512 BF16.
pub unsafe fn enable_bf16_dot() {
    enable_avx512();
    BF16_DOT.store(cfg!(target_arch = "x86_64"), Ordering::Relaxed);
}

/// Back to f32 products over widened bf16 weights (the AVX-512 tiles stay on).
pub fn disable_bf16_dot() {
    BF16_DOT.store(false, Ordering::Relaxed);
}

/// Whether bf16 products run with `vdpbf16ps` over bf16 activations.
#[inline(always)]
pub fn bf16_dot_enabled() -> bool {
    BF16_DOT.load(Ordering::Relaxed)
}

/// `out[i] = src[i]` widened to f32 (`out` as long as `src`): F16C's
/// `vcvtph2ps`, eight at a time, where the AVX2 kernels are on. In this
/// `no_std` crate `half` converts in software, which was half of an f16
/// decode step's conv (its taps are widened a block at a time). Exact
/// either way, so the same bits.
pub fn widen_f16(src: &[half::f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "widen_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2_enabled() {
        // SAFETY: enable_avx2's contract gives F16C; the lengths are equal.
        unsafe { x86::widen_f16(src, out) };
        return;
    }
    out.iter_mut().zip(src).for_each(|(o, h)| *o = h.to_f32());
}

/// Ask for the cache line holding `p` ahead of its use: a hint that never
/// faults (the address is not dereferenced, so it may be out of bounds).
/// Kernels that walk a column of a row-major buffer (16 channels a token)
/// would otherwise wait on every row: a stride the prefetchers miss.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch has no effect on memory and never faults; SSE is
    // part of x86-64.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Defines `pub fn $name` whose body is compiled three times, for AVX-512,
/// for AVX2 and portable, and picked at run time by the switches above. The
/// body is ordinary Rust: this lets the compiler vectorise it at the wider
/// width. Rust never fuses a multiply and an add on its own, and the bodies
/// fix their summation order, so all three give the same bits.
macro_rules! multiversion {
    ($(#[$attr:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        #[allow(unsafe_code)]
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if $crate::kernels::simd::avx512_enabled() {
                    // SAFETY: enable_avx512's contract: the CPU has these features.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::kernels::simd::avx2_enabled() {
                    // SAFETY: enable_avx2's contract: the CPU has these features.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use core::arch::x86_64::*;
    use half::{bf16, f16};

    /// [`super::widen_f16`].
    ///
    /// # Safety
    /// AVX2 and F16C are available; `out` is as long as `src`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16(src: &[f16], out: &mut [f32]) {
        let mut i = 0;
        while i + 8 <= src.len() {
            _mm256_storeu_ps(out.as_mut_ptr().add(i), f16::load8(src.as_ptr().add(i)));
            i += 8;
        }
        for (o, h) in out[i..].iter_mut().zip(&src[i..]) {
            *o = h.to_f32();
        }
    }

    /// Eight weights widened to f32.
    trait Widen: Copy {
        /// # Safety
        /// `p` points at 8 readable elements; AVX2/F16C are available.
        unsafe fn load8(p: *const Self) -> __m256;
        fn to_f32(self) -> f32;
    }

    impl Widen for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            self
        }
    }

    impl Widen for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // bf16 is the top half of an f32: zero-extend and shift.
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            crate::tensor::bf16_to_f32(self)
        }
    }

    impl Widen for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Where a dot product reads its weights: eight at a time, or one.
    trait Src8: Copy {
        /// Weights `i..i+8` widened.
        /// # Safety
        /// They are readable; AVX2/F16C are available.
        unsafe fn load8(self, i: usize) -> __m256;
        /// Weight `i` widened.
        /// # Safety
        /// It is readable.
        unsafe fn get(self, i: usize) -> f32;
    }

    impl<T: Widen> Src8 for *const T {
        #[inline(always)]
        unsafe fn load8(self, i: usize) -> __m256 {
            T::load8(self.add(i))
        }
        #[inline(always)]
        unsafe fn get(self, i: usize) -> f32 {
            (*self.add(i)).to_f32()
        }
    }

    /// Q8_0 blocks: `q * d`, exact in f32.
    #[derive(Clone, Copy)]
    struct Q8Src {
        q: *const i8,
        d: *const f16,
    }

    impl Src8 for Q8Src {
        #[inline(always)]
        unsafe fn load8(self, i: usize) -> __m256 {
            let q =
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(self.q.add(i) as *const __m128i)));
            let d = (*self.d.add(i / crate::tensor::Q8_BLOCK)).to_bits() as i16;
            _mm256_mul_ps(q, _mm256_cvtph_ps(_mm_set1_epi16(d)))
        }
        #[inline(always)]
        unsafe fn get(self, i: usize) -> f32 {
            crate::tensor::q8_weight(*self.q.add(i), *self.d.add(i / crate::tensor::Q8_BLOCK))
        }
    }

    /// `sum w[i] x[i]` over `n` weights with two FMA chains (even and odd
    /// blocks of 8). [`dot4_impl`] sums in exactly the same order, so a row
    /// gives the same bits whether it is computed alone or in a block of four.
    #[inline(always)]
    unsafe fn dot_impl<S: Src8>(w: S, n: usize, x: &[f32]) -> f32 {
        let n = n.min(x.len());
        let xp = x.as_ptr();
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            a0 = _mm256_fmadd_ps(w.load8(i), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(w.load8(i + 8), _mm256_loadu_ps(xp.add(i + 8)), a1);
            i += 16;
        }
        if i + 8 <= n {
            a0 = _mm256_fmadd_ps(w.load8(i), _mm256_loadu_ps(xp.add(i)), a0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(a0, a1));
        while i < n {
            s += w.get(i) * x[i];
            i += 1;
        }
        s
    }

    /// Four rows of x against one weight row: the weights are loaded and
    /// widened once for the four tokens. Same summation order as [`dot_impl`].
    #[inline(always)]
    unsafe fn dot4_impl<S: Src8>(w: S, n: usize, x: [&[f32]; 4]) -> [f32; 4] {
        let n = x.iter().fold(n, |m, r| m.min(r.len()));
        let xp = x.map(|r| r.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); 4];
        let mut a1 = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= n {
            let (w0, w1) = (w.load8(i), w.load8(i + 8));
            for k in 0..4 {
                a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[k].add(i)), a0[k]);
                a1[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[k].add(i + 8)), a1[k]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let w0 = w.load8(i);
            for k in 0..4 {
                a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[k].add(i)), a0[k]);
            }
            i += 8;
        }
        let mut out = [0.0f32; 4];
        for k in 0..4 {
            out[k] = hsum(_mm256_add_ps(a0[k], a1[k]));
        }
        while i < n {
            let wv = w.get(i);
            for k in 0..4 {
                out[k] += wv * x[k][i];
            }
            i += 1;
        }
        out
    }

    macro_rules! entry {
        ($name:ident, $name4:ident, $t:ty) => {
            /// # Safety
            /// AVX2, FMA and F16C must be available.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(w: &[$t], x: &[f32]) -> f32 {
                dot_impl(w.as_ptr(), w.len(), x)
            }
            /// # Safety
            /// AVX2, FMA and F16C must be available.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name4(w: &[$t], x: [&[f32]; 4]) -> [f32; 4] {
                dot4_impl(w.as_ptr(), w.len(), x)
            }
        };
    }
    entry!(dot_f32, dot4_f32, f32);
    entry!(dot_bf16, dot4_bf16, bf16);
    entry!(dot_f16, dot4_f16, f16);

    /// Q8_0 (`d`: one scale per 32 of `q`).
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(q: &[i8], d: &[f16], x: &[f32]) -> f32 {
        let n = q.len().min(d.len() * crate::tensor::Q8_BLOCK);
        dot_impl(Q8Src { q: q.as_ptr(), d: d.as_ptr() }, n, x)
    }
    /// Q8_0 against four rows of x.
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q8(q: &[i8], d: &[f16], x: [&[f32]; 4]) -> [f32; 4] {
        let n = q.len().min(d.len() * crate::tensor::Q8_BLOCK);
        dot4_impl(Q8Src { q: q.as_ptr(), d: d.as_ptr() }, n, x)
    }
}

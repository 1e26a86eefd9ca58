//! x86-64 AVX-512 tiles of a matrix product, chosen at run time.
//!
//! A tile is `R` weight rows against `T` activation rows. Every (row, token)
//! pair has two 16-lane accumulators, for the even and the odd blocks of 16
//! along `k` (the last block masked, so no scalar tail), added and reduced
//! in one fixed order at the end: a pair gives the same bits in every tile
//! shape. Two chains, not one, because a lone row (decode) would otherwise
//! wait on the FMA latency: one chain caps bf16 at about 20 GB/s a core. So a token's output does
//! not depend on how many other tokens share the product, nor on how the
//! threads split it (ragged = solo, chunked = whole, threaded = sequential).
//!
//! Like the AVX2 kernels, these switch on once through
//! [`super::simd::enable_avx512`], which the std runtime calls after
//! detecting AVX-512 F/BW/VL.
#![allow(unsafe_code)]

use crate::tensor::{Tensor, WData};

/// Weight rows per tile in a blocked product.
const TILE_R: usize = 3;
/// Activation rows per tile: 3 x 4 x 2 accumulators + 6 weights + 1
/// activation fit the 32 vector registers.
const TILE_T: usize = 4;
/// Bytes of weight rows kept hot (in L2) while every token block passes over them.
const PANEL_BYTES: usize = 192 * 1024;

/// `store(t, o, &[x[t] . w[o] + bias[o], ...])` (runs of consecutive features) for features `f0..f1` and all `rows`
/// rows of `x` (`[rows, k]`, `k = w.cols`). Returns `false`, doing nothing,
/// when the AVX-512 kernels are not switched on.
pub fn linear(
    x: &[f32],
    rows: usize,
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    (f0, f1): (usize, usize),
    store: &mut impl FnMut(usize, usize, &[f32]),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        // The tiles read raw pointers: every row they touch must be in bounds.
        assert!(
            f1 * w.cols <= w.len() && rows * w.cols <= x.len(),
            "linear: operands shorter than their shapes"
        );
        let rest = (w.cols, x, rows, bias, (f0, f1));
        match w.data {
            WData::F32(d) => blocked(d.as_ptr(), 4, rest, store),
            WData::F16(d) => blocked(d.as_ptr(), 2, rest, store),
            WData::BF16(d) => blocked(d.as_ptr(), 2, rest, store),
            WData::Q8_0 { q, d } => blocked(x86::Q8Rows { q: q.as_ptr(), d: d.as_ptr() }, 1, rest, store),
        }
        return true;
    }
    let _ = (x, rows, w, bias, f0, f1, store);
    false
}

/// `w . x` over the shorter of the two, in the tiles' order; `None` when
/// the AVX-512 kernels are off.
#[inline]
pub fn dot(w: WData<'_>, x: &[f32]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        let k = w.len().min(x.len());
        // SAFETY: enable_avx512's contract gives the features; both rows
        // hold at least `k` elements.
        let r = unsafe {
            match w {
                WData::F32(a) => x86::tile::<_, 1, 1>([a.as_ptr()], [x.as_ptr()], k),
                WData::F16(a) => x86::tile::<_, 1, 1>([a.as_ptr()], [x.as_ptr()], k),
                WData::BF16(a) => x86::tile::<_, 1, 1>([a.as_ptr()], [x.as_ptr()], k),
                WData::Q8_0 { q, d } => {
                    x86::tile::<_, 1, 1>([x86::Q8Rows { q: q.as_ptr(), d: d.as_ptr() }], [x.as_ptr()], k)
                }
            }
        };
        return Some(r[0][0]);
    }
    let _ = (w, x);
    None
}

/// `k`, `x`, `rows`, `bias` and the feature range of a product.
#[cfg(target_arch = "x86_64")]
type Operands<'x, 'b, 'w> = (usize, &'x [f32], usize, Option<&'b Tensor<'w>>, (usize, usize));

/// The product over weight rows from `w` (`[_, k]`, `esize` bytes per
/// quant or element, the rows `0..f1` in bounds: the caller asserts it).
#[cfg(target_arch = "x86_64")]
fn blocked<W: x86::Rows16>(
    w: W,
    esize: usize,
    (k, x, rows, bias, (f0, f1)): Operands<'_, '_, '_>,
    store: &mut impl FnMut(usize, usize, &[f32]),
) {
    let b = |o: usize| bias.map_or(0.0, |b| b.data.get(o));
    if rows == 1 {
        // One token is a pure stream of weights: rows one after another,
        // which the DRAM prefetchers follow best (measured: interleaved
        // rows read the lm head at half the rate), many rows per call.
        let mut buf = [0.0f32; 64];
        let mut o = f0;
        while o < f1 {
            let n = (f1 - o).min(buf.len());
            // SAFETY: rows o..o+n are in bounds (asserted above);
            // enable_avx512's contract gives the CPU features.
            unsafe { x86::gemv(w, k, o, x, &mut buf[..n]) };
            for (i, v) in buf[..n].iter_mut().enumerate() {
                *v += b(o + i);
            }
            store(0, o, &buf[..n]);
            o += n;
        }
        return;
    }
    let panel = (PANEL_BYTES / (k * esize).max(1)).max(TILE_R) / TILE_R * TILE_R;
    let mut p0 = f0;
    while p0 < f1 {
        let p1 = (p0 + panel).min(f1);
        // While this panel computes, the next one is fetched from memory in
        // even shares per tile, in address order (interleaved tile rows
        // alone defeat the hardware prefetchers: measured at half the rate).
        let next = (p1 * k * esize, (p1 + panel).min(f1) * k * esize);
        let tiles = rows.div_ceil(TILE_T) * (p1 - p0).div_ceil(TILE_R);
        let share = (next.1 - next.0).div_ceil(tiles.max(1)).next_multiple_of(64);
        let mut fetched = next.0;
        let mut t0 = 0;
        while t0 < rows {
            let nt = (rows - t0).min(TILE_T);
            let mut o = p0;
            while o < p1 {
                let nr = if p1 - o >= TILE_R { TILE_R } else { 1 };
                if fetched < next.1 {
                    let len = share.min(next.1 - fetched);
                    x86::prefetch(w.bytes(), fetched, len);
                    fetched += len;
                }
                // SAFETY: features and rows are in bounds (asserted above);
                // enable_avx512's contract gives the CPU features.
                let tile = unsafe { x86::tile_dyn(w, k, o, nr, x, t0, nt) };
                let bias: [f32; TILE_R] = core::array::from_fn(|r| if r < nr { b(o + r) } else { 0.0 });
                for (j, t) in (t0..t0 + nt).enumerate() {
                    // Token t's nr consecutive features, stored at once.
                    let vals: [f32; TILE_R] = core::array::from_fn(|r| tile[r][j] + bias[r]);
                    store(t, o, &vals[..nr]);
                }
                o += nr;
            }
            t0 += nt;
        }
        p0 = p1;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{TILE_R, TILE_T};
    use core::arch::x86_64::*;
    use half::{bf16, f16};

    /// Ask for bytes `start..start + len` of `base` in L2: a hint that never
    /// faults, so the range need not be in bounds (addresses are wrapped, not
    /// dereferenced).
    #[inline]
    pub fn prefetch(base: *const u8, start: usize, len: usize) {
        let mut off = 0;
        while off < len {
            // SAFETY: a prefetch has no effect on memory and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(start + off) as *const i8) };
            off += 64;
        }
    }

    /// Where a tile reads a weight row: sixteen weights at a time, widened
    /// to f32 in a register.
    pub trait Rows16: Copy {
        /// Weights `i..i+16`.
        /// # Safety
        /// They are readable; AVX-512 F/BW/VL are available.
        unsafe fn load16(self, i: usize) -> __m512;
        /// Weights `i..i+32` (`i` a multiple of 32) as two registers.
        /// # Safety
        /// As [`Rows16::load16`].
        #[inline(always)]
        unsafe fn load32(self, i: usize) -> [__m512; 2] {
            [self.load16(i), self.load16(i + 16)]
        }
        /// The first `count(m)` weights from `i`, zeros elsewhere (`m` is a low mask).
        /// # Safety
        /// The lanes set in `m` are readable; AVX-512 F/BW/VL are available.
        unsafe fn load16_masked(self, i: usize, m: __mmask16) -> __m512;
        /// The row `r` rows of `k` weights further on.
        /// # Safety
        /// That row is in bounds (`k` a multiple of the block for Q8_0).
        unsafe fn row(self, r: usize, k: usize) -> Self;
        /// The bytes the weights stream from (for prefetch hints).
        fn bytes(self) -> *const u8;
    }

    impl<W: Widen16> Rows16 for *const W {
        #[inline(always)]
        unsafe fn load16(self, i: usize) -> __m512 {
            W::load16(self.add(i))
        }
        #[inline(always)]
        unsafe fn load16_masked(self, i: usize, m: __mmask16) -> __m512 {
            W::load16_masked(self.add(i), m)
        }
        #[inline(always)]
        unsafe fn row(self, r: usize, k: usize) -> Self {
            self.add(r * k)
        }
        fn bytes(self) -> *const u8 {
            self as *const u8
        }
    }

    /// Rows of Q8_0 blocks: the int8 quants and their f16 scales, one per 32.
    #[derive(Clone, Copy)]
    pub struct Q8Rows {
        pub q: *const i8,
        pub d: *const f16,
    }

    impl Q8Rows {
        /// The scale of weight `i`'s block, broadcast.
        #[inline(always)]
        unsafe fn scale(self, i: usize) -> __m512 {
            _mm512_cvtph_ps(_mm256_set1_epi16((*self.d.add(i / crate::tensor::Q8_BLOCK)).to_bits() as i16))
        }
    }

    /// `q * d` is exact in f32, so these equal f32 weights dequantized first.
    impl Rows16 for Q8Rows {
        #[inline(always)]
        unsafe fn load16(self, i: usize) -> __m512 {
            let q =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(self.q.add(i) as *const __m128i)));
            _mm512_mul_ps(q, self.scale(i))
        }
        #[inline(always)]
        unsafe fn load32(self, i: usize) -> [__m512; 2] {
            let s = self.scale(i);
            let lo =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(self.q.add(i) as *const __m128i)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                self.q.add(i + 16) as *const __m128i
            )));
            [_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s)]
        }
        #[inline(always)]
        unsafe fn load16_masked(self, i: usize, m: __mmask16) -> __m512 {
            let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, self.q.add(i))));
            _mm512_mul_ps(q, self.scale(i))
        }
        #[inline(always)]
        unsafe fn row(self, r: usize, k: usize) -> Self {
            Q8Rows { q: self.q.add(r * k), d: self.d.add(r * k / crate::tensor::Q8_BLOCK) }
        }
        fn bytes(self) -> *const u8 {
            self.q as *const u8
        }
    }

    /// Sixteen stored weights widened to f32 in a register.
    pub trait Widen16: Copy {
        /// # Safety
        /// `p` points at 16 readable elements; AVX-512 F/BW/VL are available.
        unsafe fn load16(p: *const Self) -> __m512;
        /// The first `count(m)` lanes from `p`, zeros elsewhere (`m` is a low mask).
        /// # Safety
        /// The lanes set in `m` are readable; AVX-512 F/BW/VL are available.
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512;
    }

    impl Widen16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
    }

    /// bf16 is the top half of an f32: zero-extend and shift.
    #[inline(always)]
    unsafe fn bf16_bits_to_ps(h: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    impl Widen16 for bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            bf16_bits_to_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512 {
            bf16_bits_to_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
        }
    }

    impl Widen16 for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
        }
    }

    /// `out[r][t] = w[r] . x[t]` over `k` elements.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; each `w[r]` and `x[t]` points at `k`
    /// readable elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn tile<W: Rows16, const R: usize, const T: usize>(
        w: [W; R],
        x: [*const f32; T],
        k: usize,
    ) -> [[f32; T]; R] {
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        let mut i = 0;
        while i + 32 <= k {
            let mut wv = [[_mm512_setzero_ps(); 2]; R];
            for r in 0..R {
                wv[r] = w[r].load32(i);
            }
            for t in 0..T {
                let xv = [_mm512_loadu_ps(x[t].add(i)), _mm512_loadu_ps(x[t].add(i + 16))];
                for r in 0..R {
                    for c in 0..2 {
                        acc[r][t][c] = _mm512_fmadd_ps(wv[r][c], xv[c], acc[r][t][c]);
                    }
                }
            }
            i += 32;
        }
        // At most two blocks left: a full one (even chain), then a masked one.
        let mut c = 0;
        while i < k {
            let m = if k - i >= 16 { 0xffff } else { ((1u32 << (k - i)) - 1) as __mmask16 };
            let mut wv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                wv[r] = w[r].load16_masked(i, m);
            }
            for t in 0..T {
                let xv = _mm512_maskz_loadu_ps(m, x[t].add(i));
                for r in 0..R {
                    acc[r][t][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][t][c]);
                }
            }
            i += 16;
            c = 1;
        }
        let mut out = [[0.0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
            }
        }
        out
    }

    /// `out[i] = w[o + i] . x` for `out.len()` rows of `w` (`[_, k]`); `x`: `[k]`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; rows `o..o+out.len()` of `w` and `k`
    /// elements of `x` are in bounds.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn gemv<W: Rows16>(w: W, k: usize, o: usize, x: &[f32], out: &mut [f32]) {
        let wp = w.row(o, k);
        for (i, v) in out.iter_mut().enumerate() {
            *v = tile::<W, 1, 1>([wp.row(i, k)], [x.as_ptr()], k)[0][0];
        }
    }

    /// A tile of `nr` (1 or [`TILE_R`]) weight rows from row `o` of `w`
    /// (`[_, k]`) against `nt` (1..=[`TILE_T`]) rows from row `t0` of `x`
    /// (`[_, k]`); the first `nr` x `nt` values of the result are set.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; rows `o..o+nr` of `w` and `t0..t0+nt`
    /// of `x` are in bounds.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_dyn<W: Rows16>(
        w: W,
        k: usize,
        o: usize,
        nr: usize,
        x: &[f32],
        t0: usize,
        nt: usize,
    ) -> [[f32; TILE_T]; TILE_R] {
        let wp = w.row(o, k);
        let xp = x.as_ptr().add(t0 * k);
        let rows = |i: usize| wp.row(i, k);
        let toks = |j: usize| xp.add(j * k);
        let mut out = [[0.0f32; TILE_T]; TILE_R];
        macro_rules! run {
            ($r:literal, $($t:literal)*) => {
                match nt {
                    $($t => {
                        let v = tile::<W, $r, $t>(
                            core::array::from_fn(rows),
                            core::array::from_fn(toks),
                            k,
                        );
                        for (dst, src) in out.iter_mut().zip(v.iter()) {
                            dst[..$t].copy_from_slice(src);
                        }
                    })*
                    _ => unreachable!("token block of {nt}"),
                }
            };
        }
        if nr == TILE_R {
            run!(3, 1 2 3 4);
        } else {
            run!(1, 1 2 3 4);
        }
        out
    }
}

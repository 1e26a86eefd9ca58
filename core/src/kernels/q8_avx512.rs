//! Q8_0 products in integers on x86-64 AVX-512, chosen with the tiles
//! ([`super::simd::avx512_enabled`]).
//!
//! The activations are quantized to int16, one f32 scale per block of 32
//! (the weights' blocks), and a block's 32 products are summed exactly by
//! `vpmaddwd` into 16 int32 lanes. Per 32 weights that is one widening,
//! one multiply-add, one conversion and one FMA, where dequantizing to f32
//! takes two widenings, conversions, scalings and FMAs: batch-1 decode in
//! Q8_0 was bound by those instructions, not by memory.
//!
//! Rounding an activation costs at most half a step of 1/32767 of its
//! block's largest magnitude, far below the weights' own 1/254: a product
//! is within `sum |w| * max|x_block| / 65534` of the dequantized f32
//! product. Every path (one row, tiles of any shape, `dot`) runs the same
//! operations in the same order, so ragged = solo and threaded = sequential
//! hold bit for bit as for the float kernels.
#![allow(unsafe_code)]

/// Widest row (`k`) quantized on the stack; wider products dequantize
/// instead (every published Mamba-1 is at most 5,120).
pub const MAX_K: usize = 8192;
/// Token rows quantized at a time: the tiles' token block.
pub const ROWS: usize = super::avx512::TILE_T;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MAX_K, ROWS};
    use crate::kernels::avx512::x86::{reduce_pairs, Q8Rows, Rows16};
    use crate::tensor::Q8_BLOCK;
    use core::arch::x86_64::*;
    use core::mem::MaybeUninit;
    use half::f16;

    const MAX_BLOCKS: usize = MAX_K / Q8_BLOCK;
    /// The largest int16 level an activation is scaled to.
    const LEVELS: f32 = 32767.0;
    /// Blocks whose largest magnitude is below this quantize to zero
    /// (`LEVELS / m` would overflow near f32's smallest normals).
    const TINY: f32 = 1e-30;

    /// Up to [`ROWS`] activation rows of `k` (a multiple of 32) quantized:
    /// int16 values and one f32 scale (`max |x| / 32767`) per block.
    pub struct QuantRows {
        q: [MaybeUninit<i16>; ROWS * MAX_K],
        s: [MaybeUninit<f32>; ROWS * MAX_BLOCKS],
        k: usize,
    }

    impl QuantRows {
        /// Room for rows of `k` values; `None` if `k` is not a whole number
        /// of blocks or is wider than [`MAX_K`].
        pub fn new(k: usize) -> Option<Self> {
            (k <= MAX_K && k.is_multiple_of(Q8_BLOCK)).then_some(QuantRows {
                q: [MaybeUninit::uninit(); ROWS * MAX_K],
                s: [MaybeUninit::uninit(); ROWS * MAX_BLOCKS],
                k,
            })
        }

        /// Quantize rows `t0..t0 + nt` (`nt <= ROWS`) of `x`, `stride` apart (`k` each), into rows `0..nt`.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL are available; those rows of `x` are in bounds.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        pub unsafe fn quantize(&mut self, x: &[f32], stride: usize, t0: usize, nt: usize) {
            debug_assert!(nt <= ROWS && (nt == 0 || (t0 + nt - 1) * stride + self.k <= x.len()));
            let nb = self.k / Q8_BLOCK;
            for j in 0..nt {
                let xr = x.as_ptr().add((t0 + j) * stride);
                let q = self.q.as_mut_ptr().add(j * MAX_K) as *mut i16;
                let s = self.s.as_mut_ptr().add(j * MAX_BLOCKS) as *mut f32;
                for b in 0..nb {
                    let v0 = _mm512_loadu_ps(xr.add(b * Q8_BLOCK));
                    let v1 = _mm512_loadu_ps(xr.add(b * Q8_BLOCK + 16));
                    let m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                    // A NaN or an infinity makes the block's scale NaN, so
                    // the product is NaN as the float product would be.
                    let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v0, v1) != 0 || !m.is_finite();
                    let (inv, scale) = if bad {
                        (0.0, f32::NAN)
                    } else if m < TINY {
                        (0.0, 0.0)
                    } else {
                        (LEVELS / m, m / LEVELS)
                    };
                    let inv = _mm512_set1_ps(inv);
                    // Round to nearest even (the default MXCSR mode); |v * inv| <= 32767.
                    let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
                    let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
                    _mm256_storeu_si256(q.add(b * Q8_BLOCK) as *mut __m256i, _mm512_cvtsepi32_epi16(i0));
                    _mm256_storeu_si256(q.add(b * Q8_BLOCK + 16) as *mut __m256i, _mm512_cvtsepi32_epi16(i1));
                    *s.add(b) = scale;
                }
            }
        }

        /// The row length.
        pub fn k(&self) -> usize {
            self.k
        }

        /// Row `j`'s values and block scales (valid after [`Self::quantize`] set it).
        fn row(&self, j: usize) -> (*const i16, *const f32) {
            (
                self.q.as_ptr().wrapping_add(j * MAX_K) as *const i16,
                self.s.as_ptr().wrapping_add(j * MAX_BLOCKS) as *const f32,
            )
        }
    }

    /// `out[r][t] = w row (o + r) . x row t` for `R` weight rows of `k`
    /// (a multiple of 32) from `o` and the first `T` quantized rows of `x`.
    ///
    /// Each (row, token) pair keeps two 16-lane f32 accumulators, for the
    /// even and the odd blocks; block `b` adds lane `j` of
    /// `q[2j] x[2j] + q[2j+1] x[2j+1]` (exact in int32, then exact in f32:
    /// below 2^24) times `d_w[b] * d_x[b]` by one FMA. The two are added and
    /// reduced in `_mm512_reduce_add_ps`'s tree ([`reduce_pairs`]), as the float tiles.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; rows `o..o + R` of `w` are in bounds;
    /// rows `0..T` of `x` are quantized.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn tile<const R: usize, const T: usize>(
        w: Q8Rows,
        k: usize,
        o: usize,
        x: &QuantRows,
    ) -> [[f32; T]; R] {
        let nb = k / Q8_BLOCK;
        let wr: [(*const i8, *const f16); R] = core::array::from_fn(|r| {
            let row = w.row(o + r, k);
            (row.q, row.d)
        });
        let xr: [(*const i16, *const f32); T] = core::array::from_fn(|t| x.row(t));
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        // d_w * d_x of 16 blocks for every pair, made 16 at a time.
        let mut scale = [[[0.0f32; 16]; T]; R];
        let mut g = 0;
        while g < nb {
            let n = (nb - g).min(16);
            let m = (u32::MAX >> (32 - n)) as __mmask16;
            let mut dw = [_mm512_setzero_ps(); R];
            for r in 0..R {
                dw[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, wr[r].1.add(g) as *const i16));
            }
            for t in 0..T {
                let dx = _mm512_maskz_loadu_ps(m, xr[t].1.add(g));
                for r in 0..R {
                    _mm512_storeu_ps(scale[r][t].as_mut_ptr(), _mm512_mul_ps(dw[r], dx));
                }
            }
            // Block `g + j` goes to chain `c` = `j % 2` (`g` is even).
            macro_rules! block {
                ($j:expr, $c:expr) => {{
                    let (j, c) = ($j, $c);
                    let i = (g + j) * Q8_BLOCK;
                    let mut wv = [_mm512_setzero_si512(); R];
                    for r in 0..R {
                        wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(wr[r].0.add(i) as *const __m256i));
                    }
                    for t in 0..T {
                        let xv = _mm512_loadu_si512(xr[t].0.add(i) as *const __m512i);
                        for r in 0..R {
                            let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(wv[r], xv));
                            acc[r][t][c] = _mm512_fmadd_ps(p, _mm512_set1_ps(scale[r][t][j]), acc[r][t][c]);
                        }
                    }
                }};
            }
            let mut j = 0;
            while j + 2 <= n {
                block!(j, 0);
                block!(j + 1, 1);
                j += 2;
            }
            if j < n {
                block!(j, 0);
            }
            g += 16;
        }
        reduce_pairs(&acc)
    }
}

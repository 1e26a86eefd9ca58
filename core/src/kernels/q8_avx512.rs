//! Q8_0 products in integers on x86-64 AVX-512 with VNNI, chosen with the
//! tiles ([`super::simd::vnni_enabled`]).
//!
//! The activations are quantized to int8 as GGUF's Q8_0 (and llama.cpp's
//! Q8_0 products) do: one f32 scale, `max |x| / 127`, per block of 32, the
//! weights' blocks. `vpdpbusd` sums a block's 32 products exactly into
//! eight int32 lanes (on 256-bit registers, which Zen 4 runs two a cycle),
//! then one conversion and one FMA scale the block by `d_w * d_x`: per 32
//! weights and token three half-width instructions, where int16
//! activations took three full-width ones and dequantizing to f32 nine.
//!
//! `vpdpbusd` multiplies unsigned bytes by signed ones. The weights are
//! made unsigned by flipping their top bit (`w + 128`, one xor a row and
//! block for all tokens), and each lane's sum starts from `-128` times its
//! four activations' sum, made once when the activations are quantized:
//! `sum (w + 128) x - 128 sum x = sum w x`, exactly.
//!
//! Rounding an activation costs at most half a step of 1/127 of its
//! block's largest magnitude: a product is within
//! `sum |w| * max|x_block| / 254` of the dequantized f32 product (the
//! weights' own rounding is of the same size). Every path (one row, tiles
//! of any shape, `dot`) runs the same operations in the same order, so
//! ragged = solo and threaded = sequential hold bit for bit as for the
//! float kernels.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    // The widest row (`k`) quantized on the stack, and the token rows quantized at a time.
    use crate::kernels::avx512::x86::{reduce_pairs, Q8Rows, Rows16};
    use crate::kernels::avx512::{STAGED_K as MAX_K, TILE_T as ROWS};
    use crate::tensor::Q8_BLOCK;
    use core::arch::x86_64::*;
    use core::mem::MaybeUninit;
    use half::f16;

    const MAX_BLOCKS: usize = MAX_K / Q8_BLOCK;
    /// The largest int8 level an activation is scaled to.
    const LEVELS: f32 = 127.0;
    /// Blocks whose largest magnitude is below this quantize to zero
    /// (`LEVELS / m` would overflow near f32's smallest normals).
    const TINY: f32 = 1e-30;
    /// A `vpdpbusd` lane sums four byte products: a block is 8 lanes.
    const LANES: usize = Q8_BLOCK / 4;

    /// Up to [`ROWS`] activation rows of `k` (a multiple of 32) quantized:
    /// int8 values, one f32 scale (`max |x| / 127`) per block, and per block
    /// the eight lanes' `-128 * (sum of the lane's four values)`. Rows are
    /// `k` apart, not `MAX_K`: rows a multiple of 4 KiB apart fall in the
    /// same L1 sets and evict each other (measured: a third of the speed).
    pub struct QuantRows {
        q: [MaybeUninit<i8>; ROWS * MAX_K],
        s: [MaybeUninit<f32>; ROWS * MAX_BLOCKS],
        c: [MaybeUninit<i32>; ROWS * MAX_BLOCKS * LANES],
        k: usize,
    }

    impl QuantRows {
        /// Room for rows of `k` values; `None` if `k` is not a whole number
        /// of blocks or is wider than [`MAX_K`].
        pub fn new(k: usize) -> Option<Self> {
            (k <= MAX_K && k.is_multiple_of(Q8_BLOCK)).then_some(QuantRows {
                q: [MaybeUninit::uninit(); ROWS * MAX_K],
                s: [MaybeUninit::uninit(); ROWS * MAX_BLOCKS],
                c: [MaybeUninit::uninit(); ROWS * MAX_BLOCKS * LANES],
                k,
            })
        }

        /// Quantize rows `t0..t0 + nt` (`nt <= ROWS`) of `x`, `stride` apart (`k` each), into rows `0..nt`.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL and VNNI are available; those rows of `x` are in bounds.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn quantize(&mut self, x: &[f32], stride: usize, t0: usize, nt: usize) {
            debug_assert!(nt <= ROWS && (nt == 0 || (t0 + nt - 1) * stride + self.k <= x.len()));
            let nb = self.k / Q8_BLOCK;
            let top = _mm256_set1_epi8(-128);
            for j in 0..nt {
                let xr = x.as_ptr().add((t0 + j) * stride);
                let q = self.q.as_mut_ptr().add(j * self.k) as *mut i8;
                let s = self.s.as_mut_ptr().add(j * nb) as *mut f32;
                let c = self.c.as_mut_ptr().add(j * nb * LANES) as *mut i32;
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
                    // Round to nearest even (the default MXCSR mode); |v * inv| <= 127
                    // (saturated should rounding of `inv` overshoot).
                    let i0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)));
                    let i1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)));
                    let v = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(i0), i1);
                    _mm256_storeu_si256(q.add(b * Q8_BLOCK) as *mut __m256i, v);
                    // 128 * the lanes' sums (|.| <= 4 * 127 * 128), negated.
                    let sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), top, v);
                    _mm256_storeu_si256(
                        c.add(b * LANES) as *mut __m256i,
                        _mm256_sub_epi32(_mm256_setzero_si256(), sum),
                    );
                    *s.add(b) = scale;
                }
            }
        }

        /// The row length.
        pub fn k(&self) -> usize {
            self.k
        }

        /// Row `j`'s values, block scales and lane corrections (valid after
        /// [`Self::quantize`] set it).
        fn row(&self, j: usize) -> (*const i8, *const f32, *const i32) {
            let nb = self.k / Q8_BLOCK;
            (
                self.q.as_ptr().wrapping_add(j * self.k) as *const i8,
                self.s.as_ptr().wrapping_add(j * nb) as *const f32,
                self.c.as_ptr().wrapping_add(j * nb * LANES) as *const i32,
            )
        }
    }

    /// `out[r][i][t] = w row (o[r] + i) . x row t` for the first `T`
    /// quantized rows of `x`: `R` runs of rows (of one length), each one
    /// row after another (as [`crate::kernels::avx512::x86::gemv_tokens`]),
    /// a row of each at a time, each row read once for all the tokens.
    ///
    /// [`tile`]'s arithmetic for one pair on 512-bit registers: the lanes
    /// of an even block and of the odd one after it side by side, so one
    /// `vpdpbusd`, one conversion and one FMA (its scales permuted into
    /// place) do two blocks. Each lane sees the same operations in the same
    /// order as in [`tile`]'s two chains (the same bits: `core/tests/q8.rs`),
    /// in half the instructions. Measured: batch-1 decode 155.8 -> 171.3
    /// tok/s against the 1 x 1 tile; a 256-bit block at a time read no
    /// faster (unlike the float rows). A row is one FMA chain a token: the
    /// runs side by side give the core independent chains to overlap.
    /// A small batch's decode step against the tiles of interleaved rows
    /// (130m, three alternations, fast minutes, decode tok/s): batch 2 266
    /// -> 321 on one run, 378 on two; batch 4 346 -> 404, 465.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and VNNI are available; rows `o[r]..o[r] +
    /// out[r].len()` of `w` are in bounds; rows `0..T` of `x` are quantized.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn gemv_tokens<const R: usize, const T: usize>(
        w: Q8Rows,
        o: [usize; R],
        x: &QuantRows,
        mut out: [&mut [[f32; T]]; R],
    ) {
        let (k, nb) = (x.k, x.k / Q8_BLOCK);
        let mut xr = [(core::ptr::null::<i8>(), core::ptr::null::<f32>(), core::ptr::null::<i32>()); T];
        for (t, xr) in xr.iter_mut().enumerate() {
            *xr = x.row(t);
        }
        let top = _mm512_set1_epi8(-128);
        // Lanes 0..8 from scale `j`, lanes 8..16 from `j + 1`, for j = 0.
        let pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let len = out.iter().map(|run| run.len()).min().unwrap_or(0);
        for i in 0..len {
            let mut rows = [w; R];
            for (row, o) in rows.iter_mut().zip(o) {
                *row = w.row(o + i, k);
            }
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let mut g = 0;
            while g < nb {
                let n = (nb - g).min(16);
                let m = (u32::MAX >> (32 - n)) as __mmask16;
                let mut dx = [_mm512_setzero_ps(); T];
                for (d, xr) in dx.iter_mut().zip(&xr) {
                    *d = _mm512_maskz_loadu_ps(m, xr.1.add(g));
                }
                let mut scale = [[_mm512_setzero_ps(); T]; R];
                for (s, row) in scale.iter_mut().zip(&rows) {
                    let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row.d.add(g) as *const i16));
                    for (s, dx) in s.iter_mut().zip(dx) {
                        *s = _mm512_mul_ps(dw, dx);
                    }
                }
                let mut j = 0;
                while j + 2 <= n {
                    let at = (g + j) * Q8_BLOCK;
                    let idx = _mm512_add_epi32(pair, _mm512_set1_epi32(j as i32));
                    for r in 0..R {
                        let wv = _mm512_xor_si512(_mm512_loadu_si512(rows[r].q.add(at) as *const _), top);
                        for t in 0..T {
                            let xv = _mm512_loadu_si512(xr[t].0.add(at) as *const _);
                            let cv = _mm512_loadu_si512(xr[t].2.add((g + j) * LANES) as *const _);
                            let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cv, wv, xv));
                            acc[r][t] =
                                _mm512_fmadd_ps(p, _mm512_permutexvar_ps(idx, scale[r][t]), acc[r][t]);
                        }
                    }
                    j += 2;
                }
                if j < n {
                    // The last block alone: even lanes only, the odd ones kept.
                    let at = (g + j) * Q8_BLOCK;
                    let idx = _mm512_set1_epi32(j as i32);
                    for r in 0..R {
                        let wv = _mm256_xor_si256(
                            _mm256_loadu_si256(rows[r].q.add(at) as *const __m256i),
                            _mm512_castsi512_si256(top),
                        );
                        for t in 0..T {
                            let xv = _mm256_loadu_si256(xr[t].0.add(at) as *const __m256i);
                            let cv = _mm256_loadu_si256(xr[t].2.add((g + j) * LANES) as *const __m256i);
                            let p =
                                _mm512_castps256_ps512(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(cv, wv, xv)));
                            acc[r][t] = _mm512_mask3_fmadd_ps(
                                p,
                                _mm512_permutexvar_ps(idx, scale[r][t]),
                                acc[r][t],
                                0x00ff,
                            );
                        }
                    }
                }
                g += 16;
            }
            for (run, acc) in out.iter_mut().zip(acc) {
                for (v, acc) in run[i].iter_mut().zip(acc) {
                    *v = reduce_pairs::<1, 1>(&[[[acc, _mm512_setzero_ps()]]])[0][0];
                }
            }
        }
    }

    /// `out[r][t] = w row (o + r) . x row t` for `R` weight rows of `k`
    /// (a multiple of 32) from `o` and the first `T` quantized rows of `x`.
    ///
    /// Each (row, token) pair keeps two 8-lane f32 accumulators, for the
    /// even and the odd blocks; block `b` adds lane `j` of
    /// `sum_{i<4} q[4j+i] x[4j+i]` (exact in int32, then exact in f32:
    /// below 2^24) times `d_w[b] * d_x[b]` by one FMA. The two side by side
    /// in one register are reduced in `_mm512_reduce_add_ps`'s tree
    /// ([`reduce_pairs`]), as the float tiles: the chains' lanes added,
    /// then the eight sums in halves.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and VNNI are available; rows `o..o + R` of `w` are
    /// in bounds; rows `0..T` of `x` are quantized.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    pub unsafe fn tile<const R: usize, const T: usize>(
        w: Q8Rows,
        k: usize,
        o: usize,
        x: &QuantRows,
    ) -> [[f32; T]; R] {
        let nb = k / Q8_BLOCK;
        let mut wr = [(core::ptr::null::<i8>(), core::ptr::null::<f16>()); R];
        for (r, wr) in wr.iter_mut().enumerate() {
            let row = w.row(o + r, k);
            *wr = (row.q, row.d);
        }
        let mut xr = [(core::ptr::null::<i8>(), core::ptr::null::<f32>(), core::ptr::null::<i32>()); T];
        for (t, xr) in xr.iter_mut().enumerate() {
            *xr = x.row(t);
        }
        let top = _mm256_set1_epi8(-128);
        let mut acc = [[[_mm256_setzero_ps(); 2]; T]; R];
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
            // Read back from memory, as broadcasts folded into the FMAs:
            // kept in registers, LLVM extracts each lane with shuffles.
            let scale = core::hint::black_box(&scale);
            // Block `g + j` goes to chain `c` = `j % 2` (`g` is even).
            macro_rules! block {
                ($j:expr, $c:expr) => {{
                    let (j, c) = ($j, $c);
                    let i = (g + j) * Q8_BLOCK;
                    let mut wv = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        wv[r] = _mm256_xor_si256(_mm256_loadu_si256(wr[r].0.add(i) as *const __m256i), top);
                    }
                    for t in 0..T {
                        let xv = _mm256_loadu_si256(xr[t].0.add(i) as *const __m256i);
                        let cv = _mm256_loadu_si256(xr[t].2.add((g + j) * LANES) as *const __m256i);
                        for r in 0..R {
                            let p = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(cv, wv[r], xv));
                            acc[r][t][c] = _mm256_fmadd_ps(p, _mm256_set1_ps(scale[r][t][j]), acc[r][t][c]);
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
        let mut both = [[[_mm512_setzero_ps(); 2]; T]; R];
        for r in 0..R {
            for t in 0..T {
                let [even, odd] = acc[r][t];
                // (`insertf64x4`: `insertf32x8` would need AVX-512 DQ.)
                both[r][t][0] = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castpd256_pd512(_mm256_castps_pd(even)),
                    _mm256_castps_pd(odd),
                ));
            }
        }
        reduce_pairs(&both)
    }
}

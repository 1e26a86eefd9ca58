//! bf16 products with AVX-512 BF16's dot-product instruction, on request
//! ([`super::simd::enable_bf16_dot`]).
//!
//! `vdpbf16ps` multiplies two pairs of bf16 values and adds both products
//! to an f32 lane: 32 products an instruction where an f32 FMA makes 16,
//! and the weights go in as stored, with no widening. Both operands are
//! bf16, so the activations are rounded to bf16 (ties to even) once per
//! token block: up to 2^-9 of each activation, as llama.cpp's BF16
//! products and PyTorch's bf16 compute round them. That leaves the f32
//! reference (logits within 1e-3 of float64), so the runtime only takes
//! this path when asked; the README reports its accuracy.
//!
//! Each (row, token) pair keeps two 16-lane accumulators, for the even and
//! the odd blocks of 32 along `k` (the last block masked, zeros past `k`),
//! reduced as the float tiles reduce theirs (`avx512::x86::reduce_pairs`). Every path
//! (one row, tiles of any shape, `dot`) runs the same operations in the
//! same order, so ragged = solo, threaded = sequential and prefill = step
//! hold bit for bit, as for the float kernels.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    // The widest row (`k`) rounded on the stack, and the token rows rounded at a time.
    use crate::kernels::avx512::x86::{join256, reduce_pairs};
    use crate::kernels::avx512::{STAGED_K as MAX_K, TILE_T as ROWS};
    use core::arch::x86_64::*;
    use core::mem::MaybeUninit;
    use half::bf16;

    /// bf16 values a 512-bit register holds (16 pairs).
    const BLOCK: usize = 32;

    /// Up to [`ROWS`] activation rows of `k` rounded to bf16. Rows are `k`
    /// apart, not `MAX_K`: rows a multiple of 4 KiB apart fall in the same
    /// L1 sets (as [`super::super::q8_avx512`]'s rows).
    pub struct Bf16Rows {
        v: [MaybeUninit<u16>; ROWS * MAX_K],
        k: usize,
    }

    /// The low `n` (< 32) lanes.
    #[inline(always)]
    fn low32(n: usize) -> __mmask32 {
        (1u32 << n) - 1
    }

    impl Bf16Rows {
        /// Room for rows of `k` values; `None` if `k` is wider than [`MAX_K`].
        pub fn new(k: usize) -> Option<Self> {
            (k <= MAX_K).then_some(Bf16Rows { v: [MaybeUninit::uninit(); ROWS * MAX_K], k })
        }

        /// Round rows `t0..t0 + nt` (`nt <= ROWS`) of `x`, `stride` apart
        /// (`k` each), into rows `0..nt`: ties to even, NaN stays NaN.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL and BF16 are available; those rows of `x` are in bounds.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        pub unsafe fn round(&mut self, x: &[f32], stride: usize, t0: usize, nt: usize) {
            debug_assert!(nt <= ROWS && (nt == 0 || (t0 + nt - 1) * stride + self.k <= x.len()));
            let k = self.k;
            for j in 0..nt {
                let src = x.as_ptr().add((t0 + j) * stride);
                let dst = self.v.as_mut_ptr().add(j * k) as *mut u16;
                let mut i = 0;
                while i + 16 <= k {
                    let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(i)));
                    _mm256_storeu_si256(
                        dst.add(i) as *mut __m256i,
                        core::mem::transmute::<__m256bh, __m256i>(h),
                    );
                    i += 16;
                }
                if i < k {
                    let m = ((1u32 << (k - i)) - 1) as __mmask16;
                    let h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src.add(i)));
                    _mm256_mask_storeu_epi16(
                        dst.add(i) as *mut i16,
                        m,
                        core::mem::transmute::<__m256bh, __m256i>(h),
                    );
                }
            }
        }

        /// The row length.
        pub fn k(&self) -> usize {
            self.k
        }

        /// Row `j` (valid after [`Self::round`] set it).
        fn row(&self, j: usize) -> *const u16 {
            self.v.as_ptr().wrapping_add(j * self.k) as *const u16
        }
    }

    /// `out[r][i][t] = w row (o[r] + i) . x row t` for the first `T`
    /// rounded rows of `x`: `R` runs of rows (of one length), each one row
    /// after another (as [`crate::kernels::avx512::x86::gemv_tokens`]), a
    /// row of each at a time, each row read once for all the tokens.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 are available; rows `o[r]..o[r] +
    /// out[r].len()` of `w` (rows of `x.k()`) are in bounds; rows `0..T`
    /// of `x` are rounded.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn gemv_tokens<const R: usize, const T: usize>(
        w: *const bf16,
        o: [usize; R],
        x: &Bf16Rows,
        mut out: [&mut [[f32; T]]; R],
    ) {
        let k = x.k;
        let mut xr = [core::ptr::null::<u16>(); T];
        for (t, xr) in xr.iter_mut().enumerate() {
            *xr = x.row(t);
        }
        let len = out.iter().map(|run| run.len()).min().unwrap_or(0);
        for row in 0..len {
            let mut wr = [core::ptr::null::<u16>(); R];
            for (wr, o) in wr.iter_mut().zip(o) {
                *wr = w.add((o + row) * k) as *const u16;
            }
            // A 1 x 1 tile's two chains as four 256-bit quarters (lanes
            // `8q..8q + 8` of chain `q / 2`) for each pair, each lane the
            // same operations in the same order: 256-bit loads stream
            // faster from memory on Zen 4 (as
            // [`crate::kernels::avx512::x86::gemv_tokens`]' rows).
            let mut q = [[[_mm256_setzero_ps(); 4]; T]; R];
            let mut i = 0;
            while i + 2 * BLOCK <= k {
                for (wr, q) in wr.iter().zip(q.iter_mut()) {
                    for j in 0..4 {
                        let at = i + 16 * j;
                        let wv = core::mem::transmute::<__m256i, __m256bh>(_mm256_loadu_si256(
                            wr.add(at) as *const _
                        ));
                        for (q, xr) in q.iter_mut().zip(&xr) {
                            let xv = core::mem::transmute::<__m256i, __m256bh>(_mm256_loadu_si256(
                                xr.add(at) as *const _,
                            ));
                            q[j] = _mm256_dpbf16_ps(q[j], wv, xv);
                        }
                    }
                }
                i += 2 * BLOCK;
            }
            let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
            for (a, q) in acc.iter_mut().zip(&q) {
                for (a, q) in a.iter_mut().zip(q) {
                    *a = [join256(q[0], q[1]), join256(q[2], q[3])];
                }
            }
            let v = finish::<R, T>(wr, xr, k, i, acc);
            for (run, v) in out.iter_mut().zip(v) {
                run[row] = v;
            }
        }
    }

    /// `out[r][t] = w row (o + r) . x row t` for `R` weight rows of
    /// `x.k()` from `o` and the first `T` rounded rows of `x`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 are available; rows `o..o + R` of `w` are
    /// in bounds; rows `0..T` of `x` are rounded.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    pub unsafe fn tile<const R: usize, const T: usize>(
        w: *const bf16,
        o: usize,
        x: &Bf16Rows,
    ) -> [[f32; T]; R] {
        let k = x.k;
        let mut wr = [core::ptr::null::<u16>(); R];
        for (r, wr) in wr.iter_mut().enumerate() {
            *wr = w.add((o + r) * k) as *const u16;
        }
        let mut xr = [core::ptr::null::<u16>(); T];
        for (t, xr) in xr.iter_mut().enumerate() {
            *xr = x.row(t);
        }
        finish(wr, xr, x.k, 0, [[[_mm512_setzero_ps(); 2]; T]; R])
    }

    /// [`tile`]'s blocks from `i` on (`i` a multiple of two blocks), added
    /// to `acc`, and the pairs reduced.
    ///
    /// # Safety
    /// As [`tile`]; `wr` and `xr` are its rows.
    #[inline(always)]
    unsafe fn finish<const R: usize, const T: usize>(
        wr: [*const u16; R],
        xr: [*const u16; T],
        k: usize,
        mut i: usize,
        mut acc: [[[__m512; 2]; T]; R],
    ) -> [[f32; T]; R] {
        // The block at `i` into chain `c`: 32 values, or the lanes of mask
        // `m` (zeros elsewhere). Macros, not closures: a closure does not
        // inherit the target features, so its intrinsics would be calls.
        macro_rules! load {
            ($p:expr, full) => {
                _mm512_loadu_si512($p as *const _)
            };
            ($p:expr, $m:expr) => {
                _mm512_maskz_loadu_epi16($m, $p as *const i16)
            };
        }
        macro_rules! block {
            ($i:expr, $c:literal, $m:tt) => {{
                let i = $i;
                let mut wv = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    wv[r] = load!(wr[r].add(i), $m);
                }
                for t in 0..T {
                    let xv = core::mem::transmute::<__m512i, __m512bh>(load!(xr[t].add(i), $m));
                    for r in 0..R {
                        let wb = core::mem::transmute::<__m512i, __m512bh>(wv[r]);
                        acc[r][t][$c] = _mm512_dpbf16_ps(acc[r][t][$c], wb, xv);
                    }
                }
            }};
        }
        while i + 2 * BLOCK <= k {
            block!(i, 0, full);
            block!(i + BLOCK, 1, full);
            i += 2 * BLOCK;
        }
        // Under two blocks left: a full one (even chain), then a masked one.
        if k - i >= BLOCK {
            block!(i, 0, full);
            i += BLOCK;
            if i < k {
                let m = low32(k - i);
                block!(i, 1, m);
            }
        } else if i < k {
            let m = low32(k - i);
            block!(i, 0, m);
        }
        reduce_pairs(&acc)
    }
}
